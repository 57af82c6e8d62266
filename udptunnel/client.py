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
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from .acceptance import Proof
from .config import Address
from .errors import ConfigError, TunnelError, leaves, messages
from .persist import STEADY_AFTER, Backoff
from .session import Session
from .sockets import Connections, Resolved, SockAddr, connect, resolve, show
from .tls import Tls, is_alert

log = logging.getLogger(__name__)

REFUSAL_WINDOW = 3.0  # seconds: a server refuses within a round trip; later, a reset is a loss


@dataclass(frozen=True)
class Server:
    """Where one port pair's TCP connection goes: the server's addresses, resolved, and
    its name as given (resolved again on each reconnection)."""

    addresses: list[Resolved]
    label: Address


async def dial(
    connections: Connections,
    addresses: list[Resolved],
    label: Address,
    *,
    within: float,
    tls: Tls | None,
) -> tuple[trio.abc.Stream, SockAddr, Answer]:
    """Connect to the server within ``within`` seconds, shared among its addresses, and in TLS
    shake hands, checking its certificate. The connection is closed with ``connections``.

    Returns:
        The stream to carry the tunnel over, the address it is connected to, and what to
        tell its relay (so that a refusal is named).

    Raises:
        TunnelError: no address answered, or the handshake failed; if the server ended the
            connection at once, with the likely causes.
    """
    share = within / max(len(addresses), 1)
    try:
        stream, address = await connect(connections, addresses, label, attempt_seconds=share)
        secured = stream if tls is None else await tls.secure(stream, label.host)
    except TunnelError as exc:
        if was_reset(exc):
            raise TunnelError(refused(str(exc), tls=tls is not None)) from exc
        raise
    return secured, address, Answer(tls=tls is not None)


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
    ) -> None:
        self.session, self.servers, self.tls = session, servers, tls
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
            _log_connected(connected)
            task_status.started([address for _, address, _ in connected])
            await self._carry(connected)

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
                    _log_connected(connected)  # now: the datagrams from here on are carried
                    up_since = trio.current_time()
                    ended = await self._carry(connected)
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

    async def _carry(self, connected: list[tuple[trio.abc.Stream, SockAddr, Answer]]) -> str:
        streams = [stream for stream, _, _ in connected]
        return await self.session.carry(streams, [answer for _, _, answer in connected])

    async def _connect(
        self, connections: Connections, server: Server, *, again: bool = False
    ) -> tuple[trio.abc.Stream, SockAddr, Answer]:
        """Connect one port pair's TCP connection. ``again``: resolve the server's name
        anew first, so that a server that has moved is found (a failure to resolve is one
        more failed attempt)."""
        self.session.counters.state = f"connecting to {server.label}"
        addresses = server.addresses
        if again:
            try:
                addresses = await resolve(server.label, "TCP", socket.SOCK_STREAM)
            except ConfigError as exc:  # it did resolve at the start: it may again
                raise TunnelError(str(exc)) from exc
        return await dial(
            connections, addresses, server.label, within=self.connect_timeout, tls=self.tls
        )


def _log_connected(connected: list[tuple[trio.abc.Stream, SockAddr, Answer]]) -> None:
    for _, address, _ in connected:
        log.info("Connected TCP to %s", show(address))
