"""The client end of a single tunnel: connect, carry, and with ``--persist`` reconnect.

A client connects one TCP connection per port pair (two in RTP mode), in order, each within
the connect timeout shared among the server's addresses, and in TLS verifies the server
before anything is carried. Without ``--persist`` the first failure, or the tunnel's end,
ends the client; with it, the client tries again after a growing wait (persist.py),
resolving the server's name anew each time.

The wire format has no word for a refusal: a server that turns a client away can only end
the connection, and say why in its own log. A TLS server says it with an alert, which the
client reports in its own words; otherwise a connection reset right after it was made, before
the server sent anything, is reported with its likely causes.

With ``--connections N`` the client opens N-1 further connections per port pair once the
first is up, the same way, and replaces each that breaks while the tunnel runs (lanes.py).
A server that does not take them leaves the tunnel on its one connection, said once.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, replace
from functools import partial

import trio

from .acceptance import Proof
from .config import Address, ProxySettings
from .errors import ConfigError, TunnelError, leaves, messages
from .lanes import Lane, Lanes
from .persist import STEADY_AFTER, Backoff
from .proxy import ProxyFailure, connect_via
from .session import Session
from .sockets import Connections, Resolved, SockAddr, connect, resolve, show
from .tls import Tls, is_alert

log = logging.getLogger(__name__)

LANE_TRIES = 3  # further connections refused or failed, none taken: the server takes none
SETTLE_RTTS, SETTLE_MIN = 4, 0.1  # TLS: what the server gets to finish the first handshake
REFUSAL_WINDOW = 3.0  # seconds: a server refuses within a round trip; later, a reset is a loss
SHOWN_HEAD = 32  # bytes of what another kind of server sent, shown in the error


@dataclass(frozen=True)
class Server:
    """Where one port pair's TCP connection goes: the server's addresses, resolved (none
    where a proxy resolves the name), its name as given (resolved again on each
    reconnection), and the proxy to go through, if any."""

    addresses: list[Resolved]
    label: Address
    proxy: ProxySettings | None = None

    @property
    def resolved_here(self) -> bool:
        """Whether this end resolves the server's name (not a proxy that does it)."""
        return self.proxy is None or not self.proxy.resolves_names


async def dial(
    connections: Connections,
    server: Server,
    *,
    within: float,
    tls: Tls | None,
) -> tuple[trio.abc.Stream, SockAddr, Answer]:
    """Connect to the server within ``within`` seconds, shared among its addresses (or
    through its proxy, the proxy's handshake included), and in TLS shake hands, checking
    the server's certificate. The connection is closed with ``connections``.

    Returns:
        The stream to carry the tunnel over, the address it is connected to, and what to
        tell its relay (so that a refusal is named).

    Raises:
        TunnelError: no address answered, the proxy refused, or the handshake failed; if the
            server ended the connection at once, with the likely causes.
    """
    addresses, label = server.addresses, server.label
    share = within / max(len(addresses), 1)
    try:
        if server.proxy is None:
            stream, address = await connect(connections, addresses, label, attempt_seconds=share)
        else:
            stream, address = await _through(connections, server.proxy, addresses, label, within)
        secured = stream if tls is None else await tls.secure(stream, label.host)
    except TunnelError as exc:
        if was_reset(exc) and not isinstance(exc, ProxyFailure):
            raise TunnelError(refused(str(exc), tls=tls is not None)) from exc
        raise
    return secured, address, Answer(tls=tls is not None)


async def _through(
    connections: Connections,
    proxy: ProxySettings,
    addresses: list[Resolved],
    label: Address,
    within: float,
) -> tuple[trio.SocketStream, SockAddr]:
    """Connect to the server through ``proxy`` within ``within`` seconds."""
    with trio.move_on_after(within):
        stream, address = await connect_via(proxy, label, addresses)
        return connections.adopt(stream), address
    raise TunnelError(
        f"cannot connect to TCP {label} through the proxy {proxy}: no answer in {within:g} s"
    )


class Answer(Proof):
    """What the server has sent on a new connection, told by its relay: if the connection
    breaks before the first whole frame, this says what that means.

    Args:
        tls: the connection is in TLS.
    """

    def __init__(self, *, tls: bool) -> None:
        super().__init__()
        self.tls = tls
        self.since = trio.current_time()

    def unproven(self, failure: BaseExceptionGroup[TunnelError]) -> str | None:
        """A reset before the server's first frame: in plain TCP after a TLS alert, the
        server speaks TLS; after nothing at all, right after connecting, a refusal."""
        if self.proved.is_set() or not any(map(was_reset, leaves(failure))):
            return None
        if not self.tls and is_alert(self.head):
            return "the server speaks TLS: start this client with --tls"
        if self.head or trio.current_time() - self.since > REFUSAL_WINDOW:
            return None
        return refused(next(messages(failure)), tls=self.tls)  # one break, one line

    def cut_short(self) -> str | None:
        """The server ended the connection before its first whole frame, after bytes that
        are not one: whatever answered, it is no tunnel end."""
        shown = "".join(chr(c) if 32 <= c < 127 else "." for c in self.head[:SHOWN_HEAD])
        return (
            "the server closed the connection inside its first frame: is it udptunnel? "
            f"It sent {shown!r}"
        )


def refused(failure: str, *, tls: bool) -> str:
    """A failure right after connecting, before the server sent anything, and its likely
    causes: the server's log says which."""
    mismatch = "refuse our certificate or not use TLS" if tls else "expect TLS (--tls)"
    return (
        f"{failure} (the server ended it at once: is it busy with another client or at "
        f"--max-flows, does it {mismatch}, or is it not udptunnel? Its log at -v says which)"
    )


def was_reset(exc: BaseException) -> bool:
    """Whether the peer reset the connection (or had, when we wrote), behind ``exc``."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return True
        cause = cause.__cause__
    return False


class Client:
    """Connects a session's tunnels to the server.

    Args:
        session: the UDP side, carried over each tunnel.
        servers: one per port pair.
        tls: the client's TLS, or None.
        keepalive, connect_timeout, reconnect_max: as on the command line.
        connections: how many connections to carry each port pair over.
    """

    def __init__(
        self,
        session: Session,
        servers: list[Server],
        tls: Tls | None,
        *,
        keepalive: int | None,
        connect_timeout: float,
        reconnect_max: float,
        connections: int = 1,
    ) -> None:
        self.session, self.servers, self.tls = session, servers, tls
        self.connections = connections
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.reconnect_max = reconnect_max

    async def run_once(
        self, *, task_status: trio.TaskStatus[list[SockAddr]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, report the connected addresses, and carry the tunnel until it ends.

        Raises:
            TunnelError: the server could not be reached, or the tunnel broke.
        """
        async with Connections(self.keepalive) as connections:
            connected = [await self._connect(connections, server) for server in self.servers]
            self._log_connected(connected)
            task_status.started([address for _, address, _ in connected])
            await self._carry(connections, connected)

    async def keep_connected(self) -> None:
        """Connect, carry, and when the tunnel ends or cannot be made, connect again after
        a growing wait; until cancelled."""
        counters = self.session.counters
        backoff = Backoff(self.reconnect_max)
        attempts = 0
        while True:
            ended = "lost"
            async with Connections(self.keepalive) as connections:
                try:  # datagrams meanwhile wait in the kernel's short queue, for this tunnel
                    connected = [
                        await self._connect(connections, server, again=attempts > 0)
                        for server in self.servers
                    ]
                except* TunnelError as group:
                    for message in messages(group):
                        log.warning("%s", message)
                else:
                    self._log_connected(connected)  # now: the datagrams from here on are carried
                    up_since = trio.current_time()
                    ended = await self._carry(connections, connected)
                    if trio.current_time() - up_since >= STEADY_AFTER:
                        backoff.reset()
            attempts += 1
            if ended == "idle":  # nothing to carry: connect again when something comes
                counters.state = "idle, waiting for a datagram"
                await self.session.wait_for_datagram()
                backoff.reset()
                continue
            wait = backoff.next()
            counters.state = f"reconnecting in {wait:.1f} s"
            log.info("Reconnecting in %.1f s (attempt %d)", wait, backoff.attempt + 1)
            async with self.session.discarding():
                await trio.sleep(wait)
            counters.reconnects += 1

    async def _carry(
        self, connections: Connections, connected: list[tuple[trio.abc.Stream, SockAddr, Answer]]
    ) -> str:
        lanes = [Lanes(stream, wanted=self.connections) for stream, _, _ in connected]
        keepers = [
            partial(self._keep_lanes, connections, server, each)
            for server, each in zip(self.servers, lanes, strict=True)
            if self.connections > 1
        ]
        answers = [answer for _, _, answer in connected]
        return await self.session.carry(lanes, answers, alongside=keepers)

    async def _keep_lanes(self, connections: Connections, server: Server, lanes: Lanes) -> None:
        """Open a port pair's further connections, and replace each that breaks, while the
        tunnel runs. A server that does not greet one (the original, or ours without the
        option), or refuses the first LANE_TRIES, is told of once, and tried no more."""
        backoff = Backoff(self.reconnect_max)
        taken = False  # the server has taken one: it can take more
        failures = 0
        ended, up_since = lanes.ended, trio.current_time()
        await _after_the_server(lanes.first)
        while True:
            while not lanes.room():
                await lanes.changed()
            if lanes.ended > ended:  # one ended: soon after the last came up, wait first
                ended = lanes.ended
                if trio.current_time() - up_since >= STEADY_AFTER:
                    backoff.reset()
                else:
                    await trio.sleep(backoff.next())
            try:
                stream, _, _ = await dial(
                    connections, server, within=self.connect_timeout, tls=self.tls
                )
            except TunnelError as exc:
                why, final = _plain(exc), False
            else:
                lane = lanes.join(stream, usable=False)
                with trio.move_on_after(self.connect_timeout):
                    await lane.settled.wait()
                if lane.usable:
                    taken, up_since = True, trio.current_time()
                    continue
                final = lane.failure is None  # it took the connection, and said nothing
                why = lane.failure or f"no greeting in {self.connect_timeout:g} s"
                lanes.lose(lane, TunnelError(why))
            failures += 1
            if not taken and (final or failures >= LANE_TRIES):
                log.warning(
                    "The server did not take a further TCP connection (%s): is it udptunnel "
                    "2 started with --connections? Carrying on over one",
                    why,
                )
                return
            wait = backoff.next()
            log.info("Cannot open TCP connection (%s); trying again in %.1f s", why, wait)
            await trio.sleep(wait)

    async def _connect(
        self, connections: Connections, server: Server, *, again: bool = False
    ) -> tuple[trio.abc.Stream, SockAddr, Answer]:
        """Connect one port pair's TCP connection. ``again``: resolve the server's name
        anew first, so that a server that has moved is found (a failure to resolve is one
        more failed attempt)."""
        self.session.counters.state = f"connecting to {server.label}"
        if again and server.resolved_here:
            try:
                addresses = await resolve(server.label, "TCP", socket.SOCK_STREAM)
            except ConfigError as exc:  # it did resolve at the start: it may again
                raise TunnelError(str(exc)) from exc
            server = replace(server, addresses=addresses)
        return await dial(connections, server, within=self.connect_timeout, tls=self.tls)

    def _log_connected(self, connected: list[tuple[trio.abc.Stream, SockAddr, Answer]]) -> None:
        for (_, address, _), server in zip(connected, self.servers, strict=True):
            if server.proxy is None:
                log.info("Connected TCP to %s", show(address))
            else:
                log.info("Connected TCP to %s through the proxy %s", show(address), server.proxy)


def _plain(exc: TunnelError) -> str:
    """What went wrong, without the hint that a refusal of the tunnel itself would get."""
    cause = exc.__cause__
    return str(cause if isinstance(cause, TunnelError) else exc)


async def _after_the_server(first: Lane) -> None:
    """In TLS, give the server time to finish the first connection's handshake before a
    further connection starts its own. A TLS 1.3 client is done half a round trip before
    the server, and the server takes the first handshake it finishes for the tunnel's:
    a further one that overtook the first would take its place. Nothing tells the client
    when the server is done (its session ticket waits for its first write), so it waits
    SETTLE_RTTS round trips, at least SETTLE_MIN: time for a lost segment to be sent again."""
    if isinstance(first.stream, trio.SSLStream):
        await trio.sleep(max(SETTLE_RTTS * first.rtt(), SETTLE_MIN))
