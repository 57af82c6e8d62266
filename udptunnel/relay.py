"""One port pair at work: a task copies TCP to UDP, another copies UDP to TCP.

Each direction has exactly one writer, so frames never interleave and TCP backpressure
reaches the UDP reader with no queue or lock in between. The relay opens and closes nothing:
it is handed a connected stream and the UDP sockets, and returns when the TCP peer closes.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from .counters import Counters
from .errors import TunnelError
from .framing import MAX_DATAGRAM, Decoder, encode

log = logging.getLogger(__name__)

TCP_RECEIVE_SIZE = 256 * 1024  # one read takes many frames: each read pays a syscall
UDP_RECEIVE_SIZE = MAX_DATAGRAM + 1  # one byte more than a frame holds, to see longer ones
# UDP send failures that concern one datagram, not the tunnel: routes come and go.
_TRANSIENT_SEND_ERRORS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ENOBUFS}
)


@dataclass(frozen=True)
class UdpSockets:
    """The UDP side of one port pair.

    Attributes:
        receive: bound where datagrams for the tunnel arrive.
        send: connected to the destination of datagrams from the tunnel.
        own_address: the send socket's local address; datagrams from it are our own output
            coming back (the original's self-loop) and are dropped.
    """

    receive: trio.socket.SocketType
    send: trio.socket.SocketType
    own_address: tuple[Any, ...]  # (host, port), and for IPv6 (flowinfo, scope_id) after


async def run_relay(stream: trio.abc.Stream, udp: UdpSockets, counters: Counters) -> None:
    """Carry datagrams both ways until the TCP peer closes the connection.

    Args:
        stream: the TCP connection; this is its only reader and its only writer.
        udp: the UDP sockets of this port pair.
        counters: updated as datagrams pass or are dropped.

    Raises:
        TunnelError: if the TCP connection breaks (reset, or a write to a closed peer).
    """
    async with trio.open_nursery() as nursery:
        stop = partial(nursery.cancel_scope.cancel, reason="the TCP peer closed the connection")
        nursery.start_soon(run_then, stop, partial(tcp_to_udp, stream, udp, counters))
        nursery.start_soon(udp_to_tcp, udp, stream, counters)


async def run_then(stop: Callable[[], object], run: Callable[[], Awaitable[object]]) -> None:
    """Await ``run()``, then call ``stop()``: the first of several tasks to end ends them all."""
    await run()
    stop()


async def tcp_to_udp(stream: trio.abc.Stream, udp: UdpSockets, counters: Counters) -> None:
    """Send every complete frame from the TCP stream as a UDP datagram; return at EOF."""
    decoder = Decoder()
    verbose = log.isEnabledFor(logging.DEBUG)
    while data := await _receive(stream):
        for datagram in decoder.feed(data):
            if verbose:
                log.debug("Received packet on TCP, length %d; sending as UDP", len(datagram))
            await _send_udp(udp.send, datagram, counters)
    if decoder.pending:
        log.info(
            "TCP connection closed inside a frame: %d bytes of a %s-byte frame lost",
            decoder.pending,
            decoder.expected or "?",
        )


async def udp_to_tcp(udp: UdpSockets, stream: trio.abc.Stream, counters: Counters) -> None:
    """Send every UDP datagram received, except our own, as one frame on the TCP stream."""
    verbose = log.isEnabledFor(logging.DEBUG)
    own_address = udp.own_address[:2]
    while True:
        datagram, source = await udp.receive.recvfrom(UDP_RECEIVE_SIZE)
        if verbose:
            log.debug("Received %d byte UDP packet from %s/%d", len(datagram), *source[:2])
        if source[:2] == own_address:
            counters.dropped_own += 1
            continue
        if len(datagram) > MAX_DATAGRAM:
            counters.dropped_too_large += 1
            log.info("Dropped a UDP datagram of over %d bytes: no frame can carry it", MAX_DATAGRAM)
            continue
        try:
            await stream.send_all(encode(datagram))
        except trio.BrokenResourceError as exc:
            raise TunnelError(f"TCP connection lost while sending: {_reason(exc)}") from exc
        counters.udp_to_tcp_datagrams += 1
        counters.udp_to_tcp_bytes += len(datagram)


async def _receive(stream: trio.abc.Stream) -> bytes | bytearray:
    try:
        return await stream.receive_some(TCP_RECEIVE_SIZE)
    except trio.BrokenResourceError as exc:
        raise TunnelError(f"TCP connection lost while receiving: {_reason(exc)}") from exc


async def _send_udp(sock: trio.socket.SocketType, datagram: bytes, counters: Counters) -> None:
    try:
        await _send_clearing_refusal(sock, datagram)
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            counters.dropped_too_large += 1
            log.info("Dropped a %d-byte frame from TCP: too large for UDP", len(datagram))
            return
        if exc.errno in _TRANSIENT_SEND_ERRORS or isinstance(exc, ConnectionRefusedError):
            counters.dropped_unsent += 1
            log.debug("Dropped a %d-byte frame from TCP: %s", len(datagram), exc.strerror)
            return
        raise TunnelError(f"cannot send UDP datagram: {exc.strerror}") from exc
    counters.tcp_to_udp_datagrams += 1
    counters.tcp_to_udp_bytes += len(datagram)


async def _send_clearing_refusal(sock: trio.socket.SocketType, datagram: bytes) -> None:
    """Send once more after ECONNREFUSED, which reports an earlier datagram's fate.

    A port-unreachable answer to an earlier datagram leaves an error on the connected socket,
    and the next send fails with it before sending anything. The original cleared the error
    and lost that datagram; here it goes out on the second try. (The tunnel may well be up
    before the application at the far end is.)
    """
    try:
        await sock.send(datagram)
    except ConnectionRefusedError:
        log.debug("ECONNREFUSED on udp_send_sock; clearing.")
        await sock.send(datagram)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause or exc) or type(exc).__name__
