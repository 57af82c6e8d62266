"""Shared test helpers: real udptunnel processes, free ports, and the rules for skipping.

Tests marked ``root`` (network namespaces) or ``original`` (Debian's /usr/bin/udptunnel) skip
with a reason where the machine cannot run them, and fail instead when
UDPTUNNEL_STRICT_TESTS=1, as .ci/run sets: CI always runs them for real. A test that can only
find out as it runs calls ``unable(reason)``, under the same rule.
"""

from __future__ import annotations

import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest
import trio

BIN = Path(sys.executable).parent  # the environment's bin, not the interpreter it links to
UDPTUNNEL = str(BIN / "udptunnel")  # the console script, as users run it
ORIGINAL = "/usr/bin/udptunnel"  # Debian's package udptunnel: Lennox's C program
STRICT = os.environ.get("UDPTUNNEL_STRICT_TESTS") == "1"
WAIT = 10.0  # seconds: the ceiling for any one expected event in a real-process test


def _below_ephemeral() -> tuple[int, int]:
    """Ports for tests: the half below Linux's ephemeral range (ip_local_port_range, 32768
    and up by default), where no bind(0) or connect() lands."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1025, low // 2), low - 1


PORTS = _below_ephemeral()
_ports = random.Random()


def missing(item: pytest.Item) -> str | None:
    """Why this machine cannot run the test, if it cannot."""
    if (root := item.get_closest_marker("root")) and (
        os.geteuid() != 0 or shutil.which("ip") is None
    ):
        what = root.args[0] if root.args else "network namespaces (and iproute2)"
        return f"needs root, for {what}"
    if item.get_closest_marker("original") and not os.access(ORIGINAL, os.X_OK):
        return f"needs Debian's udptunnel at {ORIGINAL} (apt-get install udptunnel)"
    for marker in item.iter_markers("needs"):
        if absent := [tool for tool in marker.args if shutil.which(tool) is None]:
            return f"needs {', '.join(absent)} (.ci/run installs the Debian packages)"
    return None


def unable(reason: str) -> NoReturn:
    """This machine cannot run the current test: skip it with the reason, or fail it when
    UDPTUNNEL_STRICT_TESTS=1."""
    if STRICT:
        pytest.fail(f"UDPTUNNEL_STRICT_TESTS=1 but this test {reason}")
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if reason := missing(item):
        unable(reason)


class Process:
    """A child process whose standard error is collected line by line as it comes."""

    def __init__(self, argv: Sequence[str], *, prefix: Sequence[str] = ()) -> None:
        self.argv = [*prefix, *argv]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = WAIT, *, nth: int = 1) -> re.Match[str]:
        """Wait until the ``nth`` line of standard error that matches ``pattern`` (a regular
        expression) has come; return its match."""
        regex = re.compile(pattern)
        seen = 0
        for line in self.lines:
            if (match := regex.search(line)) and (seen := seen + 1) == nth:
                return match
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} in {timeout} s: {self.lines}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"exited ({self.proc.wait()}) before {pattern!r}: {self.lines}"
                )
            self.lines.append(line)
            if (match := regex.search(line)) and (seen := seen + 1) == nth:
                return match

    def wait(self, timeout: float = WAIT) -> int:
        """Wait for the exit status, and for every line of standard error."""
        status = self.proc.wait(timeout)
        self._finish()
        return status

    def _finish(self) -> None:
        self._reader.join(WAIT)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        self._queue.put(None)  # for any later wait_for
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """Kill this process (only this one, by its PID) if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if not self.proc.stderr.closed:  # type: ignore[union-attr]
            self._finish()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def spawn() -> Iterator[type[Process]]:
    """Start processes with ``spawn(argv)``; whatever is still running at the end is killed."""
    started: list[Process] = []

    class Tracked(Process):
        def __init__(self, argv: Sequence[str], *, prefix: Sequence[str] = ()) -> None:
            super().__init__(argv, prefix=prefix)
            started.append(self)

    yield Tracked
    for process in started:
        process.kill()


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A port that is free for both TCP and UDP on ``host`` right now.

    It comes from below the kernel's ephemeral range (PORTS), so that no socket that binds
    port 0 or connects, in a tunnel under test or anywhere, can take it before it is used.
    """
    while True:
        port = _ports.randrange(*PORTS)
        if _is_free(family, host, port):
            return port


def free_even_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """An even port P such that P and P+1 are free for TCP and UDP (RTP mode)."""
    while True:
        even = _ports.randrange(*PORTS) & ~1
        if _is_free(family, host, even) and _is_free(family, host, even + 1):
            return even


def _is_free(family: int, host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


async def open_trio_udp(host: str = "127.0.0.1", port: int = 0) -> trio.socket.SocketType:
    """A bound Trio UDP socket, for tests that run tunnel code in-process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, port))
    return sock


def udp_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound UDP socket with the test ceiling as its receive timeout."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(WAIT)
    return sock


FAMILY = {"127.0.0.1": socket.AF_INET, "::1": socket.AF_INET6}


class Echo:
    """A UDP server that answers every datagram with the same bytes, to where it came from,
    and remembers who sent what."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(FAMILY[host], socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.05)  # how often the thread looks at the stop flag
        self.port = self.sock.getsockname()[1]
        self.heard: list[tuple[tuple[str, int], bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.heard.append((source[:2], data))
            self.sock.sendto(data, source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.sock.close()


class LoopbackApps:
    """Ports for a server and a client tunnel end on loopback, and an application at each:
    ``app_a`` behind the server, ``app_b`` behind the client; each end takes datagrams in
    at ``a_in`` or ``b_in``."""

    def __init__(self) -> None:
        self.tcp = free_port()
        self.app_a, self.app_b = udp_socket(), udp_socket()
        self.a_in, self.b_in = free_port(), free_port()

    def crosses(self, payload: bytes) -> None:
        """The payload goes through the tunnel both ways."""
        self.app_b.sendto(payload, ("127.0.0.1", self.b_in))
        assert self.app_a.recv(65536) == payload
        self.app_a.sendto(payload[::-1], ("127.0.0.1", self.a_in))
        assert self.app_b.recv(65536) == payload[::-1]

    def close(self) -> None:
        self.app_a.close()
        self.app_b.close()
