"""The error classes pyflow raises. Every message is one line and names the object at fault."""


class PyflowError(Exception):
    """Base class: an operational error an operator can read and act on."""


class DatapathError(PyflowError):
    """The BPF datapath could not be compiled, loaded, attached or adopted."""


class DeviceError(PyflowError):
    """A network device is missing or cannot run the datapath in the asked mode."""


class MapError(PyflowError):
    """A flow-map operation failed in the kernel."""


class RequestError(PyflowError):
    """A control request refused; ``code`` is the stable machine-readable part of the answer
    (bad_request, no_such_device, already_managed ...), the message the operator's line."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
