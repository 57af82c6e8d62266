"""``--connections N``: a tunnel over several TCP connections (lanes.py), on loopback.

Real processes. Where a connection must break, it runs through ``Cutter``, a TCP relay in
this process that can end any connection it carries, by a reset or by an orderly close.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from udptunnel.errors import TunnelError
from udptunnel.framing import encode
from udptunnel.lanes import Lanes

from .conftest import UDPTUNNEL, WAIT, Process, free_port, udp_socket
from .test_e2e import Pair, start_pair
from .test_relay import tcp_pair
from .test_tls import Pki, pki  # noqa: F401 (a fixture)

LOOPBACK = "127.0.0.1"
Spawn = type[Process]
COUNT = 300  # datagrams each way
RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close with a reset


def cross(pair: Pair, count: int = COUNT, *, noise: bytes | None = None) -> None:
    """``count`` datagrams each way, each one waited for: all arrive, as sent. Datagrams
    that begin with ``noise`` (left from a flood) are passed over."""
    for sender, receiver, entry in (
        (pair.app_b, pair.app_a, pair.client_in),
        (pair.app_a, pair.app_b, pair.server_in),
    ):
        sent = {f"datagram {n}".encode() for n in range(count)}
        got = set()
        for datagram in sent:
            sender.sendto(datagram, entry)
            came = receiver.recv(65536)
            while noise is not None and came.startswith(noise):
                came = receiver.recv(65536)
            got.add(came)
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
    """A TCP relay from a port of its own to ``target``, which can break what it carries:
    the connections numbered in ``reset_at_once`` (from 0, in order of arrival) are reset
    as soon as they come, and those in ``hold`` get nothing from the target for so many
    seconds."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        reset_at_once: frozenset[int] = frozenset(),
        hold: dict[int, float] | None = None,
    ) -> None:
        self.target = target
        self.reset_at_once, self.hold = reset_at_once, hold or {}
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.carried: list[tuple[socket.socket, socket.socket]] = []
        self.resetting: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed: the test is over
            for index in itertools.count():
                near, _ = self.listener.accept()
                if self.closed:
                    near.close()
                    return
                if index in self.reset_at_once:
                    near.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                    near.close()
                    continue
                far = socket.create_connection(self.target)
                with self.lock:
                    self.carried.append((near, far))
                hold = self.hold.get(index, 0.0)
                for one, other, wait in ((near, far, 0.0), (far, near, hold)):
                    pipe = threading.Thread(target=self._pipe, args=(one, other, wait))
                    pipe.daemon = True
                    pipe.start()

    def _pipe(self, source: socket.socket, sink: socket.socket, hold: float) -> None:
        try:
            time.sleep(hold)  # the behaviour under test: an answer that comes this late
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:  # a reset at one end: passed on to the other
            self.resetting.update((source, sink))
        if source not in self.resetting:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            return
        # Woken by cut(), or reset at one end: a reset at both, no FIN. The other
        # direction's thread may be reading one of them: a shutdown wakes it, and the
        # last close of each, by either thread, sends its reset.
        for sock in (source, sink):
            with contextlib.suppress(OSError):  # closed already, by the other direction
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                self.resetting.add(sock)
                sock.shutdown(socket.SHUT_RD)
        for sock in (source, sink):
            sock.close()

    def cut(self, index: int, *, reset: bool) -> None:
        """End the ``index``th connection both ways: with a reset, or in order (FIN). A
        socket that another thread reads is closed by that thread, woken by a shutdown of
        the reading side, which sends nothing: closed here, the read would keep it open."""
        with self.lock:
            near, far = self.carried[index]
        for sock in (near, far):
            with contextlib.suppress(OSError):  # ended already
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                    self.resetting.add(sock)
                    sock.shutdown(socket.SHUT_RD)
                else:
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for pair in self.carried:
                for sock in pair:
                    sock.close()


@contextlib.contextmanager
def rig(
    spawn: Spawn,
    server: Sequence[str] = ("--connections", "3"),
    client: Sequence[str] = ("--connections", "3"),
    *,
    cutter: dict[str, Any] | None = None,
    up: str = "TCP connection 3 of 3 up",
) -> Iterator[tuple[Pair, Cutter | None, int]]:
    """A server and a client with these flags, the client through a Cutter made with
    ``cutter`` if given; once the client logs ``up``. Yields the pair, the cutter and the
    server's TCP port."""
    tcp, a, a_in, b, b_in = (free_port() for _ in range(5))
    server_end = spawn(
        [UDPTUNNEL, "-v", *server, "--udp-bind", f"{LOOPBACK}/{a_in}", "-s",
         f"{LOOPBACK}/{tcp}", f"{LOOPBACK}/{a}"]
    )  # fmt: skip
    server_end.wait_for("Listening for TCP connections on port")
    relay = None if cutter is None else Cutter((LOOPBACK, tcp), **cutter)
    port = tcp if relay is None else relay.port
    client_end = spawn(
        [UDPTUNNEL, "-v", *client, "--udp-bind", f"{LOOPBACK}/{b_in}", "-c",
         f"{LOOPBACK}/{port}", f"{LOOPBACK}/{b}"]
    )  # fmt: skip
    try:
        client_end.wait_for(up)
        with udp_socket(LOOPBACK, a) as app_a, udp_socket(LOOPBACK, b) as app_b:
            ends = Pair(server_end, client_end, app_a, app_b, (LOOPBACK, a_in), (LOOPBACK, b_in))
            yield ends, relay, tcp
    finally:
        if relay is not None:
            relay.close()


@contextlib.contextmanager
def through_cutter(spawn: Spawn) -> Iterator[tuple[Pair, Cutter]]:
    """A server and a client with --connections 3, the client connected through a Cutter."""
    with rig(spawn, cutter={}) as (pair, cutter, _):
        assert cutter is not None
        yield pair, cutter


def alive(pair: Pair, *, noise: bytes | None = None) -> None:
    """Both ends still run, have printed no traceback, and carry datagrams both ways."""
    cross(pair, 20, noise=noise)
    assert pair.client.proc.poll() is None and pair.server.proc.poll() is None
    assert "Traceback" not in pair.client.stderr + pair.server.stderr


def discard(sock: socket.socket, done: threading.Event) -> None:
    """Read and drop what comes to ``sock`` until ``done``."""
    sock.settimeout(0.05)
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            sock.recv(65536)
    sock.settimeout(WAIT)


def reset_at_once(port: int, source: str = LOOPBACK) -> None:
    """Connect to ``port`` and close with a reset."""
    with socket.create_connection((LOOPBACK, port), WAIT, (source, 0)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)


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


def test_an_orderly_close_ends_one_connection_and_of_all_the_tunnel(spawn: Spawn) -> None:
    """A peer that ends the tunnel closes every connection: only then does it end here.
    One closed alone (a hostile neighbour's, say) is only replaced."""
    with through_cutter(spawn) as (pair, cutter):
        cross(pair, 10)
        cutter.cut(2, reset=False)
        pair.client.wait_for(r"^TCP connection \d of 3 closed by the peer; 2 carry on$")
        pair.server.wait_for(r"^TCP connection \d of 3 closed by the peer; 2 carry on$")
        pair.client.wait_for(r"TCP connection \d of 3 up", nth=3)  # the replacement
        cross(pair, 10)
        with cutter.lock:
            count = len(cutter.carried)
        for index in range(count):  # the replacement too, wherever it came in the order
            cutter.cut(index, reset=False)
        assert pair.client.wait() == 0, pair.client.stderr
        assert pair.server.wait() == 0, pair.server.stderr
    assert not [line for line in pair.client.lines if line.startswith("udptunnel: ")]


def is_reset(port: int, source: str = LOOPBACK) -> bool:
    """Whether a connection to ``port`` from ``source`` is reset, as it is made (a reset
    can beat connect's return) or at the first read."""
    try:
        with socket.create_connection((LOOPBACK, port), WAIT, (source, 0)) as sock:
            return sock.recv(1) == b"" and False
    except ConnectionResetError:
        return True


def test_only_the_clients_host_adds_connections_and_no_more_than_asked(three: Pair) -> None:
    tcp_port = int(three.server.wait_for(r"Listening for TCP connections on port (\d+)")[1])
    assert is_reset(tcp_port)
    three.server.wait_for(
        r"Refused TCP connection from 127\.0\.0\.1/\d+: the tunnel has its 3 connections"
    )
    assert is_reset(tcp_port, "127.0.0.2")
    three.server.wait_for(r"Refused TCP connection from 127\.0\.0\.2/\d+: tunnel busy")
    cross(three, 10)


def test_flow_mode_does_not_take_connections(spawn: Spawn) -> None:
    process = spawn([UDPTUNNEL, "--flows", "--connections", "2", "-s", "6000", "127.0.0.1/5000"])
    assert process.wait() == 2
    assert process.lines == [
        "udptunnel: --connections does not combine with flow mode (--flows): each flow has a "
        "connection of its own"
    ]


# Found by attacking --connections (each was a crash, a stall or a wrong end before).


async def test_a_batch_with_no_connection_left_is_a_lost_tunnel_not_a_crash() -> None:
    """The writer, woken by a datagram just as the last connection was lost, found none
    left to pick: an IndexError ended the process, --persist or not (found under a flood
    with every connection reset again and again)."""
    first, first_peer = await tcp_pair()
    second, second_peer = await tcp_pair()
    async with first, first_peer, second, second_peer:
        lanes = Lanes(first, wanted=2)
        lane = lanes.join(second, usable=True)
        assert lanes.lose(lane, TunnelError("reset"))  # one of two: the other carries on
        assert not lanes.lose(lanes.first, TunnelError("reset"))  # the last: tunnel lost
        with pytest.raises(TunnelError, match="no TCP connection left"):
            await lanes.send(memoryview(encode(b"late")))


async def test_a_write_on_the_only_connection_left_broken_ends_the_tunnel_at_once() -> None:
    """With --connections, the one connection left, reset by its peer: the write fails
    and the tunnel is lost, at once (a failed write once set the connection aside and
    picked it again, without end)."""
    stream, peer = await tcp_pair()
    async with stream:
        peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        await peer.aclose()
        await trio.testing.wait_all_tasks_blocked()
        lanes = Lanes(stream, wanted=3)
        with trio.fail_after(WAIT), pytest.raises(TunnelError):
            for _ in range(3):  # the first write may go out before the reset is known
                await lanes.send(memoryview(encode(b"into a reset connection")))


def test_a_newcomer_that_resets_at_once_ends_alone(spawn: Spawn) -> None:
    """A connection from the client's host, in a free slot, reset as soon as made: it was
    an ExceptionGroup that ended the server."""
    with rig(spawn, ("--connections", "4"), ("--connections", "2"), up="2 of 2 up") as (
        pair,
        _,
        tcp,
    ):
        for _ in range(20):
            reset_at_once(tcp)
        alive(pair)


def test_a_first_connection_reset_before_it_is_taken_ends_nothing(spawn: Spawn) -> None:
    """It was "Transport endpoint is not connected" and exit 1, even with --persist."""
    tcp, app = free_port(), free_port()
    server = spawn(
        [UDPTUNNEL, "-v", "--persist", "--connections", "3", "--udp-bind",
         f"{LOOPBACK}/{free_port()}", "-s", f"{LOOPBACK}/{tcp}", f"{LOOPBACK}/{app}"]
    )  # fmt: skip
    server.wait_for("Listening for TCP connections on port")
    for nth in range(1, 11):
        reset_at_once(tcp)
        server.wait_for("Tunnel lost: |TCP connection closed by the peer", nth=nth)
    assert server.proc.poll() is None, server.stderr
    assert "Transport endpoint" not in server.stderr and "Traceback" not in server.stderr


def test_a_client_without_a_certificate_at_a_mutual_tls_server_ends_alone(
    spawn: Spawn,
    pki: Pki,  # noqa: F811
) -> None:
    """It was "TLS handshake failed: the client sent no certificate" and exit 1: anyone
    could end the tunnel."""
    ca = str(pki.ca[0])
    server = ["--connections", "4", "--tls-cert", str(pki.server[0]), "--tls-key",
              str(pki.server[1]), "--tls-ca", ca]  # fmt: skip
    client = ["--connections", "2", "--tls", "--tls-ca", ca, "--tls-cert", str(pki.client[0]),
              "--tls-key", str(pki.client[1])]  # fmt: skip
    with rig(spawn, server, client, up="2 of 2 up") as (pair, _, tcp):
        context = ssl.create_default_context(cafile=ca)
        for _ in range(3):
            with (
                socket.create_connection((LOOPBACK, tcp), WAIT) as raw,
                contextlib.suppress(OSError),  # refused: an alert, or a reset
                context.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
            ):
                tls.recv(1)
        pair.server.wait_for("Closed TCP connection from .*: .*certificate", nth=3)
        alive(pair)


def test_a_connection_whose_peer_reads_nothing_does_not_stall_the_others(spawn: Spawn) -> None:
    """A connection from the client's host that takes a free slot and never reads: once its
    window is shut it is passed over. It was chosen first (nothing in flight) and held
    the direction for good."""
    with (
        rig(spawn, ("--connections", "3"), ("--connections", "2"), up="2 of 2 up") as (
            pair,
            _,
            tcp,
        ),
        socket.create_connection((LOOPBACK, tcp), WAIT) as silent,
    ):
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pair.server.wait_for(r"TCP connection 3 of 3 from")
        done = threading.Event()
        drain = threading.Thread(target=discard, args=(pair.app_b, done), daemon=True)
        drain.start()  # so that the flood does not fill appB's own queue
        for _ in range(1000):  # 1 MB toward the client: more than the silent one holds
            pair.app_a.sendto(b"flood" + bytes(1000), pair.server_in)
        done.set()
        drain.join()
        alive(pair, noise=b"flood")


def test_a_further_connection_reset_once_is_tried_again(spawn: Spawn) -> None:
    """One early failure made the client give up its further connections for good."""
    with rig(spawn, cutter={"reset_at_once": frozenset({1})}) as (pair, _, _):
        alive(pair)
    assert not [line for line in pair.client.lines if "did not take" in line]


def test_a_greeting_too_late_gives_up_that_connection_alone(spawn: Spawn) -> None:
    """The client gives up a further connection that has no greeting within
    --connect-timeout with a reset: it closed it in order, which ended the tunnel."""
    flags = ("--connections", "2", "--connect-timeout", "1")
    with rig(spawn, flags, flags, cutter={"hold": {1: 2.5}}, up="did not take") as (
        pair,
        _,
        _,
    ):
        pair.server.wait_for(r"TCP connection 2 of 2 lost")
        alive(pair)


@pytest.mark.root("ss -K, which destroys the sockets of another process")
def test_every_connection_destroyed_at_once_under_a_flood_is_one_line_not_a_traceback(
    spawn: Spawn,
) -> None:
    """1,400-byte datagrams flood both ways, so that every connection is full, and the
    kernel destroys them all at once (found by attacking: the writer, waiting for room on
    each, met a connection closed meanwhile, ValueError and BusyResourceError). Five
    rounds: each time the tunnel is lost in one line, exit 1, at both ends."""
    for _ in range(5):
        with rig(spawn) as (pair, _, tcp):
            stop = threading.Event()

            def flood(pair: Pair = pair, stop: threading.Event = stop) -> None:
                while not stop.wait(0.0005):  # the load's pace: bursts of 50 each way
                    for _ in range(50):
                        pair.app_b.sendto(bytes(1400), pair.client_in)
                        pair.app_a.sendto(bytes(1400), pair.server_in)

            thread = threading.Thread(target=flood, daemon=True)
            thread.start()
            try:
                pair.server.wait_for("Tunnel up|TCP connection 3 of 3 from")
                subprocess.run(
                    ["ss", "-K", "-tn", "state", "established", f"( dport = :{tcp} )"],
                    check=True,
                    capture_output=True,
                )
                assert pair.client.wait() == 1
                assert pair.server.wait() == 1
            finally:
                stop.set()
                thread.join()
            for end in (pair.client, pair.server):
                assert "Traceback" not in end.stderr, end.stderr
                assert len([line for line in end.lines if line.startswith("udptunnel: ")]) >= 1
