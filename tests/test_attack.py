"""Found by attacking the program as a hostile peer and a careless operator: each test is a
case that once broke a promise (one line per error, the right exit status), kept so that it
stays fixed.

Real processes on loopback; the certificates are made with openssl, as test_tls.py makes
them."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import UDPTUNNEL, WAIT, Process, free_even_port, free_port
from .test_tls import Pki, new_key, openssl, pki  # noqa: F401 (a fixture)

LOOPBACK = "127.0.0.1"
Spawn = type[Process]
BUSY = "the server ended it at once: is it busy with another client"


def errors(process: Process) -> list[str]:
    """The lines the process printed as errors or failures it survived."""
    return [line for line in process.lines if line.startswith("udptunnel: ")]


def rtp_end(spawn: Spawn, *flags: str) -> Process:
    """An RTP tunnel end on loopback, with ports of its own for UDP."""
    bind, udp = free_even_port(), free_even_port()
    return spawn(
        [UDPTUNNEL, "-v", "-r", *flags, "--udp-bind", f"{LOOPBACK}/{bind}", f"{LOOPBACK}/{udp}"]
    )


def busy_rtp_server(spawn: Spawn) -> tuple[Process, int]:
    """An RTP server whose first client is in: the server, and its TCP port."""
    tcp = free_even_port()
    server = rtp_end(spawn, "-s", f"{LOOPBACK}/{tcp}")
    server.wait_for("Listening for TCP connections on port", nth=2)
    first = rtp_end(spawn, "-c", f"{LOOPBACK}/{tcp}")
    first.wait_for("Connected TCP to", nth=2)
    return server, tcp


def test_a_second_rtp_client_is_refused_in_one_line(spawn: Spawn) -> None:
    """Both of its connections are reset at once: one refusal, one line (it was two).

    The client makes its two connections one after the other: on a loaded machine the reset
    of the first can come before its connect returns, which then fails, and the second is
    never made (CI saw it). So the server logs one refusal or two; the client, one line."""
    server, tcp = busy_rtp_server(spawn)
    second = rtp_end(spawn, "-c", f"{LOOPBACK}/{tcp}")
    assert second.wait() == 1
    assert "Traceback" not in second.stderr
    assert len(errors(second)) == 1, second.stderr
    assert BUSY in errors(second)[0]
    server.wait_for("Refused TCP connection from .*: tunnel busy")
    assert server.proc.poll() is None


def test_a_persistent_rtp_client_refused_says_so_once_per_attempt(spawn: Spawn) -> None:
    _, tcp = busy_rtp_server(spawn)
    second = rtp_end(spawn, "--persist", "-c", f"{LOOPBACK}/{tcp}")
    second.wait_for("Reconnecting in")  # logged after every line about the lost tunnel
    # The refusal comes as the connection is made (cannot connect: ...) or just after (Tunnel
    # lost: ...), by when the reset lands: either way, one line for the attempt.
    refusals = [line for line in errors(second) if BUSY in line]
    assert len(refusals) == 1, second.stderr


# TLS files that are not what they should be: the line names the file and what is wrong
# with it, in words (it was "CERT, KEY: not a TLS certificate and its private key (None)").


@pytest.fixture(scope="module")
def files(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The good files by name, and bad ones: not PEM, empty, a certificate cut short, a key
    of another certificate, a key of another type (RSA for an EC certificate)."""
    cwd = tmp_path_factory.mktemp("bad-pem")
    junk, empty, short = cwd / "junk.pem", cwd / "empty.pem", cwd / "short.pem"
    junk.write_text("this is not PEM\n")
    empty.write_bytes(b"")
    short.write_bytes(pki.server[0].read_bytes()[:300])
    rsa = cwd / "rsa.key"
    openssl(
        "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", rsa, cwd=cwd
    )
    return {
        "cert": pki.server[0],
        "key": pki.server[1],
        "ca": pki.ca[0],
        "other key": new_key("other", cwd),
        "rsa key": rsa,
        "junk": junk,
        "empty": empty,
        "short": short,
    }


BAD_FILES = {  # --tls-cert, --tls-key, --tls-ca: the message, with {cert}, {key}, {ca}
    "a certificate that is not PEM": ("junk", "key", None, "{cert}: not a TLS certificate (PEM)"),
    "an empty certificate": ("empty", "key", None, "{cert}: not a TLS certificate (PEM)"),
    "a certificate cut short": ("short", "key", None, "{cert}: not a TLS certificate (PEM)"),
    "the key given as the certificate": (
        "key",
        "cert",
        None,
        "{cert}: not a TLS certificate (PEM)",
    ),
    "a key that is not PEM": ("cert", "junk", None, "{key}: not a private key (PEM)"),
    "an empty key": ("cert", "empty", None, "{key}: not a private key (PEM)"),
    "another certificate's key": ("cert", "other key", None, "{key}: not the key of {cert}"),
    "a key of another type": ("cert", "rsa key", None, "{key}: not the key of {cert}"),
    "CA certificates that are not PEM": ("cert", "key", "junk", "{ca}: no CA certificate in it"),
    "CA certificates cut short": ("cert", "key", "short", "{ca}: no CA certificate in it"),
}


@pytest.mark.needs("openssl")
@pytest.mark.parametrize(("cert", "key", "ca", "message"), BAD_FILES.values(), ids=BAD_FILES)
def test_a_bad_tls_file_is_named_with_what_is_wrong(
    files: dict[str, Path], cert: str, key: str, ca: str | None, message: str
) -> None:
    named = {"cert": files[cert], "key": files[key], "ca": files[ca] if ca else None}
    argv = [UDPTUNNEL, "--tls-cert", str(named["cert"]), "--tls-key", str(named["key"])]
    if ca:
        argv += ["--tls-ca", str(named["ca"])]
    result = subprocess.run(
        [*argv, "-s", f"{LOOPBACK}/{free_port()}", f"{LOOPBACK}/9"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    expected = "udptunnel: " + message.format(**named) + "\n"
    assert (result.returncode, result.stderr) == (2, expected)


# A client at a port where another service listens, one that answers with something other
# than frames and closes (an HTTP server answering the first datagram with 400 Bad Request).


class NotUdptunnel:
    """A TCP server on loopback that answers every connection's first bytes with an HTTP
    error and closes it."""

    ANSWER = b"HTTP/1.0 400 Bad request\r\nContent-Length: 0\r\n\r\n"

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.sock.accept()
        except OSError:  # closed
            return
        with connection:
            connection.recv(100)
            connection.sendall(self.ANSWER)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(WAIT)


@pytest.fixture
def other_service() -> Iterator[NotUdptunnel]:
    service = NotUdptunnel()
    yield service
    service.close()


def test_a_client_at_another_service_is_told_and_exits_1(
    spawn: Spawn, other_service: NotUdptunnel
) -> None:
    bind = free_port()
    client = spawn(
        [
            UDPTUNNEL,
            "-v",
            "-c",
            f"{LOOPBACK}/{other_service.port}",
            "--udp-bind",
            f"{LOOPBACK}/{bind}",
            f"{LOOPBACK}/9",
        ]
    )
    client.wait_for("Connected TCP to")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app:
        app.sendto(b"GET / HTTP/1.0\r\n\r\n", (LOOPBACK, bind))
        assert client.wait() == 1
    assert len(errors(client)) == 1, client.stderr
    assert "udptunnel?" in errors(client)[0]
