"""pyflowctl: the command line that talks to pyflowd over its control socket."""
