"""``--connections N``: a tunnel over several TCP connections (lanes.py), on loopback.

Real processes. Where a connection must break, it runs through ``Cutter``, a TCP relay in
this process that can end any connection it carries, by a reset or by an orderly close.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from .conftest import UDPTUNNEL, WAIT, Process, free_port, udp_socket
from .test_e2e import Pair, start_pair

LOOPBACK = "127.0.0.1"
Spawn = type[Process]
COUNT = 300  # datagrams each way
RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close with a reset


def cross(pair: Pair, count: int = COUNT) -> None:
    """``count`` datagrams each way, each one waited for: all arrive, as sent."""
    for sender, receiver, entry in (
        (pair.app_b, pair.app_a, pair.client_in),
        (pair.app_a, pair.app_b, pair.server_in),
    ):
        sent = {f"datagram {n}".encode() for n in range(count)}
        got = set()
        for datagram in sent:
            sender.sendto(datagram, entry)
            got.add(receiver.recv(100))
        assert got == sent


@pytest.fixture
def three(spawn: Spawn) -> Iterator[Pair]:
    pair = start_pair(spawn, LOOPBACK, "--connections", "3")
    pair.client.wait_for("TCP connection 3 of 3 up")
    yield pair
    pair.close()


def test_datagrams_cross_over_three_connections(three: Pair) -> None:
    cross(three)
    for number in (2, 3):
        three.server.wait_for(rf"TCP connection {number} of 3 from 127\.0\.0\.1/\d+")
    assert not [line for line in three.client.lines if line.startswith("udptunnel: ")]


def test_a_client_that_asks_alone_carries_on_over_one(spawn: Spawn) -> None:
    """Our server without the option refuses the second connection; the client says so
    once, and the tunnel works over the first."""
    tcp, a, a_in, b, b_in = (free_port() for _ in range(5))
    server = spawn(
        [UDPTUNNEL, "-v", "--udp-bind", f"{LOOPBACK}/{a_in}", "-s", f"{LOOPBACK}/{tcp}",
         f"{LOOPBACK}/{a}"]
    )  # fmt: skip
    server.wait_for("Listening for TCP connections on port")
    client = spawn(
        [UDPTUNNEL, "-v", "--connections", "3", "--udp-bind", f"{LOOPBACK}/{b_in}", "-c",
         f"{LOOPBACK}/{tcp}", f"{LOOPBACK}/{b}"]
    )  # fmt: skip
    line = client.wait_for(r"^udptunnel: The server did not take a further TCP connection .*")
    assert "Carrying on over one" in line[0]
    server.wait_for("Refused TCP connection from .*: tunnel busy")
    with udp_socket(LOOPBACK, a) as app_a, udp_socket(LOOPBACK, b) as app_b:
        cross(Pair(server, client, app_a, app_b, (LOOPBACK, a_in), (LOOPBACK, b_in)), 50)
    assert len([line for line in client.lines if line.startswith("udptunnel: ")]) == 1


class Cutter:
    """A TCP relay from a port of its own to ``target``, which can break what it carries."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.carried: list[tuple[socket.socket, socket.socket]] = []
        self.resetting: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed: the test is over
            while True:
                near, _ = self.listener.accept()
                far = socket.create_connection(self.target)
                with self.lock:
                    self.carried.append((near, far))
                for one, other in ((near, far), (far, near)):
                    threading.Thread(target=self._pipe, args=(one, other), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            if source in self.resetting:  # woken by cut(): no FIN, the close resets
                source.close()
                sink.close()
            else:
                sink.shutdown(socket.SHUT_WR)

    def cut(self, index: int, *, reset: bool) -> None:
        """End the ``index``th connection both ways: with a reset, or in order (FIN). A
        socket that another thread reads is closed by that thread, woken by a shutdown of
        the reading side, which sends nothing: closed here, the read would keep it open."""
        with self.lock:
            near, far = self.carried[index]
        for sock in (near, far):
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                self.resetting.add(sock)
                sock.shutdown(socket.SHUT_RD)
            else:
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for pair in self.carried:
                for sock in pair:
                    sock.close()


@contextlib.contextmanager
def through_cutter(spawn: Spawn) -> Iterator[tuple[Pair, Cutter]]:
    """A server and a client with --connections 3, the client connected through a Cutter."""
    tcp, a, a_in, b, b_in = (free_port() for _ in range(5))
    more = ["--connections", "3"]
    server = spawn(
        [UDPTUNNEL, "-v", *more, "--udp-bind", f"{LOOPBACK}/{a_in}", "-s", f"{LOOPBACK}/{tcp}",
         f"{LOOPBACK}/{a}"]
    )  # fmt: skip
    server.wait_for("Listening for TCP connections on port")
    cutter = Cutter((LOOPBACK, tcp))
    client = spawn(
        [UDPTUNNEL, "-v", *more, "--udp-bind", f"{LOOPBACK}/{b_in}", "-c",
         f"{LOOPBACK}/{cutter.port}", f"{LOOPBACK}/{b}"]
    )  # fmt: skip
    try:
        client.wait_for("TCP connection 3 of 3 up")
        with udp_socket(LOOPBACK, a) as app_a, udp_socket(LOOPBACK, b) as app_b:
            yield Pair(server, client, app_a, app_b, (LOOPBACK, a_in), (LOOPBACK, b_in)), cutter
    finally:
        cutter.close()


@pytest.mark.parametrize("which", [0, 1], ids=["the-first", "a-further-one"])
def test_a_broken_connection_is_replaced_and_the_tunnel_goes_on(spawn: Spawn, which: int) -> None:
    with through_cutter(spawn) as (pair, cutter):
        cross(pair, 50)
        cutter.cut(which, reset=True)
        pair.client.wait_for(r"^udptunnel: TCP connection \d of 3 lost: .*; 2 carry on$")
        pair.server.wait_for(r"^udptunnel: TCP connection \d of 3 lost: .*; 2 carry on$")
        pair.client.wait_for(r"TCP connection \d of 3 up", nth=3)  # the replacement
        pair.server.wait_for(r"TCP connection \d of 3 from", nth=3)
        cross(pair)
        assert pair.client.proc.poll() is None and pair.server.proc.poll() is None
    assert "Traceback" not in pair.client.stderr + pair.server.stderr


def test_an_orderly_close_of_any_connection_ends_the_tunnel(spawn: Spawn) -> None:
    """The peer closing one connection is the peer ending the tunnel, as with one."""
    with through_cutter(spawn) as (pair, cutter):
        cross(pair, 10)
        cutter.cut(2, reset=False)
        assert pair.client.wait() == 0, pair.client.stderr
        assert pair.server.wait() == 0, pair.server.stderr


def test_only_the_clients_host_adds_connections_and_no_more_than_asked(three: Pair) -> None:
    tcp_port = int(three.server.wait_for(r"Listening for TCP connections on port (\d+)")[1])
    with socket.create_connection((LOOPBACK, tcp_port), WAIT) as fourth:
        three.server.wait_for(
            r"Refused TCP connection from 127\.0\.0\.1/\d+: the tunnel has its 3 connections"
        )
        with pytest.raises(ConnectionResetError):
            fourth.recv(1)
    with socket.create_connection((LOOPBACK, tcp_port), WAIT, ("127.0.0.2", 0)) as stranger:
        three.server.wait_for(r"Refused TCP connection from 127\.0\.0\.2/\d+: tunnel busy")
        with pytest.raises(ConnectionResetError):
            stranger.recv(1)
    cross(three, 10)


def test_flow_mode_does_not_take_connections(spawn: Spawn) -> None:
    process = spawn([UDPTUNNEL, "--flows", "--connections", "2", "-s", "6000", "127.0.0.1/5000"])
    assert process.wait() == 2
    assert process.lines == [
        "udptunnel: --connections does not combine with flow mode (--flows): each flow has a "
        "connection of its own"
    ]
