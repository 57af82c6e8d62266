"""udptunnel: carry UDP datagrams both ways over one TCP connection.

A successor to Jonathan Lennox's udptunnel (Columbia University, 1999), with its command line
and its wire format.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("udptunnel")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
