"""The tunnel's sockets: names resolved once, then each socket opened with the options its job
needs, registered with the caller's exit stack so that it is closed however the tunnel ends.

UDP sockets are plain non-blocking ``socket.socket`` objects: the relay drains them with one
system call per datagram and waits with ``trio.lowlevel.wait_readable``. TCP connections are
``trio.SocketStream`` objects, closed with an orderly goodbye.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from .allow import SourceFilter
from .config import RTP_PAIR as RTP_RELAYS
from .config import Address
from .errors import ConfigError, TunnelError
from .systemd import ListenSocket

log = logging.getLogger(__name__)

SockAddr = tuple[Any, ...]  # (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6
Resolved = tuple[int, SockAddr]  # (address family, socket address)
WILDCARD: dict[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
GOODBYE_READ = 64 * 1024  # bytes per read while draining a closing connection
UNSENT_LIMIT = 64 * 1024  # bytes the kernel may hold unsent: enough to keep the link busy
CLOSE_GRACE = 2.0  # seconds a closing connection waits for the peer's end before giving up
ACCEPT_BACKOFF_FIRST = 0.01  # seconds: the first pause after accept() fails
ACCEPT_BACKOFF_MAX = 1.0  # seconds: the longest
KEEPALIVE_PROBES = 3  # unanswered probes that end a connection: detection in about 2x idle
# Congestion control for the tunnel's connections: under loss cubic lets a stream of
# datagrams fall behind for good (1,000/s at 80 ms RTT and 3% loss: 24-31% lost, seconds
# late), bbr keeps up (contrib/bench/wan-levers.md). Where the kernel lacks it or does not
# allow it, the system's default stays.
CONGESTION_CONTROL = b"bbr"
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_MAPPED_PREFIX = "::ffff:"  # how a dual-stack IPv6 socket sees an IPv4 source


async def resolve(
    address: Address, role: str, socktype: int, *, passive: bool = False
) -> list[Resolved]:
    """Resolve a host and port once, in the resolver's order of preference.

    Raises:
        ConfigError: the name does not exist (exit status 2).
        TunnelError: the resolver could not answer for now.
    """
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socktype, flags=flags
        )
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise TunnelError(f"{address.host}: {role} host lookup failed: {exc.strerror}") from exc
        raise ConfigError(f"{address.host}: {role} host unknown ({exc.strerror})") from exc
    except UnicodeError as exc:  # the IDNA codec refuses it before the resolver sees it
        raise ConfigError(f"{address.host}: {role} host unknown (not a valid name)") from exc
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def is_multicast(sockaddr: SockAddr) -> bool:
    return ipaddress.ip_address(sockaddr[0].partition("%")[0]).is_multicast


@dataclass(frozen=True, eq=False)
class UdpEnd:
    """The UDP side of one relay: one non-blocking socket that receives the datagrams for
    the tunnel and sends those from it, so that the destination sees the tunnel's port and
    its replies come back into the tunnel (WireGuard, OpenVPN, symmetric RTP answer to the
    address a datagram came from).

    Attributes:
        sock: bound where datagrams for the tunnel arrive (and connected to the destination,
            for a server flow's socket of its own).
        destination: where datagrams from the tunnel go; None if ``sock`` is connected.
        own_addresses: where our own datagrams come from, as this socket sees them: sent to
            an address of our own (the original's self-loop), they come back and are dropped.
        sources: who may send into the tunnel (--allow-from); by default, anyone.
    """

    sock: socket.socket
    destination: SockAddr | None = None
    own_addresses: frozenset[tuple[str, int]] = frozenset()
    sources: SourceFilter = field(default_factory=lambda: SourceFilter(()))


def open_udp(
    stack: contextlib.ExitStack[Any],
    destination: Resolved,
    bind: Resolved,
    *,
    ttl: int,
    bind_was_given: bool,
    sources: SourceFilter,
) -> UdpEnd:
    """Open a relay's UDP socket: bound where datagrams for the tunnel arrive, and sending
    from there to the destination.

    A multicast destination is sent to with the TTL and without loopback, and joined when
    the socket is bound to the group or to every address.

    Raises:
        TunnelError: naming the address that failed.
    """
    family, target = destination
    bind_family, local = bind
    sock = stack.enter_context(socket.socket(bind_family, socket.SOCK_DGRAM))
    sock.setblocking(False)
    try:
        sock.bind(local)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE and not bind_was_given:
            hint = " (--udp-bind chooses another address or port)"  # an app shares the host
        raise TunnelError(f"cannot receive UDP on {show(local)}: {strerror(exc)}{hint}") from exc
    if bind_family != family:
        raise TunnelError(
            f"cannot send UDP to {show(target)} from {show(local)}: not the same address family"
        )
    if is_multicast(target):
        try:
            _set_multicast_sending(sock, family, ttl)
        except OSError as exc:
            raise TunnelError(f"cannot send UDP to {show(target)}: {strerror(exc)}") from exc
        if local[0] in (target[0], WILDCARD[family]):
            try:
                _join(sock, family, target)
            except OSError as exc:
                raise TunnelError(
                    f"cannot join multicast group {target[0]}: {strerror(exc)}"
                ) from exc
            log.info("Joined multicast group %s", target[0])
    try:
        own = own_addresses(sock.getsockname(), destination)
    except OSError as exc:
        raise TunnelError(f"cannot send UDP to {show(target)}: {strerror(exc)}") from exc
    return UdpEnd(sock, target, own, sources)


def open_flow_udp(where: Resolved, *, bind: bool) -> socket.socket:
    """A non-blocking UDP socket for flow mode, bound to ``where`` (the client's one socket:
    every flow's datagrams arrive there and its replies leave there) or connected to it (a
    server flow's own, so that only the destination's replies come back to it). The caller
    closes it.

    Raises:
        TunnelError: if there is no socket to be had (out of descriptors), or the address
            cannot be bound or reached.
    """
    family, address = where
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise TunnelError(f"cannot open a UDP socket: {strerror(exc)}") from exc
    try:
        sock.setblocking(False)
        (sock.bind if bind else sock.connect)(address)
    except OSError as exc:
        sock.close()
        what = "receive UDP on" if bind else "send UDP to"
        raise TunnelError(f"cannot {what} {show(address)}: {strerror(exc)}") from exc
    return sock


def own_addresses(local: SockAddr, destination: Resolved) -> frozenset[tuple[str, int]]:
    """Where our datagrams to ``destination`` come from, as a socket of either family would
    see them: the address the route to it leaves from, and our port. Sent to an address of
    our own, they come back to us, and are dropped (the original's self-loop).

    Raises:
        OSError: the destination cannot be sent to from here (no route, or a broadcast
            address, which needs SO_BROADCAST).
    """
    family, target = destination
    host, port = local[:2]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(target)  # sends nothing: only asks the routing table
        if host == WILDCARD[family]:
            host = probe.getsockname()[0]
    if ":" in host:
        return frozenset({(host, port)})
    return frozenset({(host, port), (_MAPPED_PREFIX + host, port)})


def _set_multicast_sending(sock: socket.socket, family: int, ttl: int) -> None:
    """Send with the given TTL (hop limit), and do not hear our own datagrams back."""
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)


def _join(sock: socket.socket, family: int, group: SockAddr) -> None:
    """Join the group: on the IPv6 address's scope interface if it names one (ff02::1%eth0),
    otherwise on the interface the routing table picks."""
    if family == socket.AF_INET:
        request = socket.inet_aton(group[0]) + struct.pack("=I", socket.INADDR_ANY)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
    else:
        address = socket.inet_pton(socket.AF_INET6, group[0].partition("%")[0])
        request = address + struct.pack("=I", group[3])
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)


async def listen(
    stack: contextlib.AsyncExitStack,
    addresses: list[Resolved],
    label: Address,
    *,
    reuse_port: bool = False,
) -> list[trio.SocketListener]:
    """Listen on every address, all on the same port (port 0: the kernel's one choice).
    With ``reuse_port``, other processes may listen on it too (SO_REUSEPORT), and the kernel
    spreads the connections among them.

    Raises:
        TunnelError: naming the address, if any of them cannot be listened on.
    """
    listeners: list[trio.SocketListener] = []
    port = 0
    for family, address in addresses:
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:
                continue  # no IPv6 (or IPv4) on this host: listen on what there is
            raise TunnelError(f"cannot listen on TCP {label}: {strerror(exc)}") from exc
        stack.callback(sock.close)
        try:
            # Rebinding after a restart must not wait out TIME_WAIT; on Linux this never lets
            # two listeners share a port (SO_REUSEPORT would, and is not set).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind((address[0], port or address[1], *address[2:]))
            sock.listen()
        except OSError as exc:
            raise TunnelError(f"cannot listen on TCP {label}: {strerror(exc)}") from exc
        port = sock.getsockname()[1]
        listeners.append(trio.SocketListener(sock))
    return listeners


def activated_listeners(
    stack: contextlib.AsyncExitStack, activated: list[ListenSocket], relays: int
) -> list[list[trio.SocketListener]]:
    """Each relay's listeners from the sockets systemd passed: all of them for one relay; in
    RTP mode, those named "rtp" and "rtcp" (FileDescriptorName=), or two unnamed in order.

    Raises:
        TunnelError: if the sockets cannot be shared out that way.
    """
    for item in activated:
        stack.callback(item.sock.close)
    if relays == 1:
        chosen = [activated]
    elif {item.name for item in activated} >= {"rtp", "rtcp"}:
        chosen = [[item for item in activated if item.name == name] for name in ("rtp", "rtcp")]
    elif len(activated) == RTP_RELAYS:
        chosen = [[activated[0]], [activated[1]]]
    else:
        raise TunnelError(
            "RTP mode takes two sockets from systemd, named rtp and rtcp (FileDescriptorName=)"
        )
    for items in chosen:
        for item in items:
            log.info(
                "Listening for TCP connections on %s (from systemd)", show(item.sock.getsockname())
            )
    return [
        [trio.SocketListener(trio.socket.from_stdlib_socket(item.sock)) for item in items]
        for items in chosen
    ]


async def connect(
    connections: Connections,
    addresses: list[Resolved],
    label: Address,
    *,
    attempt_seconds: float,
) -> tuple[trio.SocketStream, SockAddr]:
    """Connect to the first address that answers, giving each ``attempt_seconds``: one that
    drops everything (a broken IPv6 route, say) must not keep the others from being tried.
    The stream is closed with ``connections``.

    Returns:
        The stream and the address it is connected to.

    Raises:
        TunnelError: naming the address and the last failure, if none answers.
    """
    reason = "no address"
    failure: OSError | None = None
    for family, address in addresses:
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # no such family on this host, or out of descriptors
            reason, failure = strerror(exc), exc
            continue
        with trio.move_on_after(attempt_seconds) as attempt:
            try:
                await sock.connect(address)
            except OSError as exc:
                sock.close()
                reason, failure = strerror(exc), exc
                continue
            except BaseException:
                sock.close()
                raise
        if attempt.cancelled_caught:
            sock.close()
            reason, failure = f"no answer in {attempt_seconds:g} s", None
            continue
        return connections.adopt(trio.SocketStream(sock)), address
    raise TunnelError(f"cannot connect to TCP {label}: {reason}") from failure


class Connections:
    """One tunnel's TCP connections, tuned when adopted and closed together, in order.

    Trio already turns Nagle off (TCP_NODELAY). TCP_NOTSENT_LOWAT keeps the data that the
    kernel holds unsent short, so that when the network is slower than the datagrams come,
    the relay stops reading UDP (and the kernel drops there) instead of queueing seconds.

    With ``keepalive`` seconds, a peer that vanishes without a word ends the connection in
    about twice that: probes after ``keepalive`` idle seconds, three more in the same time,
    and TCP_USER_TIMEOUT for data that stays unacknowledged as long.
    """

    def __init__(self, keepalive: int | None = None) -> None:
        self._streams: list[trio.SocketStream] = []
        self._keepalive = keepalive

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def adopt(self, stream: trio.SocketStream) -> trio.SocketStream:
        # Those closed already (a tunnel's connections that broke, of several) are let go.
        self._streams = [kept for kept in self._streams if kept.socket.fileno() >= 0]
        self._streams.append(stream)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LIMIT)
        with contextlib.suppress(OSError):  # ENOENT: not built; EPERM: not allowed to us
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CONGESTION_CONTROL)
        if idle := self._keepalive:
            interval = max(1, -(-idle // KEEPALIVE_PROBES))  # rounded up, at least 1 s
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 2 * idle * 1000)
        return stream

    async def aclose(self) -> None:
        """Close every connection so that its peer sees an orderly end, even when this end is
        being cancelled: all at once, within CLOSE_GRACE in all."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
            async with trio.open_nursery() as nursery:
                for stream in self._streams:
                    nursery.start_soon(_goodbye, stream)
        for stream in self._streams:
            stream.socket.close()


async def _goodbye(stream: trio.SocketStream) -> None:
    """Send our end (FIN), then read and discard until the peer's end. Closing with unread
    data would send a reset, which the peer would rightly take for a failure."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        while await stream.receive_some(GOODBYE_READ):
            pass


async def accept(listener: trio.SocketListener) -> trio.SocketStream:
    """Accept, waiting out failures such as running out of file descriptors (EMFILE) with
    a pause that doubles, instead of spinning."""
    backoff = ACCEPT_BACKOFF_FIRST
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            log.warning("Cannot accept a TCP connection (%s); retrying", exc.strerror)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)


BUSY = "tunnel busy (another client got in first)"  # why a single tunnel refuses


def refuse(stream: trio.SocketStream, why: str = BUSY) -> None:
    """Reset the connection at once, so that the client knows it was refused."""
    log.info("Refused TCP connection from %s: %s", peer(stream), why)
    reset(stream)


def reset(stream: trio.SocketStream, last_words: bytes = b"") -> None:
    """Close with a reset (linger 0): the peer's next read or write fails, so that it can
    tell a refusal from an orderly end. ``last_words`` (a TLS alert that says why) are sent
    first if the socket takes them at once: the peer reads them before it sees the reset."""
    with contextlib.suppress(OSError):
        if last_words:
            os.write(stream.socket.fileno(), last_words)
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    stream.socket.close()


def fd_of(stream: trio.abc.Stream) -> int:
    """The socket's descriptor, for a plain SocketStream; -1 for any other stream. Only a
    plain one may be read and written around Trio: under a wrapper such as TLS, the bytes
    on the socket are the wrapper's, never the frames."""
    return stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1


def peer(stream: trio.SocketStream) -> str:
    """The peer as ``host/port``; ``?`` if it is already gone."""
    try:
        return show(stream.socket.getpeername())
    except OSError:
        return "?"


def show(sockaddr: SockAddr) -> str:
    return f"{sockaddr[0]}/{sockaddr[1]}"


def strerror(exc: OSError) -> str:
    """The system's words for the error, without the address Trio adds to some messages."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
