"""One tunnel end: resolve the names once, open the sockets, connect, run the relays.

A server listens and takes one TCP connection per relay, refusing any further client at once;
a client connects. Either way the tunnel ends when any relay's TCP peer closes (in RTP mode,
one relay ending ends both), and every socket opened here is closed here.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass
from functools import partial

import trio

from .config import Config, Mode, Relay
from .counters import Counters
from .relay import UdpSockets, kernel_drops, run_relay, run_then
from .sockets import (
    WILDCARD,
    Connections,
    Resolved,
    SockAddr,
    connect,
    is_multicast,
    listen,
    open_udp,
    peer,
    refuse,
    resolve,
)

log = logging.getLogger(__name__)

ACCEPT_BACKOFF_MAX = 1.0  # seconds between retries when accept() fails (out of descriptors)


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
    """Run one tunnel end until its TCP peer closes.

    Reports ``Ready`` once a server listens or a client is connected. Owns every socket it
    opens, and closes them all when it returns or is cancelled.

    Raises:
        ConfigError: a host name does not resolve.
        TunnelError: a socket cannot be set up (address in use, connection refused, ...), or
            the TCP connection breaks.
    """
    plans = [await _resolve(relay, config.mode) for relay in config.relays]
    with contextlib.ExitStack() as udp_stack:
        udps = [
            open_udp(
                udp_stack,
                plan.udp,
                plan.udp_bind,
                ttl=config.ttl,
                bind_was_given=plan.relay.udp_bind.host is not None,
            )
            for plan in plans
        ]
        for udp in udps:  # closed by udp_stack later: count its drops until then
            udp_stack.callback(counters.watch_overflow(partial(kernel_drops, udp.receive)))
        udp_addresses = [udp.receive.getsockname() for udp in udps]
        async with contextlib.AsyncExitStack() as stack:
            connections = Connections()
            stack.push_async_callback(connections.aclose)
            if config.mode is Mode.SERVER:
                await _serve(
                    stack, connections, config, plans, udps, counters, udp_addresses, task_status
                )
                return
            connected = [await connect(connections, plan.tcp, plan.relay.tcp) for plan in plans]
            task_status.started(Ready([[address] for _, address in connected], udp_addresses))
            streams = [stream for stream, _ in connected]
            await _run_relays(streams, udps, counters, config.max_delay)


async def _resolve(relay: Relay, mode: Mode) -> _Plan:
    udp = (await resolve(relay.udp, "UDP", socket.SOCK_DGRAM))[0]
    if relay.udp_bind.host is None:  # as the original: the group itself, or every address
        family, target = udp
        host = target[0] if is_multicast(target) else WILDCARD[family]
        udp_bind = (family, (host, relay.udp_bind.port))
    else:
        udp_bind = (await resolve(relay.udp_bind, "UDP bind", socket.SOCK_DGRAM))[0]
    tcp = await resolve(relay.tcp, "TCP", socket.SOCK_STREAM, passive=mode is Mode.SERVER)
    return _Plan(relay, tcp, udp, udp_bind)


async def _serve(
    stack: contextlib.AsyncExitStack,
    connections: Connections,
    config: Config,
    plans: list[_Plan],
    udps: list[UdpSockets],
    counters: Counters,
    udp_addresses: list[SockAddr],
    task_status: trio.TaskStatus[Ready],
) -> None:
    """Listen, take one connection per relay, refuse the rest, and run the relays."""
    listener_sets = []
    for plan in plans:
        listeners = await listen(stack, plan.tcp, plan.relay.tcp)
        listener_sets.append(listeners)
        port = listeners[0].socket.getsockname()[1]
        if plan.relay.tcp.host is None:  # the original's words, for every address
            log.info("Listening for TCP connections on port %d", port)
        else:
            log.info("Listening for TCP connections on port %d of %s", port, plan.relay.tcp.host)
    task_status.started(
        Ready([[lst.socket.getsockname() for lst in ls] for ls in listener_sets], udp_addresses)
    )
    async with trio.open_nursery() as nursery:
        streams = []
        for listeners in listener_sets:
            streams.append(await _accept_first(connections, listeners))
            log.info("TCP connection from %s", peer(streams[-1]))
            for listener in listeners:
                nursery.start_soon(_refuse_all, listener)
        await _run_relays(streams, udps, counters, config.max_delay)
        nursery.cancel_scope.cancel(reason="the tunnel ended")


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
    accepted.append(await _accept(listener))
    scope.cancel(reason="a client connected")


async def _refuse_all(listener: trio.SocketListener) -> None:
    """Refuse every further client at once, instead of leaving it hanging (defect 8)."""
    while True:
        refuse(await _accept(listener))


async def _accept(listener: trio.SocketListener) -> trio.SocketStream:
    """Accept, waiting out failures such as running out of file descriptors."""
    backoff = 0.01
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            log.warning("Cannot accept a TCP connection (%s); retrying", exc.strerror)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)


async def _run_relays(
    streams: list[trio.SocketStream],
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
