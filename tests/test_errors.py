"""Errors that name their cause: each bad input, and each way a server turns a client away,
gives its own one line and exit status, never a traceback, and the server logs why at -v.

Real processes on loopback; the certificates are made with openssl, as test_tls.py makes
them."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .conftest import ORIGINAL, UDPTUNNEL, WAIT, Process, free_port, udp_socket
from .test_tls import Pki, pki  # noqa: F401 (a fixture)

LOOPBACK = "127.0.0.1"
Spawn = type[Process]
SLOW = "30"  # seconds of handshake timeout: a case that ends sooner did not wait for it
AT_ONCE = 5.0  # seconds: what "at once" allows for, well under SLOW
BUSY = (
    r" \(the server ended it at once: is it busy with another client or at --max-flows, "
    r"does it {} or is it not udptunnel\? Its log at -v says which\)"
)
PLAIN_BUSY = BUSY.format(r"expect TLS \(--tls\),")
TLS_BUSY = BUSY.format("refuse our certificate or not use TLS,")
PEER = r"127\.0\.0\.1/\d+"
pytestmark = pytest.mark.needs("openssl")


def one_error(process: Process, status: int) -> str:
    """The process's one error line, once it has exited with ``status``."""
    assert process.wait() == status, process.stderr
    assert "Traceback" not in process.stderr
    errors = [line for line in process.lines if line.startswith("udptunnel: ")]
    assert len(errors) == 1, process.stderr
    return errors[0].removeprefix("udptunnel: ")


@dataclass
class Ends:
    """Ports for a server and its clients on loopback, and the certificates."""

    pki: Pki
    tcp: int
    app: socket.socket  # behind the server

    def tls(self, which: str) -> list[str]:
        """A TLS client's options: verify the server by the CA, and present ``which``."""
        files = ["--tls", "--tls-ca", str(self.pki.ca[0])]
        if which == "wrong-ca":
            return ["--tls", "--tls-ca", str(self.pki.other_ca[0])]
        if which != "none":
            cert, key = getattr(self.pki, which)
            files += ["--tls-cert", str(cert), "--tls-key", str(key)]
        return files

    def server(self, spawn: Spawn, *flags: str, tls: str = "plain") -> Process:
        """A server: "plain", "tls", or "mutual" (it demands a certificate from the CA)."""
        files = []
        if tls != "plain":
            files = ["--tls-cert", str(self.pki.server[0]), "--tls-key", str(self.pki.server[1])]
        if tls == "mutual":
            files += ["--tls-ca", str(self.pki.ca[0])]
        udp = ["--udp-bind", f"{LOOPBACK}/{free_port()}", f"{LOOPBACK}/{self.app.getsockname()[1]}"]
        server = spawn([UDPTUNNEL, "-v", *files, *flags, "-s", str(self.tcp), *udp])
        server.wait_for("Listening for TCP connections")
        return server

    def client(self, spawn: Spawn, *flags: str, port: int = 0) -> tuple[Process, int]:
        """A client (with -v, so that it says when it is connected), and where it takes
        datagrams in."""
        bind = free_port()
        argv = [UDPTUNNEL, "-v", *flags, "-c", f"{LOOPBACK}/{port or self.tcp}"]
        return spawn([*argv, "--udp-bind", f"{LOOPBACK}/{bind}", f"{LOOPBACK}/9"]), bind


@pytest.fixture
def ends(pki: Pki) -> Iterator[Ends]:  # noqa: F811 (the fixture imported above)
    app = udp_socket()
    yield Ends(pki, free_port(), app)
    app.close()


@dataclass(frozen=True)
class Refusal:
    """A client turned away: the server's kind and options, the client's options, and what
    each says."""

    server: str  # "plain", "tls" or "mutual"
    client: str  # "plain", or the certificate a TLS client presents (Ends.tls)
    says: str  # the client's one line, a regular expression
    logs: str  # the server's line at -v, a regular expression
    flags: tuple[str, ...] = ()  # the server's
    busy: bool = False  # another client is in first
    send: bool = False  # the client has a datagram to send once connected


REFUSALS = {
    "no client certificate": Refusal(
        "mutual",
        "none",
        r"the server requires a client certificate \(--tls-cert/--tls-key\)",
        rf"Closed TCP connection from {PEER}: TLS handshake failed: the client sent no "
        r"certificate",
    ),
    "a self-signed client certificate": Refusal(
        "mutual",
        "stranger",
        r"the server refused our certificate: unknown CA",
        rf"Closed TCP connection from {PEER}: TLS handshake failed: the client's certificate "
        r"failed verification: self-signed certificate",
    ),
    "a client certificate from another CA": Refusal(
        "mutual",
        "foreign",
        r"the server refused our certificate: unknown CA",
        r"TLS handshake failed: the client's certificate failed verification: unable to get "
        r"local issuer certificate",
    ),
    "a server certificate the client cannot verify": Refusal(
        "tls",
        "wrong-ca",
        r"TLS handshake failed: the server's certificate failed verification: unable to get "
        r"local issuer certificate",
        rf"Closed TCP connection from {PEER}: TLS handshake failed: the client refused our "
        r"certificate: unknown CA",
    ),
    "a plain client at a TLS server, with a datagram": Refusal(
        "tls",
        "plain",
        r"the server speaks TLS: start this client with --tls",
        rf"Closed TCP connection from {PEER}: TLS handshake failed: the client does not speak "
        r"TLS \(is it started without --tls\?\)",
        ("--handshake-timeout", SLOW),
        send=True,
    ),
    "a plain client at a TLS server, silent": Refusal(
        "tls",
        "plain",
        r"the server speaks TLS: start this client with --tls",
        rf"Closed TCP connection from {PEER}: nothing useful in 1 s \(not a byte: is the "
        r"client started without --tls\?\)",
        ("--handshake-timeout", "1"),
    ),
    "a TLS client at a plain server": Refusal(
        "plain",
        "client",
        r"TLS handshake failed: the server closed the connection \(is it started with --tls\?\)",
        r"Tunnel lost: the client speaks TLS, and this end is not started with --tls",
        ("--persist",),
    ),
    "a second plain client": Refusal(
        "plain",
        "plain",
        rf"(cannot connect to TCP {LOOPBACK}/\d+|TCP connection lost while receiving): "
        rf"Connection reset by peer{PLAIN_BUSY}",
        rf"Refused TCP connection from {PEER}: tunnel busy",
        busy=True,
    ),
    "a second TLS client": Refusal(
        "tls",
        "client",
        rf"(cannot connect to TCP {LOOPBACK}/\d+|TLS handshake failed): Connection reset by "
        rf"peer{TLS_BUSY}",
        rf"Refused TCP connection from {PEER}: tunnel busy",
        busy=True,
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_client_is_told_why_or_the_likely_causes(
    spawn: Spawn, ends: Ends, case: Refusal
) -> None:
    server = ends.server(spawn, *case.flags, tls=case.server)
    tls = [] if case.client == "plain" else ends.tls(case.client)
    if case.busy:
        first, _ = ends.client(spawn, *(ends.tls("client") if tls else []))
        first.wait_for("Connected TCP to")
        server.wait_for("TCP connection from")
    started = time.monotonic()
    client, bind = ends.client(spawn, "--handshake-timeout", SLOW, *tls)
    if case.send:
        client.wait_for("Connected TCP to")
        with udp_socket() as app:
            app.sendto(b"hello", (LOOPBACK, bind))
            assert re.fullmatch(case.says, one_error(client, 1)), client.stderr
    else:
        assert re.fullmatch(case.says, one_error(client, 1)), client.stderr
    assert time.monotonic() - started < AT_ONCE  # neither end waited out a handshake
    server.wait_for(case.logs)
    assert server.proc.poll() is None  # the server goes on


@pytest.mark.original
def test_a_tls_client_at_the_original_is_asked_whether_it_speaks_tls(
    spawn: Spawn, ends: Ends
) -> None:
    original = spawn([ORIGINAL, "-v", "-s", str(ends.tcp), f"{LOOPBACK}/{free_port()}"])
    original.wait_for("Listening for TCP connections on port")
    client, _ = ends.client(spawn, "--handshake-timeout", "1", *ends.tls("client"))
    assert one_error(client, 1) == (
        "TLS handshake unfinished after 1 s (is the server started with --tls?)"
    )


def test_a_flow_refused_at_max_flows_is_logged_with_the_likely_causes(
    spawn: Spawn, ends: Ends
) -> None:
    server = ends.server(spawn, "--flows", "--max-flows", "1")
    client, bind = ends.client(spawn, "--flows")
    client.wait_for("Receiving flows on UDP")
    with udp_socket() as first, udp_socket() as second:
        first.sendto(b"first", (LOOPBACK, bind))  # takes the server's one flow, and keeps it
        assert ends.app.recv(100) == b"first"
        second.sendto(b"second", (LOOPBACK, bind))
        server.wait_for(rf"Refused TCP connection from {PEER}: too many flows \(--max-flows 1\)")
        line = client.wait_for(rf"Flow from 127\.0\.0\.1/{second.getsockname()[1]} lost: .*")
    assert re.fullmatch(
        rf"Flow from {PEER} lost: (cannot connect to TCP {LOOPBACK}/\d+|TCP connection lost "
        rf"while (receiving|sending)): Connection reset by peer{PLAIN_BUSY}",
        line[0],
    )


BAD_VALUES = {  # --allow-from: "/" is a prefix length, ":" a port
    "10.0.0.0/33": "'10.0.0.0/33': prefix length 33 is over 32; for port 33, write 10.0.0.0:33",
    "192.0.2.7/5000": (
        "'192.0.2.7/5000': prefix length 5000 is over 32; for port 5000, write 192.0.2.7:5000"
    ),
    "::1/129": "'::1/129': prefix length 129 is over 128; for port 129, write [::1]:129",
    "192.0.2.7/24": (
        "'192.0.2.7/24': 192.0.2.7 is not the first address of a /24 network (that is "
        "192.0.2.0/24); for port 24, write 192.0.2.7:24"
    ),
    "10.0.0.0/8/53": "'10.0.0.0/8/53': a port follows a colon: 10.0.0.0/8:53",
    "2001:db8::/32/443": "'2001:db8::/32/443': a port follows a colon: [2001:db8::/32]:443",
}


@pytest.mark.parametrize(("rule", "message"), BAD_VALUES.items(), ids=BAD_VALUES.keys())
def test_a_bad_allow_from_is_one_line_and_exit_2(rule: str, message: str) -> None:
    result = subprocess.run(
        [UDPTUNNEL, "--allow-from", rule, "-s", "6000", f"{LOOPBACK}/5000"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert (result.returncode, result.stderr) == (2, f"udptunnel: {message}\n")
