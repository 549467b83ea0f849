"""dyn: one command that turns a rack of GPU servers into one inference service."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
