"""Real udptunnel processes on one host, kept apart with --udp-bind."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .conftest import UDPTUNNEL, WAIT, Process, free_even_port, free_port, udp_socket

CLOSE_WITHIN = 1.0  # seconds: the bound for one end following the other out
SO_RCVBUFFORCE = 33  # Linux: SO_RCVBUF past net.core.rmem_max, for root; not in Python's socket
UDP_MAX = {"127.0.0.1": 65507, "::1": 65527}  # largest UDP payload: 65535 less the headers


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}/{port}"


@dataclass
class Pair:
    """A server and a client tunnel end, and an application socket at each end."""

    server: Process
    client: Process
    app_a: socket.socket  # behind the server: receives what app_b sends
    app_b: socket.socket  # behind the client
    server_in: tuple[str, int]  # where app_a sends datagrams for the tunnel
    client_in: tuple[str, int]

    def close(self) -> None:
        self.app_a.close()
        self.app_b.close()


def start_pair(spawn: type[Process], host: str = "127.0.0.1", *flags: str) -> Pair:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    pick = free_even_port if "-r" in flags else free_port
    tcp, a, a_in, b, b_in = (pick(family, host) for _ in range(5))
    common = [UDPTUNNEL, "-v", *flags, "--udp-bind"]
    server = spawn([*common, addr(host, a_in), "-s", addr(host, tcp), addr(host, a)])
    server.wait_for(r"Listening for TCP connections on port")
    client = spawn([*common, addr(host, b_in), "-c", addr(host, tcp), addr(host, b)])
    client.wait_for(r"Connected TCP to")
    server.wait_for(r"TCP connection from")
    app_a = udp_socket(host, a)
    try:
        app_b = udp_socket(host, b)
    except BaseException:
        app_a.close()  # not left to the garbage collector, whose warning blames the next test
        raise
    return Pair(server, client, app_a, app_b, (host, a_in), (host, b_in))


@pytest.fixture
def pair(spawn: type[Process]) -> Iterator[Pair]:
    pair = start_pair(spawn)
    yield pair
    pair.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_both_directions_every_size(spawn: type[Process], host: str) -> None:
    pair = start_pair(spawn, host)
    sizes = [0, 1, 2, 100, 1400, 9000, UDP_MAX[host], 0]
    for size in sizes:
        datagram = os.urandom(size)
        pair.app_b.sendto(datagram, pair.client_in)
        assert pair.app_a.recv(65536) == datagram
        pair.app_a.sendto(datagram[::-1], pair.server_in)
        assert pair.app_b.recv(65536) == datagram[::-1]
    pair.client.signal(signal.SIGTERM)
    assert pair.client.wait() == 0
    assert pair.server.wait() == 0
    volume = f"{len(sizes)} datagrams, {sum(sizes)} bytes"
    for end in (pair.server, pair.client):
        assert f"UDP to TCP: {volume}; TCP to UDP: {volume}; dropped: 0" in end.stderr
    pair.close()


def test_rtp_mode_relays_two_port_pairs(spawn: type[Process]) -> None:
    pair = start_pair(spawn, "127.0.0.1", "-r")
    rtcp_a = udp_socket("127.0.0.1", pair.app_a.getsockname()[1] + 1)
    rtcp_b = udp_socket("127.0.0.1", pair.app_b.getsockname()[1] + 1)
    host, port = pair.client_in
    pair.app_b.sendto(b"rtp", pair.client_in)
    rtcp_b.sendto(b"rtcp", (host, port + 1))
    assert pair.app_a.recv(100) == b"rtp"
    assert rtcp_a.recv(100) == b"rtcp"
    host, port = pair.server_in
    rtcp_a.sendto(b"rtcp back", (host, port + 1))
    assert rtcp_b.recv(100) == b"rtcp back"
    rtcp_a.close()
    rtcp_b.close()
    pair.close()


def test_zero_length_datagrams_do_not_end_the_tunnel(pair: Pair) -> None:
    for _ in range(3):
        pair.app_b.sendto(b"", pair.client_in)
        assert pair.app_a.recv(100) == b""
        pair.app_a.sendto(b"", pair.server_in)
        assert pair.app_b.recv(100) == b""
    pair.app_b.sendto(b"alive", pair.client_in)
    assert pair.app_a.recv(100) == b"alive"
    assert pair.server.proc.poll() is None and pair.client.proc.poll() is None


@pytest.mark.parametrize("closing", ["client", "server"])
def test_closing_either_end_makes_the_other_exit_0_within_1_s(pair: Pair, closing: str) -> None:
    first, other = (pair.client, pair.server) if closing == "client" else (pair.server, pair.client)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    assert other.wait(timeout=CLOSE_WITHIN) == 0


def test_a_third_client_is_refused_at_once(spawn: type[Process], pair: Pair) -> None:
    port = int(pair.server.wait_for(r"Listening for TCP connections on port (\d+)")[1])
    with (
        pytest.raises(ConnectionResetError),  # refused, not left hanging (defect 8)
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as third,
    ):
        third.recv(1)  # unless the reset came before connect() returned
    pair.server.wait_for(r"Refused TCP connection from 127\.0\.0\.1/\d+: tunnel busy")
    bind = f"127.0.0.1/{free_port()}"
    fourth = spawn([UDPTUNNEL, "-c", f"127.0.0.1/{port}", "--udp-bind", bind, "127.0.0.1/9"])
    assert fourth.wait() == 1  # a refused client fails, so that a script or systemd can tell
    assert re.fullmatch(  # depending on whether the reset beats the end of connect()
        rf"udptunnel: (cannot connect to TCP 127\.0\.0\.1/{port}|TCP connection lost while "
        r"receiving): Connection reset by peer \(the server ended it at once: is it busy with "
        r"another client.*\? Its log at -v says which\)",
        fourth.stderr,
    )
    pair.app_b.sendto(b"unaffected", pair.client_in)
    assert pair.app_a.recv(100) == b"unaffected"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_waiting_server_with_exit_0(spawn: type[Process], signum: int) -> None:
    udp = f"127.0.0.1/{free_port()}"
    server = spawn([UDPTUNNEL, "-v", "-s", str(free_port()), "--udp-bind", udp, "127.0.0.1/9"])
    server.wait_for("Listening for TCP connections")
    server.signal(signum)
    assert server.wait() == 0
    assert f"{signal.Signals(signum).name} received, closing the tunnel" in server.stderr


def test_without_v_a_tunnel_is_silent(spawn: type[Process]) -> None:
    app = udp_socket("127.0.0.1")
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the test plays the server
        listener.settimeout(WAIT)
        tcp = listener.getsockname()[1]
        destination = f"127.0.0.1/{app.getsockname()[1]}"
        client = spawn(
            [
                UDPTUNNEL,
                "-c",
                f"127.0.0.1/{tcp}",
                "--udp-bind",
                f"127.0.0.1/{free_port()}",
                destination,
            ]
        )
        peer, _ = listener.accept()
        with peer:
            peer.sendall(struct.pack("!H", 2) + b"hi")
            assert app.recv(100) == b"hi"
    assert client.wait() == 0
    assert client.stderr == ""
    app.close()


def test_a_second_instance_on_the_same_ports_fails_with_exit_1(
    spawn: type[Process], pair: Pair
) -> None:
    port = int(pair.server.wait_for(r"Listening for TCP connections on port (\d+)")[1])
    host, a_in = pair.server_in
    again = [UDPTUNNEL, "-s", str(port), "--udp-bind", f"{host}/{free_port()}", "127.0.0.1/9"]
    second = spawn(again)
    assert second.wait() == 1
    assert second.stderr == f"udptunnel: cannot listen on TCP */{port}: Address already in use"
    udp_again = [UDPTUNNEL, "-s", str(free_port()), "--udp-bind", f"{host}/{a_in}", "127.0.0.1/9"]
    second = spawn(udp_again)
    assert second.wait() == 1
    assert second.stderr == (
        f"udptunnel: cannot receive UDP on {host}/{a_in}: Address already in use"
    )


@pytest.mark.root  # to size a receive buffer for 5000 datagrams (SO_RCVBUFFORCE)
def test_5000_frames_in_one_tcp_send_arrive_as_5000_datagrams(spawn: type[Process]) -> None:
    port, a_in = free_port(), free_port()
    app = udp_socket("127.0.0.1")
    app.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
    destination = f"127.0.0.1/{app.getsockname()[1]}"
    bind = f"127.0.0.1/{a_in}"
    server = spawn([UDPTUNNEL, "-v", "-s", str(port), "--udp-bind", bind, destination])
    server.wait_for("Listening for TCP connections")
    sent = [n.to_bytes(2, "big") * (n % 5) for n in range(5000)]
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as peer:
        peer.sendall(b"".join(struct.pack("!H", len(d)) + d for d in sent))
        received = [app.recv(100) for _ in sent]
    assert received == sent
    assert server.wait() == 0
    app.close()


def start_server(spawn: type[Process], *args: str) -> tuple[Process, socket.socket]:
    """A server with the given flags and UDP address, and a raw TCP peer connected to it."""
    port = free_port()
    server = spawn([UDPTUNNEL, "-s", str(port), *args])
    server.wait_for("Listening for TCP connections")
    peer = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    server.wait_for("TCP connection from")
    return server, peer


def test_the_tunnel_does_not_hear_its_own_output(spawn: type[Process]) -> None:
    # No --udp-bind and a local destination: the original's self-loop.
    port = free_port()
    server, peer = start_server(spawn, "-vv", f"127.0.0.1/{port}")
    with peer, udp_socket() as app:
        peer.sendall(struct.pack("!H", 5) + b"loop?")
        server.wait_for(r"Received 5 byte UDP packet from 127\.0\.0\.1/\d+")  # and dropped it
        app.sendto(b"marker", ("127.0.0.1", port))
        assert peer.recv(100) == struct.pack("!H", 6) + b"marker"
    assert server.wait() == 0
    assert "dropped: 1 (1 own, 0 queue full, 0 late, 0 too large, 0 unsent)" in server.stderr


def test_a_reset_connection_exits_1_with_one_line_not_sigpipe(spawn: type[Process]) -> None:
    a_in = free_port()
    server, peer = start_server(spawn, "-v", "--udp-bind", f"127.0.0.1/{a_in}", "127.0.0.1/9")
    with udp_socket() as app:
        app.sendto(b"queued for the peer", ("127.0.0.1", a_in))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # linger 0: a reset, not a FIN
        for _ in range(3):
            app.sendto(b"more", ("127.0.0.1", a_in))
    assert server.wait() == 1
    assert server.lines[-1].startswith("udptunnel: TCP connection lost while ")
    assert server.lines[-1].endswith(("Connection reset by peer", "Broken pipe"))


@pytest.mark.parametrize("closing", ["client", "server"])
def test_closing_one_end_under_load_lets_the_other_exit_0(pair: Pair, closing: str) -> None:
    first, other = (pair.client, pair.server) if closing == "client" else (pair.server, pair.client)
    stop = threading.Event()

    def flood(app: socket.socket, to: tuple[str, int]) -> None:
        while not stop.is_set():
            app.sendto(bytes(1000), to)

    floods = [
        threading.Thread(target=flood, args=(pair.app_a, pair.server_in)),
        threading.Thread(target=flood, args=(pair.app_b, pair.client_in)),
    ]
    for thread in floods:
        thread.start()
    try:
        pair.app_a.recv(2000)  # traffic is crossing both ways
        pair.app_b.recv(2000)
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
        assert other.wait(timeout=CLOSE_WITHIN) == 0, other.stderr  # a clean end, not a reset
    finally:
        stop.set()
        for thread in floods:
            thread.join()
