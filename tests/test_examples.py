"""Every command example in README.rst and the man page, run as written, with datagrams
sent through each and checked on arrival.

The examples are read from the two documents, never retyped here: each literal block of
README.rst and each ``.EX`` block of the man page is either run by a scenario below or
named in ``NOT_COMMANDS`` with the reason, and ``test_every_example_is_run`` fails for a
block that is neither, so a new example cannot go untested.

The scenarios run in network namespaces on one bridge: ``gw`` (gw.example.org, outside a
firewall), ``in`` (in.example.com, inside it), and the applications' hosts ``media``
(media.example.org) and ``desk`` (desk.example.com). Host names resolve through the
``/etc/hosts`` that ``ip netns exec`` gives a namespace from ``/etc/netns/NAME/hosts``, so
they stay as written. The only text changed is the IPv6 documentation prefix
``2001:db8::``, which becomes the unique-local ``fd00:db8::`` (a documentation address is
not to be used on any network, even a private one).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from .conftest import BIN, UDPTUNNEL, WAIT, Process
from .netns import Namespace, Network, wait_until

IP_RECVTTL = 12  # <linux/in.h>; the socket module lacks it
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
MAN = ROOT / "man" / "udptunnel.1"
UNIT = ROOT / "contrib" / "systemd" / "udptunnel@.service"

DOC_PREFIX, TEST_PREFIX = "2001:db8::", "fd00:db8::"
HOSTS = {  # role: (name, IPv4, IPv6), all on one /24 and one /64
    "gw": ("gw.example.org", "198.18.20.1", "fd00:db8::1"),
    "in": ("in.example.com", "198.18.20.2", "fd00:db8::2"),
    "media": ("media.example.org", "198.18.20.10", "fd00:db8::10"),
    "desk": ("desk.example.com", "198.18.20.20", "fd00:db8::20"),
}

# Literal blocks that are not commands to run, by their first line, with the reason.
NOT_COMMANDS = {
    "udptunnel -s [TCP-ADDR/]TCP-PORT [options] UDP-ADDR/UDP-PORT[/TTL]": "the synopsis",
    "cli.py -> config.py -> tunnel.py -> server.py / client.py / flows.py -> relay.py -> "
    "framing.py": "the modules",
    "make test    # the whole test suite": "what runs this test (make test, from .ci/run)",
    "frontend udptunnel": "an HAProxy configuration; tests/test_programs.py runs HAProxy",
    "systemctl enable --now udptunnel@media.service": (
        "needs systemd as PID 1, which this machine has not; the env files beside it are "
        "run here with the unit's own settings, and test_systemd.py verifies the units"
    ),
}
# Man page sections whose .EX blocks are diagnostics, not commands.
MAN_EXAMPLE_SECTIONS = ("EXAMPLES", "SECURITY", "DESCRIPTION")

# Reading the examples ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One literal block: where it is, and its commands, with their ``host$`` prompts."""

    where: str
    lines: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.lines[0]

    @property
    def text(self) -> str:
        """The lines, each between newlines: ``"\\nudptunnel -s 6000 ...\\n"`` finds a
        command that is a line of its own."""
        return "\n" + "\n".join(self.lines) + "\n"

    @property
    def commands(self) -> list[tuple[str | None, str]]:
        """(prompt host or None, command) for each command line, continuations joined."""
        commands: list[tuple[str | None, str]] = []
        pending = ""
        for line in self.lines:
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if match := re.fullmatch(r"(\w+)\$ (.*)", pending):
                commands.append((match.group(1), match.group(2)))
            elif not pending.startswith("#"):
                commands.append((None, pending))
            pending = ""
        return commands


def readme_blocks() -> list[Block]:
    """The literal blocks of README.rst: the indented lines after a line ending in ``::``."""
    blocks = []
    lines = README.read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body = []
        for following in lines[number + 2 :]:
            if following and not following.startswith(" "):
                break
            body.append(following)
        while body and not body[-1].strip():
            body.pop()
        indent = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        blocks.append(Block(f"README.rst:{number + 3}", tuple(b[indent:] for b in body)))
    return blocks


_FONT = re.compile(r"\\f(?:\[[^]]*\]|\(..|.)")
_ROFF = (("\\-", "-"), ("\\e", "\\"), ("\\(aq", "'"), ("\\~", " "), ("\\&", ""), ("\\%", ""))


def man_blocks() -> list[Block]:
    """The ``.EX`` blocks of the man page's sections that hold examples, as plain text."""
    blocks, section, body, start = [], "", None, 0
    for number, line in enumerate(MAN.read_text().splitlines(), 1):
        if line.startswith(".SH "):
            section = line[4:].strip('"')
        elif line == ".EX":
            body, start = [], number + 1
        elif line == ".EE" and body is not None:
            if section in MAN_EXAMPLE_SECTIONS:
                blocks.append(Block(f"udptunnel.1:{start}", tuple(body)))
            body = None
        elif body is not None:
            text = _FONT.sub("", line)
            for escape, character in _ROFF:
                text = text.replace(escape, character)
            body.append(text)
    return blocks


def all_blocks() -> list[Block]:
    return readme_blocks() + man_blocks()


def find(*first_words: str, count: int | None = None) -> list[Block]:
    """The blocks whose text contains each of ``first_words``; ``count`` of them if given."""
    found = [b for b in all_blocks() if all(w in b.text for w in first_words)]
    assert found, f"no example with {first_words}"
    if count is not None:
        assert len(found) == count, f"{len(found)} examples with {first_words}, not {count}"
    return found


# The network ------------------------------------------------------------------------------


@dataclass
class Lan:
    """The four hosts on one bridge, by role."""

    hosts: dict[str, Namespace]

    def __getitem__(self, role: str) -> Namespace:
        return self.hosts[role]


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    with Network("udpex") as network:
        switch = network.namespace("sw")
        switch.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        switch.ip("link", "set", "br0", "up")
        hosts = {}
        hosts_file = "".join(f"{v4} {name}\n" for name, v4, _ in HOSTS.values())
        hosts_file = f"127.0.0.1 localhost\n::1 localhost\n{hosts_file}"
        made: list[Path] = []
        try:
            for role, (_, v4, v6) in HOSTS.items():
                host = network.namespace(role)
                network.link(switch, host, [], [f"{v4}/24", f"{v6}/64"])
                switch.ip("link", "set", f"to-{role}", "master", "br0")
                host.ip("route", "add", "default", "dev", "to-sw")  # multicast goes out here
                host.ip("-6", "route", "add", "default", "dev", "to-sw")
                etc = Path("/etc/netns", host.name)
                etc.mkdir(parents=True)
                made.append(etc)
                (etc / "hosts").write_text(hosts_file)
                hosts[role] = host
            yield Lan(hosts)
        finally:
            for etc in made:
                shutil.rmtree(etc, ignore_errors=True)


def address(role: str, family: int = socket.AF_INET) -> str:
    return HOSTS[role][1 if family == socket.AF_INET else 2]


def tcp_ports(ns: Namespace, state: str) -> list[tuple[int, int]]:
    """(local port, remote port) of the TCP sockets in ``ns`` in ``state`` (``0A`` listen,
    ``01`` established), IPv4 and IPv6."""
    found = []
    with ns.entered():
        for table in ("tcp", "tcp6"):
            for line in Path("/proc/thread-self/net", table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == state:
                    local, remote = (int(f.rpartition(":")[2], 16) for f in fields[1:3])
                    found.append((local, remote))
    return found


def wait_for(condition: Callable[[], bool], what: str, *processes: Process) -> None:
    """Wait until ``condition`` holds; fail at once, with its log, if a process has died."""

    def holds() -> bool:
        for process in processes:
            if process.proc.poll() is not None:
                process.wait()
                raise AssertionError(f"{process.argv} exited: {process.stderr}")
        return condition()

    wait_until(holds, WAIT, what)


def listening(ns: Namespace, port: int, count: int = 1) -> Callable[[], bool]:
    return lambda: sum(local == port for local, _ in tcp_ports(ns, "0A")) >= count


def connected(ns: Namespace, port: int) -> Callable[[], bool]:
    return lambda: any(remote == port for _, remote in tcp_ports(ns, "01"))


def bound(ns: Namespace, port: int) -> Callable[[], bool]:
    return lambda: port in ns.udp_ports()


def run(ns: Namespace, command: str, spawn: type[Process], cwd: Path | None = None) -> Process:
    """Start ``command`` as written in ``ns``: ``udptunnel`` is this environment's."""
    argv = shlex.split(command.replace(DOC_PREFIX, TEST_PREFIX), comments=True)
    assert argv[0] == "udptunnel", command
    prefix = [*ns.prefix, "env", "-C", str(cwd or ROOT)]
    return spawn([UDPTUNNEL, *argv[1:]], prefix=prefix)


@contextlib.contextmanager
def app(ns: Namespace, host: str, port: int) -> Iterator[socket.socket]:
    sock = ns.open_udp_socket(host, port, timeout=WAIT)
    try:
        yield sock
    finally:
        sock.close()


def crosses(sender: socket.socket, to: tuple[str, int], receiver: socket.socket) -> None:
    """A datagram from ``sender`` to ``to`` arrives whole at ``receiver``."""
    payload = os.urandom(8) + b"through the example"
    sender.sendto(payload, to)
    while (got := receiver.recv(65536)) != payload:
        assert got.endswith(b"through the example"), f"unexpected datagram {got!r}"


def two_way(lan: Lan, port: int, family: int = socket.AF_INET) -> None:
    """desk and media exchange datagrams on ``port`` through in and gw."""
    with (
        app(lan["media"], address("media", family), port) as media,
        app(lan["desk"], address("desk", family), port) as desk,
    ):
        crosses(desk, (address("in", family), port), media)
        crosses(media, (address("gw", family), port), desk)


def gw_and_in(
    lan: Lan,
    block: Block,
    spawn: type[Process],
    *,
    udp: int = 5000,
    bound_on: tuple[str, ...] = ("gw", "in"),
    flows: bool = False,
    cwd: Path | None = None,
) -> tuple[Process, Process]:
    """Start a block of two commands, the server on gw and the client on in, and wait until
    they are connected (in flow mode: until a datagram makes a flow) and their UDP port
    ``udp`` is bound on the hosts ``bound_on``."""
    (server_host, server_cmd), (client_host, client_cmd) = block.commands
    assert (server_host or "gw", client_host or "in") == ("gw", "in"), block
    server = run(lan["gw"], server_cmd, spawn, cwd)
    wait_for(listening(lan["gw"], 6000), f"{block.where}: server listening", server)
    client = run(lan["in"], client_cmd, spawn, cwd)
    if not flows:
        wait_for(connected(lan["in"], 6000), f"{block.where}: connected", server, client)
    for role in bound_on:
        wait_for(bound(lan[role], udp), f"{block.where}: UDP {udp} on {role}", server, client)
    return server, client


def stopped(*processes: Process) -> None:
    """SIGTERM each; each exits 0."""
    for process in processes:
        process.signal(signal.SIGTERM)
    for process in processes:
        assert process.wait() == 0, process.stderr


# The scenarios ----------------------------------------------------------------------------

root = pytest.mark.root


@root
@pytest.mark.parametrize(
    "block",
    [
        *find("\nudptunnel -s 6000 media.example.org/5000\n", count=1),  # man: two blocks
        *find("gw$ udptunnel -s 6000 media.example.org/5000", count=1),
    ],
    ids=lambda b: b.where,
)
def test_two_hosts(lan: Lan, block: Block, spawn: type[Process]) -> None:
    if block.where.startswith("udptunnel.1"):  # the server and the client in blocks of their own
        (client,) = find("\nudptunnel -c gw.example.org/6000 desk.example.com/5000\n", count=1)
        block = Block(block.where, block.lines + client.lines)
    processes = gw_and_in(lan, block, spawn)
    two_way(lan, 5000)
    stopped(*processes)


@root
@pytest.mark.parametrize(
    "block",
    find("udptunnel -s 6000 --udp-bind 127.0.0.1/5001 127.0.0.1/5000", count=2),
    ids=lambda b: b.where,
)
def test_one_host(lan: Lan, block: Block, spawn: type[Process]) -> None:
    host = lan["desk"]  # any host: everything is on its loopback
    (_, server_cmd), (_, client_cmd) = block.commands
    server = run(host, server_cmd, spawn)
    wait_for(listening(host, 6000), "server listening", server)
    client = run(host, client_cmd, spawn)
    wait_for(connected(host, 6000), "client connected", server, client)
    wait_for(lambda: {5001, 7001} <= host.udp_ports(), "both ends bound", server, client)
    with app(host, "127.0.0.1", 5000) as a, app(host, "127.0.0.1", 7000) as b:
        crosses(a, ("127.0.0.1", 5001), b)
        crosses(b, ("127.0.0.1", 7001), a)
    stopped(client, server)


@root
@pytest.mark.parametrize("block", find("udptunnel -r -s 6000", count=1), ids=lambda b: b.where)
def test_rtp(lan: Lan, block: Block, spawn: type[Process]) -> None:
    (_, server_cmd), (_, client_cmd) = block.commands
    server = run(lan["gw"], server_cmd, spawn)
    wait_for(listening(lan["gw"], 6001), "server listening on 6000 and 6001", server)
    client = run(lan["in"], client_cmd, spawn)
    for port in (6000, 6001):
        wait_for(connected(lan["in"], port), f"client connected to {port}", server, client)
    for role in ("gw", "in"):
        wait_for(lambda r=role: {5004, 5005} <= lan[r].udp_ports(), role, server, client)
    two_way(lan, 5004)
    two_way(lan, 5005)
    stopped(client, server)


@root
@pytest.mark.parametrize("block", find("[2001:db8::1]:6000", count=1), ids=lambda b: b.where)
def test_ipv6(lan: Lan, block: Block, spawn: type[Process]) -> None:
    processes = gw_and_in(lan, block, spawn)
    two_way(lan, 5000, socket.AF_INET6)
    stopped(*processes)


def _member(ns: Namespace, group: str, port: int) -> socket.socket:
    """A socket in ``ns`` that has joined ``group`` and reports each datagram's TTL."""
    v6 = ":" in group
    sock = ns.open_udp_socket("::" if v6 else "0.0.0.0", port, timeout=WAIT, reuse_address=True)
    if v6:
        index = ns.if_index("to-sw")
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    else:
        mreq = socket.inet_aton(group) + socket.inet_aton(address("desk"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        sock.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address("desk"))
        )
    return sock


@root
@pytest.mark.parametrize(
    "block", find("udptunnel -s 6000 media.example.org/5004", count=2), ids=lambda b: b.where
)
def test_multicast(lan: Lan, block: Block, spawn: type[Process]) -> None:
    (_, client_cmd) = block.commands[1]
    group, port, ttl = re.search(r" (\S+)/(\d+)/(\d+)$", client_cmd).groups()  # type: ignore[union-attr]
    processes = gw_and_in(lan, block, spawn, udp=int(port))
    with (  # media.example.org is an IPv4 name, whichever the group
        contextlib.closing(_member(lan["desk"], group, int(port))) as member,
        app(lan["media"], address("media"), int(port)) as media,
    ):
        crosses(member, (group, int(port)), media)  # a member's datagram to the group goes out
        payload = b"to the group through the example"
        media.sendto(payload, (address("gw"), int(port)))
        while True:  # the member also hears its own datagram to the group
            got, ancillary, _, _ = member.recvmsg(65536, socket.CMSG_SPACE(4))
            if got == payload:
                break
        ((_, _, data),) = ancillary
        assert struct.unpack("@i", data[:4])[0] == int(ttl), "the TTL of the example"
    stopped(*processes)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The man page's openssl commands, run as written in a directory of their own."""
    (block,) = find("openssl req -x509", count=1)
    directory = tmp_path_factory.mktemp("certs")
    script = "set -e\n" + "\n".join(command for _, command in block.commands)
    subprocess.run(["bash", "-c", script], cwd=directory, check=True, capture_output=True)
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        assert (directory / name).stat().st_size > 0, name
    return directory


@root
@pytest.mark.needs("openssl", "bash")
@pytest.mark.parametrize("block", find("--tls-cert server.pem", count=2), ids=lambda b: b.where)
def test_tls(lan: Lan, block: Block, spawn: type[Process], certificates: Path) -> None:
    processes = gw_and_in(lan, block, spawn, cwd=certificates)
    two_way(lan, 5000)
    stopped(*processes)


def _unit_environment() -> dict[str, str]:
    """The unit's own ``Environment=`` settings, as systemd would pass them."""
    (line,) = (ln for ln in UNIT.read_text().splitlines() if ln.startswith("Environment="))
    return dict(item.split("=", 1) for item in shlex.split(line.removeprefix("Environment=")))


@root
def test_the_service_env_files(lan: Lan, spawn: type[Process]) -> None:
    """The two env files of the man page, run as the shipped unit runs them: its
    Environment=, then EnvironmentFile=, then ExecStart= with no arguments."""
    (gw_file,) = find("UDPTUNNEL_SERVER=6000", count=1)
    (in_file,) = find("UDPTUNNEL_CLIENT=gw.example.org/6000", count=1)
    processes = {}
    for role, block in (("gw", gw_file), ("in", in_file)):
        env = _unit_environment() | dict(line.split("=", 1) for _, line in block.commands)
        assignments = [f"{name}={value}" for name, value in env.items()]
        processes[role] = spawn([UDPTUNNEL], prefix=[*lan[role].prefix, "env", *assignments])
        wait_for(
            listening(lan["gw"], 6000) if role == "gw" else connected(lan["in"], 6000),
            f"the {role} service",
            *processes.values(),
        )
    processes["in"].wait_for("Connected TCP to")  # UDPTUNNEL_VERBOSE=1 in its file
    for role in ("gw", "in"):
        wait_for(bound(lan[role], 5000), role, *processes.values())
    two_way(lan, 5000)
    stopped(processes["in"], processes["gw"])


@root
@pytest.mark.parametrize(
    "block", find("--flows -s 6000 127.0.0.1/51820", count=1), ids=lambda b: b.where
)
def test_wireguard_in_flow_mode(lan: Lan, block: Block, spawn: type[Process]) -> None:
    processes = gw_and_in(lan, block, spawn, udp=51821, bound_on=("in",), flows=True)
    with (
        app(lan["gw"], "127.0.0.1", 51820) as wireguard,
        contextlib.ExitStack() as stack,
    ):
        peers = [stack.enter_context(app(lan["in"], "127.0.0.1", 0)) for _ in range(3)]
        for n, peer in enumerate(peers):
            peer.sendto(b"handshake %d" % n, ("127.0.0.1", 51821))
            got, source = wireguard.recvfrom(65536)
            assert got == b"handshake %d" % n
            wireguard.sendto(b"reply %d" % n, source)  # to the flow's own source
        for n, peer in enumerate(peers):
            assert peer.recv(65536) == b"reply %d" % n
    stopped(*processes)


@root
@pytest.mark.needs("bash")
def test_several_flow_servers_on_one_port(lan: Lan, spawn: type[Process]) -> None:
    (block,) = find("--reuse-port -s 6000", count=1)
    script = "\n".join(block.lines) + "\nwait\n"  # bash stays, the servers' parent
    servers = subprocess.Popen(
        [*lan["gw"].prefix, "env", f"PATH={BIN}:{os.environ['PATH']}", "bash", "-c", script],
        start_new_session=True,
    )
    try:
        wait_until(listening(lan["gw"], 6000, count=4), WAIT, "four servers on port 6000")
        client = spawn(
            [UDPTUNNEL, "-v", "--flows", "-c", "gw.example.org/6000", "127.0.0.1/5000"],
            prefix=lan["in"].prefix,
        )
        wait_for(bound(lan["in"], 5000), "the flow client", client)
        with app(lan["media"], address("media"), 51820) as wireguard, contextlib.ExitStack() as s:
            peers = [s.enter_context(app(lan["in"], "127.0.0.1", 0)) for _ in range(8)]
            try:
                for n, peer in enumerate(peers):
                    peer.sendto(b"hello %d" % n, ("127.0.0.1", 5000))
                    got, source = wireguard.recvfrom(65536)
                    wireguard.sendto(got.replace(b"hello", b"reply"), source)
                for n, peer in enumerate(peers):
                    assert peer.recv(65536) == b"reply %d" % n
            except TimeoutError:
                client.kill()
                raise AssertionError(f"nothing came back; the client: {client.stderr}") from None
        stopped(client)
    finally:
        os.killpg(servers.pid, signal.SIGTERM)  # bash and the four servers it started
        servers.wait(WAIT)


# The set-up commands ----------------------------------------------------------------------


@pytest.mark.needs("bash", "man", "groff")
def test_the_path_help_and_manual(tmp_path: Path) -> None:
    """README's three lines, in a shell in the checkout, with this environment as .venv."""
    (block,) = find('export PATH="$PWD/.venv/bin:$PATH"', count=1)
    checkout = tmp_path / "checkout"
    (checkout / ".venv").mkdir(parents=True)
    (checkout / ".venv" / "bin").symlink_to(BIN)
    (checkout / ".venv" / "share").symlink_to(BIN.parent / "share")
    env = {"PATH": "/usr/bin:/bin", "MANPAGER": "cat", "MANWIDTH": "80", "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", "-c", "\n".join(block.lines)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: udptunnel" in result.stdout
    # Our page, not the original's: its NAME line.
    assert re.search(r"udptunnel\s+-\s+tunnel\s+UDP\s+datagrams\s+both\s+ways", result.stdout)


@pytest.mark.needs("make")
def test_make_demo() -> None:
    (block,) = find("make demo", count=1)
    (_, command), _ = block.commands
    command = command.split("#")[0].strip()
    result = subprocess.run(
        shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "crossed intact" in result.stdout
    assert "exit status: client 0, server 0" in result.stdout


def test_pipx_install(tmp_path: Path) -> None:
    """README's single-user install, with a pipx of the test's own and its directories in
    the test's: the program and its page are linked, run, and removed again."""
    (block,) = find("\npipx install .\n", count=1)
    ((_, command),) = block.commands
    tools = tmp_path / "pipx-venv"
    subprocess.run([sys.executable, "-m", "venv", tools], check=True)  # with a pip of its own
    pip = [tools / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "pipx"], check=True, timeout=300)
    env = {
        "PATH": f"{tools / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
        "PIPX_MAN_DIR": str(tmp_path / "man"),
    }
    run_as_written = partial(subprocess.run, cwd=ROOT, env=env, capture_output=True, text=True)
    installed = run_as_written(shlex.split(command), timeout=300)
    assert installed.returncode == 0, installed.stderr
    program = tmp_path / "bin" / "udptunnel"
    version = subprocess.run([program, "--version"], capture_output=True, text=True, env=env)
    assert version.stdout.startswith("udptunnel "), version.stderr
    assert (tmp_path / "man" / "man1" / "udptunnel.1").read_bytes() == MAN.read_bytes()
    removed = run_as_written(["pipx", "uninstall", "udptunnel"], timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert not program.exists()


@pytest.mark.root("a private mount namespace with an empty /usr/local")
@pytest.mark.needs("make", "unshare", "mount")
def test_make_install_for_a_service() -> None:
    """README's operator install, as written, with PREFIX left at /usr/local: in a mount
    namespace of its own with an empty /usr/local, so that the machine's is not touched."""
    (block,) = find("\nmake install PYTHON=/usr/bin/python3\n", count=1)
    install, uninstall = (command for _, command in block.commands)
    script = f"""
        set -e
        mount -t tmpfs tmpfs /usr/local
        {install} >/dev/null
        /usr/local/bin/udptunnel --version
        test -s /usr/local/share/man/man1/udptunnel.1
        grep -q '^ExecStart=/usr/local/bin/udptunnel$' \\
            /usr/local/lib/systemd/system/udptunnel@.service
        {uninstall} >/dev/null
        find /usr/local -mindepth 1
    """
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    version, *left = result.stdout.splitlines()
    assert version.startswith("udptunnel ")
    assert left == [], "make uninstall left these behind"


# Every example is run --------------------------------------------------------------------

RUN_BY: dict[str, object] = {  # a text that identifies a block: the test that runs it
    "\nudptunnel -s 6000 media.example.org/5000\n": test_two_hosts,
    "udptunnel -c gw.example.org/6000 desk.example.com/5000": test_two_hosts,
    "udptunnel -s 6000 --udp-bind 127.0.0.1/5001 127.0.0.1/5000": test_one_host,
    "udptunnel -r -s 6000": test_rtp,
    "[2001:db8::1]:6000": test_ipv6,
    "udptunnel -s 6000 media.example.org/5004": test_multicast,
    "openssl req -x509": test_tls,
    "--tls-cert server.pem": test_tls,
    "UDPTUNNEL_SERVER=6000": test_the_service_env_files,
    "UDPTUNNEL_CLIENT=gw.example.org/6000": test_the_service_env_files,
    "--flows -s 6000 127.0.0.1/51820": test_wireguard_in_flow_mode,
    "--reuse-port -s 6000": test_several_flow_servers_on_one_port,
    'export PATH="$PWD/.venv/bin:$PATH"': test_the_path_help_and_manual,
    "make demo": test_make_demo,
    "\npipx install .\n": test_pipx_install,
    "\nmake install PYTHON=/usr/bin/python3\n": test_make_install_for_a_service,
    "--proxy http://alice@proxy.example.com:3128": "test_proxy.py::test_the_documented_example",
}


def test_every_example_is_run() -> None:
    """Each literal block of both documents is run by a test here, or is not a command."""
    unrun = []
    for block in all_blocks():
        if block.first in NOT_COMMANDS or any(key in block.text for key in RUN_BY):
            continue
        unrun.append(f"{block.where}: {block.first}")
    assert not unrun, "examples no test runs:\n" + "\n".join(unrun)
    assert len(all_blocks()) >= 15  # the reading found the blocks at all
