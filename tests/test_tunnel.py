"""Both tunnel ends in-process, on loopback with port 0: accept, connect, RTP, refusal."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from udptunnel import session
from udptunnel.config import Address, Config, Mode
from udptunnel.counters import Counters
from udptunnel.errors import TunnelError
from udptunnel.framing import Decoder, encode
from udptunnel.lanes import Lanes
from udptunnel.sockets import Connections, connect
from udptunnel.tunnel import Ready, run_tunnel

from .conftest import FAMILY, free_even_port
from .conftest import WAIT as CEILING
from .conftest import open_trio_udp as udp_socket


def server_config(host: str, app: trio.socket.SocketType, *, rtp: bool = False) -> Config:
    """A server on ``host`` with kernel-chosen ports, sending to ``app``. In RTP mode its
    ports are a free even pair instead: port 0 has none (its other half would be port 1)."""
    port = free_even_port(FAMILY[host], host) if rtp else 0
    return Config(
        Mode.SERVER,
        tcp=Address(host, port),
        udp=Address(host, app.getsockname()[1]),
        udp_bind=Address(host, port),
        rtp=rtp,
    )


def client_config(host: str, server: Ready, app: trio.socket.SocketType) -> Config:
    return Config(
        Mode.CLIENT,
        tcp=Address(host, server.tcp[0][0][1]),
        udp=Address(host, app.getsockname()[1]),
        udp_bind=Address(host, 0),
    )


async def receive(sock: trio.socket.SocketType) -> bytes:
    return (await sock.recvfrom(65536))[0]


@dataclass
class Ends:
    """Both tunnel ends running in-process, and the application socket behind each."""

    a: trio.socket.SocketType  # behind the server
    b: trio.socket.SocketType  # behind the client
    server: Ready
    client: Ready


@asynccontextmanager
async def both_ends(host: str) -> AsyncIterator[Ends]:
    with trio.fail_after(CEILING), await udp_socket(host) as a, await udp_socket(host) as b:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config(host, a), Counters())
            client = await nursery.start(run_tunnel, client_config(host, server, b), Counters())
            yield Ends(a, b, server, client)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_ours_to_ours_both_ways(host: str) -> None:
    async with both_ends(host) as ends:
        for n in range(10):
            await ends.b.sendto(b"to a %d" % n, ends.client.udp[0])
            assert await receive(ends.a) == b"to a %d" % n
            await ends.a.sendto(b"to b %d" % n, ends.server.udp[0])
            assert await receive(ends.b) == b"to b %d" % n


async def test_datagrams_sent_before_the_client_connects_are_forwarded() -> None:
    host = "127.0.0.1"
    with trio.fail_after(CEILING), await udp_socket(host) as a, await udp_socket(host) as b:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config(host, a), Counters())
            for n in range(3):
                await a.sendto(b"early %d" % n, server.udp[0])
            await nursery.start(run_tunnel, client_config(host, server, b), Counters())
            assert [await receive(b) for _ in range(3)] == [b"early 0", b"early 1", b"early 2"]
            nursery.cancel_scope.cancel()


async def assert_reset(host: str, port: int) -> None:
    """A connection to host/port is reset: at once, or as soon as it is read."""
    with trio.socket.socket() as sock:
        try:
            await sock.connect((host, port))
            await sock.recv(1)
        except OSError as exc:
            assert exc.errno == errno.ECONNRESET
        else:
            pytest.fail("the connection was not reset")


async def test_a_further_client_is_refused_at_once_and_the_first_keeps_working() -> None:
    host = "127.0.0.1"
    with trio.fail_after(CEILING), await udp_socket(host) as a:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config(host, a), Counters())
            port = server.tcp[0][0][1]
            async with await trio.open_tcp_stream(host, port) as first:
                for _ in range(2):
                    await assert_reset(host, port)
                await first.send_all(encode(b"still here"))
                assert await receive(a) == b"still here"
            nursery.cancel_scope.cancel()


async def test_the_server_ends_when_its_client_closes() -> None:
    host = "127.0.0.1"
    with trio.fail_after(CEILING), await udp_socket(host) as a:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config(host, a), Counters())
            async with await trio.open_tcp_stream(host, server.tcp[0][0][1]):
                pass
        # The nursery exits only because run_tunnel returned by itself.


def readable_bytes(stream: trio.SocketStream) -> int:
    """How many bytes wait in the stream's receive queue, without reading them."""
    count = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, sys.byteorder)


async def test_rtp_server_relays_nothing_until_both_connections_exist() -> None:
    host = "127.0.0.1"
    with trio.fail_after(CEILING), await udp_socket(host) as a:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config(host, a, rtp=True), Counters())
            assert len(server.tcp) == len(server.udp) == 2
            rtp = await trio.open_tcp_stream(host, server.tcp[0][0][1])
            await a.sendto(b"rtp", server.udp[0])
            await trio.testing.wait_all_tasks_blocked()
            assert readable_bytes(rtp) == 0  # nothing relayed yet
            rtcp = await trio.open_tcp_stream(host, server.tcp[1][0][1])
            await a.sendto(b"rtcp", server.udp[1])
            decoders = Decoder(), Decoder()
            assert decoders[0].feed(await rtp.receive_some(100)) == [b"rtp"]
            assert decoders[1].feed(await rtcp.receive_some(100)) == [b"rtcp"]
            # One relay ending ends both: close RTCP, and RTP sees the server close too.
            await rtcp.aclose()
            assert await rtp.receive_some(100) == b""
            await rtp.aclose()


async def test_both_streams_have_nagle_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = session.run_relay

    async def recording(lanes: Lanes, *args: Any, **kwargs: Any) -> None:
        stream = lanes.first.stream
        assert isinstance(stream, trio.SocketStream)
        seen.append(stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await original(lanes, *args, **kwargs)

    monkeypatch.setattr(session, "run_relay", recording)
    async with both_ends("127.0.0.1") as ends:
        await ends.b.sendto(b"through", ends.client.udp[0])  # proves both relays are running
        assert await receive(ends.a) == b"through"
    assert seen == [1, 1]


async def test_a_wildcard_server_listens_on_ipv4_and_ipv6_with_one_port() -> None:
    with trio.fail_after(CEILING), await udp_socket("127.0.0.1") as a:
        config = server_config("127.0.0.1", a)
        config = Config(Mode.SERVER, Address(None, 0), config.udp, config.udp_bind)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, config, Counters())
            assert sorted(len(address) for address in server.tcp[0]) == [2, 4]  # IPv4, IPv6
            (port,) = {address[1] for address in server.tcp[0]}
            async with await trio.open_tcp_stream("::1", port) as peer:
                await peer.send_all(encode(b"over IPv6"))
                assert await receive(a) == b"over IPv6"


async def test_host_names_resolve() -> None:
    host = "127.0.0.1"
    with trio.fail_after(CEILING), await udp_socket(host) as a, await udp_socket(host) as b:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_tunnel, server_config(host, a), Counters())
            config = client_config(host, server, b)
            by_name = Config(
                Mode.CLIENT,
                Address("localhost", config.tcp.port),
                Address("localhost", config.udp.port),
                Address("localhost", 0),
            )
            client = await nursery.start(run_tunnel, by_name, Counters())
            await a.sendto(b"by name", server.udp[0])
            assert await receive(b) == b"by name"
            assert client.tcp[0][0][:2] == (host, config.tcp.port)
            nursery.cancel_scope.cancel()


async def test_an_address_that_drops_everything_does_not_keep_the_next_from_being_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_socket = trio.socket.socket

    def no_ipv6_here(family: int, *args: Any) -> trio.socket.SocketType:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args)

    monkeypatch.setattr(trio.socket, "socket", no_ipv6_here)
    with (
        socket.socket() as full,  # its accept queue full: the kernel ignores further SYNs
        socket.create_server(("127.0.0.1", 0)) as good,
        trio.fail_after(CEILING),
    ):
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = socket.create_connection(full.getsockname(), timeout=CEILING)
        addresses = [
            (socket.AF_INET6, ("::1", 9, 0, 0)),  # no such family: the next one
            (socket.AF_INET, full.getsockname()),  # silence: the next one after 0.3 s
            (socket.AF_INET, good.getsockname()),
        ]
        connections = Connections()
        started = trio.current_time()
        _, address = await connect(connections, addresses, Address("h", 1), attempt_seconds=0.3)
        assert address == good.getsockname()
        assert 0.3 <= trio.current_time() - started < 0.3 + CEILING / 10
        await connections.aclose()
        queued.close()


async def test_the_last_failure_is_named_when_no_address_answers() -> None:
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = socket.create_connection(full.getsockname(), timeout=CEILING)
        addresses = [(socket.AF_INET, full.getsockname())]
        with pytest.raises(TunnelError, match=r"^cannot connect to TCP h/1: no answer in 0.2 s$"):
            await connect(Connections(), addresses, Address("h", 1), attempt_seconds=0.2)
        queued.close()


def _congestion_control(name: str) -> list[str]:
    """A line of /proc/sys/net/ipv4/tcp_NAME_congestion_control (or tcp_congestion_control)."""
    return Path(f"/proc/sys/net/ipv4/tcp_{name}congestion_control").read_text().split()


async def test_the_tunnels_connections_use_bbr_where_the_kernel_allows_it() -> None:
    """bbr, which keeps a stream of datagrams moving under loss (issue 13); elsewhere the
    system's default, without complaint. Root may choose any available algorithm, others
    only the allowed ones."""
    choosable = _congestion_control("available_" if os.geteuid() == 0 else "allowed_")
    expected = "bbr" if "bbr" in choosable else _congestion_control("")[0]
    with socket.create_server(("127.0.0.1", 0)) as server, trio.fail_after(CEILING):
        connections = Connections()
        address = [(socket.AF_INET, server.getsockname())]
        stream, _ = await connect(connections, address, Address("h", 1), attempt_seconds=CEILING)
        used = stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        assert used.rstrip(b"\0").decode() == expected
        await connections.aclose()
