"""A relay's TCP connections: one, as in the original, or with ``--connections N`` several
between the same two ends, so that a lost segment holds back only the datagrams sent on its
own connection until TCP repairs it (head-of-line blocking), not every datagram behind it.

Each connection keeps the original's wire format. Both ends must ask for more than one: the
client opens its further connections once the first is up; a server that asked takes them
from the first client's address while the tunnel runs, and greets each with an empty frame
(``GREETING``), which the client waits for before it sends anything on that connection.
A server that does not greet (the original, or ours without the option) leaves the client
with its one connection, which it says once.

Each batch of datagrams goes on the connection least likely to hold it back, by what the
kernel says of each (TCP_INFO): one not recovering from a loss, with the fewest segments in
flight, then the fewest bytes unsent; among equals, the next in turn. Datagrams from TCP are
sent on as each connection delivers them: across connections, their order may change, as
UDP's may.

A connection that breaks, of several, ends alone: the others carry on, and the client
replaces it. The peer closing any one of them ends the tunnel, as it does with one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import struct

import trio

from .errors import TunnelError
from .framing import HEADER
from .sockets import fd_of
from .tls import lost

log = logging.getLogger(__name__)

GREETING = HEADER.pack(0)  # a server's first frame on a further connection: an empty one
TCP_RTO_MIN_US = 45  # <linux/tcp.h>, Linux 6.15: this socket's minimum retransmission timeout
QUICK_RTO_MIN_US = 10_000  # for each of several connections (see Lanes)
TCP_CA_OPEN = 0  # <linux/tcp.h> tcp_ca_state: no loss being recovered, nothing reordered
# struct tcp_info, as far as is read here: tcpi_ca_state (byte 1), tcpi_unacked (24),
# tcpi_notsent_bytes (144). Linux 4.6 and later have it all.
_TCP_INFO = struct.Struct("=xB22xI116xI")


class Lane:
    """One TCP connection of a relay.

    Args:
        stream: what the relay reads and writes (the TLS stream, in TLS).
        number: its place among the relay's connections, from 1, for the log.
        usable: whether datagrams may be sent on it yet (a client's further connection
            waits for the server's greeting).
    """

    def __init__(self, stream: trio.abc.Stream, number: int, *, usable: bool = True) -> None:
        self.stream = stream
        self.number = number
        self.usable = usable
        self.fd = fd_of(stream)  # a plain socket: written straight
        self.socket = _socket_of(stream)  # the TCP socket itself, TLS or not
        self.settled = trio.Event()  # greeted, or lost
        self.gone = False
        self.failure: str | None = None  # why it was lost

    def load(self) -> tuple[bool, int, int]:
        """How likely a datagram written now is to be held back, least first: recovering
        from a loss, segments in flight, bytes not sent yet."""
        if self.socket is None:
            return False, 0, 0
        try:
            info = self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        except OSError:  # gone already: its reader will say so
            return True, 1 << 32, 1 << 32
        ca_state, unacked, notsent = _TCP_INFO.unpack(info)
        return ca_state != TCP_CA_OPEN, unacked, notsent

    def close(self) -> None:
        """Close the connection now, without a goodbye: it is broken."""
        self.gone = True
        if self.socket is not None:
            self.socket.close()


class Lanes:
    """The TCP connections of one relay (one port pair): the first, and those that join.

    Args:
        stream: the first connection's stream.
        wanted: how many connections both ends asked for (``--connections``).
    """

    def __init__(self, stream: trio.abc.Stream, *, wanted: int = 1) -> None:
        self.wanted = wanted
        self.lanes = [self._tuned(Lane(stream, 1))]
        self._turn = 0
        self._joined_send, self.joined = trio.open_memory_channel[Lane](math.inf)
        self._changed = trio.Event()  # a lane came or went

    def _tuned(self, lane: Lane) -> Lane:
        """Of several connections, each carries a thin share of the stream: a loss at its
        tail has no later segments to reveal it, and waits for a timeout, at least 200 ms
        by default. Where the kernel allows it per socket, that floor is lowered."""
        if self.wanted > 1 and lane.socket is not None:
            with contextlib.suppress(OSError):  # ENOPROTOOPT before Linux 6.15
                lane.socket.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US, QUICK_RTO_MIN_US)
        return lane

    @property
    def first(self) -> Lane:
        return self.lanes[0]

    def join(self, stream: trio.abc.Stream, *, usable: bool) -> Lane:
        """Add a further connection; its relay starts reading it at once."""
        numbers = {lane.number for lane in self.lanes}
        number = next(n for n in range(1, len(numbers) + 2) if n not in numbers)
        lane = self._tuned(Lane(stream, number, usable=usable))
        self.lanes.append(lane)
        self._joined_send.send_nowait(lane)
        self._changed_now()
        return lane

    def greeted(self, lane: Lane) -> None:
        """The server took ``lane``: send on it from now on."""
        lane.usable = True
        lane.settled.set()
        log.info("TCP connection %d of %d up", lane.number, self.wanted)

    def lose(self, lane: Lane, failure: TunnelError) -> bool:
        """``lane`` broke: close it and carry on without it. False if it was the last usable
        one, and the tunnel is lost with it."""
        if lane.gone:
            return True
        lane.failure = str(failure)
        lane.close()
        lane.settled.set()
        self.lanes.remove(lane)
        self._changed_now()
        if not any(other.usable for other in self.lanes):
            return False
        if lane.usable:  # one that never was is the caller's to explain
            log.warning(
                "TCP connection %d of %d lost: %s; %d carry on",
                lane.number,
                self.wanted,
                failure,
                sum(other.usable for other in self.lanes),
            )
        return True

    def room(self) -> bool:
        """Whether fewer connections are up or on their way than were asked for."""
        return len(self.lanes) < self.wanted

    async def changed(self) -> None:
        """Return when a connection next comes or goes."""
        await self._changed.wait()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def pick(self) -> Lane:
        """The connection to write the next batch on."""
        lanes = self.lanes
        if len(lanes) == 1:
            return lanes[0]
        usable = [lane for lane in lanes if lane.usable and not lane.gone]
        if len(usable) <= 1:
            return usable[0] if usable else lanes[0]
        self._turn = (self._turn + 1) % len(usable)
        count, turn = len(usable), self._turn
        best = min(range(count), key=lambda i: (*usable[i].load(), (i - turn) % count))
        return usable[best]

    async def send(self, data: memoryview) -> bool:
        """Write a batch of frames on one connection. If the chosen one is found broken
        before it took any of it, on another; if it breaks while taking it, of several, the
        batch is lost with it.

        Returns:
            Whether the batch went out whole.

        Raises:
            TunnelError: the connection broke, and it was the last.
        """
        while True:
            lane = self.pick()
            sent = 0
            if lane.fd >= 0:  # the rule: the socket takes it all at once
                try:
                    sent = os.write(lane.fd, data)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if self._set_aside(lane):
                        continue
                    raise TunnelError(f"TCP connection lost while sending: {exc.strerror}") from exc
            if sent < len(data):
                try:
                    await lane.stream.send_all(data[sent:])
                except trio.BrokenResourceError as exc:
                    if self._set_aside(lane):
                        return False
                    raise lost(lane.stream, exc, "sending") from exc
                except trio.ClosedResourceError:  # closed by lose(), while it waited
                    if self._set_aside(lane):
                        return False
                    raise
            return True

    def _set_aside(self, lane: Lane) -> bool:
        """A write failed on ``lane``: whether another connection can take the writes. The
        lane is set aside; its reader will see the failure too, and end it."""
        if len(self.lanes) == 1:
            return False
        lane.usable = False
        return any(other.usable and not other.gone for other in self.lanes)


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under ``stream``, TLS or not; None for any other stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None
