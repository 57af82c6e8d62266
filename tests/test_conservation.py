"""Every datagram is accounted for: delivered, or dropped and counted by its cause.

Both tunnel ends run in-process on loopback (port 0), in the single-tunnel mode and in flow
mode. A flood from one source, and a burst of 1,000 new sources at a flow client (four
times ``--max-flows``), go from an application through the client end and the server end
to a sink. At each end, and end to end, what came in equals what went on plus what was
dropped and counted: the sink's own kernel drops are read too, so that nothing is left to
chance.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from udptunnel.config import Address, Config, Mode
from udptunnel.counters import Counters
from udptunnel.relay import kernel_drops
from udptunnel.tunnel import run_tunnel

from .conftest import WAIT as CEILING
from .conftest import open_trio_udp

LOOPBACK = "127.0.0.1"
SIZE = 200  # bytes per datagram
FLOOD = 20_000  # datagrams sent from one source without a pause
SOURCES = 1000  # new sources at once
MAX_FLOWS = 250  # the default would do as well; this makes the refusals certain
LOOK_EVERY = 0.05  # seconds between looks at the counters while nothing arrives


@dataclass
class Tunnel:
    """A client end and a server end, and the sink behind the server."""

    client: Counters
    server: Counters
    entry: tuple[str, int]  # where the client end takes datagrams in
    sink: trio.socket.SocketType
    received: int = 0

    def accounted(self) -> int:
        """Datagrams delivered to the sink or dropped anywhere on the way, so far."""
        dropped = self.client.totals().dropped + self.server.totals().dropped
        return self.received + kernel_drops(self.sink) + dropped

    async def collect(self, sent: int) -> None:
        """Take what reaches the sink until every datagram sent is accounted for."""
        while self.accounted() < sent:
            with trio.move_on_after(LOOK_EVERY):  # drops are counted without a datagram
                while True:
                    await self.sink.recv(65536)
                    self.received += 1

    def check(self, sent: int) -> None:
        client, server = self.client.totals(), self.server.totals()
        assert self.accounted() == sent
        # At the client end: in = into TCP + dropped there.
        assert client.udp_to_tcp_datagrams + client.dropped == sent
        # At the server end: out of TCP = sent on + dropped there.
        assert client.udp_to_tcp_datagrams == server.tcp_to_udp_datagrams + server.dropped
        # At the sink: everything sent on, read or dropped by its own kernel.
        assert server.tcp_to_udp_datagrams == self.received + kernel_drops(self.sink)


@asynccontextmanager
async def tunnel(*, flows: bool) -> AsyncIterator[Tunnel]:
    with trio.fail_after(CEILING), await open_trio_udp() as sink, await open_trio_udp() as app:
        common = {"flows": flows, "max_flows": MAX_FLOWS}
        server_config = Config(
            Mode.SERVER,
            tcp=Address(LOOPBACK, 0),
            udp=Address(LOOPBACK, sink.getsockname()[1]),
            udp_bind=Address(LOOPBACK, 0),
            **common,  # type: ignore[arg-type]
        )
        client_counters, server_counters = Counters(), Counters()
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config, server_counters)
            client_config = Config(
                Mode.CLIENT,
                tcp=Address(LOOPBACK, server.tcp[0][0][1]),
                udp=Address(LOOPBACK, app.getsockname()[1]),  # replies, in the single mode
                udp_bind=Address(LOOPBACK, 0),
                **common,  # type: ignore[arg-type]
            )
            client = await nursery.start(run_tunnel, client_config, client_counters)
            yield Tunnel(client_counters, server_counters, client.udp[0], sink)
            nursery.cancel_scope.cancel()


async def flood(entry: tuple[str, int]) -> int:
    """FLOOD datagrams from one source, as fast as the kernel takes them; the tunnel's tasks
    wait meanwhile, so its queues overflow."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
        for n in range(FLOOD):
            source.sendto(n.to_bytes(4, "big") * (SIZE // 4), entry)
    return FLOOD


async def burst(entry: tuple[str, int]) -> int:
    """One datagram from each of SOURCES new sources, all at once."""
    for n in range(SOURCES):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
            source.sendto(n.to_bytes(4, "big") * (SIZE // 4), entry)
    return SOURCES


async def sources_in_waves(entry: tuple[str, int]) -> int:
    """SOURCES new sources, a wave of 50 at a time, each taken in before the next comes:
    more sources than flows, none of them idle long enough to give its slot away."""
    for wave in range(0, SOURCES, 50):
        await burst_of(entry, range(wave, wave + 50))
        await trio.testing.wait_all_tasks_blocked()
    return SOURCES


async def burst_of(entry: tuple[str, int], numbers: range) -> None:
    for n in numbers:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
            source.sendto(n.to_bytes(4, "big") * (SIZE // 4), entry)


@pytest.mark.parametrize(
    ("flows", "send"),
    [(False, flood), (True, flood), (True, burst), (True, sources_in_waves)],
    ids=["flood", "flows-flood", "flows-burst", "flows-waves"],
)
async def test_every_datagram_is_delivered_or_counted(
    flows: bool, send: Callable[[tuple[str, int]], Awaitable[int]]
) -> None:
    async with tunnel(flows=flows) as ends:
        sent = await send(ends.entry)
        await ends.collect(sent)
        ends.check(sent)
        assert ends.received > 0
        client = ends.client.totals()
        if send is sources_in_waves:  # more sources than flows: some refused, and counted
            assert client.dropped_no_flow > 0
            assert ends.client.flows_refused == client.dropped_no_flow
        else:  # faster than the client end reads: its kernel queue overflowed, counted
            assert client.dropped_overflow > 0


async def test_datagrams_in_hand_when_a_flow_breaks_are_counted() -> None:
    # The server takes the connection into its backlog and never reads: the flow's TCP
    # fills, its queue overflows; then the server resets it. Whatever the client end had
    # taken in is counted: carried into TCP, or dropped (queue full, or no tunnel any more).
    sent = 1000
    with trio.fail_after(CEILING), await open_trio_udp() as app:
        (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
        counters = Counters()
        config = Config(
            Mode.CLIENT,
            tcp=Address(LOOPBACK, listener.socket.getsockname()[1]),
            udp=Address(LOOPBACK, 0),
            udp_bind=Address(LOOPBACK, 0),
            flows=True,
        )
        async with listener, trio.open_nursery() as nursery:
            client = await nursery.start(run_tunnel, config, counters)
            for n in range(sent):
                await app.sendto(n.to_bytes(4, "big") * 250, client.udp[0])
                await trio.lowlevel.checkpoint()
            stream = await listener.accept()
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()  # a reset: the client's flow is lost
            while counters.flows or counters.flows_lost == 0:
                with trio.move_on_after(LOOK_EVERY):
                    await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    totals = counters.totals()
    assert totals.udp_to_tcp_datagrams + totals.dropped == sent
    assert totals.dropped_no_tunnel > 0 or totals.dropped_queue > 0
