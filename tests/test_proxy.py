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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from udptunnel.config import parse_proxy, proxy_from_environment
from udptunnel.errors import ConfigError

from . import test_examples as examples
from .conftest import BIN, UDPTUNNEL, WAIT, Process
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
