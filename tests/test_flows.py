"""Flow mode: many UDP sources through one tunnel, each with its own TCP connection and its
own replies; limits, timeouts, source filtering and shared ports. Real processes."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import FAMILY, ORIGINAL, UDPTUNNEL, WAIT, Echo, Process, free_port, udp_socket
from .netns import APP_A, APP_B, TUN_A_LAN, TUN_A_WAN, TUN_B_LAN, Chain, open_chain

Spawn = type[Process]


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}/{port}"


@pytest.fixture
def echo() -> Iterator[Echo]:
    echo = Echo()
    yield echo
    echo.close()


def start_flows(
    spawn: Spawn,
    echo: Echo,
    host: str = "127.0.0.1",
    *,
    server_flags: tuple[str, ...] = (),
    client_flags: tuple[str, ...] = (),
) -> tuple[Process, Process, tuple[str, int]]:
    """A flow-mode server in front of ``echo`` and a flow-mode client; where to send."""
    family = FAMILY[host]
    tcp, entry = free_port(family, host), free_port(family, host)
    server = spawn(
        [UDPTUNNEL, "-v", "--flows", *server_flags, "-s", addr(host, tcp), addr(host, echo.port)]
    )
    server.wait_for(r"Listening for TCP connections on port \d+( of \S+)? \(flows\)")
    client = spawn(
        [UDPTUNNEL, "-v", "--flows", *client_flags, "-c", addr(host, tcp), addr(host, entry)]
    )
    client.wait_for("Receiving flows on UDP")
    return server, client, (host, entry)


def clients(count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """Application sockets, each on a transient port of its own."""
    return [udp_socket(host) for _ in range(count)]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_fifty_concurrent_clients_each_get_only_their_own_replies(spawn: Spawn, host: str) -> None:
    echo = Echo(host)
    _, client, entry = start_flows(spawn, echo, host)
    apps = clients(50, host)
    per_client = 5
    for round_ in range(per_client):  # fifty requests in flight at once, then their replies
        sent = [f"{n}:{round_}:".encode() + os.urandom(n * 20) for n in range(len(apps))]
        for app, request in zip(apps, sent, strict=True):
            app.sendto(request, entry)
        for app, request in zip(apps, sent, strict=True):
            assert app.recv(65536) == request  # its own, byte for byte, and nobody else's
    sent = {data for _, data in echo.heard}
    assert len(sent) == 50 * per_client  # each arrived once, byte for byte as echoed back
    assert len({source for source, _ in echo.heard}) == 50  # one UDP socket per flow
    client.signal(signal.SIGUSR1)
    client.wait_for(r"flows: 50 open, 0 refused")
    for app in apps:
        app.close()
    echo.close()


def test_a_dns_like_exchange_from_a_transient_port(spawn: Spawn, echo: Echo) -> None:
    _, _, entry = start_flows(spawn, echo)
    with udp_socket() as resolver:
        header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # id, flags, 1 question
        query = header + b"\x07example\x03com\x00\x00\x01\x00\x01"  # example.com, A, IN
        resolver.sendto(query, entry)
        answer, source = resolver.recvfrom(512)
    assert answer == query  # the echo's answer, from the tunnel's address
    assert source[:2] == entry


def test_past_max_flows_new_sources_are_refused_and_old_flows_go_on(
    spawn: Spawn, echo: Echo
) -> None:
    _, client, entry = start_flows(spawn, echo)  # the default limit: 256
    apps = clients(257)
    for number, app in enumerate(apps[:256]):
        app.sendto(b"%d" % number, entry)
        assert app.recv(100) == b"%d" % number
    apps[256].sendto(b"one too many", entry)
    for number, app in enumerate(apps[:256]):  # every one of the first 256 still works
        app.sendto(b"again %d" % number, entry)
        assert app.recv(100) == b"again %d" % number
    client.signal(signal.SIGUSR1)
    client.wait_for(r"flows: 256 open, 1 refused")
    assert b"one too many" not in {data for _, data in echo.heard}
    for app in apps:
        app.close()


def open_fds(process: Process) -> int:
    return len(os.listdir(f"/proc/{process.proc.pid}/fd"))


def test_idle_flows_end_and_release_their_sockets(spawn: Spawn, echo: Echo) -> None:
    flags = ("--flow-timeout", "0.5")
    server, client, entry = start_flows(spawn, echo, server_flags=flags, client_flags=flags)
    before = open_fds(server), open_fds(client)
    apps = clients(10)
    for app in apps:
        app.sendto(b"hello", entry)
        assert app.recv(100) == b"hello"
    assert open_fds(server) == before[0] + 20  # a TCP and a UDP socket per flow
    assert open_fds(client) == before[1] + 10  # a TCP socket per flow
    server.wait_for("Flow from .* ended", nth=10)
    client.wait_for("Flow from .* ended", nth=10)
    assert (open_fds(server), open_fds(client)) == before
    apps[0].sendto(b"a new flow", entry)  # and a source that comes back gets a fresh one
    assert apps[0].recv(100) == b"a new flow"
    for app in apps:
        app.close()


def test_a_disallowed_source_reaches_nothing_and_redirects_nothing(
    spawn: Spawn, echo: Echo
) -> None:
    with udp_socket("127.0.0.1") as allowed, udp_socket("127.0.0.2") as intruder:
        rule = ("--allow-from", "127.0.0.1")
        _, client, entry = start_flows(spawn, echo, client_flags=(*rule, "-vv"))
        allowed.sendto(b"first", entry)
        assert allowed.recv(100) == b"first"
        intruder.sendto(b"injected", entry)
        client.wait_for(r"Dropped a datagram from 127\.0\.0\.2/\d+: not allowed to send")
        allowed.sendto(b"second", entry)
        assert allowed.recv(100) == b"second"  # its replies still come to it
        intruder.setblocking(False)
        with pytest.raises(BlockingIOError):
            intruder.recv(100)  # and none went to the intruder
    assert [data for _, data in echo.heard] == [b"first", b"second"]
    client.signal(signal.SIGUSR1)
    client.wait_for(r"1 not allowed\)")


def test_two_servers_share_a_port_and_both_carry_flows(spawn: Spawn, echo: Echo) -> None:
    tcp, entry = free_port(), free_port()
    command = [UDPTUNNEL, "-v", "--flows", "--reuse-port", "-s", f"127.0.0.1/{tcp}"]
    servers = [spawn([*command, f"127.0.0.1/{echo.port}"]) for _ in range(2)]
    for server in servers:
        server.wait_for("Listening for TCP connections")
    client = spawn([UDPTUNNEL, "-v", "--flows", "-c", f"127.0.0.1/{tcp}", f"127.0.0.1/{entry}"])
    client.wait_for("Receiving flows on UDP")
    apps = clients(40)  # the kernel spreads connections by their addresses: both get some
    for number, app in enumerate(apps):
        app.sendto(b"%d" % number, ("127.0.0.1", entry))
        assert app.recv(100) == b"%d" % number
    for server in servers:
        server.wait_for(r"Flow from 127\.0\.0\.1/\d+: UDP")
    for app in apps:
        app.close()


@pytest.mark.root
@pytest.mark.original
def test_an_original_client_uses_a_flow_mode_server(spawn: Spawn) -> None:
    port_a, port_b, tcp = 5000, 5002, 6000
    with open_chain() as chain:
        run_original_against_flows(spawn, chain, port_a, port_b, tcp)


def run_original_against_flows(
    spawn: Spawn, chain: Chain, port_a: int, port_b: int, tcp: int
) -> None:
    with (
        chain.app_a.open_udp_socket(APP_A, port_a, timeout=WAIT) as app_a,
        chain.app_b.open_udp_socket(APP_B, port_b, timeout=WAIT) as app_b,
    ):
        server = spawn(
            [UDPTUNNEL, "-v", "--flows", "-s", str(tcp), f"{APP_A}/{port_a}"],
            prefix=chain.tun_a.prefix,
        )
        server.wait_for("Listening for TCP connections")
        spawn(
            [ORIGINAL, "-v", "-c", f"{TUN_A_WAN}/{tcp}", f"{APP_B}/{port_b}"],
            prefix=chain.tun_b.prefix,
        )
        server.wait_for("Flow from")
        chain.tun_b.wait_udp_bound(port_b, WAIT)
        for number in range(20):  # in lockstep: the original sends one frame per TCP read
            request = b"request %d" % number
            app_b.sendto(request, (TUN_B_LAN, port_b))
            data, source = app_a.recvfrom(100)
            assert data == request
            assert source[0] == TUN_A_LAN  # from the flow's own socket
            app_a.sendto(b"reply %d" % number, source)
            assert app_b.recv(100) == b"reply %d" % number


def cpu_seconds(process: Process) -> float:
    fields = Path(f"/proc/{process.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.needs("prlimit")
def test_out_of_descriptors_accept_backs_off_and_recovers(spawn: Spawn, echo: Echo) -> None:
    tcp = free_port()
    server = spawn(
        [UDPTUNNEL, "-v", "--flows", "-s", f"127.0.0.1/{tcp}", f"127.0.0.1/{echo.port}"],
        prefix=["prlimit", "--nofile=32"],  # room for a few flows, two descriptors each
    )
    server.wait_for("Listening for TCP connections")
    peers = [socket.create_connection(("127.0.0.1", tcp), timeout=WAIT) for _ in range(20)]
    server.wait_for(r"Cannot accept a TCP connection \(Too many open files\); retrying")
    cpu = cpu_seconds(server)
    # Waits of 10, 20, 40, 80 and 160 ms at least: a spinning accept loop would spend
    # all of those 0.31 s on the CPU.
    server.wait_for(r"Cannot accept a TCP connection", nth=6)
    assert cpu_seconds(server) - cpu < 0.1
    peers[0].sendall(struct.pack("!H", 2) + b"ok")  # one accepted before the limit ...
    assert peers[0].recv(4) == struct.pack("!H", 2) + b"ok"  # ... works meanwhile
    for peer in peers:
        peer.close()  # their flows end and give their descriptors back
    # The server recovers by itself: a new connection gets a working flow again, once the
    # connections still queued have been taken and have ended (each sees its peer gone).
    deadline = time.monotonic() + WAIT
    while True:
        with socket.create_connection(("127.0.0.1", tcp), timeout=WAIT) as fresh:
            fresh.sendall(struct.pack("!H", 5) + b"again")
            if fresh.recv(7) == struct.pack("!H", 5) + b"again":
                break
        assert time.monotonic() < deadline, "no flow again after the descriptors came back"
    assert server.proc.poll() is None


def test_a_flow_server_past_max_flows_refuses_connections_and_keeps_the_others(
    spawn: Spawn, echo: Echo
) -> None:
    tcp = free_port()
    limit = ["--max-flows", "2"]
    server = spawn([UDPTUNNEL, "-v", "--flows", *limit, "-s", str(tcp), f"127.0.0.1/{echo.port}"])
    server.wait_for("Listening for TCP connections")
    first, second = (socket.create_connection(("127.0.0.1", tcp), timeout=WAIT) for _ in "12")
    server.wait_for(r"Flow from 127\.0\.0\.1/\d+: UDP", nth=2)
    with (
        socket.create_connection(("127.0.0.1", tcp), timeout=WAIT) as third,
        pytest.raises(ConnectionResetError),
    ):
        third.recv(1)  # refused at once, with a reset
    for number, peer in enumerate((first, second)):
        frame = struct.pack("!H", 1) + b"%d" % number
        peer.sendall(frame)
        assert peer.recv(3) == frame
        peer.close()
