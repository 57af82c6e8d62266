"""Under systemd: the notify protocol, socket activation, the journal, and the shipped units.

The test plays the service manager: it binds the NOTIFY_SOCKET and reads what udptunnel
tells it, and lets systemd's own systemd-socket-activate pass the listening socket.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from udptunnel.systemd import (
    JournalFormatter,
    Notifier,
    _watchdog_interval,
    take_listen_sockets,
    writes_to_journal,
)

from .conftest import (
    BIN,
    UDPTUNNEL,
    WAIT,
    Echo,
    Process,
    free_even_port,
    free_port,
    udp_socket,
)

LOOPBACK = "127.0.0.1"
UNITS = Path(__file__).parent.parent / "contrib" / "systemd"
WATCHDOG_USEC = 400_000  # 0.4 s: pings every 0.2 s


class Manager:
    """The service manager's end of NOTIFY_SOCKET: every message udptunnel sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = WAIT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        text = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in text.splitlines())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, pattern: str = "", timeout: float = WAIT) -> dict[str, str]:
        """The next message with ``key``, whose value matches ``pattern`` if given."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(deadline - time.monotonic(), 0.001))
            if key in message and re.match(pattern, message[key]):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    manager = Manager(tmp_path / "notify")
    yield manager
    manager.close()


def test_notifications_reach_a_path_or_an_abstract_socket(manager: Manager) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(manager.path)})
    notifier.notify(READY=1, STATUS="listening")
    assert manager.next() == {"READY": "1", "STATUS": "listening"}
    notifier.close()
    name = f"udptunnel-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.notify(STOPPING=1)
        assert abstract.recv(100) == b"STOPPING=1"
        notifier.close()


def test_without_a_manager_notifying_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.notify(READY=1)  # no socket, no error


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 0.0),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, 0.0),
        ({}, 0.0),
    ],
)
def test_the_watchdog_pings_at_half_the_managers_interval(
    environ: dict[str, str], interval: float
) -> None:
    assert _watchdog_interval(environ) == interval


def test_listen_fds_for_another_process_are_not_taken() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "rtp"}
    assert take_listen_sockets(environ) == []
    assert environ == {}  # and not passed on to any child


def test_lines_into_the_journal_carry_their_priority(tmp_path: Path) -> None:
    log_file = tmp_path / "stderr"
    with log_file.open("w") as stream:
        status = os.fstat(stream.fileno())
        journal = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert writes_to_journal(journal, stream)  # type: ignore[arg-type]
        assert not writes_to_journal({"JOURNAL_STREAM": "1:2"}, stream)  # type: ignore[arg-type]
        assert not writes_to_journal({}, stream)  # type: ignore[arg-type]
    formatter = JournalFormatter("%(message)s")
    lines = [
        formatter.format(logging.LogRecord("udptunnel", level, "", 0, "text", None, None))
        for level in (logging.DEBUG, logging.INFO, 25, logging.WARNING, logging.ERROR)
    ]
    assert lines == ["<7>text", "<6>text", "<5>text", "<4>text", "<3>text"]


@pytest.mark.needs("systemd-socket-activate")
def test_under_socket_activation_it_notifies_ready_status_watchdog_and_stopping(
    spawn: type[Process], manager: Manager
) -> None:
    port, udp_in, client_in = free_port(), free_port(), free_port()
    app_a, app_b = udp_socket(), udp_socket()
    server = spawn(
        [
            "env",
            f"NOTIFY_SOCKET={manager.path}",
            f"WATCHDOG_USEC={WATCHDOG_USEC}",
            "systemd-socket-activate",
            "-l",
            f"{LOOPBACK}:{port}",
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "WATCHDOG_USEC",
            UDPTUNNEL,
            "-v",
            "-s",
            str(port),
            "--udp-bind",
            f"{LOOPBACK}/{udp_in}",
            f"{LOOPBACK}/{app_a.getsockname()[1]}",
        ]
    )
    server.wait_for(rf"Listening on {LOOPBACK}:{port}")  # systemd-socket-activate's word
    client = spawn(
        [
            UDPTUNNEL,
            "-c",
            f"{LOOPBACK}/{port}",
            "--udp-bind",
            f"{LOOPBACK}/{client_in}",
            f"{LOOPBACK}/{app_b.getsockname()[1]}",
        ]
    )
    server.wait_for(rf"Listening for TCP connections on {LOOPBACK}/{port} \(from systemd\)")
    ready = manager.wait_for("READY")
    assert ready["READY"] == "1" and "STATUS" in ready
    app_b.sendto(b"through the activated socket", (LOOPBACK, client_in))
    assert app_a.recv(100) == b"through the activated socket"
    server.wait_for("TCP connection from")
    # Refreshed every few seconds: the totals show the datagram just carried.
    manager.wait_for("STATUS", r"tunnel up with 127\.0\.0\.1/\d+; 0 datagrams to TCP, 1 from")
    manager.wait_for("WATCHDOG")
    times = []
    for _ in range(3):
        assert manager.wait_for("WATCHDOG")["WATCHDOG"] == "1"
        times.append(time.monotonic())
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap < 0.75 * WATCHDOG_USEC / 1e6 for gap in gaps), gaps  # at half the interval
    server.signal(signal.SIGTERM)
    assert manager.wait_for("STOPPING")["STOPPING"] == "1"
    assert server.wait() == 0
    assert client.wait() == 0
    app_a.close()
    app_b.close()


def installed_units(destdir: Path) -> list[Path]:
    """The shipped units as ``make install`` writes them, with this environment's program."""
    subprocess.run(
        ["make", "-s", "install-units", f"DESTDIR={destdir}", "PREFIX=/usr", f"BINDIR={BIN}"],
        cwd=UNITS.parent.parent,
        check=True,
        timeout=WAIT,
    )
    return sorted((destdir / "usr" / "lib" / "systemd" / "system").glob("udptunnel@.*"))


@pytest.mark.needs("systemd-analyze", "make")
def test_the_shipped_units_verify_cleanly(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    assert [unit.name for unit in units] == ["udptunnel@.service", "udptunnel@.socket"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT * 3,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.needs("systemd-analyze", "make")
def test_the_service_is_rated_ok_by_systemd_analyze_security(tmp_path: Path) -> None:
    service = installed_units(tmp_path)[0]
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(service)],
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT * 3,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0 and match[2] == "OK", match[0]


@pytest.mark.needs("systemd-socket-activate")
def test_in_rtp_mode_the_sockets_named_rtp_and_rtcp_serve_their_ports(
    spawn: type[Process],
) -> None:
    port = free_even_port()
    rtp_app = free_even_port()
    client_apps = [udp_socket(LOOPBACK, rtp_app), udp_socket(LOOPBACK, rtp_app + 1)]
    server_in, client_in = free_even_port(), free_even_port()
    server_app = free_even_port()
    behind = [udp_socket(LOOPBACK, server_app), udp_socket(LOOPBACK, server_app + 1)]
    # Named in the opposite order to the ports: the names decide, not the order.
    server = spawn(
        [
            "systemd-socket-activate",
            "-l",
            f"{LOOPBACK}:{port + 1}",
            "-l",
            f"{LOOPBACK}:{port}",
            "--fdname=rtcp:rtp",
            UDPTUNNEL,
            "-v",
            "-r",
            "-s",
            str(port),
            "--udp-bind",
            f"{LOOPBACK}/{server_in}",
            f"{LOOPBACK}/{server_app}",
        ]
    )
    server.wait_for(rf"Listening on {LOOPBACK}:{port}")
    spawn(
        [
            UDPTUNNEL,
            "-r",
            "-c",
            f"{LOOPBACK}/{port}",
            "--udp-bind",
            f"{LOOPBACK}/{client_in}",
            f"{LOOPBACK}/{rtp_app}",
        ]
    )
    server.wait_for("TCP connection from")
    for offset, name in enumerate([b"rtp", b"rtcp"]):
        client_apps[offset].sendto(name, (LOOPBACK, client_in + offset))
        assert behind[offset].recv(100) == name
    for sock in client_apps + behind:
        sock.close()


@pytest.mark.needs("systemd-socket-activate")
def test_a_flow_mode_server_serves_its_flows_on_the_activated_socket(
    spawn: type[Process],
) -> None:
    port, client_in = free_port(), free_port()
    echo = Echo()
    server = spawn(
        [
            "systemd-socket-activate",
            "-l",
            f"{LOOPBACK}:{port}",
            UDPTUNNEL,
            "-v",
            "--flows",
            "-s",
            str(port),
            f"{LOOPBACK}/{echo.port}",
        ]
    )
    server.wait_for(rf"Listening on {LOOPBACK}:{port}")
    client = spawn(
        [UDPTUNNEL, "-v", "--flows", "-c", f"{LOOPBACK}/{port}", f"{LOOPBACK}/{client_in}"]
    )
    client.wait_for("Receiving flows on UDP")
    sources = [udp_socket(), udp_socket()]
    for number, source in enumerate(sources):
        payload = b"flow %d" % number
        source.sendto(payload, (LOOPBACK, client_in))
        assert source.recv(100) == payload  # each source gets its own replies back
    server.wait_for(rf"Listening for TCP connections on {LOOPBACK}/{port} \(from systemd\)")
    server.wait_for("Flow from .*: UDP", nth=2)
    assert "Traceback" not in server.stderr
    for source in sources:
        source.close()
    echo.close()
