"""The tunnel over a lossy WAN link (issue 13): with ``--connections``, a lost segment holds
back fewer datagrams; every datagram is still delivered or counted; a connection that dies
is replaced while the tunnel goes on.

The chain of tests.netns with the emulated WAN of test_wan.py: the delay line holds each
frame for DELAY_MS each way, nftables drops a share of the packets at tunA and tunB. The
tunnel's server runs in tunA, its client in tunB; appB sends a paced stream of 200-byte
datagrams stamped with their send time, appA takes the kernel's receive time of each (one
clock for both).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import UDPTUNNEL, Process
from .netns import (
    APP_A,
    APP_B,
    TUN_A_WAN,
    TUN_B_LAN,
    TUN_B_WAN,
    Chain,
    open_chain,
    set_wan_loss,
)
from .test_wan import (
    BUFFER,
    SO_RCVBUFFORCE,
    SO_TIMESTAMPNS,
    STAMP,
    carrying,
    delayline,  # noqa: F401 (a fixture)
)

pytestmark = [pytest.mark.root("network namespaces"), pytest.mark.needs("gcc", "nft")]

Spawn = type[Process]
WAIT = 10.0
TCP_PORT = 6000
PORT_A, PORT_B = 5000, 5002  # each end's UDP port, and its application's
DELAY_MS = 10.0  # each way: a 20 ms round trip
SIZE = 200


@dataclass
class Tunnel:
    server: Process
    client: Process


@pytest.fixture
def chain() -> Iterator[Chain]:
    with open_chain(wan=True) as built:
        yield built


def start_tunnel(spawn: Spawn, chain: Chain, *flags: str, connections: int = 1) -> Tunnel:
    """Our server in tunA, our client in tunB, both with ``--connections``; returns once
    all the connections are up."""
    more = ["--connections", str(connections)]
    server = spawn(
        [UDPTUNNEL, "-v", *more, *flags, "-s", str(TCP_PORT), f"{APP_A}/{PORT_A}"],
        prefix=chain.tun_a.prefix,
    )
    server.wait_for("Listening for TCP connections on port")
    client = spawn(
        [UDPTUNNEL, "-v", *more, *flags, "-c", f"{TUN_A_WAN}/{TCP_PORT}", f"{APP_B}/{PORT_B}"],
        prefix=chain.tun_b.prefix,
    )
    client.wait_for("Connected TCP to")
    if connections > 1:
        client.wait_for(f"TCP connection {connections} of {connections} up")
    chain.tun_b.wait_udp_bound(PORT_B, WAIT)
    return Tunnel(server, client)


@contextlib.contextmanager
def apps(chain: Chain) -> Iterator[tuple[socket.socket, socket.socket]]:
    """appB's socket (sends into the tunnel at tunB) and appA's (receives, timestamped)."""
    with (
        chain.app_a.open_udp_socket(APP_A, PORT_A, timeout=WAIT) as app_a,
        chain.app_b.open_udp_socket(APP_B, PORT_B, timeout=WAIT) as app_b,
    ):
        app_a.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
        app_a.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        yield app_b, app_a


def send(sock: socket.socket, count: int, rate: float) -> None:
    """``count`` datagrams of SIZE bytes into the tunnel at ``rate`` per second, each
    stamped with its number and send time; paced by the clock, not by sleeps adding up."""
    start = time.monotonic()
    padding = bytes(SIZE - STAMP.size)
    for seq in range(count):
        ahead = start + seq / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # the load's pace, as a media source sends
        sock.sendto(STAMP.pack(seq, time.time_ns()) + padding, (TUN_B_LAN, PORT_B))


def receive(sock: socket.socket, quiet: float) -> list[tuple[int, float]]:
    """(number, one-way latency in ms) of each datagram, until ``quiet`` s pass without one."""
    got = []
    sock.settimeout(quiet)
    with contextlib.suppress(TimeoutError):
        while True:
            data, ancillary, _, _ = sock.recvmsg(SIZE, socket.CMSG_SPACE(16))
            seq, sent_ns = STAMP.unpack_from(data)
            ((_, _, stamp),) = ancillary
            seconds, nanoseconds = struct.unpack("=qq", stamp)
            got.append((seq, (seconds * 1_000_000_000 + nanoseconds - sent_ns) / 1e6))
    return got


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def stream(chain: Chain, count: int, rate: float) -> list[tuple[int, float]]:
    """``count`` stamped datagrams from appB to appA at ``rate``: (number, ms) of each
    that arrived."""
    with apps(chain) as (app_b, app_a):
        got: list[tuple[int, float]] = []
        reader = threading.Thread(target=lambda: got.extend(receive(app_a, 1.0)))
        reader.start()
        send(app_b, count, rate)
        reader.join()
    return got


def summary(process: Process) -> dict[str, int]:
    """The counts of an end's last summary line: datagrams each way, and dropped."""
    line = process.wait_for(r"Tunnel closed\. (.*)")[1]
    counts = re.search(
        r"UDP to TCP: (\d+) datagrams.*TCP to UDP: (\d+) datagrams.*dropped: (\d+)", line
    )
    assert counts, line
    into, out_of, dropped = map(int, counts.groups())
    return {"into": into, "out_of": out_of, "dropped": dropped}


def close(tunnel: Tunnel) -> tuple[dict[str, int], dict[str, int]]:
    """End the tunnel from the client (exit 0 both); the client's and the server's counts."""
    tunnel.client.signal(signal.SIGTERM)
    assert tunnel.client.wait() == 0, tunnel.client.stderr
    assert tunnel.server.wait() == 0, tunnel.server.stderr
    return summary(tunnel.client), summary(tunnel.server)


def added_p99(spawn: Spawn, chain: Chain, connections: int) -> float:
    """The p99 one-way latency that the tunnel added to the WAN's own delay (ms), of a
    stream of RATE datagrams a second for SECONDS; everything sent arrived."""
    tunnel = start_tunnel(spawn, chain, connections=connections)
    got = stream(chain, RATE * SECONDS, RATE)
    close(tunnel)
    assert sorted(seq for seq, _ in got) == list(range(RATE * SECONDS)), "lost or doubled"
    return percentile([ms - DELAY_MS for _, ms in got], 0.99)


RATE, SECONDS = 300, 10  # datagrams a second: 6 in flight at a time over a 20 ms round trip
LOSS_PERMILLE = 5  # each way
SPREAD = 8  # connections: more than are in flight at a time, so that one is always idle


def test_several_connections_lower_the_p99_under_loss(
    spawn: Spawn,
    chain: Chain,
    delayline: Path,  # noqa: F811
) -> None:
    """With one connection a loss holds back every datagram sent in the round trip and a
    half before TCP repairs it: at 0.5% loss, 3-4% of the stream, so the p99 is the
    repair's time (about 20-25 ms here). Spread over SPREAD connections, a datagram goes on
    one with nothing in flight, which no earlier loss can hold back: only the lost ones
    themselves are late, about 0.5%, and the p99 is the path's own."""
    with carrying(chain, delayline, DELAY_MS):
        set_wan_loss(chain, LOSS_PERMILLE)
        alone = added_p99(spawn, chain, 1)
        spread = added_p99(spawn, chain, SPREAD)
    assert spread < alone, f"p99 added: {spread:.1f} ms with {SPREAD}, {alone:.1f} ms with one"
    assert spread < DELAY_MS / 2, f"p99 added {spread:.1f} ms with {SPREAD} connections"


def test_every_datagram_is_delivered_or_counted_under_loss(
    spawn: Spawn,
    chain: Chain,
    delayline: Path,  # noqa: F811
) -> None:
    """3% loss each way, 4 connections, 1,000 datagrams a second for 3 s: sent =
    delivered + counted drops, at each end and end to end."""
    sent = 3000
    with carrying(chain, delayline, DELAY_MS):
        set_wan_loss(chain, 30)
        tunnel = start_tunnel(spawn, chain, connections=4)
        got = stream(chain, sent, 1000)
        client, server = close(tunnel)
    assert client["into"] + client["dropped"] == sent
    assert server["out_of"] + server["dropped"] == client["into"]
    assert len(got) == server["out_of"]
    assert len({seq for seq, _ in got}) == len(got), "doubled"


def test_a_connection_that_dies_under_loss_is_replaced_and_the_stream_goes_on(
    spawn: Spawn,
    chain: Chain,
    delayline: Path,  # noqa: F811
) -> None:
    """1% loss each way, 3 connections. One of the client's connections is destroyed
    mid-stream (``ss -K``: the kernel aborts it and resets the server's end): the client
    replaces it, and every datagram sent from then on arrives."""
    with carrying(chain, delayline, DELAY_MS):
        set_wan_loss(chain, 10)
        tunnel = start_tunnel(spawn, chain, connections=3)
        ports = re.findall(
            rf"{re.escape(TUN_B_WAN)}:(\d+)\s",
            chain.tun_b.run(["ss", "-tnH", "state", "established", f"( dport = :{TCP_PORT} )"]),
        )
        assert len(ports) == 3, ports
        with apps(chain) as (app_b, app_a):
            got: list[tuple[int, float]] = []
            reader = threading.Thread(target=lambda: got.extend(receive(app_a, 1.0)))
            reader.start()
            sender = threading.Thread(target=send, args=(app_b, 1000, 200))
            sender.start()
            chain.tun_b.run(["ss", "-K", "-tnH", f"( sport = :{ports[1]} )"])
            tunnel.client.wait_for(r"^udptunnel: TCP connection \d of 3 lost: .*; 2 carry on$")
            tunnel.client.wait_for(r"TCP connection \d of 3 up", nth=3)  # the replacement
            sender.join()
            reader.join()
        after = stream(chain, 500, 200)  # over the replacement too: all of them
        client, server = close(tunnel)
    assert len(got) > 900, f"{len(got)} of 1000 arrived around the loss of a connection"
    assert sorted(seq for seq, _ in after) == list(range(500))
    assert server["dropped"] == client["dropped"] == 0
