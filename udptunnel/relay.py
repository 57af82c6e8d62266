"""One connection at work: a task copies TCP to UDP, another copies UDP to TCP.

Every mode runs this relay: the single tunnel (one per port pair, each over a UDP socket of
its own) and every flow. Only where its datagrams come from differs (an ``Inbound``: a
socket, or a flow client's queue) and where they go (a ``UdpSender``'s destination).

Each direction has exactly one writer, so frames never interleave and TCP backpressure
reaches the UDP reader with no lock in between. The relay opens and closes nothing: it is
handed a connected stream and its UDP side, and returns when the TCP peer closes.

Speed comes from doing per-datagram work only where there is no way round it: UDP to TCP
drains every datagram waiting (up to a batch) into one reusable buffer behind its length
header and sends the batch as one TCP write; TCP to UDP reads large chunks and sends the
frames straight out of them, without copying, runs of equal size in one call (egress.py).

Overload: when datagrams arrive faster than they can leave, the tunnel drops rather than
queues. Into the tunnel, the UDP receive queue in the kernel is the only queue; it is short,
and when it is full the kernel drops the newest datagrams, at no cost to the relay, so the
relay's time goes to delivering. Out of the tunnel, when the frames in hand and those
queued behind them in the kernel would take longer than ``max_delay`` to send, the oldest
are dropped until the rest can make it: a late datagram is worth less to real-time traffic
than a current one, and dropping it is what lets the current ones through on time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from .counters import Counters
from .egress import ICMP_ERRORS, YIELD_EVERY, UdpSender
from .errors import TunnelError, leaves
from .framing import HEADER, MAX_DATAGRAM, Decoder
from .lanes import Lane, Lanes
from .sockets import UdpEnd, fd_of
from .tls import lost

log = logging.getLogger(__name__)

TCP_RECEIVE_SIZE = 64 * 1024  # per read: many frames, yet a short turn for the other task
BATCH_SIZE = 64 * 1024  # frames gathered from UDP before one TCP write
SO_MEMINFO = 55  # Linux <asm-generic/socket.h>: the socket's memory counters, drops among them
_MEMINFO = struct.Struct("9I")  # struct sk_meminfo: SK_MEMINFO_DROPS is the ninth


class Inbound(Protocol):
    """Where a relay's datagrams for the tunnel come from: a UDP socket of its own, or (a
    flow client's flow) the datagrams its dispatcher sorted out for it."""

    def drain(self, buffer: mmap.mmap, view: memoryview) -> tuple[int, int, bool]:
        """Put waiting datagrams into ``buffer``, each behind its length header, up to a
        batch; returns the bytes put, the datagrams among them, and whether none is left."""
        ...

    async def wait(self) -> None:
        """Return when more datagrams may be waiting."""
        ...


async def run_relay(
    lanes: Lanes,
    udp: UdpEnd,
    counters: Counters,
    *,
    max_delay: float,
    proof: Proof | None = None,
) -> None:
    """Carry datagrams both ways between the TCP connections of ``lanes`` and a UDP socket
    of the relay's own, until the TCP peer closes a connection (see ``carry``)."""
    sender = UdpSender(udp.sock, counters, destination=udp.destination)
    inbound = SocketInbound(udp, counters)
    await carry(lanes, inbound, sender, counters, max_delay=max_delay, proof=proof)


async def carry(
    lanes: Lanes,
    inbound: Inbound,
    sender: UdpSender,
    counters: Counters,
    *,
    max_delay: float,
    proof: Proof | None = None,
) -> None:
    """Carry datagrams both ways until the TCP peer closes a connection.

    Args:
        lanes: the TCP connection, or several (lanes.py), and those that join while the
            relay runs; this is their only reader and their only writer.
        inbound: the datagrams for the tunnel.
        sender: sends the datagrams from the tunnel.
        counters: updated as datagrams pass or are dropped.
        max_delay: seconds a frame from TCP may wait here before it is dropped as too late.
        proof: told when the first bytes, and the first whole frame, have come from TCP on
            the first connection.

    Raises:
        TunnelError: if the TCP connection breaks (reset, or a write to a closed peer), or
            of several, the last; or UDP sending fails for good.
    """
    try:
        async with trio.open_nursery() as nursery:
            stop = partial(nursery.cancel_scope.cancel, reason="the TCP peer closed the connection")
            nursery.start_soon(udp_to_tcp, inbound, lanes, counters)
            read = partial(_read_lane, lanes, sender, max_delay, stop)
            nursery.start_soon(read, lanes.first, proof, None)
            async for lane in lanes.joined:  # until the tunnel ends
                nursery.start_soon(read, lane, None, proof)
    except* TunnelError as group:
        # One break, seen by both directions at once: the first to see it says what it was.
        first = next(leaves(group))
        if proof is not None and (why := proof.unproven(group)) is not None:
            raise TunnelError(why) from first
        raise first from first.__cause__  # its own cause, kept (was_reset reads it)


class Proof(Protocol):
    """Told how far a new connection has got: its first bytes, its first whole frame; and
    asked, if the connection breaks before its first whole frame, what that means."""

    def began(self, data: bytes | bytearray = b"") -> None: ...

    def prove(self) -> None: ...

    def unproven(self, failure: BaseExceptionGroup[TunnelError]) -> str | None:
        """What a failure before the first whole frame means, if more than it says."""
        ...

    def cut_short(self) -> str | None:
        """What a connection that ended inside its first frame means, if it is a failure."""
        ...


async def run_then(stop: Callable[[], object], run: Callable[[], Awaitable[object]]) -> None:
    """Await ``run()``, then call ``stop()``: the first of several tasks to end ends them all."""
    await run()
    stop()


async def _read_lane(
    lanes: Lanes,
    sender: UdpSender,
    max_delay: float,
    stop: Callable[[], object],
    lane: Lane,
    proof: Proof | None,
    witness: Proof | None,
) -> None:
    """Read one connection to its end: the peer closing the last ends the relay. Of
    several, one that breaks, or that the peer closes, ends alone. A further connection
    in use (greeted, at a client) proves the peer to the first one's ``witness``: it is
    a tunnel end, and the tunnel was made, whatever comes of the first."""

    def greeted() -> None:
        lanes.greeted(lane)
        if witness is not None:
            witness.prove()

    if lane.usable and witness is not None:
        witness.prove()
    try:
        await tcp_to_udp(
            lane.stream, sender, max_delay, proof, greeted=None if lane.usable else greeted
        )
    except TunnelError as exc:
        if lanes.wanted > 1 and lanes.lose(lane, exc):
            return
        raise
    except trio.ClosedResourceError:
        if lane.gone:  # closed in lanes.py: given up, or found dead
            return
        raise
    if lanes.wanted > 1:
        if lane.failure is not None:  # the writer saw it break, and took the error
            if lanes.lose(lane, TunnelError(lane.failure)):
                return
            raise TunnelError(lane.failure)
        if not lane.settled.is_set() and not lane.usable:
            lanes.lose(lane, TunnelError("the server closed it before greeting it"))
            return
        if lanes.closed(lane):
            return
    log.info("TCP connection closed by the peer")
    stop()


async def tcp_to_udp(
    stream: trio.abc.Stream,
    sender: UdpSender,
    max_delay: float,
    proof: Proof | None = None,
    *,
    greeted: Callable[[], None] | None = None,
) -> None:
    """Send every complete frame from the TCP stream as a UDP datagram; return at EOF.
    With ``greeted``, the first frame must be a server's greeting (lanes.py): it is not
    sent on, and ``greeted()`` is called.

    Raises:
        TunnelError: if the TCP connection breaks, or UDP sending fails for good.
    """
    decoder = Decoder()
    backlog = Backlog(stream)
    receive = reader(stream)
    counters = sender.counters
    while data := await receive():
        started = time.monotonic()
        frames = decoder.feed(data)
        if greeted is not None and frames:
            if len(frames[0]):
                raise TunnelError("its first frame was a datagram, not the server's greeting")
            frames = frames[1:]
            greeted()
            greeted = None
        if proof:
            proof.began(data)
            if frames:
                proof.prove()
                proof = None
        # Only a full read is a sign of backlog: a short one emptied the kernel's queue.
        busy = len(data) == TCP_RECEIVE_SIZE
        if busy and (excess := backlog.excess(len(data), max_delay)) > 0:
            frames = _drop_oldest(frames, excess, counters)
        sent, sent_bytes = await sender.send(frames)
        if busy:  # bytes sent per second of handling a full read, preemption included
            backlog.record(sent_bytes + HEADER.size * sent, time.monotonic() - started)
    if decoder.pending and proof is not None and (why := proof.cut_short()) is not None:
        raise TunnelError(why)  # not even one frame: no tunnel end at all
    if decoder.pending:
        log.info(
            "TCP connection closed inside a frame: %d bytes of a %s-byte frame lost",
            decoder.pending,
            decoder.expected or "?",
        )


class Backlog:
    """How long the bytes already waiting in the TCP receive queue would take to send.

    The estimate is the queue's length (FIONREAD) at the recent rate of this direction:
    bytes sent per second spent handling reads that filled the buffer (time lost to other
    processes while sending included; time the other direction's task takes between reads
    is not, so under a flood both ways the estimate runs optimistic). It is what makes
    the bound hold under overload: a frame waits in the kernel before it waits here, and a
    receive buffer sized for a long fat network could hold seconds of small frames. Light
    traffic, which never fills a read, gives no samples and is never dropped.
    """

    DECAY = 0.9  # per sample: the rate of about the last ten busy reads

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._fd = fd_of(stream)  # a plain TCP socket; anything else: no estimate
        self._bytes = 0.0
        self._seconds = 0.0

    def record(self, sent: int, seconds: float) -> None:
        """``sent`` bytes of frames went out in ``seconds`` of a busy stretch."""
        self._bytes = self._bytes * self.DECAY + sent
        self._seconds = self._seconds * self.DECAY + seconds

    def excess(self, in_hand: int, max_delay: float) -> float:
        """How many bytes, of those in hand and those queued behind them, cannot be sent
        within ``max_delay`` at the recent rate: the oldest of them should be dropped."""
        if self._fd < 0 or not self._seconds or not self._bytes:
            return 0.0
        queued = int.from_bytes(fcntl.ioctl(self._fd, termios.FIONREAD, bytes(4)), sys.byteorder)
        return in_hand + queued - max_delay * self._bytes / self._seconds


def _drop_oldest(frames: list[memoryview], excess: float, counters: Counters) -> list[memoryview]:
    """Drop frames from the front of ``frames`` until ``excess`` bytes are gone."""
    count = dropped = 0
    for frame in frames:
        if dropped >= excess:
            break
        dropped += HEADER.size + len(frame)
        count += 1
    counters.dropped_late += count
    return frames[count:]


async def udp_to_tcp(inbound: Inbound, lanes: Lanes, counters: Counters) -> None:
    """Send every datagram from ``inbound`` as frames on a TCP connection, a batch per write.

    Raises:
        TunnelError: if the TCP connection breaks (of several, if none can take a batch).
    """
    # Anonymous memory: a page costs resident memory only once a datagram lands in it, so a
    # relay that carries small datagrams (one of many flows, say) stays small.
    buffer = mmap.mmap(-1, BATCH_SIZE + HEADER.size + MAX_DATAGRAM)
    view = memoryview(buffer)
    while True:
        end, count, emptied = inbound.drain(buffer, view)
        if end:
            try:
                whole = await lanes.send(view[:end])
            except (TunnelError, trio.Cancelled):  # the batch in hand goes with the connection
                counters.dropped_no_tunnel += count
                raise
            if whole:
                counters.udp_to_tcp_datagrams += count
                counters.udp_to_tcp_bytes += end - HEADER.size * count
            else:  # with one of several connections, which broke while taking it
                counters.dropped_no_tunnel += count
        if emptied:  # sleep until more comes; while busy, never ask epoll
            await inbound.wait()
        else:
            await trio.lowlevel.checkpoint()  # let the other direction, and cancellation, in


class SocketInbound:
    """The datagrams that arrive on a relay's own UDP socket, but for our own and those from
    sources not allowed, which are dropped and counted. Errors that ICMP left on the socket
    (a destination's port closed or unreachable, for an earlier datagram) end nothing: the
    service behind the tunnel may be restarting."""

    def __init__(self, udp: UdpEnd, counters: Counters) -> None:
        self.sock = udp.sock
        self.own = udp.own_addresses
        self.sources = udp.sources
        self.counters = counters
        self.verbose = log.isEnabledFor(logging.DEBUG)

    def drain(self, buffer: mmap.mmap, view: memoryview) -> tuple[int, int, bool]:
        counters, own, verbose = self.counters, self.own, self.verbose
        check, allows = bool(self.sources), self.sources.allows
        receive, pack = self.sock.recvfrom_into, HEADER.pack_into
        end = count = 0
        while end < BATCH_SIZE:
            try:
                size, source = receive(view[end + HEADER.size :], MAX_DATAGRAM)
            except BlockingIOError:
                return end, count, True
            except OSError as exc:  # an error from ICMP, for an earlier datagram
                if exc.errno not in ICMP_ERRORS:
                    raise TunnelError(f"cannot receive UDP: {exc.strerror}") from exc
                log.debug("%s on the UDP socket; clearing.", errno.errorcode[exc.errno])
                continue
            if verbose:
                log.debug("Received %d byte UDP packet from %s/%d", size, *source[:2])
            if source[:2] in own:
                counters.dropped_own += 1
                continue
            if check and not allows(source[:2]):
                counters.dropped_disallowed += 1
                if verbose:
                    log.debug("Dropped it: %s/%d is not allowed to send", *source[:2])
                continue
            pack(buffer, end, size)
            end += HEADER.size + size
            count += 1
        return end, count, False

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)


async def discard(udp: UdpEnd, counters: Counters) -> None:
    """While no tunnel is up: take every datagram that arrives and count it as dropped, so
    that none waits to be delivered late. Runs until cancelled."""
    sock, scrap = udp.sock, bytearray(1)  # the rest of each datagram is cut off
    while True:
        try:
            sock.recv_into(scrap, 1)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError:  # an error queued for the socket (ICMP): nothing to count
            await trio.lowlevel.checkpoint()
            continue
        counters.dropped_no_tunnel += 1
        if not counters.dropped_no_tunnel % YIELD_EVERY:
            await trio.lowlevel.checkpoint()


def kernel_drops(sock: socket.socket) -> int:
    """How many datagrams the kernel dropped because the socket's receive queue was full,
    since the socket was made: read when wanted, so it costs the relay nothing. 0 where the
    kernel cannot say (SO_MEMINFO is Linux 4.12 and later)."""
    try:
        meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return 0
    return int(_MEMINFO.unpack(meminfo)[8])


class RawReader:
    """Reads a plain TCP socket straight, as ``receive_some`` would, with one pass through
    the scheduler per read instead of two, and no read that is bound to fail.

    A read shorter than asked for took everything the kernel had: the next read waits for
    data first, rather than failing with EAGAIN (a system call and an exception) and then
    waiting, which at light traffic is every read. A full read may have left more: the
    next one tries at once, after a checkpoint (a wait is one too).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._emptied = False  # the last read took all there was

    async def __call__(self) -> bytes:
        fd, waited = self._fd, self._emptied
        if waited:
            self._check()
            await trio.lowlevel.wait_readable(fd)
        while True:
            self._check()
            try:
                data = os.read(fd, TCP_RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                waited = True
                continue
            except OSError as exc:
                raise TunnelError(f"TCP connection lost while receiving: {exc.strerror}") from exc
            self._emptied = 0 < len(data) < TCP_RECEIVE_SIZE
            if not waited:  # there at once: let the other direction, and cancellation, in
                await trio.lowlevel.checkpoint()
            return data

    def _check(self) -> None:
        """Raise if the socket was closed meanwhile (a connection given up, lanes.py): its
        number may be another connection's by now, which must not be read here."""
        if self._sock.fileno() != self._fd:
            raise trio.ClosedResourceError("the connection was closed")


def reader(stream: trio.abc.Stream) -> Callable[[], Awaitable[bytes | bytearray]]:
    """How to read ``stream``: straight from the socket if it is a plain one, else through
    the stream (TLS); either way b"" at its end.

    The reader raises TunnelError if the connection breaks.
    """
    if isinstance(stream, trio.SocketStream):
        return RawReader(stream.socket)
    return partial(_receive, stream)


async def _receive(stream: trio.abc.Stream) -> bytes | bytearray:
    try:
        return await stream.receive_some(TCP_RECEIVE_SIZE)
    except trio.BrokenResourceError as exc:
        raise lost(stream, exc, "receiving") from exc
