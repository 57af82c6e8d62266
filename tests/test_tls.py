"""TLS: who gets in, who is refused, and what the wire shows. Certificates are made here
with the openssl command; real processes on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import UDPTUNNEL, WAIT, LoopbackApps, Process, free_even_port, udp_socket

LOOPBACK = "127.0.0.1"
Spawn = type[Process]
pytestmark = pytest.mark.needs("openssl")


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def new_key(name: str, cwd: Path) -> Path:
    key = cwd / f"{name}.key"
    openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key, cwd=cwd
    )
    return key


def self_signed(name: str, cwd: Path) -> tuple[Path, Path]:
    """A certificate that signs itself: a CA, or a stranger's client certificate."""
    key, cert = new_key(name, cwd), cwd / f"{name}.pem"
    openssl(
        "req", "-x509", "-key", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}", cwd=cwd
    )
    return cert, key


def signed(name: str, ca: tuple[Path, Path], cwd: Path, names: str = "") -> tuple[Path, Path]:
    """A certificate for ``name`` signed by ``ca``, with subjectAltNames ``names``."""
    key, csr, cert = new_key(name, cwd), cwd / f"{name}.csr", cwd / f"{name}.pem"
    openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}", cwd=cwd)
    extensions = cwd / f"{name}.ext"
    extensions.write_text(f"subjectAltName={names}\n" if names else "basicConstraints=CA:FALSE\n")
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        extensions,
        cwd=cwd,
    )
    return cert, key


@dataclass
class Pki:
    ca: tuple[Path, Path]
    other_ca: tuple[Path, Path]
    server: tuple[Path, Path]  # for localhost and 127.0.0.1, by ca
    client: tuple[Path, Path]  # by ca
    stranger: tuple[Path, Path]  # self-signed
    foreign: tuple[Path, Path]  # by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    cwd = tmp_path_factory.mktemp("pki")
    ca, other_ca = self_signed("ca", cwd), self_signed("other-ca", cwd)
    return Pki(
        ca,
        other_ca,
        signed("server", ca, cwd, "DNS:localhost,IP:127.0.0.1"),
        signed("client", ca, cwd),
        self_signed("stranger", cwd),
        signed("foreign", other_ca, cwd),
    )


class Ends(LoopbackApps):
    """A TLS server and client tunnel end, for the applications."""

    def server(self, spawn: Spawn, pki: Pki, *flags: str, mutual: bool = True) -> Process:
        tls = ["--tls-cert", str(pki.server[0]), "--tls-key", str(pki.server[1])]
        if mutual:
            tls += ["--tls-ca", str(pki.ca[0])]
        udp = ["--udp-bind", f"{LOOPBACK}/{self.a_in}", f"{LOOPBACK}/{self.app_a.getsockname()[1]}"]
        process = spawn([UDPTUNNEL, "-v", *tls, *flags, "-s", str(self.tcp), *udp])
        process.wait_for("Listening for TCP connections")
        return process

    def client(self, spawn: Spawn, *tls: str, host: str = LOOPBACK, port: int = 0) -> Process:
        udp = ["--udp-bind", f"{LOOPBACK}/{self.b_in}", f"{LOOPBACK}/{self.app_b.getsockname()[1]}"]
        return spawn([UDPTUNNEL, "-v", "--tls", *tls, "-c", f"{host}/{port or self.tcp}", *udp])

    def nothing_reached_the_server_side(self) -> bool:
        self.app_a.setblocking(False)
        try:
            self.app_a.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.app_a.setblocking(True)
        return False


@pytest.fixture
def ends() -> Iterator[Ends]:
    ends = Ends()
    yield ends
    ends.close()


def client_files(pki: Pki, which: str) -> list[str]:
    cert, key = getattr(pki, which)
    return ["--tls-ca", str(pki.ca[0]), "--tls-cert", str(cert), "--tls-key", str(key)]


def test_a_client_with_a_certificate_from_the_ca_gets_through(
    spawn: Spawn, pki: Pki, ends: Ends
) -> None:
    server = ends.server(spawn, pki)
    client = ends.client(spawn, *client_files(pki, "client"))
    client.wait_for("Connected TCP to")
    ends.crosses(os.urandom(1000))
    client.signal()
    assert client.wait() == 0
    assert server.wait() == 0, server.stderr  # a TLS tunnel ends in order too


@pytest.mark.parametrize("which", [None, "stranger", "foreign"])
def test_a_client_without_a_certificate_from_the_ca_is_refused(
    spawn: Spawn, pki: Pki, ends: Ends, which: str | None
) -> None:
    server = ends.server(spawn, pki, "--persist")
    files = client_files(pki, which) if which else ["--tls-ca", str(pki.ca[0])]
    refused = ends.client(spawn, *files)
    ends.app_b.sendto(b"let me in", (LOOPBACK, ends.b_in))
    assert refused.wait() == 1
    server.wait_for(r"Closed TCP connection from 127\.0\.0\.1/\d+: TLS handshake failed")
    assert ends.nothing_reached_the_server_side()
    good = ends.client(spawn, *client_files(pki, "client"))  # the server goes on
    good.wait_for("Connected TCP to")
    ends.crosses(b"after the stranger")


def test_plain_frames_to_a_tls_server_reach_nothing(spawn: Spawn, pki: Pki, ends: Ends) -> None:
    server = ends.server(spawn, pki, "--persist")
    with socket.create_connection((LOOPBACK, ends.tcp), timeout=WAIT) as plain:
        plain.sendall(b"\x00\x05hello" * 100)  # the original's framing, in clear
        server.wait_for(r"Closed TCP connection from 127\.0\.0\.1/\d+: TLS handshake failed")
    assert ends.nothing_reached_the_server_side()


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (["--tls-server-name", "elsewhere.example"], "Hostname mismatch"),
        (["--tls-ca", "OTHER"], "unable to get local issuer certificate"),
    ],
)
def test_a_client_refuses_a_server_it_cannot_verify(
    spawn: Spawn, pki: Pki, ends: Ends, files: list[str], reason: str
) -> None:
    ends.server(spawn, pki, mutual=False)
    if "OTHER" in files:
        files = ["--tls-ca", str(pki.other_ca[0])]
    else:
        files = ["--tls-ca", str(pki.ca[0]), *files]
    client = ends.client(spawn, *files)
    assert client.wait() == 1
    assert reason in client.stderr
    assert client.stderr.startswith("udptunnel: TLS handshake failed: ")


class Tap:
    """A TCP relay between client and server that keeps a copy of every byte each way."""

    def __init__(self, server_port: int) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.server_port = server_port
        self.seen = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection((LOOPBACK, self.server_port))
        pumps = [
            threading.Thread(target=self._pump, args=(a, b), daemon=True)
            for a, b in ((client, server), (server, client))
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        client.close()
        server.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while data := source.recv(65536):
            self.seen += data
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("tls", [True, False])
def test_no_payload_crosses_the_wire_in_clear(spawn: Spawn, pki: Pki, tls: bool) -> None:
    ends = Ends()
    tap = Tap(ends.tcp)
    marker = os.urandom(32)
    if tls:
        ends.server(spawn, pki)
        client = ends.client(spawn, *client_files(pki, "client"), port=tap.port)
    else:
        a_udp = [
            "--udp-bind",
            f"{LOOPBACK}/{ends.a_in}",
            f"{LOOPBACK}/{ends.app_a.getsockname()[1]}",
        ]
        b_udp = [
            "--udp-bind",
            f"{LOOPBACK}/{ends.b_in}",
            f"{LOOPBACK}/{ends.app_b.getsockname()[1]}",
        ]
        server = spawn([UDPTUNNEL, "-v", "-s", str(ends.tcp), *a_udp])
        server.wait_for("Listening for TCP connections")
        client = spawn([UDPTUNNEL, "-v", "-c", f"{LOOPBACK}/{tap.port}", *b_udp])
    client.wait_for("Connected TCP to")
    ends.crosses(marker)
    client.signal()
    assert client.wait() == 0
    tap.thread.join(WAIT)
    assert (marker in tap.seen, marker[::-1] in tap.seen) == (not tls, not tls)
    tap.close()
    ends.close()


def test_flows_over_tls(spawn: Spawn, pki: Pki, ends: Ends) -> None:
    ends.server(spawn, pki, "--flows")
    client = ends.client(spawn, "--flows", *client_files(pki, "client"))
    client.wait_for("Receiving flows on UDP")
    sources = [udp_socket() for _ in range(5)]
    for number, source in enumerate(sources):
        source.sendto(b"%d" % number, (LOOPBACK, ends.b_in))
    for _ in sources:  # the server side hears each flow from its own socket ...
        data, sender = ends.app_a.recvfrom(100)
        ends.app_a.sendto(data + b" back", sender)  # ... and answers it there
    for number, source in enumerate(sources):
        assert source.recv(100) == b"%d back" % number
        source.close()


@pytest.mark.needs("setpriv")  # used only as root
def test_a_key_that_cannot_be_read_is_one_clear_line_and_exit_2(pki: Pki) -> None:
    # The key's mode 0 keeps out every user but root, who reads anything: as root, the tunnel
    # runs as nobody, and pytest's own temporary directories are closed to nobody.
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    as_user = as_nobody if os.geteuid() == 0 else []
    with tempfile.TemporaryDirectory(prefix="udptunnel-tls-") as name:
        directory = Path(name)
        directory.chmod(0o755)
        cert, key = directory / "server.pem", directory / "server.key"
        cert.write_bytes(pki.server[0].read_bytes())
        cert.chmod(0o644)
        key.write_bytes(pki.server[1].read_bytes())
        key.chmod(0o000)
        tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
        result = subprocess.run(
            [*as_user, UDPTUNNEL, *tls, "-s", "6000", "h/5000"],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
    assert (result.returncode, result.stderr) == (
        2,
        f"udptunnel: cannot read TLS key {key}: Permission denied\n",
    )


def test_stalled_connections_do_not_keep_a_client_out_of_a_tls_server(
    spawn: Spawn, pki: Pki, ends: Ends
) -> None:
    ends.server(spawn, pki, "--handshake-timeout", "5")
    stalled = [socket.create_connection((LOOPBACK, ends.tcp), timeout=WAIT) for _ in range(200)]
    for peer in stalled:
        with contextlib.suppress(ConnectionResetError):  # past 128, the oldest are reset
            peer.sendall(b"\x16")  # the first byte of a TLS record, and then nothing
    started = time.monotonic()
    client = ends.client(spawn, *client_files(pki, "client"))
    client.wait_for("Connected TCP to")
    ends.crosses(b"through the crowd")
    # A process start, a handshake and a datagram; a server that shook hands with the
    # first to come would have held the client out for the whole handshake timeout.
    assert time.monotonic() - started < 4.0
    for peer in stalled:  # every stalled one was reset once the client got in
        with contextlib.suppress(ConnectionResetError):
            assert peer.recv(100) == b""
        peer.close()


def test_rtp_and_persist_over_tls(spawn: Spawn, pki: Pki) -> None:
    tcp, a_in, b_in = free_even_port(), free_even_port(), free_even_port()
    app_a, app_b = free_even_port(), free_even_port()
    behind = [udp_socket(LOOPBACK, app_a + offset) for offset in (0, 1)]
    apps = [udp_socket(LOOPBACK, app_b + offset) for offset in (0, 1)]
    server_tls = ["--tls-cert", str(pki.server[0]), "--tls-key", str(pki.server[1])]
    server_tls += ["--tls-ca", str(pki.ca[0])]
    server_udp = ["--udp-bind", f"{LOOPBACK}/{a_in}", f"{LOOPBACK}/{app_a}"]
    server = spawn([UDPTUNNEL, "-v", "-r", "--persist", *server_tls, "-s", str(tcp), *server_udp])
    server.wait_for("Listening for TCP connections")
    client_udp = ["--udp-bind", f"{LOOPBACK}/{b_in}", f"{LOOPBACK}/{app_b}"]
    tls = ["--tls", *client_files(pki, "client")]
    for round_ in (1, 2):  # the persistent server takes a second client after the first
        client = spawn([UDPTUNNEL, "-v", "-r", *tls, "-c", f"{LOOPBACK}/{tcp}", *client_udp])
        client.wait_for("Connected TCP to", nth=2)
        for offset in (0, 1):
            apps[offset].sendto(b"%d/%d" % (round_, offset), (LOOPBACK, b_in + offset))
            assert behind[offset].recv(100) == b"%d/%d" % (round_, offset)
            behind[offset].sendto(b"back", (LOOPBACK, a_in + offset))
            assert apps[offset].recv(100) == b"back"
        client.signal()
        assert client.wait() == 0
    for sock in behind + apps:
        sock.close()
