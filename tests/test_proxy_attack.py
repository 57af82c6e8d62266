"""Attacks on ``--proxy``: hostile and odd proxies on loopback, and careless URLs.

Each fake proxy here is a thread in the test that accepts on a loopback port and does one
odd thing; the tunnel's two ends are real ``udptunnel`` processes. What must hold: a proxy
that answers at its own pace, in as many pieces as it likes, hands over a tunnel whose every
byte is the server's; a proxy that never finishes answering is bounded by
``--connect-timeout``; a bad URL or credential is one line, exit status 2, no traceback, and
shows neither the user nor the password.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from udptunnel.errors import ConfigError
from udptunnel.proxy import ProxyError, connect_request, reply_head_end, reply_status

from .conftest import UDPTUNNEL, WAIT, Process, free_port, udp_socket
from .proxies import each_connection

Spawn = type[Process]
Behaviour = Callable[[socket.socket, int], None]  # the client's connection, the server's port
SECRET_USER, SECRET = "alice-the-user", "hunter2-secret"
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
PAUSE = 0.05  # seconds between a hostile proxy's pieces: enough for each to be its own read


# The reply reader, without sockets ---------------------------------------------------------


REPLIES = [
    OK,
    b"HTTP/1.0 200 OK\r\nVia: 1.1 squid\r\nProxy-Agent: x\r\n\r\n",
    b"HTTP/1.1 200 OK\n\n",
    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 9\r\n\r\n",
]


@pytest.mark.parametrize("head", REPLIES)
def test_the_reply_head_is_found_at_every_split_and_nothing_after_it_is_taken(head: bytes) -> None:
    tunnel = b"\x00\x05hello\x00\x00"  # the server's first frames, right behind the head
    data = head + tunnel
    for cut in range(len(data) + 1):
        seen = data[:cut]
        expected = len(head) if cut >= len(head) else None
        assert reply_head_end(seen) == expected, cut


@pytest.mark.parametrize(
    "data",
    [b"SSH-2.0-OpenSSH_9.2p1\r\n", b"\x05\x00", b"HTTP/1.1 abc\r\n", b"<html>\r\n\r\n", b"H\x00"],
)
def test_what_is_not_an_http_reply_is_known_at_once(data: bytes) -> None:
    with pytest.raises(ProxyError, match="Invalid status line"):
        reply_head_end(data)


def test_a_head_that_never_ends_is_refused_once_too_long() -> None:
    with pytest.raises(ProxyError, match="too long"):
        reply_head_end(b"HTTP/1.1 200 OK\r\n" + b"X-Junk: y\r\n" * 10_000)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (OK, (200, "200 Connection established")),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", (403, "403 Forbidden")),
        (b"HTTP/1.0 502 Bad \x1b[31mGateway\r\n\r\n", (502, "502 Bad ?[31mGateway")),
        (b"HTTP/1.1 200\r\n\r\n", (200, "200")),
    ],
)
def test_the_status_and_its_printable_words(head: bytes, status: tuple[int, str]) -> None:
    assert reply_status(head) == status


def test_the_request_carries_utf8_credentials_and_brackets_an_ipv6_server() -> None:
    request = connect_request("fd00::2", 6000, "al", "p€w")
    token = base64.b64encode("al:p€w".encode()).decode()
    assert request.startswith(b"CONNECT [fd00::2]:6000 HTTP/1.1\r\nHost: [fd00::2]:6000\r\n")
    assert f"Proxy-Authorization: Basic {token}\r\n".encode() in request
    assert request.endswith(b"\r\n\r\n")
    assert b"Proxy-Authorization" not in connect_request("gw.example.org", 443, None, None)


def test_a_server_name_that_could_carry_a_header_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a valid name"):
        connect_request("gw.example.org\r\nX-Evil: 1", 443, None, None)


# Hostile proxies on loopback ---------------------------------------------------------------


def _relay(client: socket.socket, server_port: int) -> None:
    """Carry bytes both ways between ``client`` and the server, until either ends."""

    def pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    with socket.create_connection(("127.0.0.1", server_port), timeout=WAIT) as upstream:
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)


def _read_request(conn: socket.socket) -> bytes:
    request = b""
    while b"\r\n\r\n" not in request:
        if not (data := conn.recv(1)):
            break
        request += data
    return request


@contextlib.contextmanager
def fake_proxy(
    behaviour: Behaviour, server_port: int, *, http: bool = True
) -> Iterator[tuple[int, list[bytes]]]:
    """A proxy on loopback that reads each HTTP request (if ``http``) and then does
    ``behaviour``; yields its port and the requests it has read."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            if http:
                requests.append(_read_request(conn))
            behaviour(conn, server_port)

    port = listener.getsockname()[1]
    with each_connection(listener, handle):
        yield port, requests


def in_pieces(*pieces: bytes) -> Behaviour:
    """Answer in ``pieces``, each its own segment after a pause, then carry the tunnel."""

    def behaviour(conn: socket.socket, server_port: int) -> None:
        for piece in pieces:
            conn.sendall(piece)
            time.sleep(PAUSE)  # the behaviour under test: each piece its own TCP segment
        _relay(conn, server_port)

    return behaviour


class Tunnel:
    """A udptunnel server on loopback, and an application behind it."""

    def __init__(self, spawn: Spawn) -> None:
        self.port, self.server_in, self.client_in = free_port(), free_port(), free_port()
        self.server_app, self.client_app = udp_socket(), udp_socket()
        self.server = spawn(
            [UDPTUNNEL, "-v", "-s", str(self.port), "--udp-bind",
             f"127.0.0.1/{self.server_in}", f"127.0.0.1/{self.server_app.getsockname()[1]}"]
        )  # fmt: skip
        self.server.wait_for("Listening for TCP connections")
        self.spawn = spawn

    def client(self, url: str, *flags: str, verbosity: str = "-v") -> Process:
        return self.spawn(
            [UDPTUNNEL, verbosity, "--connect-timeout", "3", *flags, "--proxy", url, "-c",
             f"127.0.0.1/{self.port}", "--udp-bind", f"127.0.0.1/{self.client_in}",
             f"127.0.0.1/{self.client_app.getsockname()[1]}"]
        )  # fmt: skip

    def crosses(self, count: int = 5) -> None:
        for n in range(count):
            self.client_app.sendto(b"up %d" % n, ("127.0.0.1", self.client_in))
            assert self.server_app.recv(100) == b"up %d" % n
            self.server_app.sendto(b"down %d" % n, ("127.0.0.1", self.server_in))
            assert self.client_app.recv(100) == b"down %d" % n

    def carries_through(self, url: str) -> None:
        """A client through ``url`` connects, carries datagrams both ways, and stops cleanly."""
        client = self.client(url)
        client.wait_for("Connected TCP to .* through the proxy")
        self.server.wait_for("TCP connection from")
        self.crosses()
        client.signal()
        assert client.wait() == 0, client.stderr

    def close(self) -> None:
        self.server_app.close()
        self.client_app.close()


@pytest.fixture
def tunnel(spawn: Spawn) -> Iterator[Tunnel]:
    ends = Tunnel(spawn)
    yield ends
    ends.close()


SPLIT_REPLIES = {
    "the status line, then the headers, then the blank line": in_pieces(
        b"HTTP/1.1 200 Connection established\r\n", b"Via: 1.1 fake\r\n", b"\r\n"
    ),
    "the blank line's last byte alone": in_pieces(b"HTTP/1.1 200 OK\r\n\r", b"\n"),
    "byte by byte": in_pieces(*(bytes([b]) for b in b"HTTP/1.0 200 OK\r\n\r\n")),
}


@pytest.mark.parametrize("case", SPLIT_REPLIES)
def test_a_reply_in_pieces_leaves_the_tunnel_intact(tunnel: Tunnel, case: str) -> None:
    """python-socks read the reply with one recv: the rest of it became tunnel data, read as
    a frame's length, and every datagram from the server was lost behind it."""
    with fake_proxy(SPLIT_REPLIES[case], tunnel.port) as (port, _):
        tunnel.carries_through(f"http://127.0.0.1:{port}")


def test_tunnel_bytes_right_behind_the_reply_are_the_first_datagram(tunnel: Tunnel) -> None:
    """The server may send at once: its first frame can arrive in the reply's segment."""

    def behaviour(conn: socket.socket, server_port: int) -> None:
        conn.sendall(OK + b"\x00\x05first")  # a frame the server might have sent at once
        _relay(conn, server_port)

    with fake_proxy(behaviour, tunnel.port) as (port, _):
        client = tunnel.client(f"http://127.0.0.1:{port}")
        client.wait_for("Connected TCP to .* through the proxy")
        assert tunnel.client_app.recv(100) == b"first"
        tunnel.server.wait_for("TCP connection from")
        tunnel.crosses()
        client.signal()
        assert client.wait() == 0, client.stderr


def _endless_headers(conn: socket.socket, server_port: int) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        conn.sendall(b"X-Junk: y\r\n")
        time.sleep(0.001)  # a proxy that talks for ever, not a flood: the pace is its own


def _slow(conn: socket.socket, server_port: int) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: yes\r\n\r\n":
        conn.sendall(bytes([byte]))
        time.sleep(1.0)  # the behaviour under test: a proxy that answers a byte a second


def _407_huge(conn: socket.socket, server_port: int) -> None:
    conn.sendall(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 50000000\r\n\r\n"
        + b"x" * 50_000_000
    )


HOSTILE = {
    "headers forever": (_endless_headers, r"the proxy .* does not speak HTTP CONNECT: .*too long"),
    "one byte a second": (_slow, r"cannot connect to TCP .* through the proxy .*: no answer in 3"),
    "a 407 with a huge body": (_407_huge, r"the proxy .* requires credentials \(407 .*"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_a_proxy_that_never_finishes_its_reply_is_bounded(tunnel: Tunnel, case: str) -> None:
    behaviour, line = HOSTILE[case]
    with fake_proxy(behaviour, tunnel.port) as (port, _):
        started = time.monotonic()
        client = tunnel.client(f"http://127.0.0.1:{port}", verbosity="-vv")
        status = client.wait(WAIT)
    errors = [x.removeprefix("udptunnel: ") for x in client.lines if x.startswith("udptunnel: ")]
    assert (status, len(errors)) == (1, 1), client.stderr
    assert re.match(line, errors[0]), errors[0]
    assert time.monotonic() - started < 3 + 2  # --connect-timeout, and the process's start
    assert "Traceback" not in client.stderr


def test_non_latin1_credentials_reach_the_proxy_as_utf8(tunnel: Tunnel) -> None:
    """python-socks encoded Basic credentials in Latin-1 and crashed on anything else."""
    with fake_proxy(in_pieces(OK), tunnel.port) as (port, requests):
        client = tunnel.spawn(
            [UDPTUNNEL, "-vv", "--connect-timeout", "3", "--proxy", f"http://al@127.0.0.1:{port}",
             "-c", f"127.0.0.1/{tunnel.port}", "--udp-bind", f"127.0.0.1/{tunnel.client_in}",
             f"127.0.0.1/{tunnel.client_app.getsockname()[1]}"],
            prefix=["env", "UDPTUNNEL_PROXY_PASSWORD=p€w ✓"],
        )  # fmt: skip
        client.wait_for("Connected TCP to .* through the proxy")
        tunnel.crosses(1)
        client.signal()
        assert client.wait() == 0, client.stderr
    token = base64.b64encode("al:p€w ✓".encode()).decode()
    assert f"Proxy-Authorization: Basic {token}\r\n".encode() in requests[0]
    assert "p€w" not in client.stderr


def _socks5(bound: bytes) -> Behaviour:
    """A SOCKS5 proxy without authentication whose success reply names ``bound``."""

    def behaviour(conn: socket.socket, server_port: int) -> None:
        conn.recv(3)  # version 5, one method: none
        conn.sendall(b"\x05\x00")
        request = conn.recv(4)
        kind = request[3]
        conn.recv({1: 6, 4: 18}.get(kind) or conn.recv(1)[0] + 2)
        conn.sendall(b"\x05\x00\x00" + bound + b"\x00\x00")
        _relay(conn, server_port)

    return behaviour


BOUND = {
    "IPv4": b"\x01" + bytes(4),
    "IPv6": b"\x04" + bytes(16),
    "a domain": b"\x03\x05proxy",
    "an empty domain": b"\x03\x00",
}


@pytest.mark.parametrize("case", BOUND)
def test_each_kind_of_socks5_bound_address_leaves_the_tunnel_intact(
    tunnel: Tunnel, case: str
) -> None:
    with fake_proxy(_socks5(BOUND[case]), tunnel.port, http=False) as (port, _):
        tunnel.carries_through(f"socks5://127.0.0.1:{port}")


def test_a_socks5_bound_name_that_is_no_text_is_one_line(tunnel: Tunnel) -> None:
    """python-socks decoded the bound name as UTF-8 and let the error out: a traceback."""
    with fake_proxy(_socks5(b"\x03\x04\xff\xfe\xfd\xfc"), tunnel.port, http=False) as (port, _):
        client = tunnel.client(f"socks5://127.0.0.1:{port}", verbosity="-vv")
        status = client.wait(WAIT)
    errors = [x for x in client.lines if x.startswith("udptunnel: ")]
    assert (status, len(errors)) == (1, 1), client.stderr
    assert re.fullmatch(r"udptunnel: the proxy .* does not speak SOCKS5: .*", errors[0])
    assert "Traceback" not in client.stderr


def test_a_proxy_name_that_does_not_resolve_says_so(tunnel: Tunnel) -> None:
    client = tunnel.client("http://proxy.invalid:3128")
    assert client.wait(WAIT) == 1
    (error,) = [x for x in client.lines if x.startswith("udptunnel: ")]
    assert "Unknown error" not in error
    assert re.fullmatch(
        r"udptunnel: cannot connect to the proxy http://proxy.invalid:3128: "
        r"(Name or service not known|Temporary failure in name resolution|.*not known.*)",
        error,
    ), error


# Careless URLs and credentials: one line, exit status 2, nothing secret --------------------

LONG = "h" * 70
BAD_URLS = {
    "a bad port": (f"http://{SECRET_USER}:{SECRET}@proxy.example:abc", "invalid port"),
    "a port out of range": (f"http://{SECRET_USER}:{SECRET}@proxy.example:99999", "invalid port"),
    "no port": (f"socks5://{SECRET_USER}:{SECRET}@proxy.example", "a port is needed"),
    "another scheme": (f"ftp://{SECRET_USER}:{SECRET}@proxy.example:1", "expected http://"),
    "no scheme": (f"{SECRET_USER}:{SECRET}@proxy.example:1", "expected http://"),
    "a path": (f"http://{SECRET_USER}:{SECRET}@proxy.example:1/x", "nothing may follow"),
    "a raw '/' in the password": (f"http://{SECRET_USER}:{SECRET}/x@proxy.example:1", ""),
    "a raw '#' in the password": (f"http://{SECRET_USER}:{SECRET}#x@proxy.example:1", ""),
    "a label too long": (f"http://{LONG}.example:3128", "not a valid name or address"),
    "a name too long": (f"http://{'h.' * 130}example:3128", "not a valid name or address"),
    "a space in the host": ("http://proxy example:3128", "not a valid name or address"),
    "an empty user": (f"http://:{SECRET}@proxy.example:3128", "the proxy user is empty"),
    "':' in an HTTP user": (
        f"http://{SECRET_USER}%3Ax:{SECRET}@proxy.example:3128", "may not contain ':'"
    ),
    "a SOCKS5 password not in ASCII": (
        f"socks5://{SECRET_USER}:{SECRET}%C3%A9@127.0.0.1:1080", "1 to 255 ASCII characters"
    ),
    "a SOCKS5 user not in ASCII": (
        f"socks5h://%C3%A9{SECRET_USER}:{SECRET}@127.0.0.1:1080", "1 to 255 ASCII characters"
    ),
    "a SOCKS5 user too long": (
        f"socks5://{SECRET_USER * 20}:{SECRET}@127.0.0.1:1080", "1 to 255 ASCII characters"
    ),
    "a SOCKS5 password too long": (
        f"socks5://{SECRET_USER}:{SECRET * 20}@127.0.0.1:1080", "1 to 255 ASCII characters"
    ),
}  # fmt: skip


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UDPTUNNEL, "-vv", "--connect-timeout", "1", *argv, "-c", "127.0.0.1/6000",
         "--udp-bind", f"127.0.0.1/{free_port()}", "127.0.0.1/9"],
        capture_output=True, text=True, check=False, timeout=WAIT,
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


@pytest.mark.parametrize("case", BAD_URLS)
def test_a_bad_proxy_url_is_one_line_that_shows_no_credentials(case: str) -> None:
    url, complaint = BAD_URLS[case]
    results = [_run(["--proxy", url])]
    if "://" in url:  # in the environment, a URL without a scheme is http://
        results.append(_run(["--proxy", "env"], https_proxy=url))
    for result in results:
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("udptunnel: ") and complaint in line, line
        assert SECRET not in line and SECRET_USER not in line, line


def test_a_socks5_password_from_the_environment_is_checked_too() -> None:
    result = _run(
        ["--proxy", f"socks5://{SECRET_USER}@127.0.0.1:1080"], UDPTUNNEL_PROXY_PASSWORD="é" + SECRET
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "1 to 255 ASCII characters" in line and SECRET not in line, line


@pytest.mark.parametrize("server", [f"{LONG}.example", "gw.exa mple.org"])
def test_a_server_name_only_the_proxy_would_resolve_is_checked_here(server: str) -> None:
    """A name the proxy resolves is never resolved here: python-socks crashed on a label
    too long, and a CONNECT line could have carried anything."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for scheme in ("http", "socks5h"):
            result = subprocess.run(
                [UDPTUNNEL, "--connect-timeout", "1", "--proxy", f"{scheme}://127.0.0.1:{port}",
                 "-c", f"{server}/6000", "--udp-bind", f"127.0.0.1/{free_port()}", "127.0.0.1/9"],
                capture_output=True, text=True, check=False, timeout=WAIT,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert result.stderr == f"udptunnel: {server}: TCP host unknown (not a valid name)\n"
