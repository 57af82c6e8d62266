"""Flow mode (``--flows``): one TCP connection per UDP source, many at once.

Request/response traffic (DNS, WireGuard, QUIC, games) comes from many sources, each on a
port of its own, and each expects its replies back on that port. The client end keeps one
flow per source (address and port): its own TCP connection to the server, whose replies it
sends back to that source from the listening socket. The server end gives each connection
a UDP socket of its own, connected to the destination, so that the destination's replies
come back to the right connection. Every connection still speaks the original framing, so a
plain udptunnel client can use a flow-mode server.

A flow ends when its connection closes or after ``--flow-timeout`` without a datagram; ends
of one flow never disturb another. ``--max-flows`` bounds the flows at each end: a source or
connection past it is refused and counted, and the flows already open go on.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import trio

from .allow import SourceFilter
from .config import Config, Mode
from .counters import Counters
from .errors import TunnelError, messages
from .framing import HEADER, MAX_DATAGRAM, Decoder
from .persist import end_when_idle
from .relay import UdpSockets, fd_of, reader, run_relay
from .sockets import (
    Connections,
    Resolved,
    SockAddr,
    Unproven,
    accept,
    connect,
    listen,
    peer,
    refuse,
    reset,
    show,
    strerror,
)
from .tls import Tls

log = logging.getLogger(__name__)

OPENING_QUEUE = 64  # datagrams a flow keeps while its connection opens, or while TCP is busy
DISPATCH_BATCH = 256  # datagrams the client sorts between two looks at the scheduler


async def run_flows(
    config: Config,
    counters: Counters,
    tcp: list[Resolved],
    udp: Resolved,
    udp_bind: Resolved,
    sources: SourceFilter,
    tls: Tls | None,
    ready: Callable[[list[SockAddr], list[SockAddr]], object],
) -> None:
    """Run a flow-mode end until cancelled.

    Calls ``ready`` once it is: a server with its listening addresses (and no UDP address:
    each flow has its own), a client with no TCP address and the address it receives
    datagrams on.

    Raises:
        TunnelError: if the listening sockets cannot be opened.
    """
    label = config.relays[0].tcp
    if config.mode is Mode.SERVER:
        async with contextlib.AsyncExitStack() as stack:
            listeners = await listen(stack, tcp, label, reuse_port=config.reuse_port)
            port = listeners[0].socket.getsockname()[1]
            log.info("Listening for TCP connections on port %d (flows)", port)
            counters.state = "serving flows"
            ready([lst.socket.getsockname() for lst in listeners], [])
            server = _FlowServer(config, counters, udp, sources, tls)
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(server.accept_all, listener, nursery)
    else:
        with _open_udp(udp_bind, bind=True) as sock:
            log.info("Receiving flows on UDP %s", show(sock.getsockname()))
            counters.state = "receiving flows"
            ready([], [sock.getsockname()])
            client = _FlowClient(config, counters, tcp, sock, sources, tls)
            await client.run()


class _FlowServer:
    """Each accepted connection a flow, with a UDP socket of its own."""

    def __init__(
        self,
        config: Config,
        counters: Counters,
        udp: Resolved,
        sources: SourceFilter,
        tls: Tls | None,
    ) -> None:
        self.config, self.counters, self.udp, self.sources = config, counters, udp, sources
        self.tls = tls
        self.unproven = Unproven(config.max_handshakes)

    async def accept_all(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await accept(listener)
            if self.counters.flows >= self.config.max_flows:
                self.counters.flows_refused += 1
                refuse(stream)
                continue
            nursery.start_soon(self.serve, stream, self.counters.child())

    async def _secure(self, stream: trio.SocketStream) -> trio.abc.Stream:
        """The connection in TLS; a failed handshake resets it (so that a TLS 1.3 client,
        which may think it got in, learns otherwise) and ends the flow."""
        assert self.tls is not None
        try:
            return await self.tls.secure(stream, None)
        except TunnelError:
            reset(stream)
            raise

    async def serve(self, stream: trio.SocketStream, counters: Counters) -> None:
        """One flow, from its connection's start to its end.

        Until the connection has proved itself (its TLS handshake done, or in plain TCP its
        first whole frame come) it is one of the unproven, and may be pushed out by newer
        ones past ``--max-handshakes``. A TLS handshake, or in plain TCP a frame, has
        ``--handshake-timeout`` from its first byte to finish. A plain connection that has
        sent nothing at all is left to ``--flow-timeout``: an original client connects before
        it has anything to send. A connection ended unproven is reset, and nothing it sent
        has reached UDP.
        """
        who = peer(stream)
        with _accounted(who, self.counters, counters):
            async with Connections(self.config.keepalive) as connections:
                connections.adopt(stream)  # closed in order however the flow ends
                proof = _Proof()
                with trio.CancelScope() as flow:
                    self.unproven.add(flow)
                    proof.on_proof(partial(self.unproven.discard, flow))
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._deadline, proof, flow, who)
                            await self._carry(stream, counters, who, proof)
                            nursery.cancel_scope.cancel(reason="the flow ended")
                    finally:
                        self.unproven.discard(flow)
                if flow.cancelled_caught and not proof.proved.is_set():
                    reset(stream)  # too late or pushed out: no orderly goodbye for it

    async def _carry(
        self, stream: trio.SocketStream, counters: Counters, who: str, proof: _Proof
    ) -> None:
        secured: trio.abc.Stream = stream
        if self.tls is not None:
            proof.began()
            secured = await self._secure(stream)
            proof.prove()
        with _open_udp(self.udp, bind=False) as sock:
            log.info("Flow from %s: UDP %s", who, show(sock.getsockname()))
            udp = UdpSockets(sock, sock, frozenset(), self.sources)
            relay = partial(
                run_relay,
                secured,
                udp,
                counters,
                max_delay=self.config.max_delay,
                first_bytes=proof.began,
                first_frame=proof.prove,
            )
            await _until_idle(relay, counters, self.config.flow_timeout)

    async def _deadline(self, proof: _Proof, flow: trio.CancelScope, who: str) -> None:
        """End a connection whose handshake or first frame has not finished in time, counted
        from its first byte: silent so far, it is left to the flow timeout."""
        await proof.begun.wait()
        timeout = self.config.handshake_timeout
        with trio.move_on_after(timeout):
            await proof.proved.wait()
            return
        log.info("Closed TCP connection from %s: nothing useful in %g s", who, timeout)
        flow.cancel(reason="no handshake or frame in time")


class _Proof:
    """How far a new connection has got: begun (a byte of a handshake or a frame has come)
    and proved (the handshake done, or a whole frame come)."""

    def __init__(self) -> None:
        self.begun = trio.Event()
        self.proved = trio.Event()
        self._then: list[Callable[[], object]] = []

    def on_proof(self, then: Callable[[], object]) -> None:
        self._then.append(then)

    def began(self) -> None:
        self.begun.set()

    def prove(self) -> None:
        self.begun.set()
        self.proved.set()
        for then in self._then:  # at once: a proved connection must not be pushed out
            then()


class _Outbox:
    """A client flow's datagrams on their way into its connection.

    The dispatcher writes a frame straight to the socket when nothing is waiting before it
    and the socket takes it whole, which is the rule: no task wakes up for it. Otherwise
    the frame waits here (up to OPENING_QUEUE of them, then it is dropped and counted) for
    the flow's writer task, which sends whatever has gathered in one write. Either way
    there is one writer at a time, and frames stay in order.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.fd = -1  # the connection's descriptor, once connected
        self.frames: collections.deque[bytes] = collections.deque()
        self.waiting = 0  # whole datagrams among the frames (a frame may be a remainder)
        self.waiting_bytes = 0
        self.writing = False  # the writer task has frames in hand, being sent
        self.closed = False
        self._wake = trio.lowlevel.ParkingLot()

    def put(self, datagram: bytes) -> None:
        """Take a datagram from the flow's source (called by the dispatcher only)."""
        counters = self.counters
        if self.closed:
            counters.dropped_no_tunnel += 1
            return
        frame = HEADER.pack(len(datagram)) + datagram
        if self.fd >= 0 and not self.frames and not self.writing:
            try:
                written = os.write(self.fd, frame)
            except OSError:  # full, or broken: the writer finds out which
                written = 0
            if written:
                counters.udp_to_tcp_datagrams += 1
                counters.udp_to_tcp_bytes += len(datagram)
                if written < len(frame):
                    self.frames.append(frame[written:])  # the rest, before anything else
                    self._wake.unpark()
                return
        if self.waiting >= OPENING_QUEUE:
            counters.dropped_late += 1  # its connection cannot take them as fast
            return
        self.frames.append(frame)
        self.waiting += 1
        self.waiting_bytes += len(datagram)
        self._wake.unpark()

    async def write(self, stream: trio.abc.Stream) -> None:
        """The flow's writer: send what has gathered, as it gathers, until cancelled."""
        while True:
            while not self.frames:
                await self._wake.park()
            batch = b"".join(self.frames)
            count, size = self.waiting, self.waiting_bytes
            self.frames.clear()
            self.waiting = self.waiting_bytes = 0
            self.writing = True
            try:
                await stream.send_all(batch)
            except trio.BrokenResourceError as exc:
                raise TunnelError("TCP connection lost while sending") from exc
            finally:
                self.writing = False
            self.counters.udp_to_tcp_datagrams += count
            self.counters.udp_to_tcp_bytes += size

    def close(self) -> None:
        """No more datagrams: those still waiting are dropped and counted."""
        self.closed = True
        self.counters.dropped_no_tunnel += self.waiting
        self.frames.clear()
        self.waiting = self.waiting_bytes = 0


class _FlowClient:
    """Sorts datagrams by source into flows, each with a TCP connection of its own."""

    def __init__(
        self,
        config: Config,
        counters: Counters,
        tcp: list[Resolved],
        sock: socket.socket,
        sources: SourceFilter,
        tls: Tls | None,
    ) -> None:
        self.config, self.counters, self.tcp, self.sock = config, counters, tcp, sock
        self.sources, self.tls = sources, tls
        self.flows: dict[tuple[str, int], _Outbox] = {}
        self.verbose = log.isEnabledFor(logging.DEBUG)

    async def run(self) -> None:
        """Receive datagrams and hand each to its flow, opening flows for new sources."""
        buffer = bytearray(MAX_DATAGRAM)
        view = memoryview(buffer)
        check, allows = bool(self.sources), self.sources.allows
        receive = self.sock.recvfrom_into
        async with trio.open_nursery() as nursery:
            while True:
                for _ in range(DISPATCH_BATCH):
                    try:
                        size, address = receive(buffer)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self.sock)
                        break
                    except OSError:  # an ICMP error queued for the socket: nothing to deliver
                        continue
                    source = address[:2]
                    if check and not allows(source):
                        self.counters.dropped_disallowed += 1
                        if self.verbose:
                            log.debug("Dropped a datagram from %s/%d: not allowed to send", *source)
                        continue
                    flow = self.flows.get(source)
                    if flow is None:
                        if len(self.flows) >= self.config.max_flows:
                            self.counters.flows_refused += 1
                            if self.verbose:
                                log.debug("Refused a flow from %s/%d: too many flows", *source)
                            continue
                        flow = self._open(nursery, source, address)
                    flow.put(bytes(view[:size]))
                else:  # still more waiting: let the flows, and cancellation, in first
                    await trio.lowlevel.checkpoint()

    def _open(self, nursery: trio.Nursery, source: tuple[str, int], address: SockAddr) -> _Outbox:
        outbox = _Outbox(self.counters.child())
        self.flows[source] = outbox
        nursery.start_soon(self._carry, source, address, outbox)
        return outbox

    async def _carry(self, source: tuple[str, int], address: SockAddr, outbox: _Outbox) -> None:
        """One flow: connect, then carry both ways until the connection or the flow ends."""
        who, counters = show(source), outbox.counters
        with _accounted(who, self.counters, counters):
            async with Connections(self.config.keepalive) as connections:
                try:
                    share = self.config.connect_timeout / max(len(self.tcp), 1)
                    label = self.config.relays[0].tcp
                    raw, _ = await connect(connections, self.tcp, label, attempt_seconds=share)
                    stream = raw if self.tls is None else await self.tls.secure(raw, label.host)
                    log.info("Flow from %s: connected", who)

                    async def both_ways() -> None:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(outbox.write, stream)
                            outbox.fd = fd_of(stream)  # plain TCP only: TLS must see it all
                            await self._to_udp(stream, address, counters)
                            nursery.cancel_scope.cancel(reason="the peer closed the connection")

                    await _until_idle(both_ways, counters, self.config.flow_timeout)
                finally:
                    # Before the goodbye: the next datagram from the source opens a new flow.
                    outbox.fd = -1
                    outbox.close()
                    if self.flows.get(source) is outbox:
                        del self.flows[source]

    async def _to_udp(self, stream: trio.abc.Stream, address: SockAddr, counters: Counters) -> None:
        """Send every frame from the connection back to the flow's source."""
        decoder = Decoder()
        receive = reader(stream)
        while data := await receive():
            for frame in decoder.feed(data):
                await self._send_to(frame, address, counters)

    async def _send_to(self, frame: memoryview, address: SockAddr, counters: Counters) -> None:
        while True:
            try:
                self.sock.sendto(frame, address)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    counters.dropped_too_large += 1
                else:
                    counters.dropped_unsent += 1
                return
            counters.tcp_to_udp_datagrams += 1
            counters.tcp_to_udp_bytes += len(frame)
            return


@contextlib.contextmanager
def _accounted(who: str, totals: Counters, counters: Counters) -> Iterator[None]:
    """A flow's life in the log and the counters: a failure ends this flow only, and its
    counts join the totals when it ends."""
    totals.tunnels += 1
    try:
        yield
    except* TunnelError as group:
        for message in messages(group):
            log.info("Flow from %s lost: %s", who, message)
    finally:
        totals.retire(counters)
        log.info("Flow from %s ended", who)


async def _until_idle(
    run: Callable[[], Awaitable[object]], counters: Counters, idle: float
) -> None:
    """Run a flow until it returns, or until it has carried nothing for ``idle`` seconds."""
    async with trio.open_nursery() as nursery:
        stop = partial(nursery.cancel_scope.cancel, reason="the flow was idle")
        nursery.start_soon(end_when_idle, lambda: counters.traffic, idle, stop)
        await run()
        nursery.cancel_scope.cancel(reason="the flow ended")


@contextlib.contextmanager
def _open_udp(where: Resolved, *, bind: bool) -> Iterator[socket.socket]:
    """A non-blocking UDP socket, bound to ``where`` (the client's one socket: every flow's
    datagrams arrive there and its replies leave there) or connected to it (a server flow's
    own, so that only the destination's replies come back to it).

    Raises:
        TunnelError: if there is no socket to be had (out of descriptors), or the address
            cannot be bound or reached.
    """
    family, address = where
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise TunnelError(f"cannot open a UDP socket: {strerror(exc)}") from exc
    with sock:
        sock.setblocking(False)
        try:
            (sock.bind if bind else sock.connect)(address)
        except OSError as exc:
            what = "receive UDP on" if bind else "send UDP to"
            raise TunnelError(f"cannot {what} {show(address)}: {strerror(exc)}") from exc
        yield sock
