"""Flow mode (``--flows``): one TCP connection per UDP source, many at once.

Request/response traffic (DNS, WireGuard, QUIC, games) comes from many sources, each on a
port of its own, and each expects its replies back on that port. The client end keeps one
flow per source (address and port): its own TCP connection to the server, whose replies it
sends back to that source from the socket it received on. The server end gives each
connection a UDP socket of its own, connected to the destination, so that the destination's
replies come back to the right connection. Every connection still speaks the original
framing, so a plain udptunnel client can use a flow-mode server.

Each flow is a relay (relay.py) like the single tunnel's: only its UDP side differs. A flow
ends when its connection closes, after ``--flow-timeout`` without a datagram, or when a new
flow takes its slot (flowtable.py). A failure ends its own flow only: it is counted and
logged, and the end and every other flow go on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from functools import partial

import trio

from .acceptance import Admission, accept_each, open_listeners
from .allow import SourceFilter
from .client import Server, dial
from .config import Address
from .counters import Counters
from .egress import ICMP_ERRORS, UdpSender
from .errors import TunnelError, messages
from .flowtable import Flow, FlowTable
from .framing import HEADER, MAX_DATAGRAM
from .lanes import Lanes
from .relay import carry, kernel_drops, run_relay
from .sockets import (
    Connections,
    Resolved,
    SockAddr,
    UdpEnd,
    fd_of,
    open_flow_udp,
    peer,
    refuse,
    show,
)
from .tls import Tls

log = logging.getLogger(__name__)

OPENING_QUEUE = 64  # datagrams a flow keeps while its connection opens, or while TCP is busy
DISPATCH_BATCH = 256  # datagrams the client sorts between two looks at the scheduler
# A flow's own failures: they end that flow, and nothing else.
FLOW_FAILURES = (TunnelError, OSError, trio.BrokenResourceError, ssl.SSLError)


class FlowServer:
    """Each accepted connection a flow, with a UDP socket of its own, connected to the
    destination.

    Args:
        destination: where every flow's datagrams go.
        admission: TLS, and the time new connections have to prove themselves.
        table: the flows, bounded.
        sources: who may send into the tunnel (--allow-from).
        keepalive: seconds of silence before TCP keepalive probes, or None.
        max_delay: seconds a datagram may wait in this end.
    """

    def __init__(
        self,
        destination: Resolved,
        admission: Admission,
        table: FlowTable[Flow],
        sources: SourceFilter,
        *,
        keepalive: int | None,
        max_delay: float,
    ) -> None:
        self.destination, self.admission, self.table = destination, admission, table
        self.sources, self.keepalive, self.max_delay = sources, keepalive, max_delay

    async def serve(
        self,
        stack: contextlib.AsyncExitStack,
        tcp: list[Resolved],
        label: Address,
        *,
        reuse_port: bool,
        task_status: trio.TaskStatus[list[SockAddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen (or take systemd's sockets), report the listening addresses, and serve
        every connection as a flow until cancelled.

        Raises:
            TunnelError: if the listening sockets cannot be opened.
        """
        (listeners,) = await open_listeners(
            stack, [(tcp, label)], reuse_port=reuse_port, what=" (flows)"
        )
        self.table.totals.state = "serving flows"
        task_status.started([listener.socket.getsockname() for listener in listeners])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.table.sweep)
            for listener in listeners:
                nursery.start_soon(accept_each, listener, nursery, self.serve_one)

    async def serve_one(self, stream: trio.SocketStream) -> None:
        """One flow, from its connection's start to its end; its failures end it alone."""
        who = peer(stream)
        flow = self.table.add(stream, partial(Flow, who))
        if flow is None:
            refuse(stream, f"too many flows (--max-flows {self.table.limit})")
            return
        try:
            with _contained(flow, self.table.totals), flow.scope:
                async with Connections(self.keepalive) as connections:
                    connections.adopt(stream)  # closed in order however the flow ends
                    async with self.admission.proving(stream) as proof:
                        secured = await self.admission.secure(stream, proof)
                        self.table.totals.tunnels += 1
                        with _flow_socket(self.destination, flow.counters) as sock:
                            log.info("Flow from %s: UDP %s", who, show(sock.getsockname()))
                            udp = UdpEnd(sock, None, frozenset(), self.sources)
                            lanes = Lanes(secured)
                            await run_relay(
                                lanes, udp, flow.counters, max_delay=self.max_delay, proof=proof
                            )
        finally:
            self.table.remove(stream, flow)


@contextlib.contextmanager
def _flow_socket(destination: Resolved, counters: Counters) -> Iterator[socket.socket]:
    """A server flow's UDP socket, its kernel drops counted in the flow's counters."""
    with open_flow_udp(destination, bind=False) as sock:
        retire = counters.watch_overflow(partial(kernel_drops, sock))
        try:
            yield sock
        finally:
            retire()


class ClientFlow(Flow):
    """A client's flow: its slot, and its datagrams on their way into its connection."""

    def __init__(self, name: str, counters: Counters, now: float) -> None:
        super().__init__(name, counters, now)
        self.queue = FlowQueue(counters)


class FlowQueue:
    """A client flow's datagrams on their way into its connection (its relay's Inbound).

    The dispatcher writes a frame straight to the socket when nothing is waiting before it
    and the socket takes it whole, which is the rule: no task wakes up for it. Otherwise
    the frame waits here (up to OPENING_QUEUE of them, then it is dropped and counted) for
    the flow's relay, which sends whatever has gathered in one write. Either way there is
    one writer at a time, and frames stay in order.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.fd = -1  # the connection's descriptor, once connected (plain TCP only)
        # Frames, each with 1 if it is a whole datagram not yet counted, or 0 if it is the
        # rest of one already counted (a partial write).
        self.frames: collections.deque[tuple[bytes, int]] = collections.deque()
        self.waiting = 0  # whole datagrams among the frames
        self.busy = False  # the relay has frames in hand, being sent
        self.closed = False
        self._wake = trio.lowlevel.ParkingLot()

    def put(self, datagram: bytes) -> None:
        """Take a datagram from the flow's source (called by the dispatcher only)."""
        counters = self.counters
        if self.closed:
            counters.dropped_no_tunnel += 1
            return
        frame = HEADER.pack(len(datagram)) + datagram
        if self.fd >= 0 and not self.frames and not self.busy:
            try:
                written = os.write(self.fd, frame)
            except OSError:  # full, or broken: the relay finds out which
                written = 0
            if written:
                counters.udp_to_tcp_datagrams += 1
                counters.udp_to_tcp_bytes += len(datagram)
                if written < len(frame):
                    self.frames.append((frame[written:], 0))  # the rest, before anything else
                    self._wake.unpark()
                return
        if self.waiting >= OPENING_QUEUE:
            counters.dropped_queue += 1  # its connection cannot take them as fast
            return
        self.frames.append((frame, 1))
        self.waiting += 1
        self._wake.unpark()

    def drain(self, buffer: object, view: memoryview) -> tuple[int, int, bool]:
        """What is waiting, as much as ``view`` holds: frames already carry their headers."""
        end = count = 0
        frames = self.frames
        while frames and end + len(frames[0][0]) <= len(view):
            frame, whole = frames.popleft()
            view[end : end + len(frame)] = frame
            end += len(frame)
            count += whole
        self.waiting -= count
        self.busy = end > 0
        return end, count, not frames

    async def wait(self) -> None:
        self.busy = False  # the relay waits only once what it had in hand is sent
        while not self.frames:
            await self._wake.park()

    def close(self) -> None:
        """No more datagrams: those still waiting are dropped and counted."""
        self.closed = True
        self.fd = -1
        self.counters.dropped_no_tunnel += self.waiting
        self.frames.clear()
        self.waiting = 0


class FlowClient:
    """Sorts the datagrams that arrive on one socket by source into flows, each with a TCP
    connection of its own, and sends each flow's replies back to its source from there.

    Args:
        sock: the socket datagrams arrive on (bound to UDP-ADDR/UDP-PORT).
        server: the server's addresses and how to name them.
        tls: TLS for each flow's connection, or None.
        table: the flows, bounded.
        sources: who may send into the tunnel (--allow-from).
        keepalive, connect_timeout, max_delay: as on the command line.
    """

    def __init__(
        self,
        sock: socket.socket,
        server: Server,
        tls: Tls | None,
        table: FlowTable[ClientFlow],
        sources: SourceFilter,
        *,
        keepalive: int | None,
        connect_timeout: float,
        max_delay: float,
    ) -> None:
        self.sock, self.server, self.tls, self.table = sock, server, tls, table
        self.sources, self.keepalive = sources, keepalive
        self.connect_timeout, self.max_delay = connect_timeout, max_delay
        self.gate = trio.Lock()  # every flow sends from the one socket: one waits at a time
        self.verbose = log.isEnabledFor(logging.DEBUG)

    async def run(self) -> None:
        """Receive datagrams and hand each to its flow, opening flows for new sources; until
        cancelled."""
        totals = self.table.totals
        buffer = bytearray(MAX_DATAGRAM)
        view = memoryview(buffer)
        check, allows = bool(self.sources), self.sources.allows
        receive = self.sock.recvfrom_into
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.table.sweep)
            while True:
                for _ in range(DISPATCH_BATCH):
                    try:
                        size, address = receive(buffer)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self.sock)
                        break
                    except OSError as exc:  # an ICMP error for an earlier datagram
                        if exc.errno not in ICMP_ERRORS:
                            raise TunnelError(f"cannot receive UDP: {exc.strerror}") from exc
                        continue
                    source = address[:2]
                    if check and not allows(source):
                        totals.dropped_disallowed += 1
                        if self.verbose:
                            log.debug("Dropped a datagram from %s/%d: not allowed to send", *source)
                        continue
                    flow = self.table.get(source)
                    if flow is None:
                        flow = self.table.add(source, partial(ClientFlow, show(source)))
                        if flow is None:
                            totals.dropped_no_flow += 1
                            if self.verbose:
                                log.debug("Refused a flow from %s/%d: too many flows", *source)
                            continue
                        nursery.start_soon(self._carry, source, address, flow)
                    flow.queue.put(bytes(view[:size]))
                else:  # still more waiting: let the flows, and cancellation, in first
                    await trio.lowlevel.checkpoint()

    async def _carry(self, source: tuple[str, int], address: SockAddr, flow: ClientFlow) -> None:
        """One flow: connect, then carry both ways until the connection or the flow ends;
        its failures end it alone."""
        try:
            with _contained(flow, self.table.totals), flow.scope:
                async with Connections(self.keepalive) as connections:
                    stream, _, answer = await dial(
                        connections, self.server, within=self.connect_timeout, tls=self.tls
                    )
                    log.info("Flow from %s: connected", flow.name)
                    self.table.totals.tunnels += 1
                    flow.queue.fd = fd_of(stream)  # plain TCP only: TLS must see it all
                    sender = UdpSender(
                        self.sock, flow.counters, destination=address, gate=self.gate
                    )
                    try:
                        await carry(
                            Lanes(stream),
                            flow.queue,
                            sender,
                            flow.counters,
                            max_delay=self.max_delay,
                            proof=answer,
                        )
                    finally:
                        flow.queue.close()  # before the goodbye: a new datagram, a new flow
        finally:
            flow.queue.close()
            self.table.remove(source, flow)


@contextlib.contextmanager
def _contained(flow: Flow, totals: Counters) -> Iterator[None]:
    """A flow's life in the log and the counters: a failure ends this flow only."""
    try:
        yield
    except* FLOW_FAILURES as group:
        reasons = "; ".join(messages(group))
        if flow.ended:  # the table had ended it: its goodbye failed, it was not lost
            log.info("Flow from %s ended: %s (%s)", flow.name, flow.ended, reasons)
        else:
            totals.flows_lost += 1
            log.info("Flow from %s lost: %s", flow.name, reasons)
    else:
        log.info("Flow from %s ended%s", flow.name, f": {flow.ended}" if flow.ended else "")


def open_flow_client_socket(
    stack: contextlib.ExitStack[bool | None], where: Resolved, counters: Counters
) -> socket.socket:
    """The flow client's one socket, bound, its kernel drops counted in ``counters``."""
    sock = stack.enter_context(open_flow_udp(where, bind=True))
    stack.callback(counters.watch_overflow(partial(kernel_drops, sock)))
    return sock
