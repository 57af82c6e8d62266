"""Real proxies for tests, from Debian's packages, in a network where the client can reach
the server only through them.

``open_firewall`` builds three hosts::

    client 198.18.40.2 -- 198.18.40.1 proxy 198.18.41.1 -- 198.18.41.2 server

The client's host knows only its own link and the server's only its own, and the proxy's
host forwards nothing, so no packet of the client reaches the server except through a
proxy's own connection. Host names resolve through ``/etc/netns/NAME/hosts``, which ``ip
netns exec`` puts in place of ``/etc/hosts``: ``gw.example.org`` is the server everywhere,
``inside.example.org`` only on the proxy's host (for proxies that resolve names).

Each ``run_*`` starts one proxy on the proxy's host, waits until it listens, and stops it
(by its PID) when its ``with`` block ends: squid (HTTP CONNECT, Basic authentication),
tinyproxy (HTTP CONNECT, none), dante (SOCKS5, username and password) and OpenSSH's
``ssh -D`` (SOCKS5, none). Everything here needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .netns import Namespace, Network, wait_until

if TYPE_CHECKING:  # conftest needs pytest, which the benchmark (contrib/bench) may lack
    from .conftest import Process

CLIENT, PROXY_IN, PROXY_OUT, SERVER = "198.18.40.2", "198.18.40.1", "198.18.41.1", "198.18.41.2"
SERVER_NAME = "gw.example.org"  # resolves everywhere
PROXY_NAME = "proxy.example.com"  # the proxy, on the client's host
INSIDE_NAME = "inside.example.org"  # the same host, known only to the proxy's resolver
TUNNEL_PORT = 6000  # the server's TCP port, which the proxies allow
WAIT = 15.0  # seconds for a proxy to start listening
USER, PASSWORD = "udptunnel", "correct horse battery staple"
SOCKS_USER = "udptproxy"  # a system account for dante, which checks the system's passwords


@dataclass(frozen=True)
class Firewall:
    client: Namespace
    proxy: Namespace
    server: Namespace


@contextlib.contextmanager
def open_firewall() -> Iterator[Firewall]:
    """The three hosts of the module docstring; deleted, with their hosts files, on exit."""
    with Network("udppx") as network, contextlib.ExitStack() as stack:
        client, proxy, server = (network.namespace(r) for r in ("client", "proxy", "server"))
        network.link(client, proxy, [f"{CLIENT}/24"], [f"{PROXY_IN}/24"])
        network.link(proxy, server, [f"{PROXY_OUT}/24"], [f"{SERVER}/24"])
        for host, extra in (
            (client, f"{PROXY_IN} {PROXY_NAME}\n"),
            (proxy, f"{SERVER} {INSIDE_NAME}\n"),
            (server, ""),
        ):
            etc = Path("/etc/netns", host.name)
            etc.mkdir(parents=True)
            stack.callback(shutil.rmtree, etc, True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{SERVER} {SERVER_NAME}\n{extra}")
        yield Firewall(client, proxy, server)


@contextlib.contextmanager
def each_connection(
    listener: socket.socket, handle: Callable[[socket.socket], object]
) -> Iterator[None]:
    """Accept on ``listener`` and ``handle`` each connection in a thread of its own, until
    the ``with`` block ends; then close the listener and every connection it took."""
    taken: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            taken.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(WAIT)
        for conn in taken:
            conn.close()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A directory that a proxy which drops root (to proxy, nobody) can read."""
    path = Path(tempfile.mkdtemp(prefix="udptunnel-proxy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _listening(ns: Namespace, port: int) -> bool:
    with ns.entered():
        lines = Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]
    return any(
        int(f.split()[1].rpartition(":")[2], 16) == port and f.split()[3] == "0A" for f in lines
    )


@contextlib.contextmanager
def _serving(argv: list[str], ns: Namespace, port: int) -> Iterator[Process]:
    """Start a proxy in ``ns``; once it listens on ``port``, yield it; stop it at the end."""
    from .conftest import Process  # here, not above: see the TYPE_CHECKING import

    process = Process(argv, prefix=ns.prefix)
    try:

        def up() -> bool:
            if process.proc.poll() is not None:
                process.wait()
                raise AssertionError(f"{argv[0]} exited: {process.stderr}")
            return _listening(ns, port)

        wait_until(up, WAIT, f"{argv[0]} listening on {port}")
        yield process
    finally:
        process.signal(signal.SIGTERM)  # in order: squid, say, stops its helpers too
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()


SQUID_PORT = 3128


@contextlib.contextmanager
def run_squid(
    ns: Namespace, *, users: dict[str, str] | None = None, ports: tuple[int, ...] = (TUNNEL_PORT,)
) -> Iterator[Process]:
    """squid on the proxy's host, port 3128, allowing CONNECT to ``ports`` alone (as its
    default allows 443 alone); with ``users``, only to them (Basic authentication, an
    htpasswd file made here)."""
    with (
        squid_command(PROXY_IN, users=users, ports=ports) as argv,
        _serving(argv, ns, SQUID_PORT) as process,
    ):
        yield process


@contextlib.contextmanager
def squid_command(
    listen: str,
    *,
    users: dict[str, str] | None = None,
    ports: tuple[int, ...] = (TUNNEL_PORT,),
    outgoing: str | None = None,
) -> Iterator[list[str]]:
    """squid's configuration, as ``run_squid`` describes it, listening on ``listen`` port
    3128 and connecting from ``outgoing`` if given; yields the command line that runs squid
    in the foreground, logging to standard error. The files are removed at the end. The
    benchmark (contrib/bench) starts squid with it too."""
    with _workdir() as work:
        allowed = " ".join(map(str, ports))
        rules = [f"acl tunnel_port port {allowed}", "http_access deny CONNECT !tunnel_port"]
        if users is not None:
            lines = [f"{name}:{_md5_crypt(password)}\n" for name, password in users.items()]
            (work / "htpasswd").write_text("".join(lines))
            rules += [
                f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {work}/htpasswd",
                "auth_param basic realm udptunnel-test",
                "acl users proxy_auth REQUIRED",
                "http_access allow users",
            ]
        else:
            rules.append("http_access allow all")
        if outgoing is not None:
            rules.append(f"tcp_outgoing_address {outgoing}")
        (work / "squid.conf").write_text(
            "\n".join(
                [
                    f"http_port {listen}:{SQUID_PORT}",
                    "pid_filename none",
                    "cache_log stdio:/dev/stderr",
                    "access_log none",
                    "cache deny all",
                    "cache_mem 8 MB",
                    "shutdown_lifetime 0 seconds",
                    f"coredump_dir {work}",
                    "visible_hostname udptunnel-test",
                    "pinger_enable off",  # a helper that would outlive squid
                    *rules,
                    "http_access deny all",
                    "",
                ]
            )
        )
        yield ["squid", "-N", "-d1", "-f", str(work / "squid.conf")]


def _md5_crypt(password: str) -> str:
    return subprocess.run(
        ["openssl", "passwd", "-1", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


TINYPROXY_PORT = 8888


@contextlib.contextmanager
def run_tinyproxy(ns: Namespace) -> Iterator[Process]:
    """tinyproxy on the proxy's host, port 8888, without authentication."""
    with _workdir() as work:
        (work / "tinyproxy.conf").write_text(
            f"Port {TINYPROXY_PORT}\nListen {PROXY_IN}\nTimeout 600\nUser nobody\n"
            f"Group nogroup\nAllow {CLIENT}\nConnectPort {TUNNEL_PORT}\nLogLevel Info\n"
        )
        argv = ["tinyproxy", "-d", "-c", str(work / "tinyproxy.conf")]
        with _serving(argv, ns, TINYPROXY_PORT) as process:
            yield process


DANTE_PORT = 1080


@contextlib.contextmanager
def run_dante(ns: Namespace) -> Iterator[Process]:
    """dante on the proxy's host, port 1080, SOCKS5 with username and password, checked
    against a system account made here (SOCKS_USER, PASSWORD) and removed again."""
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SOCKS_USER],
        check=True,
    )
    try:
        subprocess.run(["chpasswd"], input=f"{SOCKS_USER}:{PASSWORD}", text=True, check=True)
        with _workdir() as work:
            (work / "danted.conf").write_text(
                f"logoutput: stderr\ninternal: {PROXY_IN} port = {DANTE_PORT}\n"
                f"external: {PROXY_OUT}\nsocksmethod: username\nuser.privileged: root\n"
                "user.unprivileged: nobody\n"
                f"client pass {{ from: {CLIENT}/32 to: 0.0.0.0/0 }}\n"
                f"socks pass {{ from: {CLIENT}/32 to: 0.0.0.0/0 command: connect }}\n"
            )
            argv = ["danted", "-f", str(work / "danted.conf"), "-p", str(work / "danted.pid")]
            with _serving(argv, ns, DANTE_PORT) as process:
                yield process
    finally:
        subprocess.run(["userdel", SOCKS_USER], check=False)


SSH_SOCKS_PORT = 1081


@contextlib.contextmanager
def run_ssh_socks(ns: Namespace) -> Iterator[Process]:
    """OpenSSH's SOCKS5 (``ssh -D``) on the proxy's host, port 1081, logged in with a key
    made here to an sshd of the test's own that it starts itself, over a pipe
    (``ProxyCommand sshd -i``): no sshd listens, and stopping ssh ends it."""
    with _workdir() as work:
        for key in ("host", "user"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)], check=True
            )
        (work / "authorized_keys").write_text((work / "user.pub").read_text())
        (work / "sshd_config").write_text(
            f"HostKey {work}/host\nAuthorizedKeysFile {work}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "AllowTcpForwarding yes\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        sshd = f"{shutil.which('sshd') or '/usr/sbin/sshd'} -i -f {work}/sshd_config"
        ssh = [
            "ssh", "-N", "-D", f"{PROXY_IN}:{SSH_SOCKS_PORT}", "-i", str(work / "user"),
            "-o", f"ProxyCommand={sshd}", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={os.devnull}", "-o", "BatchMode=yes", "root@localhost",
        ]  # fmt: skip
        with _serving(ssh, ns, SSH_SOCKS_PORT) as process:
            yield process
