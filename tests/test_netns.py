"""End to end in network namespaces: real tunnels, real hosts, byte-exact datagrams.

Our udptunnel against Debian's C original in both roles, ours against ours, Debian's own
acceptance test ("validation"), and multicast over IPv4 and IPv6. Each test builds its hosts
with ``netns`` and deletes them afterwards; every wait has a timeout and every test an
absolute ceiling (``Deadline``).
"""

from __future__ import annotations

import random
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from .conftest import ORIGINAL, UDPTUNNEL, WAIT, Process
from .netns import (
    APP_A,
    APP_B,
    TUN_A_LAN,
    TUN_A_WAN,
    TUN_B_LAN,
    TUN_B_WAN,
    Chain,
    Namespace,
    Network,
    open_chain,
)

CEILING = 60.0  # seconds: the most any one test here may take, all waits together
COUNT = 1000  # datagrams each way through the chain
WINDOW = 50  # datagrams sent at once before waiting for them: well inside any socket buffer
MAX_SIZE = 1400  # under the veth MTU (1500 - 28): one IP packet and one TCP segment per frame
RECEIVE_SIZE = 65536  # more than any datagram sent here, so a longer one would show
ANCILLARY_SIZE = socket.CMSG_SPACE(4)  # room for one int: the TTL or hop limit
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)  # <linux/in.h>; Python 3.11 lacks the name
SEQUENCE = 4  # bytes of sequence number that start each datagram (cut short below 4 bytes)

TCP_PORT = 6000
PORT_A = 5000  # UDP port of tunA's end: it listens on it, and sends to appA's socket on it
PORT_B = 5002  # the same for tunB's end and appB

Spawn = type[Process]


class Deadline:
    """An absolute ceiling for one test: each wait gets what is left of it, at most WAIT."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def timeout(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the test took longer than its ceiling of {self.seconds} s")
        return min(left, WAIT)


@pytest.fixture
def deadline() -> Deadline:
    return Deadline(CEILING)


@pytest.fixture
def chain() -> Iterator[Chain]:
    """appA -- tunA -- tunB -- appB. Request it before ``spawn``: processes die first."""
    with open_chain() as built:
        yield built


@pytest.fixture
def network() -> Iterator[Network]:
    """An empty network to add namespaces to. Request it before ``spawn``."""
    with Network() as built:
        yield built


def datagrams(count: int, seed: int) -> list[bytes]:
    """``count`` datagrams of 1 to MAX_SIZE bytes: a sequence number, then random bytes.

    Both extreme sizes come first; the seed keeps a failure reproducible and keeps the two
    directions' datagrams apart.
    """
    rng = random.Random(seed)
    sizes = [1, MAX_SIZE, 2, 3, 4, 5] + [rng.randint(1, MAX_SIZE) for _ in range(count - 6)]
    return [
        (number.to_bytes(SEQUENCE, "big") + rng.randbytes(size))[:size]
        for number, size in enumerate(sizes)
    ]


@dataclass(frozen=True)
class Leg:
    """One direction through a tunnel: who sends where, who receives from whom."""

    sender: socket.socket
    destination: tuple[str, int]  # the tunnel end's UDP port, as the sender addresses it
    receiver: socket.socket
    source_host: str  # the tunnel end that the datagrams must come from
    watch: Sequence[Namespace]  # whose UDP counters to show if something goes missing


@dataclass(frozen=True)
class Arrival:
    data: bytes
    source: tuple[str, int]
    hops: int | None  # TTL or hop limit, if the receiver asked for it


def receive(sock: socket.socket, deadline: Deadline) -> Arrival:
    """The next datagram on ``sock``, with its TTL or hop limit if the socket reports it."""
    sock.settimeout(deadline.timeout())
    data, ancillary, _flags, source = sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE)
    hops = None
    for level, kind, value in ancillary:
        if (level, kind) in {
            (socket.IPPROTO_IP, socket.IP_TTL),
            (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT),
        }:
            hops = int.from_bytes(value[:4], sys.byteorder)
    return Arrival(data, (source[0], source[1]), hops)


def _lost(leg: Leg, what: str) -> AssertionError:
    counters = {ns.role: ns.snmp() for ns in leg.watch}
    return AssertionError(f"{what} did not arrive; UDP counters: {counters}")


def send_lockstep(leg: Leg, sent: Sequence[bytes], deadline: Deadline) -> list[Arrival]:
    """Send each datagram only once the one before it has arrived."""
    arrivals = []
    for number, datagram in enumerate(sent):
        leg.sender.sendto(datagram, leg.destination)
        try:
            arrivals.append(receive(leg.receiver, deadline))
        except TimeoutError:
            raise _lost(leg, f"datagram {number} ({len(datagram)} bytes)") from None
    check_arrivals(leg, sent, arrivals)
    return arrivals


def send_windows(leg: Leg, sent: Sequence[bytes], deadline: Deadline) -> list[Arrival]:
    """Send WINDOW datagrams back to back, wait for all of them, and go on."""
    arrivals: list[Arrival] = []
    for start in range(0, len(sent), WINDOW):
        window = sent[start : start + WINDOW]
        for datagram in window:
            leg.sender.sendto(datagram, leg.destination)
        for number in range(start, start + len(window)):
            try:
                arrivals.append(receive(leg.receiver, deadline))
            except TimeoutError:
                raise _lost(leg, f"datagram {number} and later ones of its window") from None
    check_arrivals(leg, sent, arrivals)
    return arrivals


def check_arrivals(leg: Leg, sent: Sequence[bytes], arrivals: Sequence[Arrival]) -> None:
    """The same datagrams in the same order, all from one port of the tunnel end's host."""
    received = [arrival.data for arrival in arrivals]
    if received != list(sent):
        first = next(i for i, (a, b) in enumerate(zip(received, sent, strict=True)) if a != b)
        raise AssertionError(
            f"datagram {first} differs: sent {len(sent[first])} bytes, "
            f"received {len(received[first])} bytes {received[first][:SEQUENCE].hex()}..."
        )
    sources = {arrival.source for arrival in arrivals}
    assert len(sources) == 1, f"datagrams came from several places: {sources}"
    assert sources.pop()[0] == leg.source_host


# --- our tunnel and Debian's original, in the chain appA -- tunA -- tunB -- appB -------------

ORIGINAL_TOO = pytest.mark.original
PAIRS = [
    pytest.param(UDPTUNNEL, ORIGINAL, 1, marks=ORIGINAL_TOO, id="ours-server-original-client"),
    pytest.param(ORIGINAL, UDPTUNNEL, 1, marks=ORIGINAL_TOO, id="original-server-ours-client"),
    pytest.param(UDPTUNNEL, UDPTUNNEL, 1, id="ours-both"),
    # --connections on our end only: the original knows nothing of it, and need not.
    pytest.param(UDPTUNNEL, ORIGINAL, 3, marks=ORIGINAL_TOO, id="ours-server-3-original-client"),
    pytest.param(ORIGINAL, UDPTUNNEL, 3, marks=ORIGINAL_TOO, id="original-server-ours-client-3"),
    pytest.param(UDPTUNNEL, UDPTUNNEL, 3, id="ours-both-3"),
]


@pytest.mark.root
@pytest.mark.parametrize(("server_program", "client_program", "connections"), PAIRS)
def test_chain(
    chain: Chain,
    spawn: Spawn,
    deadline: Deadline,
    server_program: str,
    client_program: str,
    connections: int,
) -> None:
    """1000 datagrams each way between appA and appB, byte for byte and in order (over
    several connections, in order within each window).

    The server end runs in tunA, the client end in tunB. Each end receives on every address
    at its UDP port and sends to its application from an ephemeral port, so appA sends to
    tunA's LAN address at PORT_A and receives from tunA, and likewise for appB. Ours is
    given ``--connections``; the original at the other end must not notice.
    """

    def argv(program: str, *args: str) -> list[str]:
        more = ["--connections", str(connections)] if program == UDPTUNNEL else []
        return [program, "-v", *more, *args]

    with (
        chain.app_a.open_udp_socket(APP_A, PORT_A, timeout=WAIT) as app_a,
        chain.app_b.open_udp_socket(APP_B, PORT_B, timeout=WAIT) as app_b,
    ):
        server = spawn(
            argv(server_program, "-s", str(TCP_PORT), f"{APP_A}/{PORT_A}"),
            prefix=chain.tun_a.prefix,
        )
        server.wait_for(rf"^Listening for TCP connections on port {TCP_PORT}$")
        client = spawn(
            argv(client_program, "-c", f"{TUN_A_WAN}/{TCP_PORT}", f"{APP_B}/{PORT_B}"),
            prefix=chain.tun_b.prefix,
        )
        client.wait_for(rf"^Connected TCP to {re.escape(TUN_A_WAN)}/{TCP_PORT}$")
        server.wait_for(rf"^TCP connection from {re.escape(TUN_B_WAN)}/\d+$")
        # The original client reports the connection before it binds its UDP port.
        chain.tun_b.wait_udp_bound(PORT_B, deadline.timeout())

        everyone = (chain.app_a, chain.tun_a, chain.tun_b, chain.app_b)
        a_to_b = Leg(app_a, (TUN_A_LAN, PORT_A), app_b, TUN_B_LAN, everyone)
        b_to_a = Leg(app_b, (TUN_B_LAN, PORT_B), app_a, TUN_A_LAN, everyone)
        # The original sends at most one datagram per TCP read (its defect 1): frames that
        # arrive together wait for more TCP data, and the last ones never come out. Where it
        # is the TCP-to-UDP end, send in lockstep, or this would measure that defect rather
        # than whether the two programs understand each other. Ours takes bursts.
        # Over several connections, datagrams sent together may pass each other: lockstep.
        spread = connections > 1 and server_program == client_program == UDPTUNNEL
        a_send = send_lockstep if client_program == ORIGINAL or spread else send_windows
        b_send = send_lockstep if server_program == ORIGINAL or spread else send_windows
        a_send(a_to_b, datagrams(COUNT, seed=1), deadline)
        b_send(b_to_a, datagrams(COUNT, seed=2), deadline)

        # Ending one end ends the other, with status 0 (peer closed the connection).
        client.signal(signal.SIGTERM)
        assert server.wait(deadline.timeout()) == 0, server.stderr
        if client_program == UDPTUNNEL:
            assert client.wait(deadline.timeout()) == 0, client.stderr


# --- Debian's autopkgtest "validation", in one fresh namespace ---------------------------------

VALIDATION_TEXT = (
    "Lorem ipsum dolor sit amet,\n"
    "consectetur adipiscing elit,\n"
    "sed do eiusmod tempor incididunt\n"
    "ut labore et dolore magna aliqua.\n"
    "\n"
    "Ut enim ad minim veniam, quis nostrud exercitation\n"
    "ullamco laboris nisi ut aliquip ex ea commodo consequat.\n"
)
VALIDATION_LISTENER = ("127.0.0.1", 5500)
VALIDATION_TCP = 6491
VALIDATION_ENTRY = ("127.0.0.1", 6661)


def run_validation(
    host: Namespace, spawn: Spawn, deadline: Deadline, program: str, server_options: list[str]
) -> None:
    """The scenario: listener, server, client, then the file line by line through the tunnel.

    The listener sets SO_REUSEADDR, as ``ncat -u -l 127.0.0.1 5500`` does.
    """
    lines = VALIDATION_TEXT.splitlines(keepends=True)
    assert len(lines) == 7
    with (
        host.open_udp_socket(*VALIDATION_LISTENER, timeout=WAIT, reuse_address=True) as listener,
        host.open_udp_socket("127.0.0.1", timeout=WAIT) as sender,
    ):
        server = spawn(
            [program, "-v", "-s", str(VALIDATION_TCP), *server_options, "127.0.0.1/5500"],
            prefix=host.prefix,
        )
        server.wait_for(rf"^Listening for TCP connections on port {VALIDATION_TCP}$")
        client = spawn(
            [program, "-v", "-c", f"127.0.0.1/{VALIDATION_TCP}", "127.0.0.1/6661"],
            prefix=host.prefix,
        )
        client.wait_for(rf"^Connected TCP to 127\.0\.0\.1/{VALIDATION_TCP}$")
        server.wait_for(r"^TCP connection from 127\.0\.0\.1/\d+$")
        host.wait_udp_bound(VALIDATION_ENTRY[1], deadline.timeout())

        leg = Leg(sender, VALIDATION_ENTRY, listener, "127.0.0.1", [host])
        sent = [line.encode() for line in lines]
        # The original server is the TCP-to-UDP end here: lockstep, as in test_chain, for a
        # burst of 7 lines would leave some stuck behind its defect 1. Ours takes all 7 at once.
        arrivals = (send_lockstep if program == ORIGINAL else send_windows)(leg, sent, deadline)
        assert b"".join(arrival.data for arrival in arrivals) == VALIDATION_TEXT.encode()


@pytest.mark.root
def test_validation_ours(network: Network, spawn: Spawn, deadline: Deadline) -> None:
    """Debian's scenario with ours at both ends, the server receiving on 127.0.0.1:5501.

    On one host the scenario's server line, ``-s 6491 127.0.0.1/5500``, asks the server to
    receive on every address at port 5500, where the listener already has 127.0.0.1:5500.
    The original shares the port (SO_REUSEADDR and SO_REUSEPORT on its side, SO_REUSEADDR on
    ncat's) and the kernel gives datagrams for 127.0.0.1 to the more specific listener.
    Ours sets neither, so that two tunnels cannot silently share a port (the original's
    defect 9), and refuses to start; ``--udp-bind`` gives its receiving end an address and
    port of its own. Nothing in the scenario is sent to the server's UDP side, so where it
    receives changes nothing else.
    """
    host = network.namespace("valid")
    with host.open_udp_socket(*VALIDATION_LISTENER, timeout=WAIT, reuse_address=True):
        clash = spawn([UDPTUNNEL, "-s", str(VALIDATION_TCP), "127.0.0.1/5500"], prefix=host.prefix)
        assert clash.wait(deadline.timeout()) == 1
        assert "Address already in use (--udp-bind chooses another address or port)" in clash.stderr
    run_validation(host, spawn, deadline, UDPTUNNEL, ["--udp-bind", "127.0.0.1/5501"])


@pytest.mark.root
@pytest.mark.original
def test_validation_original(network: Network, spawn: Spawn, deadline: Deadline) -> None:
    """The same scenario with Debian's original at both ends, unchanged: the reference."""
    run_validation(network.namespace("valid"), spawn, deadline, ORIGINAL, [])


# --- multicast: appM joins a group that the tunnel's client end sends to ---------------------


@dataclass(frozen=True)
class MulticastCase:
    family: int
    group: str
    app: str  # appM's address on the link to tunM
    tun: str  # tunM's address on that link
    prefix_len: int
    multicast_net: str  # the route that sends multicast out of the veth
    loopback: str  # where the far application and the tunnel's TCP connection are


MULTICAST = [
    pytest.param(
        MulticastCase(
            family=socket.AF_INET,
            group="239.1.2.3",  # administratively scoped (RFC 2365)
            app="198.18.4.2",
            tun="198.18.4.1",
            prefix_len=24,
            multicast_net="224.0.0.0/4",
            loopback="127.0.0.1",
        ),
        id="ipv4",
    ),
    pytest.param(
        MulticastCase(
            family=socket.AF_INET6,
            group="ff15::1234",  # transient, site-local scope (RFC 4291)
            app="fd00:198:18:4::2",
            tun="fd00:198:18:4::1",
            prefix_len=64,
            multicast_net="ff00::/8",
            loopback="::1",
        ),
        id="ipv6",
    ),
]
MULTICAST_COUNT = 200  # datagrams each way
MULTICAST_PORT = 5000  # the group's port
MULTICAST_TTL = 2  # not the default of 1, so the test sees that the setting is applied
FAR_PORT = 5002  # the far application, in tunM on loopback
SERVER_UDP_PORT = 5001  # where the server end receives from the far application


def join_group(sock: socket.socket, case: MulticastCase, ifindex: int) -> None:
    """Make ``sock`` a member of the group, as an application on appM would be.

    It joins on the veth and sends there, does not hear its own datagrams back, and has each
    datagram it receives report its TTL or hop limit.
    """
    if case.family == socket.AF_INET:
        request = socket.inet_aton(case.group) + socket.inet_aton(case.app)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(case.app))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    else:
        request = socket.inet_pton(socket.AF_INET6, case.group) + ifindex.to_bytes(4, sys.byteorder)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)


@pytest.mark.root
@pytest.mark.parametrize("case", MULTICAST)
def test_multicast(network: Network, spawn: Spawn, deadline: Deadline, case: MulticastCase) -> None:
    """A tunnel end sending to a multicast group, and receiving what the group's members send.

    appM -- tunM over a veth. In tunM both tunnel ends talk over loopback: the client end's
    UDP address is the group (TTL 2), the server end's is a far application on loopback,
    which it receives from on its own ``--udp-bind`` port. appM's application joins the
    group: it must receive what the far application sends, with TTL 2, and what it sends
    to the group must reach the far application. The client end must never read its own
    datagrams back from the group (IP_MULTICAST_LOOP off).
    """
    app_ns, tun_ns = network.namespace("appM"), network.namespace("tunM")
    app_if, tun_if = network.link(
        app_ns, tun_ns, [f"{case.app}/{case.prefix_len}"], [f"{case.tun}/{case.prefix_len}"]
    )
    app_ns.ip("route", "add", case.multicast_net, "dev", app_if)
    tun_ns.ip("route", "add", case.multicast_net, "dev", tun_if)
    loop = case.loopback
    with (
        app_ns.open_udp_socket(case.group, MULTICAST_PORT, timeout=WAIT) as app,
        tun_ns.open_udp_socket(loop, FAR_PORT, timeout=WAIT) as far,
    ):
        join_group(app, case, app_ns.if_index(app_if))
        bind, far_end = f"{loop}/{SERVER_UDP_PORT}", f"{loop}/{FAR_PORT}"
        server_end = [UDPTUNNEL, "-v", "-s", str(TCP_PORT), "--udp-bind", bind, far_end]
        server = spawn(server_end, prefix=tun_ns.prefix)
        server.wait_for(rf"^Listening for TCP connections on port {TCP_PORT}$")
        group = f"{case.group}/{MULTICAST_PORT}/{MULTICAST_TTL}"
        client = spawn([UDPTUNNEL, "-vv", "-c", f"{loop}/{TCP_PORT}", group], prefix=tun_ns.prefix)
        client.wait_for(rf"^Connected TCP to {re.escape(loop)}/{TCP_PORT}$")
        server.wait_for(rf"^TCP connection from {re.escape(loop)}/\d+$")

        # Out to the group first: if the client end heard its own datagrams, they would be
        # queued on its receiving socket before anything of the second half, and logged.
        to_group = Leg(far, (loop, SERVER_UDP_PORT), app, case.tun, [app_ns, tun_ns])
        arrivals = send_windows(to_group, datagrams(MULTICAST_COUNT, seed=3), deadline)
        assert {arrival.hops for arrival in arrivals} == {MULTICAST_TTL}
        from_group = Leg(app, (case.group, MULTICAST_PORT), far, loop, [app_ns, tun_ns])
        send_windows(from_group, datagrams(MULTICAST_COUNT, seed=4), deadline)

        client.signal(signal.SIGTERM)
        assert client.wait(deadline.timeout()) == 0, client.stderr
        assert server.wait(deadline.timeout()) == 0, server.stderr
        for sock in (app, far):  # nothing more than was checked: no echo, no duplicate
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(RECEIVE_SIZE)
    heard = re.findall(r"^Received \d+ byte UDP packet from (.+)/\d+$", client.stderr, re.M)
    assert heard == [case.app] * MULTICAST_COUNT
