"""Fault injection in flow mode, in-process on port 0: a failure ends its own flow only.

A flow-mode server is run by ``run_tunnel`` in the test's own nursery; raw TCP connections
play its clients, so that each test decides exactly how and in which order they end. After
each fault the server must still be running (its task has not raised), the other flows must
still carry both ways, a new flow must get through, and the log must hold no traceback.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from udptunnel import sockets
from udptunnel.config import Address, Config, Mode
from udptunnel.counters import Counters
from udptunnel.errors import TunnelError
from udptunnel.flows import OPENING_QUEUE, FlowQueue, _contained
from udptunnel.flowtable import Flow
from udptunnel.framing import Decoder, encode
from udptunnel.tunnel import run_tunnel

from .conftest import WAIT as CEILING
from .conftest import open_trio_udp

LOOPBACK = "127.0.0.1"
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@dataclass
class FlowServer:
    """A flow-mode server under test, and what is behind it."""

    tcp: tuple[str, int]  # where it listens
    service: tuple[str, int]  # where its flows send (the service behind the tunnel)
    counters: Counters
    crashed: list[BaseException]

    async def connect(self) -> Peer:
        return Peer(await trio.open_tcp_stream(*self.tcp))


@dataclass
class Peer:
    """A client connection to the flow server, speaking the original framing."""

    stream: trio.SocketStream

    def __post_init__(self) -> None:
        self.decoder = Decoder()
        self.frames: list[bytes] = []

    async def send(self, datagram: bytes) -> None:
        await self.stream.send_all(encode(datagram))

    async def receive(self) -> bytes:
        while not self.frames:
            data = await self.stream.receive_some(65536)
            assert data, "the server closed this flow"
            self.frames += map(bytes, self.decoder.feed(data))
        return self.frames.pop(0)

    async def close(self) -> None:
        await self.stream.aclose()

    def reset(self) -> None:
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self.stream.socket.close()


async def echo(sock: trio.socket.SocketType) -> None:
    """Answer every datagram to where it came from, with the same bytes; until cancelled."""
    while True:
        data, source = await sock.recvfrom(65536)
        await sock.sendto(data, source)


@asynccontextmanager
async def flow_server(
    caplog: pytest.LogCaptureFixture, *, service_up: bool = True, **settings: Any
) -> AsyncIterator[FlowServer]:
    """A flow-mode server sending to an echo service on loopback (or, with ``service_up``
    False, to a port with nobody on it). On exit, checks that it never failed."""
    caplog.set_level(logging.INFO, logger="udptunnel")
    with trio.fail_after(CEILING), await open_trio_udp() as service:
        address = service.getsockname()
        if not service_up:
            service.close()
        config = Config(
            Mode.SERVER,
            tcp=Address(LOOPBACK, 0),
            udp=Address(LOOPBACK, address[1]),
            udp_bind=Address(LOOPBACK, 0),
            flows=True,
            **settings,
        )
        crashed: list[BaseException] = []
        counters = Counters()

        async def serve(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            try:
                await run_tunnel(config, counters, task_status=task_status)
            except Exception as exc:  # any end but cancellation (a BaseException) is a crash
                crashed.append(exc)
                raise

        async with trio.open_nursery() as nursery:
            if service_up:
                nursery.start_soon(echo, service)
            ready = await nursery.start(serve)
            yield FlowServer(ready.tcp[0][0], address, counters, crashed)
            nursery.cancel_scope.cancel()
    assert not crashed
    assert "Traceback" not in caplog.text


async def round_trip(peer: Peer, payload: bytes) -> None:
    """The payload goes to the service through the peer's flow, and comes back."""
    await peer.send(payload)
    assert await peer.receive() == payload


async def flows_settle(counters: Counters, open_flows: int) -> None:
    """Wait until the server's flows that are ending have ended."""
    while counters.flows != open_flows:
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("order", list(itertools.permutations("ABC")))
async def test_flows_that_end_in_any_order_end_only_themselves(
    caplog: pytest.LogCaptureFixture, order: tuple[str, ...]
) -> None:
    # Three flows with equal counts (none has carried anything) end in every order; a
    # fourth, busy all along, carries on; a fifth comes in afterwards.
    async with flow_server(caplog) as server:
        busy = await server.connect()
        await round_trip(busy, b"before")
        idle = {name: await server.connect() for name in "ABC"}
        for name in order:
            await idle[name].close()
            await round_trip(busy, b"after " + name.encode())
        await flows_settle(server.counters, 1)
        newcomer = await server.connect()
        await round_trip(newcomer, b"new")
        await busy.close()
        await newcomer.close()
        await flows_settle(server.counters, 0)
        assert server.counters.tunnels == 5
        assert server.counters.flows_lost == 0


async def test_a_flow_that_sends_after_a_later_one_closed_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The order that killed the server: A connects, B connects, B closes, A sends and closes.
    async with flow_server(caplog) as server:
        a = await server.connect()
        b = await server.connect()
        await b.close()
        await flows_settle(server.counters, 1)
        await round_trip(a, b"A is still here")
        await a.close()
        await flows_settle(server.counters, 0)
        late = await server.connect()
        await round_trip(late, b"and the server too")
        await late.close()
    totals = server.counters.totals()
    assert totals.udp_to_tcp_datagrams == totals.tcp_to_udp_datagrams == 2


async def test_a_reset_flow_ends_alone(caplog: pytest.LogCaptureFixture) -> None:
    async with flow_server(caplog) as server:
        doomed, other = await server.connect(), await server.connect()
        await round_trip(doomed, b"one")
        await round_trip(other, b"two")
        doomed.reset()
        await flows_settle(server.counters, 1)
        await round_trip(other, b"still carried")
        await other.close()
        assert server.counters.flows_lost == 1
    assert "lost: TCP connection lost while receiving: Connection reset by peer" in caplog.text


async def test_a_closed_destination_port_ends_no_flow(caplog: pytest.LogCaptureFixture) -> None:
    # The service behind the tunnel is down (its port answers with ICMP port unreachable),
    # then comes back on the same port: the flow that was refused meanwhile carries again.
    async with flow_server(caplog, service_up=False) as server:
        peer = await server.connect()
        for n in range(5):
            await peer.send(b"into the void %d" % n)  # refused: ECONNREFUSED on the socket
        await trio.testing.wait_all_tasks_blocked()
        with await open_trio_udp(*server.service) as service:
            await peer.send(b"anyone there?")
            data, source = await service.recvfrom(100)
            assert data == b"anyone there?"
            await service.sendto(b"yes", source)
            assert await peer.receive() == b"yes"
        await peer.close()
        await flows_settle(server.counters, 0)
        assert server.counters.flows_lost == 0


class _OutOfDescriptors:
    """The socket module, except that the next ``armed`` UDP sockets cannot be had (EMFILE)."""

    def __init__(self, armed: int) -> None:
        self.armed = armed

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, family: int, kind: int, *args: Any) -> socket.socket:
        if kind == socket.SOCK_DGRAM and self.armed:
            self.armed -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return socket.socket(family, kind, *args)


async def test_a_flow_out_of_descriptors_ends_alone(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with flow_server(caplog) as server:
        first = await server.connect()
        await round_trip(first, b"before")
        monkeypatch.setattr(sockets, "socket", _OutOfDescriptors(armed=1))
        starved = await server.connect()
        await starved.send(b"no socket for me")
        assert await starved.stream.receive_some(100) == b""  # closed, in order
        await flows_settle(server.counters, 1)
        await round_trip(first, b"after")
        second = await server.connect()
        await round_trip(second, b"descriptors again")
        for peer in (first, second, starved):
            await peer.close()
        assert server.counters.flows_lost == 1
    assert "lost: cannot open a UDP socket: Too many open files" in caplog.text


def test_a_flow_queue_larger_than_a_batch_is_counted_as_it_is_sent() -> None:
    # 64 datagrams of 60,000 bytes wait while the flow connects: more than one batch. Each
    # counts once, when it goes, and whatever is still waiting at the end counts as dropped.
    counters = Counters()
    queue = FlowQueue(counters)
    sent = [bytes([n]) * 60_000 for n in range(OPENING_QUEUE)]
    for datagram in sent:
        queue.put(datagram)
    queue.put(b"one too many")
    assert counters.dropped_queue == 1
    view = memoryview(bytearray(2 * 65_540))  # as the relay's batch: room for two of them
    decoder, received, counted = Decoder(), [], 0
    for _ in range(4):
        end, count, _ = queue.drain(view, view)
        counted += count
        received += [bytes(frame) for frame in decoder.feed(view[:end])]
    assert received == sent[:8] and counted == 8
    queue.close()
    assert counters.dropped_no_tunnel == OPENING_QUEUE - 8


async def test_a_flow_queue_hands_over_to_direct_writes_once_its_batch_is_sent() -> None:
    # While the relay sends a batch, new datagrams queue behind it; once it has sent it and
    # waits for more, the next datagram goes straight to the socket again, waking no task.
    counters = Counters()
    queue = FlowQueue(counters)
    reader, writer = socket.socketpair()
    with reader, writer:
        writer.setblocking(False)
        queue.put(b"while connecting")  # no descriptor yet: queued
        view = memoryview(bytearray(1024))
        _, count, emptied = queue.drain(view, view)
        assert (count, emptied) == (1, True)
        queue.fd = writer.fileno()
        queue.put(b"while the batch is sent")  # the relay is busy with its batch: queued
        assert queue.waiting == 1
        with trio.fail_after(CEILING):
            await queue.wait()  # frames are waiting: returns at once
        _, count, emptied = queue.drain(view, view)
        assert (count, emptied) == (1, True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.wait)  # the relay, its batch sent, waits for more
            await trio.testing.wait_all_tasks_blocked()
            queue.put(b"straight through")
            assert queue.waiting == 0 and not queue.frames  # written, not queued
            nursery.cancel_scope.cancel()
        decoder = Decoder()
        assert [bytes(f) for f in decoder.feed(reader.recv(100))] == [b"straight through"]
    assert counters.udp_to_tcp_datagrams == 1  # the other two count when the relay sends


def test_a_flow_the_table_ended_is_not_lost_when_its_goodbye_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="udptunnel")
    totals = Counters()
    evicted, failed = Flow("evicted", totals.child(), 0.0), Flow("failed", totals.child(), 0.0)
    evicted.end("evicted")
    for flow in (evicted, failed):
        with _contained(flow, totals):
            raise TunnelError("TCP connection lost while sending: Connection reset by peer")
    assert totals.flows_lost == 1  # the other one had been ended already, and counted so
    assert "Flow from evicted ended: evicted (TCP connection lost" in caplog.text
    assert "Flow from failed lost: TCP connection lost" in caplog.text
