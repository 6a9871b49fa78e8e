"""How a netlink error reads in pyflow's messages: the kernel's own words first."""

from __future__ import annotations

import errno
import os


def errno_name(code: int) -> str:
    """The kernel's name for an errno value (EOPNOTSUPP where Python says ENOTSUP)."""
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, str(code))


def error_text(exc_or_code: BaseException | int) -> str:
    """'<the kernel's extended-ack text, else strerror> (<ENAME>)' for an errno value or
    an exception carrying one (OSError.errno, pyroute2's NetlinkError.code)."""
    if isinstance(exc_or_code, int):
        code, text = abs(exc_or_code), ""
    else:
        exc = exc_or_code
        code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 0
        args = getattr(exc, "args", ())
        text = args[-1] if args and isinstance(args[-1], str) else ""
        if isinstance(exc, OSError) and exc.strerror and text == exc.strerror:
            text = ""
    return f"{text or os.strerror(code)} ({errno_name(code)})"
