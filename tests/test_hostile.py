"""Hostile peers against a flow-mode server: stalled connections (slowloris) and streams of
garbage. Neither may stop it, nor disturb the flows of real clients."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import UDPTUNNEL, WAIT, Echo, Process, free_port, udp_socket, unable

Spawn = type[Process]
LOOPBACK = "127.0.0.1"
DEADLINE = 1.0  # --handshake-timeout for these tests: what a stalled connection gets
SLACK = 2.0  # seconds for timers and a loaded machine around that
NORMAL = 1.0  # seconds: a round trip that took longer was held up (on loopback: ~1 ms)
SO_RCVBUFFORCE = 33  # Linux: SO_RCVBUF past net.core.rmem_max, for root
RCVBUF = 16 << 20  # bytes asked for the destination's receive buffer (Linux doubles it)
# What the garbage test needs: a few times the most garbage seen queued there at once (under
# 2 MiB). Root always has it; others where net.core.rmem_max is at least half of it.
ROOM = 8 << 20


@pytest.fixture
def echo() -> Iterator[Echo]:
    """The destination behind the server. In plain TCP the garbage arrives there too, as
    datagrams: room for all of it, so that what is measured is the tunnel, not this."""
    echo = Echo()
    try:
        echo.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except PermissionError:  # not root: as much as net.core.rmem_max allows
        echo.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    yield echo
    echo.close()


def start(spawn: Spawn, echo: Echo) -> tuple[Process, int, tuple[str, int]]:
    """A flow-mode server in front of ``echo``, a flow-mode client, and where to send."""
    tcp, entry = free_port(), free_port()
    deadline = ["--handshake-timeout", str(DEADLINE)]
    server = spawn(
        [
            UDPTUNNEL,
            "-v",
            "--flows",
            *deadline,
            "-s",
            f"{LOOPBACK}/{tcp}",
            f"{LOOPBACK}/{echo.port}",
        ]
    )
    server.wait_for("Listening for TCP connections")
    client = spawn([UDPTUNNEL, "-v", "--flows", "-c", f"{LOOPBACK}/{tcp}", f"{LOOPBACK}/{entry}"])
    client.wait_for("Receiving flows on UDP")
    return server, tcp, (LOOPBACK, entry)


def round_trip(app: socket.socket, entry: tuple[str, int], payload: bytes) -> float:
    started = time.monotonic()
    app.sendto(payload, entry)
    assert app.recv(65536) == payload
    return time.monotonic() - started


def closed(peer: socket.socket) -> bool:
    """Whether the server has closed this connection (orderly or with a reset)."""
    try:
        return peer.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_stalled_connections_do_not_keep_a_real_client_out(spawn: Spawn, echo: Echo) -> None:
    server, tcp, entry = start(spawn, echo)
    with udp_socket() as app, contextlib.ExitStack() as stack:
        round_trip(app, entry, b"before")  # a flow of a real client, open already
        stalled = []
        for _ in range(200):
            peer = stack.enter_context(socket.create_connection((LOOPBACK, tcp), timeout=WAIT))
            stalled.append(peer)
            with contextlib.suppress(ConnectionResetError):  # past 128, the oldest are reset
                peer.sendall(b"\x00")  # half a length, and then nothing
        with udp_socket() as newcomer:  # a real client that comes during the attack
            assert round_trip(newcomer, entry, b"new flow") < NORMAL
        assert round_trip(app, entry, b"during") < NORMAL
        started = time.monotonic()
        assert all(closed(peer) for peer in stalled)  # each one, by the deadline at the latest
        assert time.monotonic() - started < DEADLINE + SLACK
        assert round_trip(app, entry, b"after") < NORMAL
    assert "Traceback" not in "\n".join(server.lines)


def garbage(rng: random.Random) -> bytes:
    """One adversarial stream: random bytes, huge lengths, truncated or empty frames."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 5000))
    if kind == 1:  # a frame longer than any UDP datagram, cut short
        return struct.pack("!H", 0xFFFF) + rng.randbytes(rng.randrange(0, 70_000))
    if kind == 2:  # many tiny frames, then half a header
        return b"".join(struct.pack("!H", 1) + b"x" for _ in range(rng.randrange(1, 500))) + b"\x00"
    if kind == 3:  # a length and nothing
        return struct.pack("!H", rng.randrange(1, 0x10000))
    return b""  # connect and close


def rss_mb(process: Process) -> float:
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_garbage_closes_only_its_own_connection(spawn: Spawn, echo: Echo) -> None:
    if echo.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < ROOM:
        # Datagrams dropped there, not in the tunnel, would fail the round trips.
        unable(
            f"needs root, or net.core.rmem_max of at least {ROOM // 2} bytes, "
            "for a destination with room for the garbage"
        )
    server, tcp, entry = start(spawn, echo)
    seed = int.from_bytes(os.urandom(4), "big")  # in every failure message, to replay it
    rng = random.Random(seed)
    with udp_socket() as app:
        round_trip(app, entry, b"before")
        deadline = time.monotonic() + 3.0  # a bounded time of abuse
        streams = 0
        while time.monotonic() < deadline:
            with (
                socket.create_connection((LOOPBACK, tcp), timeout=WAIT) as attacker,
                contextlib.suppress(BrokenPipeError, ConnectionResetError),  # closed on it
            ):
                attacker.sendall(garbage(rng))
            streams += 1
            if not streams % 20:  # the real flow keeps working throughout
                assert round_trip(app, entry, b"%d" % streams) < NORMAL, f"seed {seed}"
        assert streams > 50, f"seed {seed}"
        assert round_trip(app, entry, b"after") < NORMAL
        assert server.proc.poll() is None
        assert rss_mb(server) < 60
    server.signal()
    assert server.wait() == 0
    assert "Traceback" not in server.stderr


def test_a_silent_plain_client_is_left_alone_past_the_deadline(spawn: Spawn, echo: Echo) -> None:
    # An original udptunnel client connects at its start, before it has anything to send.
    server, tcp, _ = start(spawn, echo)
    with socket.create_connection((LOOPBACK, tcp), timeout=WAIT) as quiet:
        server.wait_for(r"Flow from 127\.0\.0\.1/\d+: UDP")
        quiet.settimeout(DEADLINE + SLACK)
        with pytest.raises(TimeoutError):
            quiet.recv(100)  # not closed at the deadline: it began nothing
        quiet.sendall(struct.pack("!H", 5) + b"later")
        quiet.settimeout(WAIT)
        assert quiet.recv(100) == struct.pack("!H", 5) + b"later"  # the echo, back through it
    assert "nothing useful" not in "\n".join(server.lines)
