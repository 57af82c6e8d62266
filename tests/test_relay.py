"""The relay in-process, over a real socket pair and real UDP sockets on loopback."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from udptunnel.allow import SourceFilter
from udptunnel.config import parse_rule
from udptunnel.counters import Counters
from udptunnel.egress import UdpSender
from udptunnel.errors import TunnelError
from udptunnel.framing import Decoder, encode
from udptunnel.lanes import Lanes
from udptunnel.relay import (
    Backlog,
    _drop_oldest,
    kernel_drops,
    run_relay,
    tcp_to_udp,
)
from udptunnel.sockets import UdpEnd, own_addresses

from .conftest import WAIT as CEILING
from .conftest import open_trio_udp

LOOPBACK = "127.0.0.1"


@dataclass
class Rig:
    """A relay under test and the far ends of everything it is connected to."""

    peer: trio.SocketStream  # the other end of the relay's TCP stream
    app: trio.socket.SocketType  # the application the relay sends datagrams to
    udp: UdpEnd
    counters: Counters
    done: trio.Event
    decoder: Decoder = field(default_factory=Decoder)
    frames: list[bytes] = field(default_factory=list)  # decoded, not yet taken

    async def send_to_tunnel(self, datagram: bytes) -> None:
        """Send a datagram from the application to the relay's receive socket."""
        await self.app.sendto(datagram, self.udp.sock.getsockname())

    async def frame_from_tunnel(self) -> bytes:
        """The next datagram the relay put on TCP."""
        while not self.frames:
            self.frames += map(bytes, self.decoder.feed(await self.peer.receive_some(65536)))
        return self.frames.pop(0)


def relay_socket() -> socket.socket:
    """A UDP socket as the tunnel gives the relay: plain and non-blocking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Both ends of a real TCP connection on loopback."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    async with listeners[0] as listener:
        client = await trio.testing.open_stream_to_socket_listener(listener)
        return await listener.accept(), client


@asynccontextmanager
async def relay_rig(
    destination: tuple[str, int] | None = None,
    max_delay: float = 1.0,
    receive_buffer: int = 0,
    tcp_buffer: int = 0,
    allow_from: tuple[str, ...] = (),
    *,
    connected: bool = False,
    self_loop: bool = False,
) -> AsyncIterator[Rig]:
    """Run ``run_relay`` over a loopback TCP connection, with an app on loopback.

    Args:
        destination: where the relay sends UDP; by default, the app's socket.
        max_delay: the relay's bound on how long a frame may wait in it.
        receive_buffer: SO_RCVBUF of the relay's UDP socket, if not 0.
        tcp_buffer: SO_SNDBUF and SO_RCVBUF of both TCP ends, if not 0.
        allow_from: --allow-from rules; the app's own address is ``APP``.
        connected: the relay's socket is connected to the destination, as a server flow's.
        self_loop: the destination is the relay's own socket (the original's self-loop).
    """
    with trio.fail_after(CEILING):
        stream, peer = await tcp_pair()
        for end, option in ((stream, socket.SO_SNDBUF), (peer, socket.SO_RCVBUF)):
            if tcp_buffer:
                end.socket.setsockopt(socket.SOL_SOCKET, option, tcp_buffer)
        with await open_trio_udp() as app, relay_socket() as sock:
            if receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.bind((LOOPBACK, 0))
            target = sock.getsockname() if self_loop else destination or app.getsockname()
            own = own_addresses(sock.getsockname(), (socket.AF_INET, target))
            if connected:
                sock.connect(target)
            host, port = app.getsockname()
            rules = [parse_rule(rule.replace("APP", f"{host}:{port}")) for rule in allow_from]
            udp = UdpEnd(sock, None if connected else target, own, SourceFilter(rules))
            rig = Rig(peer, app, udp, Counters(), trio.Event())
            rig.counters.watch_overflow(partial(kernel_drops, sock))
            async with stream, peer, trio.open_nursery() as nursery:

                async def relay() -> None:
                    await run_relay(Lanes(stream), udp, rig.counters, max_delay=max_delay)
                    rig.done.set()

                nursery.start_soon(relay)
                yield rig
                nursery.cancel_scope.cancel()


async def test_datagrams_cross_both_ways_zero_length_too() -> None:
    async with relay_rig() as rig:
        for datagram in (b"", b"first", b"", bytes(1400)):
            await rig.send_to_tunnel(datagram)
            assert await rig.frame_from_tunnel() == datagram
            await rig.peer.send_all(encode(datagram))
            assert (await rig.app.recvfrom(65536))[0] == datagram
        await trio.testing.wait_all_tasks_blocked()  # the relay counts after its send returns
        assert not rig.done.is_set()
        assert rig.counters.udp_to_tcp_datagrams == rig.counters.tcp_to_udp_datagrams == 4
        assert rig.counters.udp_to_tcp_bytes == rig.counters.tcp_to_udp_bytes == 1405


async def test_every_frame_of_one_tcp_write_is_sent() -> None:
    sent = [i.to_bytes(2, "big") for i in range(200)]  # fits the app's default receive buffer
    async with relay_rig() as rig:
        await rig.peer.send_all(b"".join(map(encode, sent)))
        received = [(await rig.app.recvfrom(100))[0] for _ in sent]
    assert received == sent


async def test_a_frame_too_large_for_udp_is_dropped_and_the_tunnel_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="udptunnel")
    async with relay_rig() as rig:
        await rig.peer.send_all(encode(bytes(65535)) + encode(b"after"))  # IPv4 max: 65507
        assert (await rig.app.recvfrom(65536))[0] == b"after"
        assert rig.counters.dropped_too_large == 1
    assert "Dropped a 65535-byte frame from TCP: too large for UDP" in caplog.text


async def test_own_output_looped_back_is_dropped() -> None:
    async with relay_rig(self_loop=True) as rig:
        # The relay sends to its own socket: the original's self-loop.
        assert rig.udp.own_addresses == {
            rig.udp.sock.getsockname(),
            ("::ffff:127.0.0.1", rig.udp.sock.getsockname()[1]),
        }
        await rig.peer.send_all(encode(b"echo?"))
        await trio.testing.wait_all_tasks_blocked()  # loopback delivers within the send call
        await rig.send_to_tunnel(b"marker")  # queued behind the looped datagram, if any
        assert await rig.frame_from_tunnel() == b"marker"
        assert rig.counters.dropped_own == 1


@pytest.mark.parametrize("rule", ["APP", "127.0.0.0/30", "127.0.0.1"])
async def test_datagrams_from_a_source_not_allowed_are_dropped_and_counted(rule: str) -> None:
    async with relay_rig(allow_from=(rule,)) as rig:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
            intruder.bind(("127.0.0.9", 0))  # another loopback address: outside every rule
            intruder.sendto(b"injected", rig.udp.sock.getsockname())
        await rig.send_to_tunnel(b"marker")  # from the app, which every rule allows
        assert await rig.frame_from_tunnel() == b"marker"
        assert rig.counters.dropped_disallowed == 1
        assert rig.counters.udp_to_tcp_datagrams == 1


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
async def test_a_closed_destination_port_ends_nothing(
    caplog: pytest.LogCaptureFixture, connected: bool
) -> None:
    # A server flow's socket is connected: the port-unreachable answer comes back to it as
    # ECONNREFUSED, on the next receive or send. The service behind the tunnel may be
    # restarting: the relay goes on, both ways, and the next datagram is delivered.
    caplog.set_level(logging.DEBUG, logger="udptunnel")
    with await open_trio_udp() as placeholder:
        closed = placeholder.getsockname()  # a port with nobody on it, once closed
    async with relay_rig(destination=closed, connected=connected) as rig:
        for _ in range(3):
            await rig.peer.send_all(encode(b"into the void"))  # answered by port unreachable
            await trio.testing.wait_all_tasks_blocked()
        with await open_trio_udp(*closed) as late_app:
            await rig.peer.send_all(encode(b"now someone listens"))
            assert (await late_app.recvfrom(100))[0] == b"now someone listens"
            await late_app.sendto(b"and answers", rig.udp.sock.getsockname())
            assert await rig.frame_from_tunnel() == b"and answers"
        assert not rig.done.is_set()
    if connected:
        assert "ECONNREFUSED on " in caplog.text


async def test_tcp_eof_ends_the_relay_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="udptunnel")
    async with relay_rig() as rig:
        await rig.peer.send_all(encode(b"whole") + encode(b"cut short")[:5])
        assert (await rig.app.recvfrom(100))[0] == b"whole"
        await rig.peer.send_eof()
        await rig.done.wait()
    assert "TCP connection closed inside a frame: 5 bytes of a 11-byte frame lost" in caplog.text


async def test_tcp_reset_is_a_tunnel_error() -> None:
    lost = pytest.RaisesExc(TunnelError, match="TCP connection lost")
    with pytest.RaisesGroup(lost, flatten_subgroups=True):
        async with relay_rig() as rig:
            rig.peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            rig.peer.socket.close()  # linger 0: the close sends a reset
            await rig.done.wait()


async def test_a_burst_larger_than_a_batch_arrives_whole_and_in_order() -> None:
    sizes = [0, 1, 2, 100, 1400, 9000, 65507] * 4  # 300 KB: several batches
    sent = [bytes([n % 256]) * size for n, size in enumerate(sizes)]
    async with relay_rig(receive_buffer=4 << 20) as rig:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app:
            for datagram in sent:  # all queued before the relay gets to run
                app.sendto(datagram, rig.udp.sock.getsockname())
        assert [await rig.frame_from_tunnel() for _ in sent] == sent
        await trio.testing.wait_all_tasks_blocked()
        assert rig.counters.udp_to_tcp_datagrams == len(sent)
        assert rig.counters.udp_to_tcp_bytes == sum(sizes)


async def test_frames_split_across_reads_are_sent_whole() -> None:
    frames = encode(bytes(range(256)) * 40) + encode(b"") + encode(b"tail")
    async with relay_rig() as rig:
        for cut in (1, 2, 3, 5000, len(frames)):  # header split, body split, several frames
            await rig.peer.send_all(frames[:cut])
            await trio.testing.wait_all_tasks_blocked()  # the relay has read this piece
            frames = frames[cut:]
        received = [(await rig.app.recvfrom(65536))[0] for _ in range(3)]
    assert received == [bytes(range(256)) * 40, b"", b"tail"]


async def test_frames_that_would_wait_too_long_are_dropped_oldest_first_and_counted() -> None:
    sent = 256
    async with relay_rig(max_delay=1e-6) as rig:  # any backlog at all is too long
        received: list[int] = []

        async def app() -> None:
            while True:
                received.append(int.from_bytes((await rig.app.recvfrom(2000))[0][:4], "big"))

        # Room for two reads' worth (all that is sent) even if the app task runs late.
        rig.app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app)
            # 256 KB in one write: the relay reads 64 KB at a time while the rest waits.
            await rig.peer.send_all(
                b"".join(encode(n.to_bytes(4, "big") * 250) for n in range(sent))
            )
            await trio.testing.wait_all_tasks_blocked()  # loopback delivers within each send
            nursery.cancel_scope.cancel()
        assert len(received) + rig.counters.dropped_late == sent
        assert rig.counters.dropped_late > 0
        # The first read came before any measure of the sending rate and went out whole,
        # as did the last, which left nothing queued behind it; those in between could not
        # have made a microsecond.
        assert received == sorted(received) and received[0] == 0 and received[-1] == sent - 1
        assert rig.counters.tcp_to_udp_datagrams == len(received)


def test_the_oldest_frames_go_first_until_the_excess_is_gone() -> None:
    frames = [memoryview(bytes(n)) for n in (10, 20, 30, 40)]  # 12, 22, 32, 42 with headers
    counters = Counters()
    assert _drop_oldest(frames, 30, counters) == frames[2:]  # 12 + 22 >= 30
    assert counters.dropped_late == 2
    assert _drop_oldest(frames, 1000, counters) == []
    assert counters.dropped_late == 6


async def test_the_backlog_counts_what_waits_in_the_kernel_at_the_recent_rate() -> None:
    stream, peer = await tcp_pair()
    async with stream, peer:
        backlog = Backlog(stream)
        assert backlog.excess(10**6, 0.001) == 0  # no measure of the rate yet: no drops
        backlog.record(1000, 1.0)  # 1000 bytes/s
        await peer.send_all(bytes(500))
        await trio.testing.wait_all_tasks_blocked()
        # 200 in hand and 500 queued, of which 0.5 s lets 500 bytes through: 200 too many.
        assert backlog.excess(200, 0.5) == pytest.approx(200)


async def test_every_datagram_either_arrives_or_is_counted_as_dropped() -> None:
    sent = 3000
    async with relay_rig(receive_buffer=16 * 1024, tcp_buffer=16 * 1024) as rig:
        # The peer reads nothing: TCP fills up, the relay stops reading UDP, the kernel's
        # short receive queue overflows and drops.
        for n in range(sent):
            await rig.send_to_tunnel(n.to_bytes(4, "big") * 250)
        received = []
        while len(received) + rig.counters.dropped_overflow < sent:
            received.append(int.from_bytes((await rig.frame_from_tunnel())[:4], "big"))
        assert rig.counters.dropped_overflow > 0
        assert received == sorted(received)  # whatever was kept kept its order
        await rig.send_to_tunnel(b"marker")  # nothing else was kept back
        assert await rig.frame_from_tunnel() == b"marker"
        assert len(received) + rig.counters.dropped_overflow == sent


class Unreachable:
    """A UDP send socket whose network has gone away, for one datagram or for good."""

    def __init__(self, error: int, times: int) -> None:
        self.error, self.times, self.sent = error, times, []

    def send(self, datagram: memoryview) -> int:
        if self.times:
            self.times -= 1
            raise OSError(self.error, os.strerror(self.error))
        self.sent.append(bytes(datagram))
        return len(datagram)

    def sendmsg(self, buffers: list[memoryview], ancdata: object) -> int:
        raise OSError(errno.EIO, "no segmentation here: every datagram goes one by one")

    def fileno(self) -> int:
        return -1


# An error that ICMP may have left for an earlier datagram is tried once more (ICMP_ERRORS):
# it takes two failures to lose a datagram.
@pytest.mark.parametrize(
    ("error", "times"), [(errno.ENETUNREACH, 2), (errno.EHOSTUNREACH, 2), (errno.EPERM, 1)]
)
async def test_a_transient_send_failure_drops_one_datagram_not_the_tunnel(
    error: int, times: int
) -> None:
    send = Unreachable(error, times=times)
    stream, peer = await tcp_pair()
    counters = Counters()
    async with stream, peer:
        sender = UdpSender(send, counters)  # type: ignore[arg-type]
        with trio.fail_after(CEILING):
            await peer.send_all(encode(b"lost") + encode(b"kept"))
            await peer.send_eof()
            await tcp_to_udp(stream, sender, max_delay=1.0)
    assert send.sent == [b"kept"]
    assert counters.dropped_unsent == 1 and counters.tcp_to_udp_datagrams == 1


async def test_a_lasting_send_failure_is_a_tunnel_error() -> None:
    sender = UdpSender(Unreachable(errno.EBADF, times=1), Counters())  # type: ignore[arg-type]
    stream, peer = await tcp_pair()
    async with stream, peer:
        await peer.send_all(encode(b"x"))
        with pytest.raises(TunnelError, match="cannot send UDP datagram: Bad file descriptor"):
            await tcp_to_udp(stream, sender, max_delay=1.0)


class Scrambled(trio.abc.Stream):
    """A stream that changes every byte on the way, as TLS does, and (unlike TLS) shows
    its socket: the relay must still go through it, never around it to the socket."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner, self.socket = inner, inner.socket

    @staticmethod
    def _flip(data: bytes | bytearray | memoryview) -> bytes:
        return bytes(byte ^ 0x5A for byte in bytes(data))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(self._flip(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self._flip(await self.inner.receive_some(max_bytes))

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_wrapped_stream_is_never_bypassed_for_its_socket() -> None:
    stream, peer = await tcp_pair()
    wrapped, far = Scrambled(stream), Scrambled(peer)
    decoder = Decoder()
    async with stream, peer:
        with await open_trio_udp() as app, relay_socket() as sock:
            sock.bind((LOOPBACK, 0))
            udp = UdpEnd(sock, app.getsockname())
            with trio.fail_after(CEILING):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(run_relay, Lanes(wrapped), udp, Counters(), max_delay=1.0)
                    )
                    await far.send_all(encode(b"into UDP" * 20) * 3)  # a run: segmentation too
                    for _ in range(3):
                        assert (await app.recvfrom(1000))[0] == b"into UDP" * 20
                    await app.sendto(b"into TCP", sock.getsockname())
                    frames: list[bytes] = []
                    while not frames:
                        frames = [bytes(f) for f in decoder.feed(await far.receive_some(100))]
                    assert frames == [b"into TCP"]
                    nursery.cancel_scope.cancel()
