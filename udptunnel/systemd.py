"""Living under systemd, with no library: readiness, status and the watchdog, socket
activation, and the journal.

Each of these is a small documented protocol of environment variables and one datagram
socket (sd_notify(3), sd_listen_fds(3), systemd.exec(5)); outside systemd none of the
variables is set and everything here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TextIO

import trio

from .errors import TunnelError

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0  # seconds between two STATUS= lines while the tunnel runs
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first descriptor systemd passes
# A level between INFO and WARNING: what a user asked to see (SIGUSR1's counters), shown
# without -v; syslog's "notice".
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
# Python's levels as syslog priorities, for the journal's "<N>" line prefixes.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (NOTICE, 5),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


class Notifier:
    """Tells the service manager how the service is doing (sd_notify(3)).

    Every message is best-effort: a manager that has gone away must not take the tunnel
    with it.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address if address.startswith(("/", "\0")) else ""
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self.watchdog_interval = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> None:
        """Send ``READY=1``, ``STATUS=...`` and the like, one datagram."""
        if self._sock is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.debug("Cannot notify the service manager: %s", exc.strerror)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    async def run(self, status: Callable[[], str]) -> None:
        """Send ``STATUS=`` every few seconds and ``WATCHDOG=1`` at half the manager's
        interval, until cancelled."""
        if self._sock is None:
            await trio.sleep_forever()
        next_status = trio.current_time()
        next_ping = next_status if self.watchdog_interval else float("inf")
        while True:
            now = trio.current_time()
            if now >= next_ping:
                self.notify(WATCHDOG=1)
                next_ping = now + self.watchdog_interval
            if now >= next_status:
                self.notify(STATUS=status())
                next_status = now + STATUS_EVERY
            await trio.sleep_until(min(next_ping, next_status))


def _watchdog_interval(environ: Mapping[str, str]) -> float:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is on and meant for us; else 0."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0.0
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return 0.0
    return usec / 2e6 if usec > 0 else 0.0


@dataclass(frozen=True)
class ListenSocket:
    """A listening socket passed by the service manager, and its FileDescriptorName=."""

    sock: socket.socket
    name: str


def take_listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[ListenSocket]:
    """The listening sockets passed by socket activation (sd_listen_fds(3)); none if this
    process was not activated. The variables are removed, so no child takes them too.

    Raises:
        TunnelError: if a passed descriptor is not a listening TCP socket.
    """
    try:
        pid, count = int(environ.get("LISTEN_PID", "")), int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(variable, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets: list[ListenSocket] = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:
            raise TunnelError(f"descriptor {fd} from systemd: {exc.strerror}") from exc
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if not (tcp and listening):
            sock.detach()
            for taken in sockets:
                taken.sock.detach()  # systemd's, still: the process ends with this error
            raise TunnelError(f"descriptor {fd} from systemd is not a listening TCP socket")
        sock.set_inheritable(False)
        sockets.append(ListenSocket(sock, names[index] if index < len(names) else ""))
    return sockets


def writes_to_journal(environ: Mapping[str, str] = os.environ, stream: TextIO = sys.stderr) -> bool:
    """Whether ``stream`` is the journal's stream socket ($JOURNAL_STREAM, systemd.exec(5))."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


class JournalFormatter(logging.Formatter):
    """Each line starts with its syslog priority (``<6>``), which the journal reads off; the
    journal keeps its own time stamps."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{super().format(record)}"


def priority(level: int) -> int:
    """The syslog priority of a logging level."""
    for threshold, value in _PRIORITIES:
        if level >= threshold:
            return value
    return _DEBUG_PRIORITY
