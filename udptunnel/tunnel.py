"""One tunnel end: resolve the names once, open the sockets, connect, run the relays.

A server listens and takes one TCP connection per relay, closing any further client at once;
a client connects. Either way the tunnel ends when any relay's TCP peer closes (in RTP mode,
one relay ending ends both), and every socket opened here is closed here.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from .config import Address, Config, Mode, Relay
from .counters import Counters
from .errors import ConfigError, TunnelError
from .relay import UdpSockets, run_relay, run_then

log = logging.getLogger(__name__)

SockAddr = tuple[Any, ...]  # (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6
_WILDCARD: dict[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


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
    tcp: list[tuple[int, SockAddr]]
    udp: tuple[int, SockAddr]
    udp_bind: tuple[int, SockAddr]


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
    plans = [await _resolve_relay(relay, config.mode) for relay in config.relays]
    with contextlib.ExitStack() as stack:
        udps = [await _open_udp(stack, plan, config.ttl) for plan in plans]
        udp_addresses = [udp.receive.getsockname() for udp in udps]
        async with contextlib.AsyncExitStack() as streams:
            if config.mode is Mode.SERVER:
                await _serve(streams, plans, udps, counters, udp_addresses, task_status)
            else:
                connected = [await _connect(streams, plan) for plan in plans]
                task_status.started(
                    Ready([[s.socket.getpeername()] for s in connected], udp_addresses)
                )
                await _run_relays(connected, udps, counters)


async def _resolve_relay(relay: Relay, mode: Mode) -> _Plan:
    udp = (await _resolve(relay.udp, "UDP", socket.SOCK_DGRAM))[0]
    if relay.udp_bind.host is None:
        udp_bind = (udp[0], (_default_bind_host(udp), relay.udp_bind.port))
    else:
        udp_bind = (await _resolve(relay.udp_bind, "UDP bind", socket.SOCK_DGRAM))[0]
    tcp = await _resolve(relay.tcp, "TCP", socket.SOCK_STREAM, passive=mode is Mode.SERVER)
    return _Plan(relay, tcp, udp, udp_bind)


def _default_bind_host(udp: tuple[int, SockAddr]) -> str:
    """As the original: a multicast group's own address, otherwise every address."""
    family, sockaddr = udp
    return sockaddr[0] if _is_multicast(sockaddr) else _WILDCARD[family]


async def _resolve(
    address: Address, role: str, socktype: int, *, passive: bool = False
) -> list[tuple[int, SockAddr]]:
    """Resolve once, returning (family, sockaddr) pairs in the resolver's order."""
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socktype, flags=flags
        )
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise TunnelError(f"{address.host}: {role} host lookup failed: {exc.strerror}") from exc
        raise ConfigError(f"{address.host}: {role} host unknown ({exc.strerror})") from exc
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _is_multicast(sockaddr: SockAddr) -> bool:
    return ipaddress.ip_address(sockaddr[0].partition("%")[0]).is_multicast


async def _open_udp(stack: contextlib.ExitStack[Any], plan: _Plan, ttl: int) -> UdpSockets:
    """Open the send socket (connected to the destination) and the receive socket (bound)."""
    family, destination = plan.udp
    multicast = _is_multicast(destination)
    send = stack.enter_context(trio.socket.socket(family, socket.SOCK_DGRAM))
    try:
        if multicast:
            _set_multicast_sending(send, family, ttl)
        await send.connect(destination)
    except OSError as exc:
        raise TunnelError(f"cannot send UDP to {plan.relay.udp}: {_strerror(exc)}") from exc

    bind_family, bind_address = plan.udp_bind
    receive = stack.enter_context(trio.socket.socket(bind_family, socket.SOCK_DGRAM))
    try:
        await receive.bind(bind_address)
    except OSError as exc:
        where = f"{bind_address[0]}/{bind_address[1]}"
        hint = ""
        if exc.errno == errno.EADDRINUSE and plan.relay.udp_bind.host is None:
            hint = " (--udp-bind chooses another address or port)"  # an app shares the host
        raise TunnelError(f"cannot receive UDP on {where}: {_strerror(exc)}{hint}") from exc
    if (
        multicast
        and bind_family == family
        and bind_address[0] in (destination[0], _WILDCARD[family])
    ):
        try:
            _join(receive, family, destination)
        except OSError as exc:
            raise TunnelError(
                f"cannot join multicast group {destination[0]}: {_strerror(exc)}"
            ) from exc
        log.info("Joined multicast group %s", destination[0])
    return UdpSockets(receive, send, send.getsockname())


def _set_multicast_sending(sock: trio.socket.SocketType, family: int, ttl: int) -> None:
    """Send with the given TTL (hop limit), and do not hear our own datagrams back."""
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)


def _join(sock: trio.socket.SocketType, family: int, group: SockAddr) -> None:
    """Join the group: on the IPv6 address's scope interface if it names one (ff02::1%eth0),
    otherwise on the interface the routing table picks."""
    if family == socket.AF_INET:
        request = socket.inet_aton(group[0]) + struct.pack("=I", socket.INADDR_ANY)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
    else:
        address = socket.inet_pton(socket.AF_INET6, group[0].partition("%")[0])
        sock.setsockopt(
            socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, address + struct.pack("=I", group[3])
        )


async def _open_listeners(plan: _Plan) -> list[trio.SocketListener]:
    """Listen on every resolved address; the caller closes what is returned."""
    socks: list[trio.socket.SocketType] = []
    try:
        for family, address in plan.tcp:
            if socks and address[1] == 0:  # port 0: the same kernel-chosen port everywhere
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            try:
                sock = trio.socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # no IPv6 (or IPv4) on this host: listen on what there is
                raise
            socks.append(sock)
            # Rebinding after a restart must not wait out TIME_WAIT; on Linux this never lets
            # two listeners share a port (SO_REUSEPORT would, and is not set).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
            sock.listen()
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise TunnelError(f"cannot listen on TCP {plan.relay.tcp}: {_strerror(exc)}") from exc
    return [trio.SocketListener(sock) for sock in socks]


async def _serve(
    streams: contextlib.AsyncExitStack,
    plans: list[_Plan],
    udps: list[UdpSockets],
    counters: Counters,
    udp_addresses: list[SockAddr],
    task_status: trio.TaskStatus[Ready],
) -> None:
    """Listen, take one connection per relay, refuse the rest, and run the relays."""
    listener_sets = []
    for plan in plans:
        listeners = await _open_listeners(plan)
        for listener in listeners:
            streams.push_async_callback(listener.aclose)
        listener_sets.append(listeners)
        log.info("Listening for TCP connections on port %d", listeners[0].socket.getsockname()[1])
    task_status.started(
        Ready([[lst.socket.getsockname() for lst in ls] for ls in listener_sets], udp_addresses)
    )
    async with trio.open_nursery() as nursery:
        connected = []
        for listeners in listener_sets:
            stream = await _accept_first(listeners)
            await streams.enter_async_context(stream)
            log.info("TCP connection from %s/%d", *stream.socket.getpeername()[:2])
            connected.append(stream)
            for listener in listeners:
                nursery.start_soon(_refuse_all, listener)
        await _run_relays(connected, udps, counters)
        nursery.cancel_scope.cancel(reason="the tunnel ended")


async def _accept_first(listeners: list[trio.SocketListener]) -> trio.SocketStream:
    """The first connection on any of the listeners; the caller closes it."""
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_into, listener, accepted, nursery.cancel_scope)
    first, *others = accepted
    for stream in others:  # two at the same instant: the later one is refused like any other
        await _refuse(stream)
    return first


async def _accept_into(
    listener: trio.SocketListener, accepted: list[trio.SocketStream], scope: trio.CancelScope
) -> None:
    accepted.append(await listener.accept())
    scope.cancel(reason="a client connected")


async def _refuse_all(listener: trio.SocketListener) -> None:
    """Close every further client at once, instead of leaving it hanging (defect 8)."""
    while True:
        await _refuse(await listener.accept())


async def _refuse(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        log.info("Refused TCP connection from %s/%d: tunnel busy", *stream.socket.getpeername()[:2])
    await stream.aclose()


async def _connect(streams: contextlib.AsyncExitStack, plan: _Plan) -> trio.SocketStream:
    """Connect to the first address that answers; the stream is closed with ``streams``."""
    failure: OSError | None = None
    for family, address in plan.tcp:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        stream = await streams.enter_async_context(trio.SocketStream(sock))
        log.info("Connected TCP to %s/%d", *address[:2])
        return stream
    reason = _strerror(failure) if failure else "no address"
    raise TunnelError(f"cannot connect to TCP {plan.relay.tcp}: {reason}") from failure


async def _run_relays(
    streams: list[trio.SocketStream], udps: list[UdpSockets], counters: Counters
) -> None:
    """Run every relay; the first whose peer closes ends them all. Logs the summary."""
    try:
        async with trio.open_nursery() as nursery:
            stop = partial(nursery.cancel_scope.cancel, reason="a TCP peer closed the connection")
            for stream, udp in zip(streams, udps, strict=True):
                nursery.start_soon(run_then, stop, partial(run_relay, stream, udp, counters))
    finally:
        log.info("Tunnel closed. %s", counters.summary())


def _strerror(exc: OSError) -> str:
    """The system's words for the error, without the address Trio adds to some messages."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
