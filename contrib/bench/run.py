"""``make bench``: our udptunnel, Debian's C original and plain kernel forwarding, side by side.

Builds the four-host chain of ``tests.netns`` (appA -- tunA -- tunB -- appB over veth pairs)
and drives each subject through the same scenarios, in the same run:

- ``kernel``: no tunnel; tunA and tunB forward IP between the applications (the ceiling);
- ``original``: /usr/bin/udptunnel, server in tunA and client in tunB;
- ``ours``: this repository's udptunnel (the virtual environment's console script), the same
  command lines;
- ``ours+squid``: ours, its client's TCP through squid (HTTP CONNECT, Basic authentication)
  in tunB, in the scenarios made for it, beside ``ours`` without a proxy;
- ``ours+conns``: ours with ``--connections N`` on both ends (the resilience of issue 13),
  in the ``wan-*`` scenarios, beside ``ours`` with one connection.

The ``wan-*`` scenarios put an emulated WAN between tunA and tunB: a fifth namespace, ``wan``,
whose delay line (delayline.c beside this file, built like udpload) holds every frame for
half the round-trip time, and nftables random loss at both tunnel hosts.

The load comes from ``udpload`` (udpload.c beside this file, built here with gcc), one
process per application host. Each case gets fresh tunnel processes. Results: a table on
standard output, JSON (build/bench/results.json) and a plot of latency against offered load
(build/bench/latency.png). README.rst beside this file says how to read them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import analysis  # noqa: E402
import report  # noqa: E402

from tests.netns import (  # noqa: E402
    APP_A,
    APP_B,
    PREFIX_LEN,
    TUN_A_LAN,
    TUN_A_WAN,
    TUN_B_LAN,
    TUN_B_WAN,
    WAN_TO_A,
    WAN_TO_B,
    Chain,
    Namespace,
    open_chain,
    set_wan_loss,
    wan_drops,
)
from tests.proxies import SQUID_PORT, squid_command  # noqa: E402

HERE = Path(__file__).resolve().parent
BUILD = REPO / "build" / "bench"
UDPLOAD = BUILD / "udpload"
DELAYLINE = BUILD / "delayline"
OURS = str(Path(sys.executable).parent / "udptunnel")  # the console script, as users run it
ORIGINAL = "/usr/bin/udptunnel"  # Debian's package udptunnel
PROXIED = report.PROXIED  # ours, its client through squid
RESILIENT = report.RESILIENT  # ours over several TCP connections
SUBJECTS = ("kernel", "original", "ours", PROXIED, RESILIENT)
# --connections of RESILIENT, chosen by measurement (wan-resilience.md: N = 2, 3, 4 and 6
# at 20 and 80 ms RTT with 1% loss, both loads).
CONNECTIONS = 3

TCP_PORT = 6000
PORT_A = 5000  # appA's port; tunA's end receives on it and sends to appA on it
PORT_B = 5002  # the same for appB and tunB
# squid runs in tunB, the client's host: it listens on the LAN side and connects to tunA from
# an address of its own on the WAN side, so the server sees where the connection came from.
SQUID_OUT = "198.18.2.3"
PROXY_USER, PROXY_PASSWORD = "bench", "bench proxy password"  # squid's Basic authentication
WAIT = 10.0  # seconds: the most any one expected event may take (a start, a line of output)
START_DELAY_NS = 100_000_000  # from "go" to the first datagram: every sender is waiting
FREEZE_NS = 200_000_000  # how long the server tunnel is stopped in the freeze scenario
DRAIN_IDLE_MS = 300  # after sending, a sink stops once nothing came for this long
# ... but over a lossy WAN a TCP stall lasts retransmission timeouts (200 ms and up, doubling
# when a retransmission is lost too): what a tunnel delivers that late still counts.
WAN_DRAIN_IDLE_MS = 3000
DRAIN_MAX_MS = 5000  # ... or this long after sending ended at the latest
SOCKET_BUFFER = 32 << 20  # bytes, SO_RCVBUF and SO_SNDBUF of the load sockets
UNIX_QUEUE = "512"  # net.unix.max_dgram_qlen for the acknowledgements (default 10)
RSS_PERIOD_NS = 1_000_000_000  # the soak scenario samples each tunnel's VmRSS this often
POLL = 0.01  # seconds between looks while traffic runs
# A paced sender wakes at most once per tick and sends whatever is due: at 80,000/s that is
# 16 datagrams per wake-up, not one, which keeps the generator's CPU far below the tunnel's.
PACE_TICK_US = 200
CPU_LOAD, CPU_TUNNEL = "0", "1"  # with --pin split: the load tools' core and the tunnels'

FULL_EVENT_AT, QUICK_EVENT_AT = 2.0, 1.0  # seconds after the start: the burst, the freeze
SWEEP_RATES = (1_000, 5_000, 10_000, 20_000, 40_000, 80_000, 120_000, 160_000)  # of 200 B


# --- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """One direction of traffic: who sends, how big, how fast."""

    source: str  # "A" or "B": the application that sends; the other one receives
    size: int  # UDP payload bytes
    rate: float = 0.0  # paced, datagrams/s; 0 (and no window): unpaced, as fast as possible
    window: int = 0  # closed loop: at most this many datagrams in flight
    burst: int = 0  # this many extra datagrams at once, at the scenario's event time
    sockets: int = 1  # sources (ports) the sender sends from in turn: flows, in flow mode

    @property
    def name(self) -> str:
        return "A>B" if self.source == "A" else "B>A"

    @property
    def sink(self) -> str:
        return "B" if self.source == "A" else "A"


@dataclass(frozen=True)
class Wan:
    """The emulated WAN between tunA and tunB: round-trip time, jitter and random loss."""

    rtt_ms: float  # the delay line holds each frame half of this, each way
    loss_pct: float  # of the packets, each way, dropped at random (nftables, per thousand)
    jitter_ms: float = 0.0  # each frame's delay varies by this, uniform, order kept

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2

    @property
    def loss_permille(self) -> int:
        return round(self.loss_pct * 10)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    flows: tuple[Flow, ...]
    seconds: float  # how long the senders send, in a full run
    quick_seconds: float  # ... and with --quick
    kind: str = "plain"  # capacity, overload, flood, burst, freeze, steady, soak, sweep
    tunnels_only: bool = False  # measures tunnel processes: nothing to see with "kernel"
    ours_only: bool = False  # a feature the original does not have
    minimum: float = 0.0  # seconds: never shorter than this, whatever --duration says
    # Capacity varies by 20-30% from one run to the next on a shared VM, the original's as
    # much as ours: each subject runs this many rounds, interleaved, and the median counts.
    rounds: int = 1
    flow_mode: bool = False  # our tunnel ends run with --flows (the original cannot)
    tls: bool = False  # our tunnel ends run with TLS: ours only, next to the plain scenario
    proxied: bool = False  # ours+squid runs too: our client through squid, beside ours
    wan: Wan | None = None  # run on the chain with the wan host, with this delay and loss

    @property
    def drain_idle_ms(self) -> int:
        return WAN_DRAIN_IDLE_MS if self.wan else DRAIN_IDLE_MS

    def runs(self, subject: str) -> bool:
        """Whether ``subject`` has a row in this scenario."""
        if subject == PROXIED:
            return self.proxied
        if subject == RESILIENT:
            return self.wan is not None
        if self.tunnels_only and subject == "kernel":
            return False
        return not (self.ours_only and subject != "ours")


A_B, B_A = "A", "B"
CAPACITY_ROUNDS = 3
MANY_FLOWS = 100  # sources at once for the flow-mode scenario
FLOW_RATE = 200  # datagrams/s per flow: 20,000/s in all
SCENARIOS = [
    Scenario(
        "rtp-50",
        "RTP-like: 200 B at 50/s both ways",
        (Flow(A_B, 200, rate=50), Flow(B_A, 200, rate=50)),
        10,
        2,
    ),
    Scenario("paced-200", "200 B at 1,000/s", (Flow(A_B, 200, rate=1000),), 10, 2),
    Scenario("paced-1200", "1200 B at 1,000/s", (Flow(A_B, 1200, rate=1000),), 10, 2),
    *(
        Scenario(
            f"capacity-{size}",
            f"closed loop, 64 in flight, {size} B (one-way capacity)",
            (Flow(A_B, size, window=64),),
            10,
            2,
            kind="capacity",
            rounds=CAPACITY_ROUNDS,
        )
        for size in (64, 200, 1400)
    ),
    *(
        Scenario(
            f"overload-{size}",
            f"unpaced overload, {size} B",
            (Flow(A_B, size),),
            10,
            2,
            kind="overload",
        )
        for size in (64, 512, 1400)
    ),
    Scenario(
        "flood-both",
        "unpaced 512 B both ways at once",
        (Flow(A_B, 512), Flow(B_A, 512)),
        10,
        2,
        kind="flood",
    ),
    Scenario(
        "burst",
        "500 datagrams at once into 200 B at 100/s",
        (Flow(A_B, 200, rate=100, burst=500),),
        6,
        3.5,
        kind="burst",
        minimum=4,
    ),
    Scenario(
        "freeze",
        "server tunnel stopped 0.2 s (SIGSTOP) in 200 B at 1,000/s both ways",
        (Flow(A_B, 200, rate=1000), Flow(B_A, 200, rate=1000)),
        6,
        3.5,
        kind="freeze",
        minimum=4,
    ),
    Scenario(
        "steady-60", "1200 B at 1,000/s, long", (Flow(A_B, 1200, rate=1000),), 60, 5, kind="steady"
    ),
    Scenario(
        "soak-60",
        "unpaced 512 B both ways, long, tunnels' RSS sampled each second",
        (Flow(A_B, 512), Flow(B_A, 512)),
        60,
        5,
        kind="soak",
        tunnels_only=True,
    ),
]
SCENARIOS.append(
    Scenario(
        f"flows-{MANY_FLOWS}",
        f"{MANY_FLOWS} flows of 200 B at {FLOW_RATE}/s each, client to server",
        (Flow(B_A, 200, rate=MANY_FLOWS * FLOW_RATE, sockets=MANY_FLOWS),),
        10,
        2,
        kind="flows",
        flow_mode=True,
    )
)


def variant(
    prefix: str, what: str, *, rounds: int = 1, tls: bool = False, proxied: bool = False
) -> list[Scenario]:
    """capacity-1400 and paced-1200 again for a variant of ours (over TLS, through a proxy):
    ``prefix``-capacity-1400 (``rounds`` of it) and ``prefix``-paced-1200."""
    return [
        Scenario(
            f"{prefix}-capacity-1400",
            f"closed loop, 64 in flight, 1400 B, {what}",
            (Flow(A_B, 1400, window=64),),
            10,
            2,
            kind="capacity",
            rounds=rounds,
            tunnels_only=True,
            ours_only=True,
            tls=tls,
            proxied=proxied,
        ),
        Scenario(
            f"{prefix}-paced-1200",
            f"1200 B at 1,000/s, {what}",
            (Flow(A_B, 1200, rate=1000),),
            10,
            2,
            tunnels_only=True,
            ours_only=True,
            tls=tls,
            proxied=proxied,
        ),
    ]


SCENARIOS += variant("tls", "over TLS 1.3 (ours only)", tls=True)
SCENARIOS += variant("proxy", "ours direct and through squid", rounds=CAPACITY_ROUNDS, proxied=True)

# Issue 13: real time over a WAN with delay and loss. wan-LOAD-rttR-lossL; LOAD is rtp50
# (200 B at 50/s both ways) or paced200 (200 B at 1,000/s one way).
WAN_RTTS_MS = (0, 20, 80)
WAN_LOSSES_PCT = (0, 0.5, 1, 3)
WAN_LOADS = {
    "rtp50": ("200 B at 50/s both ways", (Flow(A_B, 200, rate=50), Flow(B_A, 200, rate=50))),
    "paced200": ("200 B at 1,000/s", (Flow(A_B, 200, rate=1000),)),
}
SCENARIOS += [
    Scenario(
        f"wan-{load}-rtt{rtt}-loss{loss:g}",
        f"{what}, WAN of {rtt} ms RTT and {loss:g}% loss each way",
        flows,
        10,
        2,
        kind="wan",
        wan=Wan(rtt, loss),
    )
    for load, (what, flows) in WAN_LOADS.items()
    for rtt in WAN_RTTS_MS
    for loss in WAN_LOSSES_PCT
]
# --wan-tuning: kernel settings in tunA and tunB (per network namespace, so they end with the
# chain) for the wan-* cases, to weigh the kernel's own levers against loss without touching
# the tunnel: sysctls, and options of the routes over the WAN link. Congestion control goes by
# route (congctl): a namespace other than the first may not make cubic its default here, as
# tcp_allowed_congestion_control is "reno bbr" and the default bbr.
RTO10 = ("net.ipv4.tcp_rto_min_us", "10000")  # the minimum RTO: 10 ms instead of 200 ms
THIN = ("net.ipv4.tcp_thin_linear_timeouts", "1")  # no backoff while a stream is thin
QUICKACK = ("quickack", "1")  # route option: acknowledge each segment at once, never delayed


@dataclass(frozen=True)
class WanTuning:
    sysctls: tuple[tuple[str, str], ...] = ()
    route: tuple[tuple[str, str], ...] = ()  # options of the routes over the WAN link


WAN_TUNINGS = {
    "none": WanTuning(),
    "cubic": WanTuning(route=(("congctl", "cubic"),)),
    "rto10": WanTuning((RTO10,)),
    "rto10-quickack": WanTuning((RTO10,), (QUICKACK,)),
    "thin": WanTuning((THIN,)),
    "rto10-thin": WanTuning((RTO10, THIN)),
}
SWEEP = Scenario("sweep", "200 B paced at rising rates (the plot)", (), 5, 1, kind="sweep")
NAMES = [s.name for s in SCENARIOS] + [SWEEP.name]


# --- processes --------------------------------------------------------------------------------


class Child:
    """A process started here: its PID, and one of its outputs collected line by line."""

    def __init__(self, argv: Sequence[str], *, read: str, stdin: bool = False) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if read == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid  # `ip netns exec` and `taskset` exec: this is the program
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        main = self.proc.stdout if read == "stdout" else self.proc.stderr
        threading.Thread(target=self._read, args=(main, self._queue), daemon=True).start()
        if read == "stdout":
            threading.Thread(target=self._collect_errors, daemon=True).start()

    def _read(self, stream: Any, into: queue.Queue[str | None]) -> None:
        for line in stream:
            into.put(line.rstrip("\n"))
        into.put(None)

    def _collect_errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(line.rstrip("\n"))

    def next_line(self, timeout: float) -> str | None:
        """The next line of output, or None if none came within ``timeout`` seconds.

        Raises:
            RuntimeError: the process ended first.
        """
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            self._queue.put(None)
            status = self.proc.wait()
            raise RuntimeError(f"{self.describe()} exited ({status}): {self.output()}")
        self.lines.append(line)
        return line

    def wait_for(self, pattern: str, timeout: float = WAIT, count: int = 1) -> str:
        """Wait for the ``count``-th line of output matching ``pattern`` (counting those
        already read); RuntimeError if it does not come."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        found = [line for line in self.lines if regex.search(line)]
        while len(found) < count and (left := deadline - time.monotonic()) > 0:
            line = self.next_line(left)
            if line is not None and regex.search(line):
                found.append(line)
        if len(found) < count:
            raise RuntimeError(
                f"{self.describe()}: {len(found)} of {count} {pattern!r} in {timeout} s: "
                f"{self.output()}"
            )
        return found[count - 1]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = WAIT) -> int | None:
        """SIGTERM, then SIGKILL if it does not end in time; its exit status."""
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """Kill this process, by its PID, if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def drain(self) -> list[str]:
        """Every line of output, once the process has ended."""
        while True:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
        return self.lines

    def describe(self) -> str:
        return " ".join(self.argv[self.argv.index("exec") + 2 :] if "exec" in self.argv else [])

    def output(self) -> str:
        return " | ".join([*self.lines[-5:], *self.errors[-5:]])


class Children:
    """Every process a case starts; on exit each one still running is killed by its PID."""

    def __init__(self) -> None:
        self.started: list[Child] = []

    def spawn(self, argv: Sequence[str], *, read: str, stdin: bool = False) -> Child:
        child = Child(argv, read=read, stdin=stdin)
        self.started.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for child in self.started:
            child.kill()


def cpu_ns(pid: int) -> int:
    """CPU time (user and system) of every thread of ``pid`` so far, in ns.

    The sum of each thread's /proc/PID/task/TID/schedstat run time: utime+stime at ns
    resolution, where /proc/PID/stat counts in 10 ms ticks.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak resident size) of ``pid``, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def udp_errors(chain: Chain) -> dict[str, int]:
    """Per namespace: UDP datagrams the kernel dropped (receive errors, full send buffers)."""
    out = {}
    for ns in namespaces(chain):
        counters = ns.snmp("Udp")
        out[ns.role] = counters["InErrors"] + counters.get("SndbufErrors", 0)
    return out


def namespaces(chain: Chain) -> tuple[Namespace, ...]:
    return (chain.app_a, chain.tun_a, chain.tun_b, chain.app_b)


# --- building udpload, the topology -----------------------------------------------------------


def build(binary: Path) -> None:
    """Compile NAME.c beside this file into build/bench/NAME unless the binary is newer."""
    source = HERE / f"{binary.name}.c"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    argv = ["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(binary)]
    subprocess.run([*argv, str(source), "-lm"], check=True)
    print(f"built {binary.relative_to(REPO)}", file=sys.stderr)


@contextlib.contextmanager
def forwarding(chain: Chain) -> Iterator[None]:
    """Let tunA and tunB route between appA and appB: the kernel path, with no tunnel."""
    for ns in (chain.tun_a, chain.tun_b):
        ns.sysctl("net.ipv4.ip_forward", "1")
    try:
        yield
    finally:
        for ns in (chain.tun_a, chain.tun_b):
            ns.sysctl("net.ipv4.ip_forward", "0")


@contextlib.contextmanager
def open_bench_chain(*, wan: bool = False) -> Iterator[Chain]:
    """The chain of tests.netns, plus routes over the WAN link for the kernel subject.

    The routes do nothing until ``forwarding`` turns forwarding on: the tunnel subjects send
    only to their tunnel host's addresses. With ``wan``, the wan host sits in the middle of
    the WAN link, and nothing crosses it until a case starts its delay line; without, the
    link is the direct veth pair, and the scenarios of issue 3 measure what they always did.
    """
    with open_chain(wan=wan) as chain:
        chain.tun_a.ip("route", "add", APP_B.rsplit(".", 1)[0] + ".0/24", "via", TUN_B_WAN)
        chain.tun_b.ip("route", "add", APP_A.rsplit(".", 1)[0] + ".0/24", "via", TUN_A_WAN)
        for ns in (chain.app_a, chain.app_b):
            ns.sysctl("net.unix.max_dgram_qlen", UNIX_QUEUE)
        # squid's, after TUN_B_WAN: direct connections still come from TUN_B_WAN.
        chain.tun_b.ip("addr", "add", f"{SQUID_OUT}/{PREFIX_LEN}", "dev", chain.wan_ifnames[1])
        yield chain


@dataclass
class Tunnels:
    server: Child
    client: Child


def apply_wan_tuning(chain: Chain, name: str) -> None:
    """Set WAN_TUNINGS[name] in tunA and tunB (their own namespaces: nothing global)."""
    tuning = WAN_TUNINGS[name]
    for ns, ifname in zip((chain.tun_a, chain.tun_b), chain.wan_ifnames, strict=True):
        for key, value in tuning.sysctls:
            ns.run(["sysctl", "-q", "-w", f"{key}={value}"])
        options = [word for option in tuning.route for word in option]
        for route in ns.run(["ip", "-o", "route", "show", "dev", ifname]).splitlines():
            if options:
                ns.run(["ip", "route", "change", *route.split(), "dev", ifname, *options])


def start_squid(
    children: Children, stack: contextlib.ExitStack, chain: Chain, tmp: Path
) -> tuple[Child, list[str]]:
    """squid in tunB (tests/proxies.py's configuration: Basic authentication, CONNECT to the
    tunnel's port alone), listening on tunB's LAN address, once it accepts; and the client's
    options to go through it (the password in a file, as users should give it).

    ``children`` kills squid by its PID if the case fails before stopping it; squid's
    authentication helpers end when their pipe from it closes.
    """
    argv = stack.enter_context(
        squid_command(
            TUN_B_LAN, users={PROXY_USER: PROXY_PASSWORD}, ports=(TCP_PORT,), outgoing=SQUID_OUT
        )
    )
    squid = children.spawn([*chain.tun_b.prefix, *argv], read="stderr")
    squid.wait_for(rf"Accepting HTTP Socket connections at .*{re.escape(TUN_B_LAN)}:{SQUID_PORT}")
    password = tmp / "proxy-password"
    password.write_text(PROXY_PASSWORD + "\n")
    password.chmod(0o600)
    url = f"http://{PROXY_USER}@{TUN_B_LAN}:{SQUID_PORT}"
    return squid, ["--proxy", url, "--proxy-password-file", str(password)]


def start_tunnels(
    children: Children,
    chain: Chain,
    program: str,
    pin: list[str],
    *,
    flows: bool = False,
    tls: Path | None = None,
    proxy: Sequence[str] = (),
    connections: int = 1,
) -> Tunnels:
    """Server end in tunA, client end in tunB, as in tests/test_netns.py; ready to relay.

    Ready means: the server listens, the client is connected, the server has accepted, and
    both UDP ports are bound (the original client binds only after it reports the connection).
    With ``flows`` (ours only), both ends run in flow mode: the client receives on tunB's
    port, and connects once per source when the traffic starts. With ``tls`` (a directory
    from ``make_certificates``, ours only), the connection is TLS 1.3 with mutual
    authentication. With ``proxy`` (options from ``start_squid``, ours only), the client
    connects through squid, and the server must see the connection come from squid's
    address: nothing went around the proxy. With ``connections`` over 1 (ours only), both
    ends run with ``--connections``, and ready means every connection is up.
    """
    mode = ["--flows"] if flows else []
    lanes = ["--connections", str(connections)] if connections > 1 else []
    server_tls, client_tls = [], []
    if tls:
        server_tls = ["--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key")]
        server_tls += ["--tls-ca", str(tls / "ca.pem")]
        client_tls = ["--tls", "--tls-ca", str(tls / "ca.pem")]
        client_tls += ["--tls-cert", str(tls / "client.pem"), "--tls-key", str(tls / "client.key")]
    serve = ["-s", str(TCP_PORT), f"{APP_A}/{PORT_A}"]
    server = children.spawn(
        [*chain.tun_a.prefix, *pin, program, "-v", *mode, *lanes, *server_tls, *serve],
        read="stderr",
    )
    server.wait_for(rf"Listening for TCP connections on port {TCP_PORT}( \(flows\))?$")
    client = children.spawn(
        [
            *chain.tun_b.prefix,
            *pin,
            program,
            "-v",
            *lanes,
            *([*mode, "--udp-bind", f"{TUN_B_LAN}/{PORT_B}"] if flows else []),
            *client_tls,
            *proxy,
            "-c",
            f"{TUN_A_WAN}/{TCP_PORT}",
            f"{APP_B}/{PORT_B}",
        ],
        read="stderr",
    )
    if flows:
        client.wait_for(rf"Receiving flows on UDP {re.escape(TUN_B_LAN)}/{PORT_B}$")
        return Tunnels(server, client)
    via = r" through the proxy \S+" if proxy else ""
    client.wait_for(rf"Connected TCP to {re.escape(TUN_A_WAN)}/{TCP_PORT}{via}$")
    peer = SQUID_OUT if proxy else TUN_B_WAN
    server.wait_for(rf"TCP connection from {re.escape(peer)}/\d+$")
    if connections > 1:  # the further ones, taken by the server and greeted on the client
        further = connections - 1
        server.wait_for(rf"TCP connection \d+ of {connections} from ", count=further)
        client.wait_for(rf"TCP connection \d+ of {connections} up$", count=further)
    chain.tun_a.wait_udp_bound(PORT_A, WAIT)
    chain.tun_b.wait_udp_bound(PORT_B, WAIT)
    return Tunnels(server, client)


def make_certificates(directory: Path) -> Path:
    """A CA, a server certificate for tunA's address and a client certificate, made once
    with the openssl command; the directory that holds them."""
    pki = directory / "pki"
    if (pki / "client.pem").exists():
        return pki
    pki.mkdir(exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

    for name in ("ca", "server", "client"):
        openssl(
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            f"{name}.key",
        )
    openssl(
        "req", "-x509", "-key", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA"
    )
    (pki / "server.ext").write_text(f"subjectAltName=IP:{TUN_A_WAN}\n")
    (pki / "client.ext").write_text("basicConstraints=CA:FALSE\n")
    for name in ("server", "client"):
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            "-extfile",
            f"{name}.ext",
        )
    return pki


def reported_drops(lines: list[str]) -> dict[str, int] | None:
    """What a tunnel end says it dropped, from its closing summary line (ours has one).

    ``dropped``: every drop it reports ("dropped: N"); ``own``: those the kernel did not
    count already. Ours also reports receive-queue overflows the kernel told it of ("N queue
    full"), which the namespace's UDP InErrors count too.
    """
    found = None
    for line in lines:
        if match := re.search(r"dropped:?\s+(\d+)", line):
            overflow = re.search(r"(\d+) (?:queue full|overflow)", line)
            dropped = int(match.group(1))
            found = {"dropped": dropped, "own": dropped - int(overflow.group(1) if overflow else 0)}
    return found


# --- one case: a scenario for one subject -----------------------------------------------------


@dataclass
class Options:
    quick: bool
    scale: float
    pin: str
    tmp: Path
    subjects: list[str]
    wan_tuning: str = "none"
    connections: int = CONNECTIONS  # of RESILIENT
    lengths: dict[str, float] = field(default_factory=dict)  # --seconds: pattern -> seconds

    def seconds(self, scenario: Scenario) -> float:
        for pattern, seconds in self.lengths.items():
            if fnmatch.fnmatchcase(scenario.name, pattern):
                return seconds
        base = scenario.quick_seconds if self.quick else scenario.seconds
        return max(base * self.scale, scenario.minimum if not self.quick else 0.0, 0.5)

    def event_at(self) -> float:
        return QUICK_EVENT_AT if self.quick else FULL_EVENT_AT

    def pin_load(self) -> list[str]:
        return ["taskset", "-c", CPU_LOAD] if self.pin == "split" else []

    def pin_tunnel(self) -> list[str]:
        return ["taskset", "-c", CPU_TUNNEL] if self.pin == "split" else []


@dataclass
class Load:
    """The udpload process of one application host, and what it sends and receives."""

    app: str  # "A" or "B"
    child: Child
    sends: Flow | None
    receives: Flow | None
    records: Path
    totals: dict[str, Any] = field(default_factory=dict)


def destination(subject: str, flow: Flow) -> str:
    """Where the sender addresses its datagrams: its tunnel end, or the far application."""
    if subject == "kernel":
        return f"{APP_B}:{PORT_B}" if flow.source == A_B else f"{APP_A}:{PORT_A}"
    return f"{TUN_A_LAN}:{PORT_A}" if flow.source == A_B else f"{TUN_B_LAN}:{PORT_B}"


def start_load(
    children: Children,
    chain: Chain,
    subject: str,
    flows: Sequence[Flow],
    seconds: float,
    options: Options,
    tag: str,
    drain_idle_ms: int = DRAIN_IDLE_MS,
) -> list[Load]:
    loads = []
    for app, ns, address, port in (
        (A_B, chain.app_a, APP_A, PORT_A),
        (B_A, chain.app_b, APP_B, PORT_B),
    ):
        sends = next((f for f in flows if f.source == app), None)
        receives = next((f for f in flows if f.sink == app), None)
        if not sends and not receives:
            continue
        records = options.tmp / f"{tag}-{app}.bin"
        argv = [*ns.prefix, *options.pin_load(), str(UDPLOAD), "--bind", f"{address}:{port}"]
        argv += ["--buffer", str(SOCKET_BUFFER)]
        if sends:
            argv += ["--dest", destination(subject, sends), "--size", str(sends.size)]
            argv += ["--duration", f"{seconds:.3f}"]
            if sends.sockets > 1:
                argv += ["--sockets", str(sends.sockets)]
            if sends.window:
                argv += ["--window", str(sends.window), "--ack-listen", str(ack_path(options, app))]
            elif sends.rate:
                argv += ["--rate", str(sends.rate), "--tick-us", str(PACE_TICK_US)]
                if sends.burst:
                    argv += ["--burst", f"{sends.burst}@{options.event_at()}"]
        if receives:
            argv += ["--receive", "--records", str(records)]
            argv += ["--drain-idle-ms", str(drain_idle_ms), "--drain-max-ms", str(DRAIN_MAX_MS)]
            if receives.window:
                argv += ["--ack-to", str(ack_path(options, receives.source))]
        child = children.spawn(argv, read="stdout", stdin=True)
        loads.append(Load(app, child, sends, receives, records))
    for load in loads:
        load.child.wait_for("^ready$")
    return loads


def ack_path(options: Options, app: str) -> Path:
    return options.tmp / f"ack-{app}"


def run_case(
    chain: Chain, subject: str, scenario: Scenario, flows: Sequence[Flow], options: Options
) -> dict[str, Any]:
    """Run one scenario's traffic through one subject, with fresh tunnel processes."""
    seconds = options.seconds(scenario)
    tag = f"{scenario.name}-{subject}" + (f"-{flows[0].rate:g}" if scenario.kind == "sweep" else "")
    case: dict[str, Any] = {"seconds": seconds}
    if subject == RESILIENT:
        case["connections"] = options.connections
    with contextlib.ExitStack() as stack:
        children = stack.enter_context(Children())
        tunnels = squid = delay = None
        wan_before: dict[str, int] = {}
        delay_cpu_before = 0
        if scenario.wan:
            delay = start_delayline(children, chain, scenario.wan)
        if subject == "kernel":
            stack.enter_context(forwarding(chain))
        else:
            program = ORIGINAL if subject == "original" else OURS
            flow_mode = scenario.flow_mode and subject == "ours"
            tls = make_certificates(options.tmp) if scenario.tls else None
            proxy: list[str] = []
            if subject == PROXIED:
                squid, proxy = start_squid(children, stack, chain, options.tmp)
            pin = options.pin_tunnel()
            connections = options.connections if subject == RESILIENT else 1
            tunnels = start_tunnels(
                children,
                chain,
                program,
                pin,
                flows=flow_mode,
                tls=tls,
                proxy=proxy,
                connections=connections,
            )
        loads = start_load(
            children, chain, subject, flows, seconds, options, tag, scenario.drain_idle_ms
        )
        errors_before = udp_errors(chain)
        if scenario.wan:  # from here on: the set-up went through without loss
            set_wan_loss(chain, scenario.wan.loss_permille)
            wan_before = wan_drops(chain)
            delay_cpu_before = cpu_ns(delay.pid) if delay else 0

        go = time.monotonic_ns() + START_DELAY_NS
        ends = {"server": tunnels.server, "client": tunnels.client} if tunnels else {}
        cpu_before = {role: cpu_ns(end.pid) for role, end in ends.items()}
        squid_before = cpu_ns(squid.pid) if squid else 0
        for load in loads:
            load.child.send(f"go {go}")
        case["events"] = drive(scenario, loads, tunnels, go, seconds, options, case)

        for load in loads:
            if load.receives:
                load.child.signal(signal.SIGUSR1)
        for load in loads:
            line = load.child.wait_for(r"^\{", DRAIN_MAX_MS / 1000 + WAIT)
            load.totals = json.loads(line)
            load.child.proc.wait(WAIT)

        case["tunnel"] = {}
        for role, end in ends.items():
            case["tunnel"][role] = {
                "cpu_ns": cpu_ns(end.pid) - cpu_before[role],
                **memory_kb(end.pid),
            }
        if squid:  # what squid's relaying cost, beside the tunnel ends
            case["proxy"] = {"cpu_ns": cpu_ns(squid.pid) - squid_before, **memory_kb(squid.pid)}
        errors_after = udp_errors(chain)
        for role, end in ends.items():
            status = end.stop()
            lines = end.drain()
            opened = sum(1 for line in lines if re.match(r"Flow from .*: UDP ", line))
            case["tunnel"][role].update(
                exit=status, dropped=reported_drops(lines), log_tail=lines[-3:], flows=opened
            )
        if squid:
            case["proxy"]["exit"] = squid.stop()
        if scenario.wan and delay:
            case["wan"] = stop_delayline(chain, scenario.wan, delay, wan_before, delay_cpu_before)
    case["kernel_drops"] = {ns: errors_after[ns] - errors_before[ns] for ns in errors_after}
    case["load"] = {
        load.app: {
            key: load.totals[key]
            for key in (
                "cpu_ns",
                "send_cpu_ns",
                "recv_cpu_ns",
                "malformed",
                "untimed",
                "ack_failures",
            )
        }
        for load in loads
    }
    analyse(case, flows, loads)
    if scenario.wan:  # what the tunnel added to the path's own delay
        for key in ("p50_ms", "p90_ms", "p95_ms", "p98_ms", "p99_ms"):
            value = case["total"][key]
            added = None if value is None else value - case["wan"]["one_way_ms"]
            case["total"][f"added_{key}"] = added
    return case


def start_delayline(children: Children, chain: Chain, wan: Wan) -> Child:
    """The delay line in the wan host, carrying frames once it says so."""
    assert chain.wan is not None, "a WAN scenario on the chain without the wan host"
    argv = [*chain.wan.prefix, str(DELAYLINE), "--a", WAN_TO_A, "--b", WAN_TO_B]
    argv += ["--delay-us", str(round(wan.one_way_ms * 1000))]
    argv += ["--jitter-us", str(round(wan.jitter_ms * 1000))]
    line = children.spawn(argv, read="stdout")
    line.wait_for("^ready$")
    return line


def stop_delayline(
    chain: Chain, wan: Wan, line: Child, drops_before: dict[str, int], cpu_before: int
) -> dict[str, Any]:
    """Loss off, the delay line stopped; what the emulator did during the case."""
    drops = {ns: count - drops_before[ns] for ns, count in wan_drops(chain).items()}
    cpu = cpu_ns(line.pid) - cpu_before
    set_wan_loss(chain, 0)
    line.signal(signal.SIGTERM)
    counters = json.loads(line.wait_for(r"^\{"))
    line.proc.wait(WAIT)
    return {
        **asdict(wan),
        "one_way_ms": wan.one_way_ms,
        "nft_dropped": drops,  # by the receiving host: tunA's drops went B to A
        "delayline": counters,
        "delayline_cpu_ns": cpu,
    }


def drive(
    scenario: Scenario,
    loads: list[Load],
    tunnels: Tunnels | None,
    go: int,
    seconds: float,
    options: Options,
    case: dict[str, Any],
) -> dict[str, Any]:
    """While the senders send: freeze the server, sample RSS; return when all have sent."""
    events: dict[str, Any] = {}
    senders = [load for load in loads if load.sends]
    freeze_at = go + int(options.event_at() * 1e9) if scenario.kind == "freeze" else None
    if scenario.kind == "burst":
        events["burst_ns"] = go + int(options.event_at() * 1e9)
    rss: dict[str, list[int]] = {"server": [], "client": []}
    next_rss = go if scenario.kind == "soak" and tunnels else None
    deadline = time.monotonic() + START_DELAY_NS / 1e9 + seconds + WAIT + 5
    while senders:
        now = time.monotonic_ns()
        if freeze_at is not None and tunnels and now >= freeze_at:
            tunnels.server.signal(signal.SIGSTOP)
            events["stop_ns"] = time.monotonic_ns()
            time.sleep(max(0.0, (events["stop_ns"] + FREEZE_NS - time.monotonic_ns()) / 1e9))
            tunnels.server.signal(signal.SIGCONT)
            events["cont_ns"] = time.monotonic_ns()
            freeze_at = None
        if next_rss is not None and tunnels and now >= next_rss:
            rss["server"].append(memory_kb(tunnels.server.pid)["VmRSS"])
            rss["client"].append(memory_kb(tunnels.client.pid)["VmRSS"])
            next_rss += RSS_PERIOD_NS
        for load in list(senders):
            while (line := load.child.next_line(0)) is not None:
                if line == "sent":
                    senders.remove(load)
                    break
        if time.monotonic() > deadline:
            raise RuntimeError(f"senders did not finish: {[s.child.output() for s in senders]}")
        wake = POLL
        if freeze_at is not None:
            wake = min(wake, max(0.0, (freeze_at - now) / 1e9))
        time.sleep(wake)
    if scenario.kind == "freeze" and tunnels is None:
        events["note"] = "no tunnel process to freeze: the same stream, undisturbed"
        events["cont_ns"] = go + int(options.event_at() * 1e9) + FREEZE_NS
    if next_rss is not None:
        case["rss_kb"] = rss
    return events


def analyse(case: dict[str, Any], flows: Sequence[Flow], loads: list[Load]) -> None:
    """Per-flow statistics, the totals, and CPU per delivered datagram, into ``case``."""
    by_app = {load.app: load for load in loads}
    record_sets = []
    case["flows"] = {}
    for flow in flows:
        records = analysis.load(by_app[flow.sink].records)
        record_sets.append(records)
        stats = analysis.flow_stats(records, by_app[flow.source].totals, flow.size)
        events = case["events"]
        after = events.get("burst_ns") or events.get("cont_ns")
        if after is not None:
            end = by_app[flow.source].totals["send_end_ns"]
            stats["recovery"] = analysis.recovery(records, after, end, flow.rate)
        case["flows"][flow.name] = stats
        with contextlib.suppress(FileNotFoundError):
            by_app[flow.sink].records.unlink()
    totals = case["flows"].values()
    sent = sum(f["sent"] for f in totals)
    delivered = sum(f["delivered"] for f in totals)
    # Drops the tunnel ends report that the kernel's counters do not already include.
    dropped_by_tunnel = sum((t["dropped"] or {}).get("own", 0) for t in case["tunnel"].values())
    dropped_by_kernel = sum(case["kernel_drops"].values())
    case["total"] = {
        "sent": sent,
        "delivered": delivered,
        "lost": sent - delivered,
        "loss_pct": 100.0 * (sent - delivered) / sent if sent else 0.0,
        "offered_per_s": sum(f["offered_per_s"] for f in totals),
        "delivered_per_s": sum(f["delivered_per_s"] for f in totals),
        "mbit_per_s": sum(f["mbit_per_s"] for f in totals),
        "dropped_by_tunnel": dropped_by_tunnel,
        "dropped_by_kernel": dropped_by_kernel,
        # Neither arrived nor counted as dropped anywhere: held back, or lost unaccounted.
        "unaccounted": sent - delivered - dropped_by_tunnel - dropped_by_kernel,
        **analysis.combined_latency(record_sets),
    }
    tunnel_cpu = {role: t["cpu_ns"] for role, t in case["tunnel"].items()}
    load_cpu = sum(load["cpu_ns"] for load in case["load"].values())

    def per_datagram(ns: int) -> float | None:
        return ns / delivered / 1e3 if delivered else None

    case["cpu_us_per_datagram"] = {
        **{role: per_datagram(ns) for role, ns in tunnel_cpu.items()},
        "both": per_datagram(sum(tunnel_cpu.values())) if tunnel_cpu else None,
        "load": per_datagram(load_cpu),
        **({"proxy": per_datagram(case["proxy"]["cpu_ns"])} if "proxy" in case else {}),
    }
    case["cpu_s"] = {**{r: ns / 1e9 for r, ns in tunnel_cpu.items()}, "load": load_cpu / 1e9}
    if "proxy" in case:
        case["cpu_s"]["proxy"] = case["proxy"]["cpu_ns"] / 1e9


# --- the whole run ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    revision = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "repository": revision or "unknown",
    }


def attempt(
    chain: Chain,
    subject: str,
    scenario: Scenario,
    flows: Sequence[Flow],
    options: Options,
    label: str,
) -> dict[str, Any]:
    """Run one case; a case that fails is reported as such, and the run goes on."""
    started = time.monotonic()
    try:
        case = run_case(chain, subject, scenario, flows, options)
    except Exception as exc:  # any failure of one case: a tunnel that died, a timeout
        print(f"  {label:22} {subject:10} FAILED: {exc}", file=sys.stderr, flush=True)
        return {"error": str(exc)}
    report.progress(label, subject, case, time.monotonic() - started)
    return case


def median_round(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median delivered rate, carrying every round's rate and losses."""
    if len(cases) == 1:
        return cases[0]
    done = [case for case in cases if "error" not in case]
    if len(done) < len(cases):
        return next(case for case in cases if "error" in case)  # a failed round fails it
    done.sort(key=lambda case: case["total"]["delivered_per_s"])
    median = done[len(done) // 2]
    median["rounds"] = [
        {"delivered_per_s": case["total"]["delivered_per_s"], "lost": case["total"]["lost"]}
        for case in cases
    ]
    return median


def run_all(options: Options, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"scenarios": {}, "sweep": {}}
    chosen = [s for s in SCENARIOS if s.name in names]
    direct = [s for s in chosen if not s.wan]
    if direct or SWEEP.name in names:
        with open_bench_chain() as chain:
            run_scenarios(chain, direct, options, results)
            run_sweep(chain, names, options, results)
    if emulated := [s for s in chosen if s.wan]:
        with open_bench_chain(wan=True) as chain:
            apply_wan_tuning(chain, options.wan_tuning)
            run_scenarios(chain, emulated, options, results)
    results["wan"] = report.wan_rows(results)
    return results


def run_scenarios(
    chain: Chain, chosen: list[Scenario], options: Options, results: dict[str, Any]
) -> None:
    """Each scenario for each subject, its rounds interleaved, into ``results``."""
    for scenario in chosen:
        entry = {"title": scenario.title, "kind": scenario.kind, "subjects": {}}
        entry["flows"] = [asdict(flow) for flow in scenario.flows]
        results["scenarios"][scenario.name] = entry
        subjects = [s for s in options.subjects if scenario.runs(s)]
        rounds: dict[str, list[dict[str, Any]]] = {subject: [] for subject in subjects}
        for number in range(scenario.rounds):
            label = scenario.name + (f" #{number + 1}" if scenario.rounds > 1 else "")
            for subject in subjects:
                case = attempt(chain, subject, scenario, scenario.flows, options, label)
                rounds[subject].append(case)
        for subject, cases in rounds.items():
            entry["subjects"][subject] = median_round(cases)


def run_sweep(chain: Chain, names: list[str], options: Options, results: dict[str, Any]) -> None:
    """The sweep's rates for each subject, into ``results``, if it was chosen."""
    if SWEEP.name not in names:
        return
    for rate in SWEEP_RATES:
        flows = (Flow(A_B, 200, rate=rate),)
        point = results["sweep"].setdefault(str(rate), {})
        for subject in filter(SWEEP.runs, options.subjects):
            case = attempt(chain, subject, SWEEP, flows, options, f"sweep {rate}/s")
            for stats in case.get("flows", {}).values():
                stats.pop("series")  # the plot needs the totals only
            point[subject] = case


def parse_lengths(text: str) -> dict[str, float]:
    """``--seconds``: 'PATTERN=S,PATTERN=S' as {pattern: seconds}, each pattern a scenario's."""
    lengths = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, _, seconds = item.rpartition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = 0.0
        if not pattern or not value > 0:
            raise click.BadParameter(f"{item!r} is not PATTERN=SECONDS", param_hint="--seconds")
        if not fnmatch.filter(NAMES, pattern):
            raise click.BadParameter(f"no scenario matches {pattern!r}", param_hint="--seconds")
        lengths[pattern] = value
    return lengths


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Short runs (long scenarios ~5 s): a smoke test.")
@click.option(
    "--only",
    metavar="NAME[,NAME]",
    help=f"Run only these scenarios (shell patterns: 'wan-*-rtt20-*'): {', '.join(NAMES)}.",
)
@click.option(
    "--subjects",
    default=",".join(SUBJECTS),
    show_default=True,
    help=f"Which of {', '.join(SUBJECTS)} to measure ({PROXIED}: in proxy-* scenarios; "
    f"{RESILIENT}: in wan-*).",
)
@click.option(
    "--duration",
    "scale",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Scale every scenario's duration by this factor.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=BUILD / "results.json",
    show_default=True,
    help="Where to write the results.",
)
@click.option(
    "--pin",
    type=click.Choice(["split", "none"]),
    default="none",
    show_default=True,
    help="split: load tools on CPU 0, tunnel ends on CPU 1 (taskset). none: the scheduler's.",
)
@click.option(
    "--wan-tuning",
    type=click.Choice(list(WAN_TUNINGS)),
    default="none",
    show_default=True,
    help="Kernel settings in tunA and tunB for the wan-* scenarios (WAN_TUNINGS in run.py).",
)
@click.option(
    "--connections",
    type=click.IntRange(2, 16),
    default=CONNECTIONS,
    show_default=True,
    metavar="N",
    help=f"{RESILIENT}: ours with --connections N on both ends, in the wan-* scenarios.",
)
@click.option(
    "--seconds",
    "lengths",
    metavar="PATTERN=S[,...]",
    help="Send for S seconds in the scenarios matching PATTERN, whatever --quick and "
    "--duration say ('wan-rtp50-*=60': a p99 of 50/s needs a long run).",
)
@click.option("--check", is_flag=True, help="Exit 1 if any target of issue 3 fails.")
def main(
    quick: bool,
    only: str | None,
    subjects: str,
    scale: float,
    json_path: Path,
    pin: str,
    wan_tuning: str,
    connections: int,
    lengths: str | None,
    check: bool,
) -> None:
    """Benchmark our udptunnel against Debian's original and the bare kernel path."""
    names = NAMES
    if only:
        patterns = [n.strip() for n in only.split(",") if n.strip()]
        for pattern in patterns:
            if not fnmatch.filter(NAMES, pattern):
                raise click.BadParameter(f"unknown scenario {pattern!r}", param_hint="--only")
        names = [n for n in NAMES if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    chosen_subjects = [s.strip() for s in subjects.split(",") if s.strip()]
    for subject in chosen_subjects:
        if subject not in SUBJECTS:
            raise click.BadParameter(f"unknown subject {subject!r}", param_hint="--subjects")
    chosen_subjects = [s for s in SUBJECTS if s in chosen_subjects]  # kernel first: the ceiling
    seconds_for = parse_lengths(lengths or "")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise click.ClickException("needs root and iproute2 (it builds network namespaces)")
    if "original" in chosen_subjects and not os.access(ORIGINAL, os.X_OK):
        raise click.ClickException(f"needs Debian's udptunnel at {ORIGINAL}, or --subjects")
    proxied = any(s.proxied for s in SCENARIOS if s.name in names)
    if proxied and PROXIED in chosen_subjects and shutil.which("squid") is None:
        raise click.ClickException(f"{PROXIED} needs squid (Debian's package), or --subjects")
    if any(s.wan for s in SCENARIOS if s.name in names) and shutil.which("nft") is None:
        raise click.ClickException("the wan-* scenarios need nft (Debian's package nftables)")
    build(UDPLOAD)
    build(DELAYLINE)
    started = time.monotonic()
    info = machine()
    print(report.header(info, quick, pin), file=sys.stderr)
    # A signal from outside (make's, say) unwinds like Ctrl-C: processes killed, namespaces gone.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD, prefix="run-") as tmp:
        options = Options(
            quick, scale, pin, Path(tmp), chosen_subjects, wan_tuning, connections, seconds_for
        )
        results = run_all(options, names)
    results["machine"] = info
    results["options"] = {
        "quick": quick,
        "duration_scale": scale,
        "pin": pin,
        "wan_tuning": wan_tuning,
        "connections": connections,
        "seconds": seconds_for,
        "subjects": chosen_subjects,
        "scenarios": names,
        "wall_s": round(time.monotonic() - started, 1),
    }
    results["targets"] = report.targets(results)
    results["wan_targets"] = report.wan_targets(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(report.header(info, quick, pin))
    print(report.table(results))
    if results["wan"]:
        print(report.wan_text(results["wan"]))
    plot = report.plot(results, BUILD / "latency.png")
    print(report.targets_text(results["targets"]))
    if results["wan"]:
        print(report.targets_text(results["wan_targets"], "issue 13 (Done when)"))
    print(f"\nJSON: {json_path}   plot: {plot}   wall time: {results['options']['wall_s']} s")
    if check and any(t["status"] == "FAIL" for t in results["targets"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
