"""How a server end takes its connections: listening (on its own sockets or those systemd
passed), accepting, refusing, and the time a new connection has to prove itself.

Every server, the single tunnel's and flow mode's, takes its connections here. A new
connection proves itself by finishing its TLS handshake or, where asked for (a flow-mode
server), in plain TCP by sending its first whole frame; it has the handshake timeout to do
so from its first byte. At most ``--max-handshakes`` connections are unproven at once: a
newer one pushes out the oldest, so that neither a stranger nor a crowd of stalled
connections keeps a real client out. A connection ended unproven is reset, and nothing it
sent has reached UDP.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

import trio

from .config import Address
from .errors import TunnelError
from .sockets import (
    Connections,
    Resolved,
    accept,
    activated_listeners,
    listen,
    peer,
    refuse,
    reset,
)
from .systemd import take_listen_sockets
from .tls import HANDSHAKE_RECORD, HEAD, NOT_TLS_ALERT, Tls, first_byte, is_client_hello

log = logging.getLogger(__name__)


async def open_listeners(
    stack: contextlib.AsyncExitStack,
    relays: Sequence[tuple[list[Resolved], Address]],
    *,
    reuse_port: bool = False,
    what: str = "",
) -> list[list[trio.SocketListener]]:
    """Each relay's listeners, closed with ``stack``: the sockets systemd passed, if it did,
    or new ones on each relay's addresses (``relays``: the addresses and how to name them).

    Raises:
        TunnelError: if an address cannot be listened on, or systemd's sockets cannot be
            shared out among the relays.
    """
    activated = take_listen_sockets()
    if activated:
        return activated_listeners(stack, activated, len(relays))
    listener_sets = []
    for addresses, label in relays:
        listeners = await listen(stack, addresses, label, reuse_port=reuse_port)
        listener_sets.append(listeners)
        port = listeners[0].socket.getsockname()[1]
        if label.host is None:  # the original's words, for every address
            log.info("Listening for TCP connections on port %d%s", port, what)
        else:
            log.info("Listening for TCP connections on port %d of %s%s", port, label.host, what)
    return listener_sets


async def accept_each(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handle: Callable[[trio.SocketStream], Awaitable[object]],
) -> None:
    """Hand every connection that comes to ``handle``, in a task of ``nursery``; until
    cancelled."""
    while True:
        stream = await accept(listener)
        nursery.start_soon(handle, stream)


async def accept_first(
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
            refuse(stream, "no longer waiting for a client")
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


async def refuse_all(listener: trio.SocketListener) -> None:
    """Refuse every further client at once, instead of leaving it hanging (defect 8)."""
    while True:
        refuse(await accept(listener))


class Proof:
    """How far a new connection has got: begun (its first bytes have come, the first of them
    kept in ``head``), proved (the handshake done, or a whole frame come), or expired (out of
    time to prove itself).

    Args:
        plain: frames in clear are expected, so that a TLS client is told at its first
            bytes that this end does not speak TLS.
    """

    def __init__(self, *, plain: bool = False) -> None:
        self.begun = trio.Event()
        self.proved = trio.Event()
        self.head = b""
        self.expired = False
        self.plain = plain
        self._then: list[Callable[[], object]] = []

    def on_proof(self, then: Callable[[], object]) -> None:
        self._then.append(then)

    def began(self, data: bytes | bytearray = b"") -> None:
        """Bytes have come (``data``, if they are in hand).

        Raises:
            TunnelError: they are a TLS ClientHello, where frames in clear are expected.
        """
        if data and len(self.head) < HEAD:
            self.head += data[: HEAD - len(self.head)]
            if self.plain and is_client_hello(self.head):
                raise TunnelError("the client speaks TLS, and this end is not started with --tls")
        self.begun.set()

    def prove(self) -> None:
        self.begun.set()
        if not self.proved.is_set():
            self.proved.set()
            for then in self._then:  # at once: a proved connection must not be pushed out
                then()

    def unproven(self, failure: BaseExceptionGroup[TunnelError]) -> str | None:
        """What a failure before the first whole frame means: to a server, what it says."""
        return None

    def cut_short(self) -> str | None:
        """A client that ended inside its first frame: to a server, a connection that
        ended, as the original's clients may."""
        return None


class Unproven:
    """Connections that have not yet proved themselves, oldest first. Past the limit, the
    oldest is reset to make room: a crowd of stalled connections can occupy the server's
    attention for at most the handshake timeout, and cannot keep a newcomer out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: dict[trio.CancelScope, str] = {}  # who, in order of arrival

    def add(self, scope: trio.CancelScope, who: str) -> None:
        """A new connection; the oldest are ended (their tasks reset them) past the limit."""
        while len(self._waiting) >= self.limit:
            oldest = next(iter(self._waiting))
            log.info(
                "Closed TCP connection from %s: pushed out by newer ones (--max-handshakes %d)",
                self._waiting.pop(oldest),
                self.limit,
            )
            oldest.cancel(reason="pushed out by newer connections")
        self._waiting[scope] = who

    def discard(self, scope: trio.CancelScope) -> None:
        self._waiting.pop(scope, None)


class Admission:
    """A server's new connections on their way in: TLS, and the time and room they have to
    prove themselves.

    Args:
        tls: the server's TLS, or None for plain TCP.
        limit: connections unproven at once (``--max-handshakes``).
        timeout: seconds from a connection's first byte to its proof
            (``--handshake-timeout``).
    """

    def __init__(self, tls: Tls | None, limit: int, timeout: float) -> None:
        self.tls = tls
        self.timeout = timeout
        self._unproven = Unproven(limit)

    @contextlib.asynccontextmanager
    async def proving(self, stream: trio.SocketStream) -> AsyncIterator[Proof]:
        """The connection's time to prove itself, for the body of this ``async with``: it
        is ended (cancelled, and reset) if it has not proved itself within the timeout of
        its first byte, or when newer connections push it out. A connection that has sent
        nothing at all is not ended here: an original client connects before it has
        anything to send."""
        proof, who = Proof(plain=self.tls is None), peer(stream)
        with trio.CancelScope() as scope:
            self._unproven.add(scope, who)
            proof.on_proof(partial(self._unproven.discard, scope))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._deadline, proof, scope, who)
                    yield proof
                    nursery.cancel_scope.cancel(reason="the connection ended")
            finally:
                self._unproven.discard(scope)
        if scope.cancelled_caught and not proof.proved.is_set():
            # Too late or pushed out: no orderly goodbye for it. In TLS, one that sent
            # nothing in all its time is told that this end speaks TLS: a plain client sends
            # nothing until its first datagram.
            silent = self.tls is not None and proof.expired and not proof.head
            reset(stream, NOT_TLS_ALERT if silent else b"")

    async def secure(self, stream: trio.SocketStream, proof: Proof) -> trio.abc.Stream:
        """The connection in TLS, which proves it; as it is, in plain TCP. A connection
        whose first byte cannot begin a TLS handshake is ended at once; a failed handshake
        resets the connection, after the alert that says why (so that a TLS 1.3 client,
        which may think it got in, learns otherwise).

        Raises:
            TunnelError: the client does not speak TLS, or the handshake failed or did not
                finish in time.
        """
        if self.tls is None:
            return stream
        proof.began()  # the handshake timeout runs from now: a TLS client speaks first
        first = await first_byte(stream)
        proof.began(first)
        if first and first[0] != HANDSHAKE_RECORD:
            reset(stream, NOT_TLS_ALERT)
            raise TunnelError(
                "TLS handshake failed: the client does not speak TLS (is it started without --tls?)"
            )
        try:
            secured = await self.tls.secure(stream, None)
        except TunnelError:
            reset(stream)
            raise
        proof.prove()
        return secured

    async def _deadline(self, proof: Proof, scope: trio.CancelScope, who: str) -> None:
        """End a connection that has not proved itself in time, counted from its first
        byte."""
        await proof.begun.wait()
        with trio.move_on_after(self.timeout):
            await proof.proved.wait()
            return
        hint = ""
        if self.tls is not None and not proof.head:
            hint = " (not a byte: is the client started without --tls?)"
        log.info("Closed TCP connection from %s: nothing useful in %g s%s", who, self.timeout, hint)
        proof.expired = True
        scope.cancel(reason="no handshake or frame in time")
