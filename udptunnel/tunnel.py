"""One tunnel end: resolve the names once, open the sockets, connect, run the relays.

A server listens and takes one TCP connection per relay, refusing any further client at once;
a client connects. Either way the tunnel ends when any relay's TCP peer closes (in RTP mode,
one relay ending ends both), and every socket opened here is closed here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from .allow import SourceFilter
from .config import Config, Mode, Relay
from .counters import Counters
from .errors import ConfigError, TunnelError, messages
from .flows import run_flows
from .persist import STEADY_AFTER, Backoff, end_when_idle
from .relay import UdpSockets, discard, kernel_drops, run_relay, run_then
from .sockets import (
    WILDCARD,
    Connections,
    Resolved,
    SockAddr,
    Unproven,
    accept,
    activated_listeners,
    connect,
    is_multicast,
    listen,
    open_udp,
    peer,
    refuse,
    reset,
    resolve,
    show,
)
from .systemd import take_listen_sockets
from .tls import Tls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ready:
    """What a started tunnel end reports: the real addresses, once they exist.

    Attributes:
        tcp: a server's listening addresses, or a client's connected peers, one list per relay.
        udp: where each relay receives its datagrams.
    """

    tcp: list[list[SockAddr]]
    udp: list[SockAddr]


@dataclass(frozen=True)
class _Plan:
    """One relay's addresses, resolved."""

    relay: Relay
    tcp: list[Resolved]
    udp: Resolved
    udp_bind: Resolved


async def run_tunnel(
    config: Config,
    counters: Counters,
    *,
    task_status: trio.TaskStatus[Ready] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one tunnel end until its TCP peer closes or, with ``config.persist``, until
    cancelled.

    Reports ``Ready`` once a server listens or a client is connected (with ``persist``, once
    a client's UDP sockets are bound: it connects and reconnects on its own). Owns every
    socket it opens, and closes them all when it returns or is cancelled. The UDP sockets
    and a server's listeners stay open from one tunnel to the next.

    Raises:
        ConfigError: a host name does not resolve.
        TunnelError: a socket cannot be set up (address in use, connection refused, ...), or
            the TCP connection breaks; with ``persist``, only the first kind.
    """
    tls = Tls(config.tls, config.mode, config.handshake_timeout) if config.tls else None
    plans = [await _resolve(relay, config) for relay in config.relays]
    sources = SourceFilter(config.allow_from)
    if config.flows:
        plan = plans[0]

        def ready(tcp: list[SockAddr], udp: list[SockAddr]) -> None:
            task_status.started(Ready([tcp], udp))

        await run_flows(config, counters, plan.tcp, plan.udp, plan.udp_bind, sources, tls, ready)
        return
    with contextlib.ExitStack() as udp_stack:
        udps = [
            open_udp(
                udp_stack,
                plan.udp,
                plan.udp_bind,
                ttl=config.ttl,
                bind_was_given=plan.relay.udp_bind.host is not None,
                sources=sources,
            )
            for plan in plans
        ]
        for udp in udps:  # closed by udp_stack later: count its drops until then
            udp_stack.callback(counters.watch_overflow(partial(kernel_drops, udp.receive)))
        udp_addresses = [udp.receive.getsockname() for udp in udps]
        tunnel = _Tunnel(config, counters, udps, tls)
        if config.mode is Mode.SERVER:
            async with contextlib.AsyncExitStack() as stack:
                listener_sets = await _listen_all(stack, plans)
                addresses = [[lst.socket.getsockname() for lst in ls] for ls in listener_sets]
                task_status.started(Ready(addresses, udp_addresses))
                await tunnel.serve(listener_sets)
        elif config.persist:
            task_status.started(Ready([[] for _ in plans], udp_addresses))
            await tunnel.keep_connected(plans)
        else:
            async with Connections(config.keepalive) as connections:
                connected = [await tunnel.connect(connections, plan) for plan in plans]
                _log_connected(connected)
                task_status.started(Ready([[address] for _, address in connected], udp_addresses))
                await tunnel.carry([stream for stream, _ in connected])


class _Tunnel:
    """Establishes tunnels over one set of UDP sockets, and carries datagrams through them:
    once, or again and again with ``config.persist``."""

    def __init__(
        self, config: Config, counters: Counters, udps: list[UdpSockets], tls: Tls | None
    ) -> None:
        self.config = config
        self.counters = counters
        self.udps = udps
        self.tls = tls

    async def serve(self, listener_sets: list[list[trio.SocketListener]]) -> None:
        """Take one connection per relay, refuse the rest while the tunnel runs; with
        ``persist``, then go back to accepting."""
        while True:
            self.counters.state = "waiting for a client"
            served = False
            async with (
                Connections(self.config.keepalive) as connections,
                trio.open_nursery() as refusers,
            ):
                async with self._discarding():
                    streams: list[trio.SocketStream] = []
                    secured: list[trio.abc.Stream] = []
                    for listeners in listener_sets:
                        # In RTP mode a persistent server gives the second connection the
                        # connect timeout to come: a stray first one must not wedge it.
                        second = streams and self.config.persist
                        with trio.move_on_after(
                            self.config.connect_timeout if second else math.inf
                        ):
                            raw, stream = await self._accept(connections, listeners)
                            streams.append(raw)
                            secured.append(stream)
                            for listener in listeners:
                                refusers.start_soon(_refuse_all, listener)
                if len(streams) < len(listener_sets):
                    log.warning(
                        "No second connection within %g s of %s; closing it",
                        self.config.connect_timeout,
                        peer(streams[0]),
                    )
                else:
                    for raw in streams:  # now: the datagrams from here on are carried
                        log.info("TCP connection from %s", peer(raw))
                    await self.carry(secured)
                    served = True
                refusers.cancel_scope.cancel(reason="the tunnel ended")
            if served and not self.config.persist:
                return

    async def _accept(
        self, connections: Connections, listeners: list[trio.SocketListener]
    ) -> tuple[trio.SocketStream, trio.abc.Stream]:
        """The connection this relay will carry, and the stream to carry it over.

        In plain TCP, the first to come. In TLS, the first to finish its handshake: every
        connection that comes meanwhile shakes hands at once, each within the handshake
        timeout and at most ``--max-handshakes`` of them (the oldest give way), so that
        neither a stranger nor a crowd of stalled connections keeps a real client out.
        The others are reset.
        """
        if self.tls is None:
            stream = await _accept_first(connections, listeners)
            return stream, stream
        tls, unproven = self.tls, Unproven(self.config.max_handshakes)
        won: list[tuple[trio.SocketStream, trio.abc.Stream]] = []

        async def shake_hands(stream: trio.SocketStream, race: trio.CancelScope) -> None:
            try:
                with trio.CancelScope() as attempt:
                    unproven.add(attempt)
                    try:
                        secured = await tls.secure(stream, None)
                    except TunnelError as exc:
                        log.warning("Closed TCP connection from %s: %s", peer(stream), exc)
                        return
                    finally:
                        unproven.discard(attempt)
                    if not won:
                        won.append((stream, secured))
                        race.cancel(reason="a client got in")
            finally:
                if not won or won[0][0] is not stream:
                    reset(stream)

        try:
            async with trio.open_nursery() as race:
                for listener in listeners:
                    race.start_soon(_accept_each, listener, race, shake_hands)
        except BaseException:  # cancelled from outside just as one won: not ours to keep
            if won:
                reset(won[0][0])
            raise
        raw, secured = won[0]
        return connections.adopt(raw), secured

    async def keep_connected(self, plans: list[_Plan]) -> None:
        """Connect, carry, and when the tunnel ends or cannot be made, connect again after
        a growing wait; until cancelled."""
        backoff = Backoff(self.config.reconnect_max)
        attempts = 0
        while True:
            ended = "lost"
            async with Connections(self.config.keepalive) as connections:
                try:  # datagrams meanwhile wait in the kernel's short queue, for this tunnel
                    connected = [
                        await self.connect(connections, plan, again=attempts > 0) for plan in plans
                    ]
                except* TunnelError as group:
                    for message in messages(group):
                        log.warning("%s", message)
                else:
                    _log_connected(connected)  # now: the datagrams from here on are carried
                    up_since = trio.current_time()
                    ended = await self.carry([stream for stream, _ in connected])
                    if trio.current_time() - up_since >= STEADY_AFTER:
                        backoff.reset()
            attempts += 1
            if ended == "idle":  # nothing to carry: connect again when something comes
                self.counters.state = "idle, waiting for a datagram"
                await _wait_for_datagram(self.udps)
                backoff.reset()
                continue
            wait = backoff.next()
            self.counters.state = f"reconnecting in {wait:.1f} s"
            log.info("Reconnecting in %.1f s (attempt %d)", wait, backoff.attempt + 1)
            async with self._discarding():
                await trio.sleep(wait)
            self.counters.reconnects += 1

    async def connect(
        self, connections: Connections, plan: _Plan, *, again: bool = False
    ) -> tuple[trio.abc.Stream, SockAddr]:
        """Connect one relay's TCP connection within the connect timeout, shared among the
        server's addresses. ``again``: resolve the server's name anew first, so that a
        server that has moved is found (a failure to resolve is one more failed attempt)."""
        self.counters.state = f"connecting to {plan.relay.tcp}"
        addresses = plan.tcp
        if again:
            try:
                addresses = await resolve(plan.relay.tcp, "TCP", socket.SOCK_STREAM)
            except ConfigError as exc:  # it did resolve at the start: it may again
                raise TunnelError(str(exc)) from exc
        share = self.config.connect_timeout / max(len(addresses), 1)
        stream, address = await connect(
            connections, addresses, plan.relay.tcp, attempt_seconds=share
        )
        if self.tls is None:
            return stream, address
        return await self.tls.secure(stream, plan.relay.tcp.host), address

    async def carry(self, streams: list[trio.abc.Stream]) -> str:
        """Run the relays over ``streams`` until the tunnel ends.

        Returns:
            Why it ended: "closed" by a peer, "idle" past the idle timeout, or "lost"
            (broken; only with ``persist``, which logs it instead of raising).
        """
        self.counters.tunnels += 1
        self.counters.state = "tunnel up with " + ", ".join(map(_peer, streams))
        ended = "closed"
        try:
            async with trio.open_nursery() as nursery:

                def end_idle() -> None:
                    nonlocal ended
                    ended = "idle"
                    nursery.cancel_scope.cancel(reason="no datagram for the idle timeout")

                if idle := self.config.idle_timeout:
                    watch = partial(end_when_idle, lambda: self.counters.traffic, idle, end_idle)
                    nursery.start_soon(watch)
                await _run_relays(streams, self.udps, self.counters, self.config.max_delay)
                nursery.cancel_scope.cancel(reason="the tunnel ended")
        except* TunnelError as group:
            if not self.config.persist:
                raise
            for message in messages(group):
                log.warning("Tunnel lost: %s", message)
            ended = "lost"
        return ended

    @contextlib.asynccontextmanager
    async def _discarding(self) -> AsyncIterator[None]:
        """With ``persist``: while waiting for a client, or between two attempts to connect,
        datagrams are dropped and counted rather than left to wait. Without, as the
        original: they wait in the kernel's short queue."""
        if not self.config.persist:
            yield
            return
        async with trio.open_nursery() as nursery:
            for udp in self.udps:
                nursery.start_soon(discard, udp, self.counters)
            yield
            nursery.cancel_scope.cancel(reason="a tunnel is up")


def _peer(stream: trio.abc.Stream) -> str:
    """Who is at the other end of a connection, in TLS or not."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return peer(stream) if isinstance(stream, trio.SocketStream) else "?"


def _log_connected(connected: list[tuple[trio.abc.Stream, SockAddr]]) -> None:
    for _, address in connected:
        log.info("Connected TCP to %s", show(address))


async def _wait_for_datagram(udps: list[UdpSockets]) -> None:
    """Return when a datagram waits on any of the UDP sockets, leaving it there."""
    async with trio.open_nursery() as nursery:
        for udp in udps:
            waiter = partial(trio.lowlevel.wait_readable, udp.receive)
            nursery.start_soon(run_then, nursery.cancel_scope.cancel, waiter)


async def _resolve(relay: Relay, config: Config) -> _Plan:
    mode = config.mode
    udp = (await resolve(relay.udp, "UDP", socket.SOCK_DGRAM))[0]
    if relay.udp_bind.host is None:  # as the original: the group itself, or every address
        family, target = udp
        there = is_multicast(target) or (config.flows and mode is Mode.CLIENT)  # flows: UDP-ADDR
        host = target[0] if there else WILDCARD[family]
        udp_bind = (family, (host, relay.udp_bind.port))
    else:
        udp_bind = (await resolve(relay.udp_bind, "UDP bind", socket.SOCK_DGRAM))[0]
    tcp = await resolve(relay.tcp, "TCP", socket.SOCK_STREAM, passive=mode is Mode.SERVER)
    return _Plan(relay, tcp, udp, udp_bind)


async def _listen_all(
    stack: contextlib.AsyncExitStack, plans: list[_Plan]
) -> list[list[trio.SocketListener]]:
    """Each relay's listeners: the sockets systemd passed, if it did, or new ones."""
    activated = take_listen_sockets()
    if activated:
        return activated_listeners(stack, activated, len(plans))
    listener_sets = []
    for plan in plans:
        listeners = await listen(stack, plan.tcp, plan.relay.tcp)
        listener_sets.append(listeners)
        port = listeners[0].socket.getsockname()[1]
        if plan.relay.tcp.host is None:  # the original's words, for every address
            log.info("Listening for TCP connections on port %d", port)
        else:
            log.info("Listening for TCP connections on port %d of %s", port, plan.relay.tcp.host)
    return listener_sets


async def _accept_first(
    connections: Connections, listeners: list[trio.SocketListener]
) -> trio.SocketStream:
    """The first connection on any of the listeners, closed with ``connections``."""
    accepted: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_into, listener, accepted, nursery.cancel_scope)
    except BaseException:  # cancelled just as a client came: it is not ours to keep
        for stream in accepted:
            refuse(stream)
        raise
    first, *others = accepted
    for stream in others:  # two at the same instant: the later one is refused like any other
        refuse(stream)
    return connections.adopt(first)


async def _accept_into(
    listener: trio.SocketListener, accepted: list[trio.SocketStream], scope: trio.CancelScope
) -> None:
    accepted.append(await accept(listener))
    scope.cancel(reason="a client connected")


async def _accept_each(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handle: Callable[[trio.SocketStream, trio.CancelScope], Awaitable[object]],
) -> None:
    """Hand every connection that comes to ``handle`` in a task of ``nursery``."""
    while True:
        stream = await accept(listener)
        nursery.start_soon(handle, stream, nursery.cancel_scope)


async def _refuse_all(listener: trio.SocketListener) -> None:
    """Refuse every further client at once, instead of leaving it hanging (defect 8)."""
    while True:
        refuse(await accept(listener))


async def _run_relays(
    streams: list[trio.abc.Stream],
    udps: list[UdpSockets],
    counters: Counters,
    max_delay: float,
) -> None:
    """Run every relay; the first whose peer closes ends them all. Logs the summary."""
    try:
        async with trio.open_nursery() as nursery:
            stop = partial(nursery.cancel_scope.cancel, reason="a TCP peer closed the connection")
            for stream, udp in zip(streams, udps, strict=True):
                relay = partial(run_relay, stream, udp, counters, max_delay=max_delay)
                nursery.start_soon(run_then, stop, relay)
    finally:
        log.info("Tunnel closed. %s", counters.summary())
