"""Network namespaces for tests: private hosts joined by veth links, gone again afterwards.

``Network`` makes namespaces with unique names (the test process's PID, a counter and a random
tag, so parallel and earlier runs never clash), links them with veth pairs, and deletes every
namespace it made when its ``with`` block ends, even on failure; deleting a namespace deletes
its veths. ``open_chain`` builds the four-host chain used by the interoperability tests and
the benchmark::

    appA 198.18.1.2 -- 198.18.1.1 tunA 198.18.2.1 -- 198.18.2.2 tunB 198.18.3.1 -- 198.18.3.2 appB

``open_chain(wan=True)`` puts a fifth host, ``wan``, in the middle of the WAN link: tunA and
tunB keep their addresses and see each other as neighbours, and whatever carries frames
between wan's two interfaces (contrib/bench/delayline.c, which holds each for a propagation
delay) is the wire; ``set_wan_loss`` drops a random share of the packets each tunnel host
receives from that wire (nftables, both directions).

The tunnel's two ends run in tunA and tunB; the applications get hosts of their own, because
the original udptunnel binds the wildcard address and would hear its own output on a shared
host. The applications have a default route via their tunnel host; nothing forwards between
the namespaces, so no packet leaves them. Addresses come from 198.18.0.0/15 (RFC 2544
benchmarking) and fd00::/8 (unique local), which no real network routes here.

Processes run inside a namespace with ``Namespace.prefix`` (``ip netns exec NAME``, which
execs the command, so the PID is the command's own). Sockets are made inside a namespace
from the test process itself with ``Namespace.entered``: a socket keeps the namespace it was
created in after the thread switches back. Everything here needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000  # <sched.h>; os.CLONE_NEWNET and os.setns exist only from 3.12
NETNS_DIR = Path("/var/run/netns")  # where `ip netns add` mounts the namespaces it names
THIS_THREAD_NETNS = "/proc/thread-self/ns/net"  # setns changes only the calling thread
MAX_IFNAME = 15  # IFNAMSIZ - 1
POLL = 0.005  # seconds between looks at a condition that has no event to wait on

# The chain's addresses (see the module docstring). LAN: tunnel host to its application;
# WAN: between the two tunnel hosts, where the TCP connection runs.
APP_A = "198.18.1.2"
TUN_A_LAN = "198.18.1.1"
TUN_A_WAN = "198.18.2.1"
TUN_B_WAN = "198.18.2.2"
TUN_B_LAN = "198.18.3.1"
APP_B = "198.18.3.2"
PREFIX_LEN = 24
# The emulated WAN: wan's interfaces toward tunA and tunB, and the nftables table that drops.
WAN_TO_A, WAN_TO_B = "to-tunA", "to-tunB"
LOSS_TABLE = "wanloss"
LOSS_SCALE = 1000  # loss is given in packets per thousand: `numgen random mod 1000`

_serial = itertools.count()
_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace that ``fd`` refers to."""
    global _libc
    if hasattr(os, "setns"):  # Python 3.12 and later
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def _run(argv: Sequence[str]) -> str:
    """Run a command to completion; its standard output, or an error naming its complaint."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout`` s.

    Only for states that announce themselves with no event, such as a socket being bound.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(POLL)


@dataclass(frozen=True)
class Namespace:
    """One named network namespace: a private host with its own interfaces and ports."""

    name: str
    role: str  # short and readable: "appA", "tunB"; veth names are made from it

    @property
    def prefix(self) -> list[str]:
        """Put this before a command to run it here (``spawn(argv, prefix=ns.prefix)``)."""
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str) -> str:
        """Run ``ip ARGS`` in this namespace; its standard output."""
        return _run(["ip", "-n", self.name, *args])

    def run(self, argv: Sequence[str]) -> str:
        """Run a command in this namespace to completion; its standard output."""
        return _run([*self.prefix, *argv])

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch this thread into the namespace, and back on exit.

        Sockets created inside stay in this namespace. Start no processes inside: use
        ``prefix`` for them.
        """
        home = os.open(THIS_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(NETNS_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def open_socket(self, family: int, kind: int) -> socket.socket:
        """A new socket in this namespace; the caller closes it."""
        with self.entered():
            return socket.socket(family, kind)

    def open_udp_socket(
        self, host: str, port: int = 0, *, timeout: float, reuse_address: bool = False
    ) -> socket.socket:
        """A UDP socket in this namespace bound to ``host``:``port``; the caller closes it."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.open_socket(family, socket.SOCK_DGRAM)
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def sysctl(self, key: str, value: str) -> None:
        """Set a network sysctl (``net.ipv6.conf.all.disable_ipv6``) in this namespace.

        Writes only if the value differs, so that a read-only /proc/sys (some containers)
        matters only when something really has to change.
        """
        with self.entered():  # /proc/sys/net shows the namespace of whoever opens it
            path = Path("/proc/sys", *key.split("."))
            if path.read_text().strip() != value:
                path.write_text(value)

    def if_index(self, ifname: str) -> int:
        """The interface index of ``ifname`` in this namespace."""
        with self.entered():
            return socket.if_nametoindex(ifname)

    def udp_ports(self) -> set[int]:
        """The UDP ports that sockets in this namespace are bound to, IPv4 and IPv6."""
        ports = set()
        with self.entered():
            for table in ("udp", "udp6"):
                lines = Path("/proc/thread-self/net", table).read_text().splitlines()[1:]
                ports |= {int(line.split()[1].rpartition(":")[2], 16) for line in lines}
        return ports

    def wait_udp_bound(self, port: int, timeout: float) -> None:
        """Wait until some socket here is bound to UDP ``port``.

        For programs that say they are ready before they bind (the original client prints
        "Connected TCP" and only then opens its UDP sockets).
        """
        wait_until(lambda: port in self.udp_ports(), timeout, f"UDP port {port} in {self.role}")

    def snmp(self, protocol: str = "Udp") -> dict[str, int]:
        """This namespace's counters for ``protocol`` from /proc/net/snmp (``RcvbufErrors``)."""
        with self.entered():
            lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        names, values = (line.split()[1:] for line in lines if line.startswith(f"{protocol}:"))
        return dict(zip(names, map(int, values), strict=True))


@dataclass
class Network:
    """Namespaces and veth links made for one test; ``with`` deletes every namespace made."""

    tag: str = "udpt"
    namespaces: list[Namespace] = field(default_factory=list)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def namespace(self, role: str) -> Namespace:
        """A new namespace with ``lo`` up and IPv6 enabled."""
        if len(f"to-{role}") > MAX_IFNAME:
            raise ValueError(f"role {role!r} is too long to name a veth after")
        name = f"{self.tag}-{os.getpid()}-{next(_serial)}-{secrets.token_hex(2)}-{role}"
        _run(["ip", "netns", "add", name])
        namespace = Namespace(name, role)
        self.namespaces.append(namespace)
        namespace.ip("link", "set", "lo", "up")
        for scope in ("all", "default"):  # a host that boots with IPv6 off passes that on
            namespace.sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", "0")
        return namespace

    def link(
        self, a: Namespace, b: Namespace, a_addresses: Sequence[str], b_addresses: Sequence[str]
    ) -> tuple[str, str]:
        """Join ``a`` and ``b`` with a veth pair, address both ends, and bring them up.

        Each end is named after the namespace at its other end: in ``a`` the interface is
        ``to-ROLE_OF_B``. Addresses are written with their prefix length, ``198.18.1.1/24``.

        Returns:
            The interface names in ``a`` and in ``b``.
        """
        a_if, b_if = f"to-{b.role}", f"to-{a.role}"
        a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
        for namespace, ifname, addresses in ((a, a_if, a_addresses), (b, b_if, b_addresses)):
            for address in addresses:
                # IPv6: no duplicate address detection, so the address works at once.
                ipv6 = ipaddress.ip_interface(address).version == 6
                namespace.ip("addr", "add", address, "dev", ifname, *(["nodad"] if ipv6 else []))
            namespace.ip("link", "set", ifname, "up")
        return a_if, b_if

    def close(self) -> None:
        """Delete every namespace made, even if deleting one of them fails."""
        failures = []
        while self.namespaces:
            namespace = self.namespaces.pop()
            try:
                _run(["ip", "netns", "delete", namespace.name])
            except RuntimeError as exc:
                failures.append(str(exc))
        if failures:
            raise RuntimeError("; ".join(failures))


@dataclass(frozen=True)
class Chain:
    """appA -- tunA -- tunB -- appB; the addresses are this module's constants."""

    app_a: Namespace
    tun_a: Namespace
    tun_b: Namespace
    app_b: Namespace
    wan: Namespace | None = None  # the host in the middle of the WAN link, if asked for

    @property
    def wan_ifnames(self) -> tuple[str, str]:
        """tunA's and tunB's interfaces on the WAN link."""
        if self.wan:
            return f"to-{self.wan.role}", f"to-{self.wan.role}"
        return f"to-{self.tun_b.role}", f"to-{self.tun_a.role}"


@contextlib.contextmanager
def open_chain(*, wan: bool = False) -> Iterator[Chain]:
    """Build the chain of the module docstring, with the wan host if asked; delete it all on
    exit. Nothing carries frames across wan until a program (the delay line) does."""
    with Network() as network:
        app_a, tun_a, tun_b, app_b = (
            network.namespace(role) for role in ("appA", "tunA", "tunB", "appB")
        )
        net = f"/{PREFIX_LEN}"
        network.link(app_a, tun_a, [APP_A + net], [TUN_A_LAN + net])
        middle = None
        if wan:
            middle = network.namespace("wan")
            for key in ("all", "default"):  # a wire: no addresses, no solicitations of its own
                middle.sysctl(f"net.ipv6.conf.{key}.disable_ipv6", "1")
            network.link(tun_a, middle, [TUN_A_WAN + net], [])
            network.link(middle, tun_b, [], [TUN_B_WAN + net])
            for ifname in (WAN_TO_A, WAN_TO_B):
                middle.ip("link", "set", ifname, "promisc", "on")
            # One TCP segment per frame, as on a real link, so that loss hits segments.
            tun_a.ip("link", "set", "to-wan", "gso_max_segs", "1")
            tun_b.ip("link", "set", "to-wan", "gso_max_segs", "1")
        else:
            network.link(tun_a, tun_b, [TUN_A_WAN + net], [TUN_B_WAN + net])
        network.link(tun_b, app_b, [TUN_B_LAN + net], [APP_B + net])
        app_a.ip("route", "add", "default", "via", TUN_A_LAN)
        app_b.ip("route", "add", "default", "via", TUN_B_LAN)
        yield Chain(app_a, tun_a, tun_b, app_b, middle)


def set_wan_loss(chain: Chain, permille: int) -> None:
    """Drop ``permille`` in 1000 of the IP packets tunA and tunB receive on the WAN link, at
    random and each on its own (nftables ``numgen random``), replacing any earlier rule.

    Dropped on arrival, not on departure: a packet that netfilter drops on its way out is an
    error the sender's TCP sees at once, not a loss it must discover.
    """
    for ns, ifname in zip((chain.tun_a, chain.tun_b), chain.wan_ifnames, strict=True):
        ns.run(
            [
                "nft",
                f"add table inet {LOSS_TABLE}; delete table inet {LOSS_TABLE}; "
                f"add table inet {LOSS_TABLE}; "
                f"add chain inet {LOSS_TABLE} arrive "
                "{ type filter hook prerouting priority -300; }; "
                f'add rule inet {LOSS_TABLE} arrive iifname "{ifname}" '
                f"numgen random mod {LOSS_SCALE} < {permille} counter drop",
            ]
        )


def wan_drops(chain: Chain) -> dict[str, int]:
    """Per tunnel host: the packets ``set_wan_loss``'s rule has dropped there so far."""
    out = {}
    for ns in (chain.tun_a, chain.tun_b):
        listing = ns.run(["nft", "list", "table", "inet", LOSS_TABLE])
        match = re.search(r"counter packets (\d+)", listing)
        out[ns.role] = int(match.group(1)) if match else 0
    return out
