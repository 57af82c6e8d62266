"""udptunnel: carry UDP datagrams both ways over one TCP connection.

A successor to Jonathan Lennox's udptunnel (Columbia University, 1999), with its command line
and its wire format.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """``__version__``, looked up when asked for: the package metadata takes a while to
    read, and the command's first step (launch.py) must come before anything slow."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("udptunnel")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
