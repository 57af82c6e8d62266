"""The server end of a single tunnel: take one connection per port pair, refuse the rest.

Connections are taken as acceptance.py takes them. In plain TCP the first to come is
carried, as the original did; in TLS, the first to finish its handshake (every connection
that comes meanwhile shakes hands at once, within the handshake timeout and the room for
unproven connections). While a tunnel runs, every further client is refused at once, not
left hanging. With ``--persist`` the server then goes back to waiting for the next client.

With ``--connections N`` the tunnel's client may open further connections to each port,
up to N in all (lanes.py): they are taken from the client's host alone, each greeted once
it is in (after its TLS handshake, in TLS), and refused like any other past N.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import trio

from .acceptance import Admission, Proof, accept_each, accept_first, refuse_all
from .errors import TunnelError, messages
from .lanes import GREETING, Lanes
from .session import Session
from .sockets import Connections, accept, peer, refuse, reset
from .tls import lost

log = logging.getLogger(__name__)


class Server:
    """Serves a session's tunnels to the clients that come.

    Args:
        session: the UDP side, carried over each tunnel.
        admission: TLS, and the room for connections still shaking hands.
        keepalive: seconds of silence before TCP keepalive probes, or None.
        connect_timeout: in RTP mode with ``persist``, how long the second connection
            has to come after the first.
        persist: serve one client after another, until cancelled.
        connections: how many connections a client may carry each port pair over.
    """

    def __init__(
        self,
        session: Session,
        admission: Admission,
        *,
        keepalive: int | None,
        connect_timeout: float,
        persist: bool,
        connections: int = 1,
    ) -> None:
        self.session, self.admission = session, admission
        self.connections = connections
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.persist = persist

    async def serve(self, listener_sets: list[list[trio.SocketListener]]) -> None:
        """Take one connection per port pair, refuse the rest while the tunnel runs; with
        ``persist``, then go back to accepting."""
        counters = self.session.counters
        while True:
            counters.state = "waiting for a client"
            served = False
            async with (
                Connections(self.keepalive) as connections,
                trio.open_nursery() as refusers,
            ):
                async with self.session.discarding():
                    streams: list[trio.SocketStream] = []
                    lanes: list[Lanes] = []
                    for listeners in listener_sets:
                        # In RTP mode a persistent server gives the second connection the
                        # connect timeout to come: a stray first one must not wedge it.
                        second = streams and self.persist
                        with trio.move_on_after(self.connect_timeout if second else math.inf):
                            raw, stream = await self._accept(connections, listeners)
                            streams.append(raw)
                            lanes.append(Lanes(stream, wanted=self.connections))
                            for listener in listeners:
                                if self.connections == 1:
                                    refusers.start_soon(refuse_all, listener)
                                else:
                                    admit = partial(self._admit_lanes, connections, lanes[-1], raw)
                                    refusers.start_soon(admit, listener)
                if len(streams) < len(listener_sets):
                    log.warning(
                        "No second connection within %g s of %s; closing it",
                        self.connect_timeout,
                        peer(streams[0]),
                    )
                else:
                    for raw in streams:  # now: the datagrams from here on are carried
                        log.info("TCP connection from %s", peer(raw))
                    # In plain TCP, a TLS client is told at once that it is not welcome.
                    plain = self.admission.tls is None
                    await self.session.carry(lanes, [Proof(plain=plain) for _ in lanes])
                    served = True
                refusers.cancel_scope.cancel(reason="the tunnel ended")
            if served and not self.persist:
                return

    async def _admit_lanes(
        self,
        connections: Connections,
        lanes: Lanes,
        first: trio.SocketStream,
        listener: trio.SocketListener,
    ) -> None:
        """While the tunnel runs: take the further connections of the client of ``first``
        from its host, up to ``--connections`` in all (one that looks dead gives way to a
        newcomer); refuse every other. A failure of one newcomer ends it alone."""
        try:
            host = first.socket.getpeername()[0]
        except OSError:  # the first connection is gone already: so is the tunnel
            host = None
        coming = 0  # taken, still shaking hands

        async def join(stream: trio.SocketStream) -> None:
            nonlocal coming
            who, secured, greeted = peer(stream), None, False
            try:
                async with self.admission.proving(stream) as proof:
                    secured = await self.admission.secure(stream, proof)
                    await _greet(secured)
                    greeted = True
            except* TunnelError as group:
                log.warning("Closed TCP connection from %s: %s", who, next(messages(group)))
                reset(stream)
            finally:
                coming -= 1
            if secured is None or not greeted:  # failed, or too slow (proving reset it)
                return
            lane = lanes.join(secured, usable=True)
            log.info("TCP connection %d of %d from %s", lane.number, lanes.wanted, who)

        async with trio.open_nursery() as nursery:
            while True:
                stream = await accept(listener)
                try:
                    same = stream.socket.getpeername()[0] == host
                except OSError:  # gone already
                    same = False
                if not same:
                    refuse(stream)
                    continue
                if len(lanes.lanes) + coming >= lanes.wanted:
                    if (stale := lanes.stale()) is None:
                        refuse(stream, f"the tunnel has its {lanes.wanted} connections")
                        continue
                    dead, why = stale
                    lanes.lose(dead, TunnelError(f"{why}; a new one takes its place"))
                coming += 1
                nursery.start_soon(join, connections.adopt(stream))

    async def _accept(
        self, connections: Connections, listeners: list[trio.SocketListener]
    ) -> tuple[trio.SocketStream, trio.abc.Stream]:
        """The connection this port pair will carry, and the stream to carry it over: in
        plain TCP, the first to come; in TLS, the first to finish its handshake. The others
        are reset."""
        if self.admission.tls is None:
            stream = await accept_first(connections, listeners)
            return stream, stream
        admission = self.admission
        won: list[tuple[trio.SocketStream, trio.abc.Stream]] = []

        async def shake_hands(stream: trio.SocketStream) -> None:
            who = peer(stream)  # before a failed handshake resets it
            failed = False
            try:
                async with admission.proving(stream) as proof:
                    try:
                        secured = await admission.secure(stream, proof)
                    except TunnelError as exc:
                        log.warning("Closed TCP connection from %s: %s", who, exc)
                        failed = True
                        return
                    if not won:
                        won.append((stream, secured))
                        race.cancel_scope.cancel(reason="a client got in")
            finally:
                if won and won[0][0] is not stream and not failed:
                    refuse(stream)
                elif not won or won[0][0] is not stream:
                    reset(stream)

        try:
            async with trio.open_nursery() as race:
                for listener in listeners:
                    race.start_soon(accept_each, listener, race, shake_hands)
        except BaseException:  # cancelled from outside just as one won: not ours to keep
            if won:
                reset(won[0][0])
            raise
        raw, secured = won[0]
        return connections.adopt(raw), secured


async def _greet(stream: trio.abc.Stream) -> None:
    """Send a further connection's greeting (lanes.py).

    Raises:
        TunnelError: the connection broke.
    """
    try:
        await stream.send_all(GREETING)
    except trio.BrokenResourceError as exc:
        raise lost(stream, exc, "greeting") from exc
