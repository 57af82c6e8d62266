"""udptunnel as a long-running service: --persist, timeouts, SIGUSR1, and configuration from
the environment. Real processes on loopback, kept apart with --udp-bind."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from udptunnel import cli
from udptunnel.config import Config, Mode
from udptunnel.persist import Backoff, end_when_idle

from .conftest import UDPTUNNEL, WAIT, LoopbackApps, Process, free_even_port, free_port, udp_socket

LOOPBACK = "127.0.0.1"
FAST_RETRY = ["--reconnect-max", "0.5"]  # waits of 0.25-0.5 s: tests need no patience
Spawn = type[Process]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Ends(LoopbackApps):
    """A server and a client tunnel end, plain, for the applications."""

    def server(self, spawn: Spawn, *flags: str) -> Process:
        destination = f"{LOOPBACK}/{self.app_a.getsockname()[1]}"
        bind = f"{LOOPBACK}/{self.a_in}"
        return spawn(
            [UDPTUNNEL, "-v", *flags, "-s", str(self.tcp), "--udp-bind", bind, destination]
        )

    def client(self, spawn: Spawn, *flags: str) -> Process:
        destination = f"{LOOPBACK}/{self.app_b.getsockname()[1]}"
        bind = f"{LOOPBACK}/{self.b_in}"
        tcp = f"{LOOPBACK}/{self.tcp}"
        return spawn([UDPTUNNEL, "-v", *flags, "-c", tcp, "--udp-bind", bind, destination])


@pytest.fixture
def ends() -> Any:
    ends = Ends()
    yield ends
    ends.close()


def test_a_persistent_client_comes_back_after_the_server_restarts(spawn: Spawn, ends: Ends) -> None:
    server = ends.server(spawn)
    server.wait_for("Listening for TCP connections")
    client = ends.client(spawn, "--persist", *FAST_RETRY)
    client.wait_for("Connected TCP to")  # logged once datagrams are carried
    ends.crosses(b"before")
    server.kill()  # SIGKILL: no goodbye, the client sees the connection go
    client.wait_for(r"Reconnecting in \d+\.\d s")
    server = ends.server(spawn)
    client.wait_for("Connected TCP to", nth=2)  # the client came back by itself
    ends.crosses(b"after")
    assert client.proc.poll() is None


def test_a_persistent_server_serves_three_clients_one_after_another(
    spawn: Spawn, ends: Ends
) -> None:
    server = ends.server(spawn, "--persist")
    server.wait_for("Listening for TCP connections")
    for number in range(3):
        client = ends.client(spawn)
        client.wait_for("Connected TCP to")
        ends.crosses(f"client {number}".encode())
        client.signal(signal.SIGTERM)
        assert client.wait() == 0
    assert server.proc.poll() is None
    server.signal(signal.SIGUSR1)
    server.wait_for(r"tunnels: 3, reconnects: 0")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_datagrams_while_no_tunnel_is_up_are_dropped_counted_and_cost_no_memory(
    spawn: Spawn, ends: Ends
) -> None:
    client = ends.client(spawn, "--persist", *FAST_RETRY)  # no server: never connected
    # A failure it survives is shown without -v, and named like an error.
    client.wait_for(rf"^udptunnel: cannot connect to TCP .*/{ends.tcp}: Connection refused$")
    sent = 20_000
    before = rss_kb(client.proc.pid)
    for _ in range(sent):
        ends.app_b.sendto(b"x" * 1000, (LOOPBACK, ends.b_in))
    wait_for_count(client, sent)
    assert rss_kb(client.proc.pid) - before < 2048  # 20 MB went by; less than 2 MB stayed
    ends.server(spawn)
    client.wait_for("Connected TCP to")
    ends.crosses(b"none of the dropped ones came first")


def wait_for_count(client: Process, sent: int) -> None:
    """Ask for the counters until every datagram sent is counted as dropped for no tunnel
    (the last ones may still be on their way through the kernel when first asked)."""
    deadline = time.monotonic() + WAIT
    pattern = re.compile(r"dropped: (\d+) .*?(\d+) queue full.*?(\d+) no tunnel\)")
    while True:
        client.signal(signal.SIGUSR1)
        match = None
        while match is None:
            line = client.wait_for(r"no tunnel\)").string
            client.lines.remove(line)  # so that the next wait_for sees the next report
            match = pattern.search(line)
        dropped, overflow, no_tunnel = map(int, match.groups())
        if no_tunnel + overflow == sent:
            assert dropped == sent
            return
        assert time.monotonic() < deadline, f"{no_tunnel} + {overflow} of {sent} counted"


def test_an_idle_tunnel_ends_after_the_timeout_with_exit_0(spawn: Spawn, ends: Ends) -> None:
    server = ends.server(spawn)
    server.wait_for("Listening for TCP connections")
    client = ends.client(spawn, "--idle-timeout", "0.5")
    client.wait_for("Connected TCP to")
    ends.crosses(b"some traffic first")
    started = time.monotonic()
    assert client.wait() == 0
    assert 0.5 <= time.monotonic() - started < 0.5 + 1.0
    assert "No datagram for 0.5 s; closing the tunnel" in client.stderr
    assert server.wait() == 0


def test_a_persistent_client_after_an_idle_end_reconnects_when_traffic_comes(
    spawn: Spawn, ends: Ends
) -> None:
    server = ends.server(spawn, "--persist")
    server.wait_for("Listening for TCP connections")
    client = ends.client(spawn, "--persist", "--idle-timeout", "0.3", *FAST_RETRY)
    client.wait_for("Connected TCP to")
    client.wait_for("No datagram for 0.3 s")
    server.wait_for("Tunnel closed")
    ends.app_b.sendto(b"wake up", (LOOPBACK, ends.b_in))
    assert ends.app_a.recv(100) == b"wake up"  # kept while connecting, then carried


def test_sigusr1_reports_the_counters_without_v_and_without_disturbing(
    spawn: Spawn, ends: Ends
) -> None:
    destination = f"{LOOPBACK}/{ends.app_a.getsockname()[1]}"
    server = spawn(
        [UDPTUNNEL, "-s", str(ends.tcp), "--udp-bind", f"{LOOPBACK}/{ends.a_in}", destination]
    )
    client = ends.client(spawn, "--persist", *FAST_RETRY)  # the server says nothing when up
    client.wait_for("Connected TCP to")
    ends.crosses(b"12345")
    server.signal(signal.SIGUSR1)
    line = server.wait_for(r"^Tunnel up with 127\.0\.0\.1/\d+\. UDP to TCP").string
    assert "UDP to TCP: 1 datagrams, 5 bytes; TCP to UDP: 1 datagrams, 5 bytes" in line
    assert line.endswith("; tunnels: 1, reconnects: 0")
    ends.crosses(b"still carrying")
    client.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert server.stderr == line  # nothing else without -v


def test_a_connect_that_gets_no_answer_times_out(spawn: Spawn) -> None:
    # A listener whose accept queue is full: the kernel ignores further SYNs.
    with socket.socket() as full:
        full.bind((LOOPBACK, 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = [socket.create_connection((LOOPBACK, port), timeout=WAIT)]  # now it is full
        started = time.monotonic()
        client = spawn(
            [
                UDPTUNNEL,
                "--connect-timeout",
                "0.5",
                "-c",
                f"{LOOPBACK}/{port}",
                "--udp-bind",
                f"{LOOPBACK}/{free_port()}",
                f"{LOOPBACK}/9",
            ]
        )
        assert client.wait() == 1
        assert time.monotonic() - started < 0.5 + 2.0
        for sock in queued:
            sock.close()
    assert (
        client.stderr == f"udptunnel: cannot connect to TCP {LOOPBACK}/{port}: no answer in 0.5 s"
    )


# --- configuration from the environment --------------------------------------------------------

ENVIRONMENT_FILE = """\
# /etc/udptunnel/media.env, as a unit's EnvironmentFile= reads it
UDPTUNNEL_CLIENT=tunnel.example/7000
UDPTUNNEL_UDP=127.0.0.1/5004
UDPTUNNEL_RTP=1
UDPTUNNEL_UDP_BIND=127.0.0.1/6004
UDPTUNNEL_MAX_DELAY=25
UDPTUNNEL_VERBOSE=2
UDPTUNNEL_PERSIST=true
UDPTUNNEL_RECONNECT_MAX=10
UDPTUNNEL_KEEPALIVE=15
UDPTUNNEL_IDLE_TIMEOUT=300
UDPTUNNEL_CONNECT_TIMEOUT=3
"""
COMMAND_LINE = [
    "-vv",
    "-r",
    "-c",
    "tunnel.example/7000",
    "--udp-bind",
    "127.0.0.1/6004",
    "--max-delay",
    "25",
    "--persist",
    "--reconnect-max",
    "10",
    "--keepalive",
    "15",
    "--idle-timeout",
    "300",
    "--connect-timeout",
    "3",
    "127.0.0.1/5004",
]


def environment(text: str) -> dict[str, str]:
    """KEY=value lines, as systemd reads an EnvironmentFile (comments and blanks skipped)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return dict(pairs)  # type: ignore[arg-type]


def configured(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]) -> Any:
    """The Config and log level the command would run with."""
    seen: list[Config] = []
    monkeypatch.setattr(cli, "run", lambda config: seen.append(config) or 0)
    for name in list(os.environ):
        if name.startswith(cli.ENV):
            monkeypatch.delenv(name)
    package = logging.getLogger("udptunnel")
    saved = package.handlers[:], package.level, package.propagate
    try:
        result = CliRunner().invoke(cli.command, argv, env=env)
        level = package.level
    finally:
        package.handlers[:], package.level, package.propagate = saved
    assert result.exit_code == 0, result.output
    return seen[0], level


def test_an_environment_file_configures_the_same_tunnel_as_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from_env = configured(monkeypatch, [], environment(ENVIRONMENT_FILE))
    from_argv = configured(monkeypatch, COMMAND_LINE, {})
    assert from_env == from_argv
    config, level = from_env
    assert config.persist and config.rtp and config.keepalive == 15 and level == logging.DEBUG


def test_the_command_line_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = configured(monkeypatch, ["--max-delay", "40"], environment(ENVIRONMENT_FILE))
    assert config.max_delay == 0.04
    # -s on the command line overrides UDPTUNNEL_CLIENT too: one mode, the one typed.
    config, _ = configured(monkeypatch, ["-s", "7000"], environment(ENVIRONMENT_FILE))
    assert config.mode is Mode.SERVER and config.tcp.port == 7000


def test_a_bad_environment_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = CliRunner().invoke(
        cli.command,
        [],
        env={"UDPTUNNEL_SERVER": "6000", "UDPTUNNEL_UDP": "h/1", "UDPTUNNEL_KEEPALIVE": "soon"},
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "UDPTUNNEL_KEEPALIVE" in result.output and "soon" in result.output


def test_help_shows_every_environment_variable() -> None:
    shown = " ".join(CliRunner().invoke(cli.command, ["--help"]).output.split())  # unwrapped
    for name in environment(ENVIRONMENT_FILE):
        if name != "UDPTUNNEL_UDP":  # the positional: named in the description
            assert f"env var: {name}" in shown
    assert "UDPTUNNEL_UDP" in shown


def test_a_tunnel_configured_only_by_the_environment_carries_traffic(
    spawn: Spawn, ends: Ends
) -> None:
    server = ends.server(spawn)
    server.wait_for("Listening for TCP connections")
    env = {
        "UDPTUNNEL_CLIENT": f"{LOOPBACK}/{ends.tcp}",
        "UDPTUNNEL_UDP_BIND": f"{LOOPBACK}/{ends.b_in}",
        "UDPTUNNEL_UDP": f"{LOOPBACK}/{ends.app_b.getsockname()[1]}",
        "UDPTUNNEL_VERBOSE": "1",
    }
    client = spawn(["env", *(f"{k}={v}" for k, v in env.items()), UDPTUNNEL])
    client.wait_for("Connected TCP to")
    ends.crosses(b"configured by the environment")


# --- the pieces -----------------------------------------------------------------------------


def test_waits_double_from_half_a_second_up_to_the_cap_each_in_its_upper_half() -> None:
    highest = Backoff(cap=5.0, draw=lambda: 1.0)
    assert [highest.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    lowest = Backoff(cap=5.0, draw=lambda: 0.0)
    assert [lowest.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.5, 2.5]
    lowest.reset()
    assert lowest.attempt == 0 and lowest.next() == 0.25
    waits = [lowest.next() for _ in range(5000)]  # a server down for days
    assert waits[-1] == 2.5  # still at the cap


async def test_an_idle_timeout_counts_from_the_last_traffic(autojump_clock: object) -> None:
    # autojump_clock: the sleeps below move virtual time to chosen instants, they do not wait
    # for anything; no real I/O happens here.
    traffic, ended = [0], []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            end_when_idle, lambda: traffic[0], 8.0, lambda: ended.append(trio.current_time())
        )
        await trio.sleep(5)
        traffic[0] += 1  # in use at 5 s: the tunnel lives on to about 13 s
        await trio.sleep(7)
        assert not ended
    assert 13 <= ended[0] <= 14


def test_a_stray_first_connection_does_not_wedge_a_persistent_rtp_server(spawn: Spawn) -> None:
    tcp, a_in, b_in = free_even_port(), free_even_port(), free_even_port()
    app_port, behind_port = free_even_port(), free_even_port()
    apps = [udp_socket(LOOPBACK, app_port + offset) for offset in (0, 1)]  # behind the client
    behind = [udp_socket(LOOPBACK, behind_port + offset) for offset in (0, 1)]  # the server
    server_udp = ["--udp-bind", f"{LOOPBACK}/{a_in}", f"{LOOPBACK}/{behind_port}"]
    flags = ["-r", "--persist", "--connect-timeout", "0.5"]
    server = spawn([UDPTUNNEL, "-v", *flags, "-s", str(tcp), *server_udp])
    server.wait_for("Listening for TCP connections")
    with socket.create_connection((LOOPBACK, tcp), timeout=WAIT) as stray:  # the RTP port only
        server.wait_for(r"No second connection within 0\.5 s of 127\.0\.0\.1/\d+; closing it")
        assert stray.recv(1) == b""  # closed in order
    client_udp = ["--udp-bind", f"{LOOPBACK}/{b_in}", f"{LOOPBACK}/{app_port}"]
    client = spawn([UDPTUNNEL, "-v", "-r", "-c", f"{LOOPBACK}/{tcp}", *client_udp])
    client.wait_for("Connected TCP to", nth=2)
    for offset in (0, 1):  # both port pairs work: the server went back to accepting
        apps[offset].sendto(b"pair %d" % offset, (LOOPBACK, b_in + offset))
        assert behind[offset].recv(100) == b"pair %d" % offset
    for sock in apps + behind:
        sock.close()
