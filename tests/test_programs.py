"""Real programs through the tunnel: WireGuard, OpenVPN, dnsmasq and HAProxy, in namespaces.

Every test runs in the chain of ``netns``::

    appA -- tunA -- tunB -- appB

The client end runs in tunA and the server end in tunB; the programs' first side runs in
appA, the other (or the service) in appB. Nothing forwards between the namespaces, so the
only way from appA to appB is the tunnel: appA sends to tunA's LAN address at the tunnel's
UDP port, and the server end sends on to appB. Each test has an absolute ceiling
(``Deadline``); the processes it starts are killed by PID at the end (``spawn``), and the
namespaces deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from .conftest import UDPTUNNEL, WAIT, Process
from .netns import (
    APP_A,
    APP_B,
    TUN_A_LAN,
    TUN_B_WAN,
    Chain,
    Namespace,
    open_chain,
    wait_until,
)

Spawn = type[Process]

TCP_PORT = 6000  # the server end's port in tunB (HAProxy's frontend in its test)
TRACEBACK = "Traceback (most recent call last)"
LOG_LINES = 25  # the last lines of each process that a failure shows
FLOWS = ["--flows"]
DEFAULT: list[str] = []
MODES = [pytest.param(DEFAULT, id="default"), pytest.param(FLOWS, id="flows")]


class Deadline:
    """An absolute ceiling for one test: each wait gets what is left of it, at most ``limit``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, limit: float = WAIT) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the test took longer than its ceiling of {self.seconds} s")
        return min(remaining, limit)


@pytest.fixture
def chain() -> Iterator[Chain]:
    """appA -- tunA -- tunB -- appB. Request it before ``spawn``: processes die first."""
    with open_chain() as built:
        yield built


def to_stderr(argv: Sequence[str]) -> list[str]:
    """``argv`` with its standard output joined to standard error, where ``Process`` reads.

    The shell execs the program, so the PID that ``spawn`` kills is still the program's.
    """
    return ["sh", "-c", 'exec "$@" >&2', "sh", *argv]


def run(
    namespace: Namespace, argv: Sequence[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command in ``namespace`` to completion (at most ``timeout`` s), whatever its status."""
    return subprocess.run(
        [*namespace.prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def start_tunnel(
    chain: Chain, spawn: Spawn, port: int, mode: Sequence[str]
) -> tuple[Process, Process]:
    """A tunnel from tunA's LAN address at ``port`` to appB's ``port``; the server and client.

    The server end in tunB sends to appB at ``port``; the client end in tunA receives at
    ``port`` and, in default mode, sends what comes back to appA at ``port``. In flow mode
    it sends each reply to the source it belongs to.
    """
    server = spawn(
        [UDPTUNNEL, "-v", *mode, "-s", str(TCP_PORT), f"{APP_B}/{port}"], prefix=chain.tun_b.prefix
    )
    server.wait_for(rf"^Listening for TCP connections on port {TCP_PORT}\b")
    if mode == FLOWS:
        client = spawn(
            [UDPTUNNEL, "-v", *mode, "-c", f"{TUN_B_WAN}/{TCP_PORT}", f"{TUN_A_LAN}/{port}"],
            prefix=chain.tun_a.prefix,
        )
        client.wait_for(r"^Receiving flows on UDP")
    else:
        client = spawn(
            [UDPTUNNEL, "-v", "-c", f"{TUN_B_WAN}/{TCP_PORT}", f"{APP_A}/{port}"],
            prefix=chain.tun_a.prefix,
        )
        client.wait_for(rf"^Connected TCP to {re.escape(TUN_B_WAN)}/{TCP_PORT}$")
        server.wait_for(r"^TCP connection from ")
        chain.tun_a.wait_udp_bound(port, WAIT)
    return server, client


def assert_unharmed(*tunnel_ends: Process) -> None:
    """Each tunnel end still runs; SIGTERM ends it with status 0 and it printed no traceback."""
    for end in tunnel_ends:
        if end.proc.poll() is not None:
            end.wait()
            raise AssertionError(f"{end.argv} exited ({end.proc.returncode}): {end.stderr}")
    for end in tunnel_ends:
        end.signal(signal.SIGTERM)
        assert end.wait() == 0, end.stderr
        assert TRACEBACK not in end.stderr, end.stderr


@contextlib.contextmanager
def telling(processes: list[Process]) -> Iterator[None]:
    """On a failed assertion inside, end ``processes`` (as the list is by then) and add all
    they printed to it."""
    try:
        yield
    except AssertionError as exc:
        for process in processes:
            process.kill()
        logs = "".join(
            f"\n--- {' '.join(p.argv)}\n" + "\n".join(p.lines[-LOG_LINES:]) for p in processes
        )
        raise AssertionError(f"{exc}{logs}") from exc


def ping(namespace: Namespace, address: str, count: int, deadline: Deadline) -> int:
    """Send ``count`` pings 20 ms apart from ``namespace``; how many were answered."""
    result = run(
        namespace,
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.02", "-W", "2", address],
        timeout=deadline.left(count * 0.02 + 2 * WAIT),
    )
    match = re.search(r"(\d+) received", result.stdout)
    assert match, f"ping: {result.stdout} {result.stderr}"
    return int(match[1])


# --- WireGuard: wireguard-go peers in appA and appB, their UDP through the tunnel ------------

WG_PORT = 51820
WG_A, WG_B = "198.18.10.1", "198.18.10.2"  # the peers' addresses inside WireGuard
PINGS = 50
TRANSFER_SIZE = 20 * 1024 * 1024  # bytes over TCP inside WireGuard
TRANSFER_PORT = 7000
TRANSFER_SEED = 10
HANDSHAKE_WAIT = 15.0  # seconds: a lost first initiation is retried after 5 s

RECEIVER = """
import hashlib, socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    print("listening", file=sys.stderr, flush=True)
    connection, _ = server.accept()
    digest, length = hashlib.sha256(), 0
    with connection:
        while data := connection.recv(1 << 16):
            digest.update(data)
            length += len(data)
print("received", length, digest.hexdigest(), file=sys.stderr, flush=True)
"""

SENDER = """
import random, socket, sys
data = random.Random(int(sys.argv[4])).randbytes(int(sys.argv[3]))
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    connection.sendall(data)
"""


def start_wireguard(spawn: Spawn, namespace: Namespace) -> tuple[str, Process]:
    """A wireguard-go interface in ``namespace``, not yet configured; its name and process.

    Names are unique on the machine, not only in the namespace: wireguard-go keeps its
    control socket in /var/run/wireguard, which every namespace shares.
    """
    name = f"wg{secrets.token_hex(4)}"
    process = spawn(
        to_stderr(["env", "WG_PROCESS_FOREGROUND=1", "LOG_LEVEL=verbose", "wireguard-go", name]),
        prefix=namespace.prefix,
    )
    process.wait_for("UAPI listener started")
    return name, process


def wg_keys(directory: Path, who: str) -> tuple[Path, str]:
    """A new private key in a file (``wg set`` reads it from there) and its public key."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    path = directory / f"{who}.key"
    path.write_text(private)
    path.chmod(0o600)
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout
    return path, public.strip()


def latest_handshake(namespace: Namespace, interface: str) -> int:
    """When the interface's one peer last completed a handshake (0: never)."""
    line = namespace.run(["wg", "show", interface, "latest-handshakes"]).split()
    return int(line[1]) if len(line) == 2 else 0


@pytest.mark.root
@pytest.mark.needs("wireguard-go", "wg", "ping")
@pytest.mark.parametrize("mode", MODES)
def test_wireguard(chain: Chain, spawn: Spawn, tmp_path: Path, mode: list[str]) -> None:
    """Two WireGuard peers whose only path is the tunnel: handshake, pings, 20 MB over TCP.

    appA's peer has tunA's end of the tunnel as its endpoint and keeps the connection alive;
    appB's peer has no endpoint and answers wherever appA's datagrams come from, as
    WireGuard does: this works only if the tunnel sends from the port it receives on.
    """
    deadline = Deadline(90)
    server, client = start_tunnel(chain, spawn, WG_PORT, mode)
    with telling(watched := [server, client]):
        (wg_a, go_a), (wg_b, go_b) = (
            start_wireguard(spawn, ns) for ns in (chain.app_a, chain.app_b)
        )
        watched += [go_a, go_b]
        key_a, public_a = wg_keys(tmp_path, "a")
        key_b, public_b = wg_keys(tmp_path, "b")
        # appB's peer first: the first datagram from appA must find its port open.
        chain.app_b.run(
            [
                *("wg", "set", wg_b, "listen-port", str(WG_PORT), "private-key", str(key_b)),
                *("peer", public_a, "allowed-ips", f"{WG_A}/32"),
            ]
        )
        # appA's peer: keepalives from the start, so the handshake begins without traffic.
        chain.app_a.run(
            [
                *("wg", "set", wg_a, "listen-port", str(WG_PORT), "private-key", str(key_a)),
                *("peer", public_b, "allowed-ips", f"{WG_B}/32"),
                *("endpoint", f"{TUN_A_LAN}:{WG_PORT}", "persistent-keepalive", "1"),
            ]
        )
        for namespace, interface, address in ((chain.app_a, wg_a, WG_A), (chain.app_b, wg_b, WG_B)):
            namespace.ip("addr", "add", f"{address}/24", "dev", interface)
            namespace.ip("link", "set", interface, "up")

        wait_until(
            lambda: latest_handshake(chain.app_a, wg_a) > 0,
            deadline.left(HANDSHAKE_WAIT),
            "a WireGuard handshake through the tunnel",
        )
        assert latest_handshake(chain.app_b, wg_b) > 0
        assert ping(chain.app_a, WG_B, PINGS, deadline) == PINGS

        receiver = spawn(
            [sys.executable, "-c", RECEIVER, WG_B, str(TRANSFER_PORT)], prefix=chain.app_b.prefix
        )
        receiver.wait_for("^listening$", deadline.left())
        sender = spawn(
            [
                sys.executable,
                "-c",
                SENDER,
                WG_B,
                *map(str, (TRANSFER_PORT, TRANSFER_SIZE, TRANSFER_SEED)),
            ],
            prefix=chain.app_a.prefix,
        )
        assert sender.wait(deadline.left(60)) == 0, sender.stderr
        received = receiver.wait_for(r"^received (\d+) (\w+)$", deadline.left())
        expected = hashlib.sha256(random.Random(TRANSFER_SEED).randbytes(TRANSFER_SIZE)).hexdigest()
        assert (int(received[1]), received[2]) == (TRANSFER_SIZE, expected)
    assert_unharmed(server, client)


# --- OpenVPN: a static-key point-to-point link through the tunnel, default mode ---------------

OPENVPN_PORT = 1194
OVPN_A, OVPN_B = "198.18.11.1", "198.18.11.2"  # the ends of OpenVPN's tun link


@pytest.mark.root
@pytest.mark.needs("openvpn", "ping")
def test_openvpn(chain: Chain, spawn: Spawn, tmp_path: Path) -> None:
    """OpenVPN over UDP with a static key, point to point, answering pings.

    appB's end replies to the address and port that appA's datagrams come from, and appA's
    end, which has a remote and no ``--float``, takes datagrams only from that remote's
    address and port: both work only if the tunnel sends from the port it receives on.
    """
    deadline = Deadline(60)
    server, client = start_tunnel(chain, spawn, OPENVPN_PORT, DEFAULT)
    with telling(watched := [server, client]):
        key = tmp_path / "static.key"
        subprocess.run(["openvpn", "--genkey", "secret", str(key)], capture_output=True, check=True)
        # appB's end first, and without a remote: it answers wherever appA's end talks from.
        # appA's end has tunA's end of the tunnel as its remote, and starts talking at once.
        for namespace, local, remote, remote_options in (
            (chain.app_b, OVPN_B, OVPN_A, []),
            (chain.app_a, OVPN_A, OVPN_B, ["--remote", TUN_A_LAN]),
        ):
            end = spawn(
                [
                    *("openvpn", "--dev", "tun", "--ifconfig", local, remote),
                    # 2.6 wants the static key's cipher named: its default ciphers are AEAD.
                    *("--secret", str(key), "--cipher", "AES-256-CBC"),
                    *("--proto", "udp", "--port", str(OPENVPN_PORT), *remote_options),
                    *("--verb", "3", "--log", "/dev/stderr"),
                ],
                prefix=namespace.prefix,
            )
            watched.append(end)
            namespace.wait_udp_bound(OPENVPN_PORT, deadline.left())
        # Each end logs "Initialization Sequence Completed" once it has heard the other, but
        # it logs on and on while it rejects datagrams, which would keep a wait_for alive.
        wait_until(
            lambda: ping(chain.app_a, OVPN_B, 1, deadline) == 1,
            deadline.left(HANDSHAKE_WAIT),
            "a first ping answered through OpenVPN",
        )
        assert ping(chain.app_a, OVPN_B, PINGS, deadline) == PINGS
    assert_unharmed(server, client)


# --- dnsmasq behind a flow-mode server with the default limits --------------------------------

DNS_PORT = 53
NAME, ADDRESS = "test.example", "198.18.9.9"  # the one record dnsmasq answers
QUERIES = 300  # from 300 source ports, more than the default --max-flows (256)
QUERIES_WITHIN = 60.0  # seconds: all of them, so none of their flows times out in between
DIG_TRY = 2  # seconds dig waits for its one try
RESTART_QUERIES = 20


def start_dnsmasq(spawn: Spawn, namespace: Namespace) -> Process:
    """dnsmasq on appB's address, answering ``NAME`` from its own record, and nothing else."""
    dnsmasq = spawn(
        [
            *("dnsmasq", "--keep-in-foreground", "--log-facility=-", "--conf-file=/dev/null"),
            *("--no-resolv", "--no-hosts", "--pid-file", f"--address=/{NAME}/{ADDRESS}"),
            *(f"--listen-address={APP_B}", "--bind-interfaces", f"--port={DNS_PORT}"),
            *("--user=root", "--group=root"),
        ],
        prefix=namespace.prefix,
    )
    dnsmasq.wait_for(r"started, version")  # logged once its sockets are bound
    return dnsmasq


def dig(namespace: Namespace, deadline: Deadline) -> str:
    """One query for ``NAME`` through the tunnel, from a port of dig's own; the answer or ''."""
    result = run(
        namespace,
        [
            "dig",
            "+short",
            "+tries=1",
            f"+time={DIG_TRY}",
            "-p",
            str(DNS_PORT),
            f"@{TUN_A_LAN}",
            NAME,
        ],
        timeout=deadline.left(DIG_TRY + WAIT),
    )
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.mark.root
@pytest.mark.needs("dnsmasq", "dig")
def test_dnsmasq(chain: Chain, spawn: Spawn) -> None:
    """300 queries from 300 ports in a minute, then the server restarted under the tunnel.

    While dnsmasq is down, a query goes unanswered (its flow's datagram is refused by ICMP at
    the server end); once it is back, queries are answered again by the same tunnel ends.
    """
    deadline = Deadline(100)
    dnsmasq = start_dnsmasq(spawn, chain.app_b)
    server, client = start_tunnel(chain, spawn, DNS_PORT, FLOWS)
    with telling(watched := [server, client, dnsmasq]):
        started = time.monotonic()
        for number in range(QUERIES):
            assert dig(chain.app_a, deadline) == ADDRESS, f"query {number} unanswered"
        assert time.monotonic() - started < QUERIES_WITHIN

        dnsmasq.kill()
        assert dig(chain.app_a, deadline) == ""
        watched.append(dnsmasq := start_dnsmasq(spawn, chain.app_b))
        wait_until(
            lambda: dig(chain.app_a, deadline) == ADDRESS,
            deadline.left(),
            "an answer from dnsmasq restarted behind the running tunnel",
        )
        for number in range(RESTART_QUERIES):
            assert dig(chain.app_a, deadline) == ADDRESS, f"query {number} after the restart"
    assert_unharmed(server, client)


# --- HAProxy health-checking two flow-mode servers --------------------------------------------

ECHO_PORT = 7
FLOW_SERVER_PORTS = (6001, 6002)  # the two servers behind HAProxy, on tunB's loopback
SOURCES = 20
CHECKED_FOR = 30.0  # seconds of traffic while HAProxy checks the servers every 500 ms
ROUND_PAUSE = 0.1  # seconds between rounds: pacing the traffic, not waiting for anything

ECHO = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind((sys.argv[1], int(sys.argv[2])))
    print("echoing", file=sys.stderr, flush=True)
    while True:
        data, source = sock.recvfrom(65535)
        sock.sendto(data, source)
"""

HAPROXY = f"""
global
    stats socket {{stats}} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
frontend udptunnel
    bind {TUN_B_WAN}:{TCP_PORT}
    default_backend tunnels
backend tunnels
    balance roundrobin
    server a 127.0.0.1:{FLOW_SERVER_PORTS[0]} check inter 500ms
    server b 127.0.0.1:{FLOW_SERVER_PORTS[1]} check inter 500ms
"""


def tcp_listening(namespace: Namespace, port: int) -> bool:
    """Whether some socket in ``namespace`` listens on TCP ``port`` (IPv4)."""
    with namespace.entered():
        lines = Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]
    listen = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
    return any(
        int(fields[1].rpartition(":")[2], 16) == port and fields[3] == listen
        for fields in map(str.split, lines)
    )


def haproxy_servers(stats: Path) -> dict[str, dict[str, str]]:
    """HAProxy's view of each backend server (``show stat`` on its stats socket): its name to
    its CSV fields."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    header, *rows = text.lstrip("# ").splitlines()
    records = [dict(zip(header.split(","), row.split(","), strict=False)) for row in rows if row]
    return {r["svname"]: r for r in records if r["pxname"] == "tunnels" and r["svname"] in "ab"}


def exchange(sources: Sequence[socket.socket], entry: tuple[str, int], round_: int) -> None:
    """Each source sends a datagram of its own, and gets exactly that one back."""
    sent = [f"{n}:{round_}:".encode() + random.randbytes(n * 10) for n in range(len(sources))]
    for source, payload in zip(sources, sent, strict=True):
        source.sendto(payload, entry)
    for number, (source, payload) in enumerate(zip(sources, sent, strict=True)):
        try:
            assert source.recv(65536) == payload, f"source {number} got another's datagram"
        except TimeoutError:
            raise AssertionError(f"source {number}: no reply in round {round_}") from None


@pytest.mark.root
@pytest.mark.needs("haproxy")
def test_haproxy(chain: Chain, spawn: Spawn, tmp_path: Path) -> None:
    """20 sources through a flow-mode client, HAProxy and two flow-mode servers, for 30 s.

    HAProxy's health checks open and close a connection to each server every 500 ms, in
    among the flows that carry traffic; the servers and the client must take it.
    """
    deadline = Deadline(CHECKED_FOR + 40)
    echo = spawn([sys.executable, "-c", ECHO, APP_B, str(ECHO_PORT)], prefix=chain.app_b.prefix)
    echo.wait_for("^echoing$")
    flow_servers = []
    for port in FLOW_SERVER_PORTS:
        flow_servers.append(
            spawn(
                [UDPTUNNEL, "-v", "--flows", "-s", f"127.0.0.1/{port}", f"{APP_B}/{ECHO_PORT}"],
                prefix=chain.tun_b.prefix,
            )
        )
        flow_servers[-1].wait_for(rf"^Listening for TCP connections on port {port}\b")
    stats = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY.format(stats=stats))
    haproxy = spawn(["haproxy", "-db", "-f", str(config)], prefix=chain.tun_b.prefix)
    client = spawn(
        [UDPTUNNEL, "-v", "--flows", "-c", f"{TUN_B_WAN}/{TCP_PORT}", f"{TUN_A_LAN}/{ECHO_PORT}"],
        prefix=chain.tun_a.prefix,
    )
    client.wait_for(r"^Receiving flows on UDP")
    entry = (TUN_A_LAN, ECHO_PORT)
    with (
        telling([*flow_servers, client, haproxy]),
        contextlib.ExitStack() as stack,
    ):
        wait_until(lambda: tcp_listening(chain.tun_b, TCP_PORT), deadline.left(), "HAProxy")
        sources = [
            stack.enter_context(chain.app_a.open_udp_socket(APP_A, timeout=WAIT))
            for _ in range(SOURCES)
        ]
        exchange(sources, entry, 0)
        end = time.monotonic() + CHECKED_FOR
        round_ = 1
        while time.monotonic() < end:
            exchange(sources, entry, round_)
            round_ += 1
            time.sleep(ROUND_PAUSE)
        servers = haproxy_servers(stats)
        assert {name: s["status"] for name, s in servers.items()} == {"a": "UP", "b": "UP"}
        assert all(s["chkfail"] == "0" for s in servers.values()), servers
        assert all(int(s["stot"]) >= SOURCES // 2 for s in servers.values()), servers
        exchange(sources, entry, round_)
    assert_unharmed(*flow_servers, client)
