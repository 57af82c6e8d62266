"""Frames out of the tunnel: runs of equal size in one call, everything arriving as sent."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import given, settings

from udptunnel.counters import Counters
from udptunnel.egress import SEGMENTS_MAX, YIELD_EVERY, UdpSender

from .conftest import WAIT as CEILING
from .conftest import udp_socket


class Recorded:
    """A real UDP socket, with its calls counted and chosen failures put in its way."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0
        self.sendmsgs: list[int] = []  # datagrams in each segmented call that went out
        self.refuse: list[OSError] = []  # raised by the next sendmsg calls, in turn
        self.too_large = 0  # sendmsg refuses segments larger than this with EMSGSIZE, if set

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, datagram: memoryview) -> int:
        self.sends += 1
        return self.sock.send(datagram)

    def sendmsg(self, buffers: list[memoryview], ancdata: list[tuple[int, int, bytes]]) -> int:
        if self.refuse:
            raise self.refuse.pop(0)
        if self.too_large and len(buffers[0]) > self.too_large:
            raise OSError(errno.EMSGSIZE, "Message too long")
        sent = self.sock.sendmsg(buffers, ancdata)
        self.sendmsgs.append(len(buffers))
        return sent


@contextmanager
def egress() -> Iterator[tuple[Recorded, socket.socket, Counters, UdpSender]]:
    """A sender on loopback, the socket it sends to, and its counters."""
    with udp_socket() as app, udp_socket() as out:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # room for a whole test
        app.setblocking(False)
        out.setblocking(False)
        out.connect(app.getsockname())
        recorded, counters = Recorded(out), Counters()
        yield recorded, app, counters, UdpSender(recorded, counters)  # type: ignore[arg-type]


def received(app: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``app``."""
    datagrams = []
    while True:
        try:
            datagrams.append(app.recv(65536))
        except BlockingIOError:
            return datagrams


def views(datagrams: list[bytes]) -> list[memoryview]:
    return [memoryview(datagram) for datagram in datagrams]


def send(sender: UdpSender, datagrams: list[bytes]) -> tuple[int, int]:
    async def main() -> tuple[int, int]:
        with trio.fail_after(CEILING):
            return await sender.send(views(datagrams))

    return trio.run(main)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from([0, 1, 7, 200, 1400, 1401, 9000, 32000, 65507]).map(lambda n: b"x" * n)
        | st.binary(max_size=300),
        max_size=200,
    )
)
def test_any_datagrams_arrive_each_as_sent_in_order(datagrams: list[bytes]) -> None:
    numbered = [d[:0] if not d else bytes([n % 256]) + d[1:] for n, d in enumerate(datagrams)]
    with egress() as (_, app, counters, sender):
        assert send(sender, numbered) == (len(numbered), sum(map(len, numbered)))
        assert received(app) == numbered
    assert counters.tcp_to_udp_datagrams == len(numbered)
    assert counters.tcp_to_udp_bytes == sum(map(len, numbered))


def test_a_run_of_equal_sizes_goes_out_in_few_calls() -> None:
    datagrams = [bytes([n]) * 1400 for n in range(100)] + [b"short", b"", b"y" * 1400]
    with egress() as (out, app, _, sender):
        send(sender, datagrams)
        assert received(app) == datagrams
    # 100 of 1400 B: 46 fit one call (64 KB), so three calls; "short" ends the third.
    assert out.sendmsgs == [46, 46, 9]
    assert out.sends == 2  # the empty datagram and the last, each alone


def test_runs_stop_at_the_kernels_segment_limit() -> None:
    datagrams = [b"z" * 10] * (3 * SEGMENTS_MAX)
    with egress() as (out, app, _, sender):
        send(sender, datagrams)
        assert received(app) == datagrams
    assert out.sendmsgs == [SEGMENTS_MAX] * 3


def test_a_size_too_large_for_the_path_is_sent_one_by_one_from_then_on() -> None:
    large, small = [b"L" * 2000] * 5, [b"s" * 1000] * 5
    with egress() as (out, app, _, sender):
        out.too_large = 1472  # a 1500-byte MTU
        send(sender, large + small)
        send(sender, large)
        assert received(app) == large + small + large
    # One refusal taught the sender: the large ones went one by one, with the first small
    # one that had joined their run; the other small ones went together.
    assert out.sendmsgs == [4]
    assert out.sends == 11


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP])
def test_no_segmentation_on_the_device_turns_it_off(error: int) -> None:
    datagrams = [b"a" * 100] * 5 + [b"b" * 50] * 5
    with egress() as (out, app, _, sender):
        out.refuse = [OSError(error, "refused")]
        send(sender, datagrams)
        assert received(app) == datagrams
    assert out.sendmsgs == []
    assert out.sends == 10


@pytest.mark.parametrize(
    "refusal",
    [
        BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),  # wait for room
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),  # an earlier reply
    ],
)
def test_a_refusal_of_one_call_loses_nothing_and_keeps_segmentation(refusal: OSError) -> None:
    datagrams = [b"w" * 300] * 10
    with egress() as (out, app, counters, sender):
        out.refuse = [refusal]
        send(sender, datagrams)
        send(sender, datagrams)
        assert received(app) == datagrams * 2
    assert out.sendmsgs == [10]  # the second run
    assert out.sends == 10  # the first, one by one
    assert counters.dropped_unsent == 0


def test_many_tiny_datagrams_let_other_tasks_run() -> None:
    datagrams = [b"t"] * (4 * YIELD_EVERY)
    turns = 0

    async def main() -> None:
        nonlocal turns
        with egress() as (_, app, _counters, sender):
            async with trio.open_nursery() as nursery:

                async def other() -> None:
                    nonlocal turns
                    while True:
                        turns += 1
                        await trio.lowlevel.checkpoint()

                nursery.start_soon(other)
                await sender.send(views(datagrams))
                nursery.cancel_scope.cancel()
            assert len(received(app)) == len(datagrams)

    trio.run(main)
    assert turns >= 3  # the other task ran while the sender was busy, not only after


def test_a_send_that_yields_on_the_way_reports_everything_it_sent() -> None:
    # Counting resumed after each look at the scheduler: 1,500 frames were once reported as
    # the 476 since the last one, which skewed the backlog estimate into dropping too much.
    datagrams = [b"c" * 10] * (YIELD_EVERY + 476)
    with egress() as (_, app, counters, sender):
        assert send(sender, datagrams) == (len(datagrams), 10 * len(datagrams))
        assert len(received(app)) == len(datagrams)
    assert counters.tcp_to_udp_datagrams == len(datagrams)


def test_an_unconnected_socket_sends_runs_and_singles_to_its_destination() -> None:
    datagrams = [b"r" * 500] * 20 + [b"alone"]
    with udp_socket() as app, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        app.setblocking(False)
        out.setblocking(False)
        out.bind(("127.0.0.1", 0))  # the tunnel's own port: the replies come back here
        sender = UdpSender(out, Counters(), destination=app.getsockname())
        assert send(sender, datagrams) == (21, 10_005)
        assert received(app) == datagrams
        app.sendto(b"reply", out.getsockname())
        assert out.recvfrom(100) == (b"reply", app.getsockname())


class Stalled:
    """A UDP socket whose sends fail with EAGAIN until ``room``; its descriptor is that of a
    full stream socket, so that waiting for room really waits."""

    def __init__(self, full: socket.socket) -> None:
        self.full, self.room, self.sent = full, False, 0

    def fileno(self) -> int:
        return self.full.fileno()

    def send(self, datagram: memoryview) -> int:
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.sent += 1
        return len(datagram)

    def sendmsg(self, buffers: list[memoryview], ancdata: object) -> int:
        raise OSError(errno.EIO, "no segmentation here")


async def test_senders_that_share_a_socket_wait_for_room_in_turn() -> None:
    # A flow client's flows all answer from one socket: two waiting for room at once must
    # not trip Trio's one-waiter rule (BusyResourceError).
    full, drain = socket.socketpair()
    with full, drain:
        full.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                full.send(bytes(65536))
        stalled, gate = Stalled(full), trio.Lock()
        senders = [UdpSender(stalled, Counters(), gate=gate) for _ in range(3)]  # type: ignore[arg-type]
        with trio.fail_after(CEILING):
            async with trio.open_nursery() as nursery:
                for sender in senders:
                    nursery.start_soon(sender.send, views([b"waits"]))
                await trio.testing.wait_all_tasks_blocked()
                assert stalled.sent == 0
                stalled.room = True
                drain.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while drain.recv(1 << 20):
                        pass
    assert stalled.sent == 3
    assert [s.counters.tcp_to_udp_datagrams for s in senders] == [1, 1, 1]
