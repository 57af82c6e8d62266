"""The client end of a single tunnel: connect, carry, and with ``--persist`` reconnect.

A client connects one TCP connection per port pair (two in RTP mode), in order, each within
the connect timeout shared among the server's addresses, and in TLS verifies the server
before anything is carried. Without ``--persist`` the first failure, or the tunnel's end,
ends the client; with it, the client tries again after a growing wait (persist.py),
resolving the server's name anew each time.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from .config import Address
from .errors import ConfigError, TunnelError, messages
from .persist import STEADY_AFTER, Backoff
from .session import Session
from .sockets import Connections, Resolved, SockAddr, connect, resolve, show
from .tls import Tls

log = logging.getLogger(__name__)


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
) -> tuple[trio.abc.Stream, SockAddr]:
    """Connect to the server within ``within`` seconds, shared among its addresses, and in TLS
    shake hands, checking its certificate. The connection is closed with ``connections``.

    Returns:
        The stream to carry the tunnel over, and the address it is connected to.

    Raises:
        TunnelError: no address answered, or the handshake failed.
    """
    share = within / max(len(addresses), 1)
    stream, address = await connect(connections, addresses, label, attempt_seconds=share)
    if tls is None:
        return stream, address
    return await tls.secure(stream, label.host), address


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
            task_status.started([address for _, address in connected])
            await self.session.carry([stream for stream, _ in connected])

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
                    ended = await self.session.carry([stream for stream, _ in connected])
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

    async def _connect(
        self, connections: Connections, server: Server, *, again: bool = False
    ) -> tuple[trio.abc.Stream, SockAddr]:
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


def _log_connected(connected: list[tuple[trio.abc.Stream, SockAddr]]) -> None:
    for _, address in connected:
        log.info("Connected TCP to %s", show(address))
