"""Through the proxies that real firewalls impose: HTTP CONNECT and SOCKS5 on the client.

The proxies are Debian's own (squid, tinyproxy, dante, OpenSSH's ``ssh -D``), started by
tests/proxies.py in a network where the client's host has no route to the server's except
through the proxy's host, so nothing reaches the server around a proxy.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from udptunnel.config import parse_proxy, proxy_from_environment
from udptunnel.errors import ConfigError

from . import test_examples as examples
from . import test_tls as tls
from .conftest import BIN, UDPTUNNEL, WAIT, Process, free_port
from .netns import Namespace
from .proxies import (
    DANTE_PORT,
    INSIDE_NAME,
    PASSWORD,
    PROXY_IN,
    PROXY_OUT,
    SERVER,
    SERVER_NAME,
    SOCKS_USER,
    SQUID_PORT,
    SSH_SOCKS_PORT,
    TINYPROXY_PORT,
    TUNNEL_PORT,
    USER,
    Firewall,
    each_connection,
    open_firewall,
    run_dante,
    run_squid,
    run_ssh_socks,
    run_tinyproxy,
)

Spawn = type[Process]
DATAGRAMS = 1000  # each way, through each proxy
PATH = "/usr/bin:/bin"  # a shell's, after this environment's bin
SERVER_APP, SERVER_IN = 5000, 5001  # the server's application, and where the server receives
CLIENT_APP, CLIENT_IN = 7000, 7001


# The URL and the environment, without a network ------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.example:3128", ("http", "proxy.example", 3128, None, None)),
        ("http://alice@198.18.40.1:8080", ("http", "198.18.40.1", 8080, "alice", None)),
        ("http://alice:s%20cret@[fd00::1]:3128", ("http", "fd00::1", 3128, "alice", "s cret")),
        ("socks5://10.1.2.3:1080", ("socks5", "10.1.2.3", 1080, None, None)),
        ("socks5h://bob@proxy.example:1080", ("socks5h", "proxy.example", 1080, "bob", None)),
        ("HTTP://Proxy.Example:3128/", ("http", "Proxy.Example", 3128, None, None)),
    ],
)
def test_a_proxy_url(url: str, expected: tuple[object, ...]) -> None:
    proxy = parse_proxy(url)
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username, proxy.password) == expected


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("proxy.example:3128", "expected http://, socks5:// or socks5h://"),
        ("https://proxy.example:3128", "expected http://, socks5:// or socks5h://"),
        ("socks4://proxy.example:1080", "expected http://, socks5:// or socks5h://"),
        ("http://proxy.example", "a port is needed"),
        ("http://proxy.example:0", "invalid port"),
        ("http://proxy.example:99999", "invalid port"),
        ("http://:3128", "no proxy host"),
        ("http://proxy.example:3128/path?x", "nothing may follow the port"),
        ("http://proxy.example:nan", "invalid port"),
    ],
)
def test_a_bad_proxy_url_says_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(complaint)):
        parse_proxy(url)


def test_a_proxy_is_shown_without_its_credentials() -> None:
    proxy = parse_proxy("http://alice:secret@proxy.example:3128")
    assert str(proxy) == "http://proxy.example:3128"
    assert "secret" not in repr(proxy) and "alice" not in str(proxy)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"https_proxy": "http://p:1"}, "http://p:1"),
        ({"HTTPS_PROXY": "http://p:2"}, "http://p:2"),
        ({"https_proxy": "http://p:1", "HTTPS_PROXY": "http://p:2"}, "http://p:1"),
        ({"all_proxy": "socks5h://p:3"}, "socks5h://p:3"),
        ({"ALL_PROXY": "socks5://p:4"}, "socks5://p:4"),
        ({"https_proxy": "http://p:1", "all_proxy": "socks5://p:3"}, "http://p:1"),
        ({"http_proxy": "http://p:5"}, None),  # for plain HTTP, which this is not
        ({}, None),
        ({"https_proxy": "http://p:1", "no_proxy": "gw.example.org"}, None),
        ({"https_proxy": "http://p:1", "no_proxy": ".example.org"}, None),
        ({"https_proxy": "http://p:1", "no_proxy": "example.org"}, None),
        ({"https_proxy": "http://p:1", "NO_PROXY": "*"}, None),
        ({"https_proxy": "http://p:1", "no_proxy": "other.org, localhost"}, "http://p:1"),
        ({"https_proxy": "http://p:1", "no_proxy": "ample.org"}, "http://p:1"),
        ({"https_proxy": "http://p:1", "no_proxy": "gw.example.org:7000"}, "http://p:1"),
        ({"https_proxy": "http://p:1", "no_proxy": "gw.example.org:6000"}, None),
        ({"https_proxy": ""}, None),
    ],
)
def test_the_proxy_from_the_environment_as_curl_chooses_it(
    environ: dict[str, str], expected: str | None
) -> None:
    proxy = proxy_from_environment(environ, "gw.example.org", 6000)
    assert (None if proxy is None else str(proxy)) == expected


def test_no_proxy_matches_addresses_and_networks() -> None:
    environ = {"https_proxy": "http://p:1", "no_proxy": "198.18.41.0/24,fd00::/8"}
    assert proxy_from_environment(environ, "198.18.41.2", 6000) is None
    assert proxy_from_environment(environ, "fd00::2", 6000) is None
    assert proxy_from_environment(environ, "198.18.42.2", 6000) is not None


# The tunnel through real proxies ----------------------------------------------------------

root = pytest.mark.root


@pytest.fixture(scope="module")
def firewall() -> Iterator[Firewall]:
    with open_firewall() as network:
        yield network


@root
def test_nothing_reaches_the_server_except_through_a_proxy(firewall: Firewall) -> None:
    sock = firewall.client.open_socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock, pytest.raises(OSError, match="unreachable"):
        sock.settimeout(WAIT)
        sock.connect((SERVER, TUNNEL_PORT))


@dataclass
class Ends:
    """A tunnel's two applications, each on its own host's loopback."""

    client_app: socket.socket
    server_app: socket.socket

    def exchange(self, count: int) -> None:
        """``count`` datagrams each way, one at a time, each arriving byte for byte."""
        for n in range(count):
            payload = n.to_bytes(4, "big") + os.urandom(196)
            self.client_app.sendto(payload, ("127.0.0.1", CLIENT_IN))
            assert self.server_app.recv(65536) == payload, f"datagram {n} to the server"
            reply = os.urandom(196) + n.to_bytes(4, "big")
            self.server_app.sendto(reply, ("127.0.0.1", SERVER_IN))
            assert self.client_app.recv(65536) == reply, f"datagram {n} to the client"


@contextlib.contextmanager
def applications(firewall: Firewall) -> Iterator[Ends]:
    with (
        contextlib.closing(
            firewall.client.open_udp_socket("127.0.0.1", CLIENT_APP, timeout=WAIT)
        ) as client_app,
        contextlib.closing(
            firewall.server.open_udp_socket("127.0.0.1", SERVER_APP, timeout=WAIT)
        ) as server_app,
    ):
        yield Ends(client_app, server_app)


def start_server(spawn: Spawn, firewall: Firewall, *flags: str) -> Process:
    server = spawn(
        [UDPTUNNEL, "-v", *flags, "-s", str(TUNNEL_PORT), "--udp-bind", f"127.0.0.1/{SERVER_IN}",
         f"127.0.0.1/{SERVER_APP}"],
        prefix=firewall.server.prefix,
    )  # fmt: skip
    server.wait_for("Listening for TCP connections")
    return server


def start_client(
    spawn: Spawn,
    firewall: Firewall,
    proxy: str,
    *flags: str,
    server: str = SERVER_NAME,
    password: str | None = None,
    verbosity: str = "-v",
) -> Process:
    env = [] if password is None else [f"UDPTUNNEL_PROXY_PASSWORD={password}"]
    return spawn(
        [UDPTUNNEL, verbosity, *flags, "--proxy", proxy, "-c", f"{server}/{TUNNEL_PORT}",
         "--udp-bind", f"127.0.0.1/{CLIENT_IN}", f"127.0.0.1/{CLIENT_APP}"],
        prefix=[*firewall.client.prefix, "env", *env],
    )  # fmt: skip


@contextlib.contextmanager
def proxy_running(kind: str, ns: Namespace) -> Iterator[None]:
    if kind == "squid":
        with run_squid(ns, users={USER: PASSWORD}):
            yield
    elif kind == "tinyproxy":
        with run_tinyproxy(ns):
            yield
    elif kind == "dante":
        with run_dante(ns):
            yield
    else:
        with run_ssh_socks(ns):
            yield


# (proxy, URL, server name, password): a name the client cannot resolve where the proxy
# resolves names, so that only the proxy can have found the server.
THROUGH = {
    "squid, Basic authentication": (
        "squid", f"http://{USER}@{PROXY_IN}:{SQUID_PORT}", INSIDE_NAME, PASSWORD,
    ),
    "tinyproxy": ("tinyproxy", f"http://{PROXY_IN}:{TINYPROXY_PORT}", INSIDE_NAME, None),
    "dante, socks5": (
        "dante", f"socks5://{SOCKS_USER}@{PROXY_IN}:{DANTE_PORT}", SERVER_NAME, PASSWORD,
    ),
    "dante, socks5h": (
        "dante", f"socks5h://{SOCKS_USER}@{PROXY_IN}:{DANTE_PORT}", INSIDE_NAME, PASSWORD,
    ),
    "ssh -D, socks5": ("ssh", f"socks5://{PROXY_IN}:{SSH_SOCKS_PORT}", SERVER_NAME, None),
    "ssh -D, socks5h": ("ssh", f"socks5h://{PROXY_IN}:{SSH_SOCKS_PORT}", INSIDE_NAME, None),
}  # fmt: skip


@root
@pytest.mark.needs("squid", "tinyproxy", "danted", "ssh", "sshd", "openssl")
@pytest.mark.parametrize("case", THROUGH)
def test_datagrams_cross_through_the_proxy(firewall: Firewall, spawn: Spawn, case: str) -> None:
    kind, url, name, password = THROUGH[case]
    with proxy_running(kind, firewall.proxy), applications(firewall) as ends:
        server = start_server(spawn, firewall)
        client = start_client(spawn, firewall, url, server=name, password=password)
        client.wait_for(rf"Connected TCP to .*{TUNNEL_PORT} through the proxy")
        server.wait_for(rf"TCP connection from {PROXY_OUT}/")
        ends.exchange(DATAGRAMS)
        client.signal()
        assert (client.wait(), server.wait()) == (0, 0)
    assert PASSWORD not in client.stderr + server.stderr


@root
@pytest.mark.needs("squid", "openssl", "bash")
@pytest.mark.parametrize(
    "block", examples.find("--proxy http://alice@proxy.example.com:3128", count=2), ids=str
)
def test_the_documented_example(
    firewall: Firewall, spawn: Spawn, block: examples.Block, tmp_path: Path
) -> None:
    """README's and the man page's proxy example, as written, in a shell on the client's host
    whose HOME is the test's: squid on port 3128 of proxy.example.com with user alice and
    CONNECT to 443 alone, and a server on port 443 of gw.example.org."""
    users = {"alice": "correct horse"}
    with (
        run_squid(firewall.proxy, users=users, ports=(443,)),
        applications_on(firewall, 5000) as (client_app, server_app),
    ):
        server = spawn(
            [UDPTUNNEL, "-v", "-s", "443", "--udp-bind", "127.0.0.1/5001", "127.0.0.1/5000"],
            prefix=firewall.server.prefix,
        )
        server.wait_for("Listening for TCP connections")
        script = "\n".join(command for _, command in block.commands)
        client = spawn(
            ["bash", "-c", f"set -e\n{script}"],
            prefix=[
                *firewall.client.prefix,
                "env",
                f"HOME={tmp_path}",
                f"PATH={BIN}:/usr/bin:/bin",
            ],
        )
        server.wait_for(rf"TCP connection from {PROXY_OUT}/")
        firewall.client.wait_udp_bound(5001, WAIT)
        for n in range(10):
            client_app.sendto(b"out %d" % n, ("127.0.0.1", 5001))
            assert server_app.recv(100) == b"out %d" % n
            server_app.sendto(b"back %d" % n, ("127.0.0.1", 5001))
            assert client_app.recv(100) == b"back %d" % n
        assert (tmp_path / ".proxy-password").stat().st_mode & 0o777 == 0o600
        client.signal()
        client.wait()
        assert server.wait() == 0


@contextlib.contextmanager
def applications_on(firewall: Firewall, port: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """An application on ``port`` of each end's loopback: the client's, the server's."""
    with (
        contextlib.closing(firewall.client.open_udp_socket("127.0.0.1", port, timeout=WAIT)) as a,
        contextlib.closing(firewall.server.open_udp_socket("127.0.0.1", port, timeout=WAIT)) as b,
    ):
        yield a, b


# Through squid, every mode -----------------------------------------------------------------

SQUID_URL = f"http://{USER}@{PROXY_IN}:{SQUID_PORT}"


@root
@pytest.mark.needs("squid", "openssl")
def test_rtp_mode_makes_both_connections_through_the_proxy(
    firewall: Firewall, spawn: Spawn
) -> None:
    ports = (TUNNEL_PORT, TUNNEL_PORT + 1)
    with (
        run_squid(firewall.proxy, users={USER: PASSWORD}, ports=ports),
        applications_on(firewall, 5000) as (rtp_client, rtp_server),
        applications_on(firewall, 5001) as (rtcp_client, rtcp_server),
    ):
        server = spawn(
            [UDPTUNNEL, "-v", "-r", "-s", str(TUNNEL_PORT), "--udp-bind", "127.0.0.1/5002",
             "127.0.0.1/5000"],
            prefix=firewall.server.prefix,
        )  # fmt: skip
        server.wait_for("Listening for TCP connections on port 6001")
        client = spawn(
            [UDPTUNNEL, "-v", "-r", "--proxy", SQUID_URL, "-c", f"{INSIDE_NAME}/{TUNNEL_PORT}",
             "--udp-bind", "127.0.0.1/5006", "127.0.0.1/5000"],
            prefix=[*firewall.client.prefix, "env", f"UDPTUNNEL_PROXY_PASSWORD={PASSWORD}"],
        )  # fmt: skip
        for port in ports:
            client.wait_for(rf"Connected TCP to {INSIDE_NAME}/{port} through the proxy")
        for near, far, near_in, far_in in (
            (rtp_client, rtp_server, 5006, 5002),
            (rtcp_client, rtcp_server, 5007, 5003),
        ):
            near.sendto(b"to the server", ("127.0.0.1", near_in))
            assert far.recv(100) == b"to the server"
            far.sendto(b"to the client", ("127.0.0.1", far_in))
            assert near.recv(100) == b"to the client"
        client.signal()
        assert (client.wait(), server.wait()) == (0, 0)


@root
@pytest.mark.needs("squid", "openssl")
def test_each_flow_connects_through_the_proxy(firewall: Firewall, spawn: Spawn) -> None:
    """Flow mode: 20 sources, each with its own connection through squid, each getting its
    own replies."""
    with (
        run_squid(firewall.proxy, users={USER: PASSWORD}),
        applications_on(firewall, 5000) as (_, service),
    ):
        server = spawn(
            [UDPTUNNEL, "-v", "--flows", "-s", str(TUNNEL_PORT), "127.0.0.1/5000"],
            prefix=firewall.server.prefix,
        )
        server.wait_for("Listening for TCP connections")
        client = spawn(
            [UDPTUNNEL, "-v", "--flows", "--proxy", SQUID_URL, "-c",
             f"{INSIDE_NAME}/{TUNNEL_PORT}", "127.0.0.1/7001"],
            prefix=[*firewall.client.prefix, "env", f"UDPTUNNEL_PROXY_PASSWORD={PASSWORD}"],
        )  # fmt: skip
        client.wait_for("Receiving flows on UDP")
        with contextlib.ExitStack() as stack:
            sources = [
                stack.enter_context(
                    contextlib.closing(firewall.client.open_udp_socket("127.0.0.1", timeout=WAIT))
                )
                for _ in range(20)
            ]
            for n, source in enumerate(sources):
                source.sendto(b"question %d" % n, ("127.0.0.1", 7001))
                question, flow = service.recvfrom(100)
                assert question == b"question %d" % n
                service.sendto(question.replace(b"question", b"answer"), flow)
            for n, source in enumerate(sources):
                assert source.recv(100) == b"answer %d" % n
        client.wait_for(r"Connecting to .* through the proxy", nth=20)  # a connection each
        client.signal()
        server.signal()
        assert (client.wait(), server.wait()) == (0, 0)


@root
@pytest.mark.needs("squid", "openssl")
def test_tls_runs_end_to_end_through_the_proxy(
    firewall: Firewall, spawn: Spawn, tmp_path: Path
) -> None:
    """Mutual TLS through CONNECT: the certificate and the name checked are the server's
    (gw.example.org), which the proxy neither has nor sees."""
    ca = tls.self_signed("ca", tmp_path)
    cert, key = tls.signed("server", ca, tmp_path, f"DNS:{SERVER_NAME}")
    client_cert, client_key = tls.signed("client", ca, tmp_path)
    with run_squid(firewall.proxy, users={USER: PASSWORD}), applications(firewall) as ends:
        server = start_server(
            spawn, firewall, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca[0])
        )
        client = start_client(
            spawn, firewall, SQUID_URL, "--tls", "--tls-ca", str(ca[0]), "--tls-cert",
            str(client_cert), "--tls-key", str(client_key), password=PASSWORD,
        )  # fmt: skip
        client.wait_for(rf"Connected TCP to {SERVER_NAME}/{TUNNEL_PORT} through the proxy")
        ends.exchange(100)
        client.signal()
        assert (client.wait(), server.wait()) == (0, 0)


@root
@pytest.mark.needs("squid", "openssl")
def test_a_persistent_client_comes_back_through_a_restarted_proxy(
    firewall: Firewall, spawn: Spawn
) -> None:
    with applications(firewall) as ends:
        server = start_server(spawn, firewall, "--persist")
        with run_squid(firewall.proxy, users={USER: PASSWORD}):
            client = start_client(
                spawn, firewall, SQUID_URL, "--persist", "--reconnect-max", "1",
                server=INSIDE_NAME, password=PASSWORD,
            )  # fmt: skip
            client.wait_for("Connected TCP to .* through the proxy")
            ends.exchange(10)
        client.wait_for("Tunnel lost|TCP connection closed by the peer")  # squid went
        with run_squid(firewall.proxy, users={USER: PASSWORD}):
            client.wait_for("Connected TCP to .* through the proxy", nth=2)
            ends.exchange(10)
        client.signal()
        server.signal()
        assert (client.wait(), server.wait()) == (0, 0)
    assert PASSWORD not in client.stderr


# What the client says when it cannot get through -------------------------------------------


@contextlib.contextmanager
def impostor(ns: Namespace, port: int, answer: bytes | None) -> Iterator[None]:
    """Something on ``port`` of the proxy's host that is no proxy: it sends ``answer`` to
    each connection and then holds it, or (None) closes it at once."""
    listener = ns.open_socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((PROXY_IN, port))
    listener.listen()

    def handle(conn: socket.socket) -> None:
        if answer is None:
            conn.close()
        else:
            conn.sendall(answer)  # and holds it, until the end

    with each_connection(listener, handle):
        yield


@dataclass(frozen=True)
class Failure:
    proxy: str  # which proxy runs: squid, dante, or an impostor's answer
    url: str
    line: str  # the client's one line, a regular expression
    server: str = f"{SERVER_NAME}/{TUNNEL_PORT}"
    password: str | None = PASSWORD
    status: int = 1
    flags: tuple[str, ...] = ()


SQUID = f"http://{USER}@{PROXY_IN}:{SQUID_PORT}"
DANTE = f"socks5://{SOCKS_USER}@{PROXY_IN}:{DANTE_PORT}"
SHOWN_SQUID = re.escape(f"http://{PROXY_IN}:{SQUID_PORT}")
SHOWN_DANTE = re.escape(f"socks5://{PROXY_IN}:{DANTE_PORT}")
FAILURES = {
    "nothing listens where the proxy should be": Failure(
        "none", SQUID, rf"cannot connect to the proxy {SHOWN_SQUID}: Connection refused"
    ),
    "squid, the wrong password": Failure(
        "squid", SQUID,
        rf"the proxy {SHOWN_SQUID} refused our credentials \(407 Proxy "
        r"Authentication Required\)",
        password="not the password",
    ),
    "squid, the user without a password": Failure(
        "squid", SQUID,
        rf"the proxy {SHOWN_SQUID} refused our credentials \(407 .*\)",
        password=None,
    ),
    "squid, no credentials at all": Failure(
        "squid", f"http://{PROXY_IN}:{SQUID_PORT}",
        rf"the proxy {SHOWN_SQUID} requires credentials \(407 Proxy Authentication Required\): "
        r"give the user in the URL .* --proxy-password-file or UDPTUNNEL_PROXY_PASSWORD",
        password=None,
    ),
    "squid, CONNECT to a port it does not allow": Failure(
        "squid", SQUID,
        rf"the proxy {SHOWN_SQUID} forbids a connection to {SERVER_NAME}/7000 \(403 Forbidden\); "
        r"many proxies, squid by default, allow CONNECT only to port 443: .*allow port 7000",
        server=f"{SERVER_NAME}/7000",
    ),
    "squid, no server behind it": Failure(
        "squid", SQUID,
        rf"the proxy {SHOWN_SQUID} could not reach the server {SERVER_NAME}/{TUNNEL_PORT} "
        r"\(503 Service Unavailable\)",
    ),
    "dante, no server behind it": Failure(
        "dante", DANTE,
        rf"the proxy {SHOWN_DANTE} could not connect to {SERVER}/{TUNNEL_PORT}: "
        r"connection refused",
    ),
    "dante, the wrong password": Failure(
        "dante", DANTE,
        rf"the proxy {SHOWN_DANTE} refused our credentials \(SOCKS5 username and password\)",
        password="not the password",
    ),
    "dante, no credentials": Failure(
        "dante", f"socks5://{PROXY_IN}:{DANTE_PORT}",
        rf"the proxy {SHOWN_DANTE} requires credentials: give the user in the URL .*",
        password=None,
    ),
    "an SSH server where an HTTP proxy should be": Failure(
        "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", f"http://{PROXY_IN}:{SQUID_PORT}",
        rf"the proxy {SHOWN_SQUID} does not speak HTTP CONNECT: 'Invalid status .*'",
        password=None,
    ),
    "an HTTP server where a SOCKS5 proxy should be": Failure(
        "HTTP/1.1 400 Bad Request\r\n\r\n", f"socks5h://{PROXY_IN}:{DANTE_PORT}",
        rf"the proxy {re.escape(f'socks5h://{PROXY_IN}:{DANTE_PORT}')} does not speak SOCKS5: .*",
        password=None,
    ),
    "a proxy that hangs up at once": Failure(
        "close", f"http://{PROXY_IN}:{SQUID_PORT}",
        rf"the proxy {SHOWN_SQUID} closed the connection during its handshake",
        password=None,
    ),
    "a proxy that never answers": Failure(
        "", f"http://{PROXY_IN}:{SQUID_PORT}",
        rf"cannot connect to TCP {SERVER_NAME}/{TUNNEL_PORT} through the proxy {SHOWN_SQUID}: "
        r"no answer in 1 s",
        password=None,
        flags=("--connect-timeout", "1"),
    ),
    "socks5, a name only the proxy knows": Failure(  # the client resolves for socks5
        "dante", DANTE,
        rf"{INSIDE_NAME}: TCP host (unknown|lookup failed): .*",
        server=f"{INSIDE_NAME}/{TUNNEL_PORT}",
        status=1,  # no resolver answers in the namespace: a temporary failure
    ),
}  # fmt: skip


@contextlib.contextmanager
def failing_proxy(kind: str, ns: Namespace) -> Iterator[None]:
    """squid or dante as for the crossing tests, nothing at all, or an impostor."""
    if kind in ("squid", "dante"):
        with proxy_running(kind, ns):
            yield
    elif kind == "none":
        yield
    else:
        port = DANTE_PORT if kind.startswith("HTTP/") else SQUID_PORT
        with impostor(ns, port, None if kind == "close" else kind.encode()):
            yield


@root
@pytest.mark.needs("squid", "danted", "openssl")
@pytest.mark.parametrize("case", FAILURES)
def test_each_failure_of_the_proxy_has_its_own_line(
    firewall: Firewall, spawn: Spawn, case: str
) -> None:
    failure = FAILURES[case]
    password = [] if failure.password is None else [f"UDPTUNNEL_PROXY_PASSWORD={failure.password}"]
    with failing_proxy(failure.proxy, firewall.proxy):
        client = spawn(
            [UDPTUNNEL, "-vv", *failure.flags, "--proxy", failure.url, "-c", failure.server,
             "--udp-bind", f"127.0.0.1/{CLIENT_IN}", f"127.0.0.1/{CLIENT_APP}"],
            prefix=[*firewall.client.prefix, "env", *password],
        )  # fmt: skip
        status = client.wait(30)
    errors = [line for line in client.lines if line.startswith("udptunnel: ")]
    assert (status, len(errors)) == (failure.status, 1), client.stderr
    assert re.fullmatch(failure.line, errors[0].removeprefix("udptunnel: ")), errors[0]
    assert "Traceback" not in client.stderr
    assert PASSWORD not in client.stderr and "not the password" not in client.stderr
    # nor the user (USER is also the program's name, which starts every error line)
    assert f"{USER}@" not in client.stderr and f"'{USER}'" not in client.stderr
    assert SOCKS_USER not in client.stderr


def test_a_server_with_a_proxy_is_a_bad_command_line() -> None:
    result = subprocess.run(
        [UDPTUNNEL, "--proxy", "http://p:1", "-s", "6000", "127.0.0.1/5000"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr) == (
        2,
        "udptunnel: --proxy is for a client (-c): a server makes no connections\n",
    )


def test_a_password_in_the_url_works_but_is_warned_about_and_never_shown() -> None:
    result = subprocess.run(
        [UDPTUNNEL, "-vv", "--connect-timeout", "0.2", "--proxy",
         "http://alice:hunter2@127.0.0.1:1", "-c", "127.0.0.1/6000", "--udp-bind",
         f"127.0.0.1/{free_port()}", "127.0.0.1/9"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    first, *_ = result.stderr.splitlines()
    assert first.startswith("udptunnel: The proxy password is in the URL, where other users")
    assert "hunter2" not in result.stderr and "alice" not in result.stderr


def test_a_password_without_a_user_is_a_bad_command_line() -> None:
    result = subprocess.run(
        [UDPTUNNEL, "--proxy", "http://proxy.example:3128", "-c", "127.0.0.1/6000",
         "127.0.0.1/5000"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "UDPTUNNEL_PROXY_PASSWORD": "hunter2"},
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (
        2,
        "udptunnel: a proxy password without a user: give the user in the URL "
        "(http://USER@proxy.example:3128)\n",
    )
