"""The WAN emulator of the benchmark keeps its word: the delay it is given, the loss it is given.

contrib/bench/delayline.c carries the frames between tunA and tunB through the ``wan`` host of
``open_chain(wan=True)`` and holds each for the configured delay; ``set_wan_loss`` drops a
share of the packets with nftables. The benchmark's loss and delay scenarios are only as good
as these two, so they are measured here with plain UDP between the two tunnel hosts: the
kernel's receive timestamps against the send times (one clock, CLOCK_REALTIME, for both).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import (
    TUN_A_WAN,
    TUN_B_WAN,
    WAN_TO_A,
    WAN_TO_B,
    Chain,
    open_chain,
    set_wan_loss,
    wan_drops,
)

SOURCE = Path(__file__).resolve().parents[1] / "contrib" / "bench" / "delayline.c"
PORT = 7000
WAIT = 10.0  # seconds: the most one expected event may take
BUFFER = 8 << 20  # bytes of receive buffer: every datagram of a test waits there, none lost
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # <asm-generic/socket.h>; root only
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # the same; Python 3.11 lacks both
STAMP = struct.Struct("=Iq")  # sequence number, send time (ns, CLOCK_REALTIME)
DELAY_MS = 10.0
JITTER_MS = 4.0
# Lateness allowed: a wake-up on a busy virtual machine, under a loaded CI runner.
SLACK_P50_MS, SLACK_MAX_MS = 2.0, 25.0
LOSS_PERMILLE = 100  # 10% each way
LOSS_COUNT = 2000  # datagrams each way; the binomial's deviation is 0.7 percentage points
STRAYS = 5  # packets of the hosts' own (IPv6 neighbour discovery) that the rule may drop
LOSS_TOLERANCE = 2.5  # percentage points either side: about 3.7 deviations

pytestmark = [pytest.mark.root("network namespaces"), pytest.mark.needs("gcc", "nft")]


@pytest.fixture(scope="module")
def delayline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The delay line, compiled as the benchmark compiles it."""
    binary = tmp_path_factory.mktemp("wan") / "delayline"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(SOURCE)], check=True)
    return binary


@pytest.fixture
def chain() -> Iterator[Chain]:
    with open_chain(wan=True) as built:
        yield built


@contextlib.contextmanager
def carrying(
    chain: Chain, binary: Path, delay_ms: float, jitter_ms: float = 0.0
) -> Iterator[dict[str, dict[str, int]]]:
    """The delay line running in wan; on exit it is stopped, and the dict holds its report."""
    assert chain.wan is not None
    argv = [*chain.wan.prefix, str(binary), "--a", WAN_TO_A, "--b", WAN_TO_B]
    argv += ["--delay-us", str(round(delay_ms * 1000)), "--jitter-us", str(round(jitter_ms * 1000))]
    report: dict[str, dict[str, int]] = {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            yield report
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=WAIT)
        report.update(json.loads(out.strip().splitlines()[-1]))
        assert proc.returncode == 0


@contextlib.contextmanager
def sockets(chain: Chain) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A UDP socket in tunA and one in tunB on the WAN addresses, receiving with timestamps."""
    with contextlib.ExitStack() as stack:
        pair = []
        for ns, host in ((chain.tun_a, TUN_A_WAN), (chain.tun_b, TUN_B_WAN)):
            sock = stack.enter_context(ns.open_udp_socket(host, PORT, timeout=WAIT))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            pair.append(sock)
        a, b = pair
        # The first datagram each way waits for ARP through the line: not a measurement.
        for sender, receiver, peer in ((a, b, TUN_B_WAN), (b, a, TUN_A_WAN)):
            sender.sendto(b"hello", (peer, PORT))
            assert receiver.recv(64) == b"hello"
        yield a, b


def send(sender: socket.socket, peer: str, count: int, gap: float) -> None:
    for seq in range(count):
        sender.sendto(STAMP.pack(seq, time.time_ns()), (peer, PORT))
        time.sleep(gap)  # the load's pace: datagrams spread out in time, as a stream sends


def receive(receiver: socket.socket, idle: float) -> list[tuple[int, float]]:
    """(sequence number, one-way latency in ms) of each datagram, until ``idle`` s of quiet."""
    got = []
    receiver.settimeout(idle)
    with contextlib.suppress(TimeoutError):
        while True:
            data, ancillary, _, _ = receiver.recvmsg(64, socket.CMSG_SPACE(16))
            seq, sent_ns = STAMP.unpack(data)
            ((_, _, stamp),) = ancillary
            seconds, nanoseconds = struct.unpack("=qq", stamp)
            got.append((seq, (seconds * 1_000_000_000 + nanoseconds - sent_ns) / 1e6))
    return got


@pytest.mark.parametrize("jitter_ms", [0.0, JITTER_MS], ids=["steady", "jitter"])
def test_delay_line_holds_each_frame_for_the_delay(
    chain: Chain, delayline: Path, jitter_ms: float
) -> None:
    """Never early, late only by a wake-up, in order, once each, in both directions."""
    count = 200
    with carrying(chain, delayline, DELAY_MS, jitter_ms) as report, sockets(chain) as (a, b):
        for sender, receiver, peer in ((a, b, TUN_B_WAN), (b, a, TUN_A_WAN)):
            send(sender, peer, count, 0.001)
            got = receive(receiver, 0.5)
            seqs = [seq for seq, _ in got]
            assert seqs == list(range(count)), "lost, duplicated or reordered"
            latency = sorted(ms for _, ms in got)
            low, median, high = latency[0], latency[len(latency) // 2], latency[-1]
            assert low >= DELAY_MS - jitter_ms, f"early: {low:.3f} ms"
            assert median <= DELAY_MS + SLACK_P50_MS, f"p50 {median:.3f} ms"
            assert high <= DELAY_MS + jitter_ms + SLACK_MAX_MS, f"max {high:.3f} ms"
            if jitter_ms:  # the spread is the jitter's, not a fixed delay's
                assert latency[-count // 10] - latency[count // 10] > jitter_ms / 2
    for direction in ("a_to_b", "b_to_a"):
        counts = report[direction]
        assert counts["forwarded"] >= count + 1  # and ARP, and the greeting
        assert counts["queue_full"] == counts["too_big"] == counts["send_errors"] == 0


def test_nftables_drops_the_configured_share(chain: Chain, delayline: Path) -> None:
    """About LOSS_PERMILLE in 1000 each way, and exactly what its counters say."""
    with carrying(chain, delayline, 0.0) as report, sockets(chain) as (a, b):
        set_wan_loss(chain, LOSS_PERMILLE)
        lost = {}
        for sender, receiver, peer, arrives in (
            (a, b, TUN_B_WAN, "tunB"),
            (b, a, TUN_A_WAN, "tunA"),
        ):
            before = wan_drops(chain)[arrives]
            send(sender, peer, LOSS_COUNT, 0.0001)
            received = len(receive(receiver, 0.5))
            dropped = wan_drops(chain)[arrives] - before
            # The rule also meets the hosts' own IPv6 neighbour discovery, now and then.
            assert 0 <= dropped - (LOSS_COUNT - received) <= STRAYS, "lost uncounted"
            lost[arrives] = 100 * dropped / LOSS_COUNT
        set_wan_loss(chain, 0)
    expected = LOSS_PERMILLE / 10
    for host, percent in lost.items():
        assert abs(percent - expected) <= LOSS_TOLERANCE, f"{host}: {percent:.1f}% lost"
    assert all(report[d]["queue_full"] == 0 for d in ("a_to_b", "b_to_a"))
