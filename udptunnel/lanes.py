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
replaces it. So does one that the peer closes in order (a neighbour's, on the client's
host); the tunnel ends when the peer has closed them all, as a peer that ends it does. A
connection that takes no data for STALL_LIMIT while another does is ended; on the server,
one that looks dead gives way to a newcomer.
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
BLOCKED_UNSENT = 16 * 1024  # bytes unsent in the kernel: the connection is not keeping up
STALL_LIMIT = 5.0  # seconds one connection may take nothing while another does: then it ends
STALE_MS = 2000  # ms without an acknowledgement, data outstanding: a connection is dead
# struct tcp_info, as far as is read here: tcpi_ca_state (byte 1), tcpi_unacked (24),
# tcpi_last_ack_recv (56), tcpi_notsent_bytes (144): Linux 4.6 and later; tcpi_snd_wnd
# (228), the peer's receive window: Linux 5.19 and later.
_TCP_INFO = struct.Struct("=xB22xI28xI84xI")
_SND_WND = struct.Struct("=228xI")
_RTT = struct.Struct("=68xI")  # tcpi_rtt (68): microseconds
_RESET = struct.pack("ii", 1, 0)  # struct linger {on, 0 s}: close with a reset


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
        self.carried = usable  # it has carried datagrams (set aside since, perhaps)
        self.fd = fd_of(stream)  # a plain socket: written straight
        self.socket = _socket_of(stream)  # the TCP socket itself, TLS or not
        self.settled = trio.Event()  # greeted, or lost
        self.gone = False
        self.failure: str | None = None  # why it broke, as whichever direction saw it first
        self.blocked_since: float | None = None  # taking no data since (trio's clock)
        self.last_info: tuple[int, int, int, int, bool] | None = None  # as ``load`` read it

    def info(self) -> tuple[int, int, int, int, bool] | None:
        """What the kernel says of the connection: its congestion state, segments in
        flight, ms since the last acknowledgement, bytes unsent, and whether the peer's
        window is shut. None if it cannot say."""
        info = self._tcp_info(_SND_WND.size)
        if len(info) < _TCP_INFO.size:  # gone already (its reader will say so), or Linux < 4.6
            return None
        ca_state, unacked, last_ack, notsent = _TCP_INFO.unpack_from(info)
        shut = len(info) >= _SND_WND.size and _SND_WND.unpack_from(info)[0] == 0
        return ca_state, unacked, last_ack, notsent, shut

    def rtt(self) -> float:
        """The connection's smoothed round-trip time, in seconds; 0 if unknown."""
        info = self._tcp_info(_RTT.size)
        return _RTT.unpack_from(info)[0] / 1e6 if len(info) >= _RTT.size else 0.0

    def _tcp_info(self, size: int) -> bytes:
        """The first ``size`` bytes of the kernel's struct tcp_info (fewer from an older
        kernel); none if the connection has gone or is no TCP socket."""
        if self.socket is None:
            return b""
        try:
            return self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, size)
        except OSError:
            return b""

    def load(self) -> tuple[bool, bool, int, int]:
        """How likely a datagram written now is to be held back, least first: blocked
        (recovering from a loss, not keeping up, or the peer's window shut), bytes left
        unsent (they wait, where those in flight may well arrive), segments in flight,
        bytes unsent."""
        info = self.last_info = self.info()
        if info is None:
            return False, False, 0, 0
        ca_state, unacked, _, notsent, shut = info
        stuck = shut or notsent >= BLOCKED_UNSENT
        if not stuck:
            self.blocked_since = None
        elif self.blocked_since is None:
            self.blocked_since = trio.current_time()
        return stuck or ca_state != TCP_CA_OPEN, notsent > 0, unacked, notsent

    def stale(self, *, fresh: bool = True) -> str | None:
        """Why the connection looks dead, if it does: data outstanding and no
        acknowledgement for STALE_MS, or no data taken for STALL_LIMIT. Not ``fresh``:
        by what ``load`` read just before, without asking the kernel again."""
        info = self.info() if fresh else self.last_info
        if info is not None and info[1] > 0 and info[2] >= STALE_MS:
            return f"no acknowledgement for {info[2] / 1000:g} s"
        since = self.blocked_since
        if since is not None and trio.current_time() - since >= STALL_LIMIT:
            return f"it took no data for {STALL_LIMIT:g} s"
        return None

    def close(self) -> None:
        """Close the connection now, with a reset: it is broken, or abandoned (an orderly
        close would tell the peer that the tunnel ends)."""
        self.gone = True
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
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
        self.ended = 0  # connections that carried and have ended (lost or closed)

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
        lane.usable = lane.carried = True
        lane.settled.set()
        log.info("TCP connection %d of %d up", lane.number, self.wanted)

    def lose(self, lane: Lane, failure: TunnelError) -> bool:
        """``lane`` broke: close it and carry on without it. False if it was the last usable
        one, and the tunnel is lost with it."""
        if lane.gone:
            return True
        lane.failure = lane.failure or str(failure)
        was_usable = self._remove(lane)
        if not self.carrying():
            return False
        if was_usable:  # one that never was is the caller's to explain
            log.warning(
                "TCP connection %d of %d lost: %s; %d carry on",
                lane.number,
                self.wanted,
                lane.failure,
                self.carrying(),
            )
        return True

    def closed(self, lane: Lane) -> bool:
        """The peer closed ``lane`` in order. False if it was the last: the peer has ended
        the tunnel (an ending peer closes them all)."""
        self._remove(lane)
        if not self.carrying():
            return False
        log.info(
            "TCP connection %d of %d closed by the peer; %d carry on",
            lane.number,
            self.wanted,
            self.carrying(),
        )
        return True

    def _remove(self, lane: Lane) -> bool:
        """Close ``lane`` and forget it; whether it had carried datagrams."""
        was_usable = lane.carried and lane in self.lanes
        self.ended += was_usable
        lane.usable = False
        lane.close()
        lane.settled.set()
        if lane in self.lanes:
            self.lanes.remove(lane)
        self._changed_now()
        return was_usable

    def carrying(self) -> int:
        """How many connections carry datagrams now."""
        return sum(lane.usable and not lane.gone for lane in self.lanes)

    def room(self) -> bool:
        """Whether fewer connections are up or on their way than were asked for."""
        return len(self.lanes) < self.wanted

    def stale(self) -> tuple[Lane, str] | None:
        """A connection that looks dead (``Lane.stale``), and why, to give way to a new one."""
        for lane in self.lanes:
            if lane.usable and (why := lane.stale()) is not None:
                return lane, why
        return None

    async def changed(self) -> None:
        """Return when a connection next comes or goes."""
        await self._changed.wait()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def pick(self, tried: set[Lane]) -> Lane | None:
        """The connection to write the next batch on, of those not ``tried`` for it. A
        connection that has taken nothing for STALL_LIMIT while another takes data (its
        peer reads nothing) is ended here. None if there is none left to try."""
        lanes = self.lanes
        if len(lanes) == 1:
            only = lanes[0]
            return None if only in tried or only.gone or not only.usable else only
        usable = [lane for lane in lanes if lane.usable and not lane.gone and lane not in tried]
        if len(usable) <= 1:
            return usable[0] if usable else None
        self._turn = (self._turn + 1) % len(usable)
        count, turn = len(usable), self._turn
        loads = [lane.load() for lane in usable]
        best = min(range(count), key=lambda i: (*loads[i], (i - turn) % count))
        if loads[best][0] is False:  # one keeps up: any that has not for long is dead
            for lane in usable:
                if (why := lane.stale(fresh=False)) is not None:
                    self.lose(lane, TunnelError(why))
        return usable[best]

    async def send(self, data: memoryview) -> bool:
        """Write a batch of frames on one connection, whole. Of several: on another if the
        chosen one takes none of it at once (full, or found broken); if it breaks while
        taking it, or takes nothing more for STALL_LIMIT, the batch is lost with it.

        Returns:
            Whether the batch went out whole.

        Raises:
            TunnelError: the connection broke, and it was the last.
        """
        if self.wanted == 1:
            return await self._send_on(self.lanes[0], data, bound=math.inf)
        tried: set[Lane] = set()
        while True:
            lane = self.pick(tried)
            if lane is None:
                if not tried:
                    raise TunnelError("no TCP connection left to send on")
                await self._until_writable(tried)
                tried.clear()
                continue
            if lane.fd < 0:  # TLS: only its stream may write
                return await self._send_on(lane, data, bound=self._patience())
            try:
                sent = os.write(lane.fd, data)
            except BlockingIOError:
                tried.add(lane)
                continue
            except OSError as exc:
                lane.failure = f"TCP connection lost while sending: {exc.strerror}"
                self._set_aside(lane)
                tried.add(lane)
                continue
            if sent < len(data):  # the rest of a frame must follow on the same connection
                return await self._send_on(lane, data[sent:], bound=self._patience())
            return True

    async def _send_on(self, lane: Lane, data: memoryview, *, bound: float) -> bool:
        """Write ``data`` on ``lane``, waiting for room at most ``bound`` seconds; whether it
        all went. Of several connections, one that fails is set aside (its reader ends it)."""
        sent = 0
        if bound == math.inf and lane.fd >= 0:  # the rule: the socket takes it all at once
            try:
                sent = os.write(lane.fd, data)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise TunnelError(f"TCP connection lost while sending: {exc.strerror}") from exc
            if sent == len(data):
                return True
        with trio.move_on_after(bound):
            try:
                await lane.stream.send_all(data[sent:])
            except trio.BrokenResourceError as exc:
                failure = lost(lane.stream, exc, "sending")
                if self.wanted == 1:
                    raise failure from exc
                lane.failure = str(failure)
                self._set_aside(lane)
                return False
            except trio.ClosedResourceError:  # closed by lose(), while it waited
                if self.wanted == 1:
                    raise
                return False
            return True
        lane.failure = f"it took no data for {bound:g} s"
        self.lose(lane, TunnelError(lane.failure))
        return False

    def _patience(self) -> float:
        """How long a write may wait for room: STALL_LIMIT while another connection could
        carry the rest, without end on the only one (a slow peer, the original say)."""
        return STALL_LIMIT if self.carrying() > 1 else math.inf

    def _set_aside(self, lane: Lane) -> None:
        """A write failed on ``lane``, one of several: send no more on it. Its reader sees
        the failure too (or an end, the error having been read here), and ends it."""
        lane.usable = False

    async def _until_writable(self, lanes: set[Lane]) -> None:
        """Return when any of ``lanes`` can take data, or one of them has gone."""
        socks = [lane.socket for lane in lanes if not lane.gone and lane.socket is not None]
        numbers = {sock.fileno() for sock in socks}
        if len(numbers) < len(lanes) or -1 in numbers:
            return  # one has gone meanwhile (and its number may be another's): look again
        async with trio.open_nursery() as nursery:
            for sock in socks:
                nursery.start_soon(_writable_then, sock, nursery.cancel_scope)


async def _writable_then(sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
    """Wait until ``sock`` can take data, or is closed (ValueError: its number is gone by
    the time this runs; BusyResourceError: its number is already another connection's,
    being opened), then cancel ``scope``."""
    with contextlib.suppress(trio.ClosedResourceError, trio.BusyResourceError, OSError, ValueError):
        await trio.lowlevel.wait_writable(sock)
    scope.cancel(reason="a connection can take data, or has gone")


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under ``stream``, TLS or not; None for any other stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None
