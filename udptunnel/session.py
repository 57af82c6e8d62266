"""One tunnel end's UDP side and the tunnels carried over it, one after another.

The UDP sockets and the counters outlive any one TCP connection: a server waiting for its
next client, or a persistent client between two attempts, keeps them bound. A tunnel is
carried by running one relay per port pair (relay.py); the first relay whose TCP peer
closes ends them all, as does the idle timeout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

import trio

from .counters import Counters
from .errors import TunnelError, leaves, messages
from .lanes import Lanes
from .persist import end_when_idle
from .relay import Proof, discard, run_relay, run_then
from .sockets import UdpEnd, peer

log = logging.getLogger(__name__)


class Session:
    """Carries tunnels over one set of UDP ends, counting in ``counters``.

    Args:
        udps: one UDP end per port pair (two in RTP mode).
        counters: the end's counters.
        max_delay: seconds a datagram from TCP may wait in this end.
        idle_timeout: seconds without a datagram that end a tunnel, or None.
        persist: a lost tunnel is logged and reported, not raised; datagrams that come
            while no tunnel is up are dropped and counted, not kept.
    """

    def __init__(
        self,
        udps: list[UdpEnd],
        counters: Counters,
        *,
        max_delay: float,
        idle_timeout: float | None,
        persist: bool,
    ) -> None:
        self.udps = udps
        self.counters = counters
        self.max_delay = max_delay
        self.idle_timeout = idle_timeout
        self.persist = persist

    async def carry(
        self,
        lanes: list[Lanes],
        proofs: Sequence[Proof],
        *,
        alongside: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> str:
        """Run the relays, one per port pair over its connections (``lanes``), until the
        tunnel ends; ``proofs``, one per port pair, are told of its first connection's
        first bytes and frame, and asked what a failure before them means. The tasks
        ``alongside`` run as long as the tunnel does.

        Returns:
            Why it ended: "closed" by a peer, "idle" past the idle timeout, or "lost"
            (broken; only with ``persist``, which logs it instead of raising).

        Raises:
            TunnelError: the tunnel broke (without ``persist``).
        """
        counters = self.counters
        counters.tunnels += 1
        counters.state = "tunnel up with " + ", ".join(_peer(each.first.stream) for each in lanes)
        ended = "closed"
        try:
            async with trio.open_nursery() as nursery:

                def end_idle() -> None:
                    nonlocal ended
                    ended = "idle"
                    nursery.cancel_scope.cancel(reason="no datagram for the idle timeout")

                if idle := self.idle_timeout:
                    watch = partial(end_when_idle, lambda: counters.traffic, idle, end_idle)
                    nursery.start_soon(watch)
                for task in alongside:
                    nursery.start_soon(task)
                await self._run_relays(lanes, proofs)
                nursery.cancel_scope.cancel(reason="the tunnel ended")
        except* TunnelError as group:
            # One break, seen by each port pair at once (a refused RTP client's two
            # connections): the first relay to see it says what it was.
            first = next(leaves(group))
            if not self.persist:
                raise first from first.__cause__
            log.warning("Tunnel lost: %s", next(messages(group)))
            ended = "lost"
        return ended

    async def _run_relays(self, lanes: list[Lanes], proofs: Sequence[Proof]) -> None:
        """Run every relay; the first whose peer closes ends them all. Logs the summary."""
        try:
            async with trio.open_nursery() as nursery:
                stop = partial(
                    nursery.cancel_scope.cancel, reason="a TCP peer closed the connection"
                )
                for each, udp, proof in zip(lanes, self.udps, proofs, strict=True):
                    relay = partial(
                        run_relay, each, udp, self.counters, max_delay=self.max_delay, proof=proof
                    )
                    nursery.start_soon(run_then, stop, relay)
        finally:
            log.info("Tunnel closed. %s", self.counters.summary())

    @contextlib.asynccontextmanager
    async def discarding(self) -> AsyncIterator[None]:
        """With ``persist``: while waiting for a client, or between two attempts to connect,
        datagrams are dropped and counted rather than left to wait. Without, as the
        original: they wait in the kernel's short queue."""
        if not self.persist:
            yield
            return
        async with trio.open_nursery() as nursery:
            for udp in self.udps:
                nursery.start_soon(discard, udp, self.counters)
            yield
            nursery.cancel_scope.cancel(reason="a tunnel is up")

    async def wait_for_datagram(self) -> None:
        """Return when a datagram waits on any of the UDP sockets, leaving it there."""
        async with trio.open_nursery() as nursery:
            for udp in self.udps:
                waiter = partial(trio.lowlevel.wait_readable, udp.sock)
                nursery.start_soon(run_then, nursery.cancel_scope.cancel, waiter)


def _peer(stream: trio.abc.Stream) -> str:
    """Who is at the other end of a connection, in TLS or not."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return peer(stream) if isinstance(stream, trio.SocketStream) else "?"
