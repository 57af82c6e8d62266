"""Through a proxy: a client's TCP connection made by way of an HTTP proxy (CONNECT) or a
SOCKS5 proxy, where a firewall lets only its proxy out.

python-socks does the SOCKS5 handshake; its Trio back end hands back the connected socket.
The HTTP CONNECT handshake is this module's own: python-socks reads an HTTP proxy's reply
with a single receive, so a reply that comes in pieces left its rest in the tunnel (read as
a frame's length, losing every datagram behind it), and tunnel bytes that came with the reply
were lost. Here the reply's head is peeked at and only it is taken, up to its blank line:
whatever follows stays in the kernel for the relay. Either way the socket becomes a
``trio.SocketStream`` like any other: the relay's fast path, and TLS on top (end to end: the
certificate and the name checked are the server's, never the proxy's), are the same as for a
direct connection. This module chooses what to ask the proxy for, and turns each failure into
one line that names its cause. A proxy is shown as ``scheme://host:port``: credentials never
reach the log.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import socket
import string

import trio
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.trio import Proxy as SocksClient

from .config import Address, ProxySettings, ascii_host
from .errors import ConfigError, TunnelError
from .sockets import Resolved, SockAddr

log = logging.getLogger(__name__)

HTTP_PROXY_AUTHENTICATION_REQUIRED = 407
HTTP_FORBIDDEN = 403
HTTP_NO_WAY_THROUGH = {502, 503, 504}  # the proxy could not reach the server
SOCKS5_REPLIES = {  # RFC 1928, section 6: what each failure code means
    1: "general SOCKS server failure",
    2: "connection not allowed by the proxy's rules",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
CLOSED = "Connection closed unexpectedly"
HUNG_UP = {"Invalid proxy response", "Empty connect reply", CLOSED}  # nothing (more) came
SHOWN_ANSWER = 40  # characters of an answer in an unknown protocol shown in the error
SHOWN_STATUS = 80  # characters of an HTTP proxy's status line shown in the error
MAX_REPLY_HEAD = 16384  # bytes: a CONNECT reply's status line and headers (squid's: ~100)
HEAD_ENDS = (b"\r\n\r\n", b"\n\n")  # the blank line after the headers; bare LF, leniently
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? +([0-9]{3})(?: [^\r]*)?\r?")
_BAD_STATUS = "Invalid status line"
_TYPES = {"socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5}


class ProxyFailure(TunnelError):
    """The proxy's failure, not the server's: it says nothing of why a server would refuse."""


async def connect_via(
    proxy: ProxySettings, label: Address, addresses: list[Resolved]
) -> tuple[trio.SocketStream, SockAddr]:
    """Connect to the server through ``proxy``: by name where the proxy resolves it (HTTP,
    socks5h), otherwise to each of its ``addresses`` in turn. The caller bounds the time.

    Returns:
        The stream, connected through the proxy to the server, and the server's address as
        asked for.

    Raises:
        ProxyFailure: the proxy cannot be reached, refused, or could not reach the server,
            saying which and why.
    """
    assert label.host is not None  # a client always names its server
    if proxy.resolves_names:
        if ascii_host(label.host) is None:  # never resolved here: checked here all the same
            raise ConfigError(f"{label.host}: TCP host unknown (not a valid name)")
        targets: list[SockAddr] = [(label.host, label.port)]
    else:
        targets = [address[:2] for _, address in addresses]
    failure = ProxyFailure(f"cannot connect to TCP {label} through the proxy {proxy}: no address")
    for target in targets:
        log.info("Connecting to %s/%d through the proxy %s", target[0], target[1], proxy)
        try:
            sock = await _handshake(proxy, str(target[0]), target[1])
        except (ProxyError, ProxyConnectionError, ProxyTimeoutError, OSError) as exc:
            failure = ProxyFailure(explain(exc, proxy, Address(str(target[0]), target[1])))
            failure.__cause__ = exc
            continue
        except UnicodeDecodeError as exc:  # python-socks: a bound name in a SOCKS5 reply
            failure = ProxyFailure(
                f"the proxy {proxy} does not speak SOCKS5: a bound name not text"
            )
            failure.__cause__ = exc
            continue
        return trio.SocketStream(sock), target
    raise failure


async def _handshake(proxy: ProxySettings, host: str, port: int) -> trio.socket.SocketType:
    """A socket connected through ``proxy`` to ``host``/``port``, its handshake done."""
    if proxy.scheme == "http":
        return await _connect_http(proxy, host, port)
    client = SocksClient(
        proxy_type=_TYPES[proxy.scheme],
        host=proxy.host,
        port=proxy.port,
        username=proxy.username,
        password=proxy.password,
        rdns=proxy.resolves_names,
    )
    return await client.connect(host, port, timeout=math.inf)


async def _connect_http(proxy: ProxySettings, host: str, port: int) -> trio.socket.SocketType:
    """A socket through the HTTP proxy to ``host``/``port`` (CONNECT), with nothing of the
    tunnel's taken from it.

    Raises:
        ProxyConnectionError: the proxy cannot be reached.
        ProxyError: the proxy refused (its status as ``error_code``), or is not HTTP.
        OSError: the connection failed during the handshake.
    """
    sock = await _open_to(proxy)
    try:
        request = connect_request(host, port, proxy.username, proxy.password)
        sent = 0
        while sent < len(request):
            sent += await sock.send(request[sent:])
        code, answer = reply_status(await _receive_head(sock))
        if not 200 <= code < 300:  # any 2xx: the proxy is now a tunnel (RFC 9110, 9.3.6)
            raise ProxyError(answer, error_code=code)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_to(proxy: ProxySettings) -> trio.socket.SocketType:
    """A TCP connection to the proxy: its addresses in the resolver's order.

    Raises:
        ProxyConnectionError: none answered, or the name did not resolve; caused by the
            last error.
    """
    try:
        infos = await trio.socket.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyConnectionError(exc.errno, f"cannot resolve {proxy.host}") from exc
    failure: OSError = ConnectionRefusedError(0, "no address")
    for family, _, _, _, address in infos:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise ProxyConnectionError(failure.errno, f"cannot connect to {proxy}") from failure


async def _receive_head(sock: trio.socket.SocketType) -> bytes:
    """The head of the proxy's reply, up to its blank line, and not a byte more: what the
    proxy sent after it is the tunnel's, and stays in the socket for the relay.

    Raises:
        ProxyError: the proxy closed the connection first, or its reply is not HTTP.
    """
    head = b""
    while True:  # peek at what has come, take only what is head
        peeked = await sock.recv(MAX_REPLY_HEAD - len(head), socket.MSG_PEEK)
        if not peeked:
            raise ProxyError(CLOSED)
        end = reply_head_end(head + peeked)
        wanted = len(peeked) if end is None else end - len(head)
        while wanted:  # peeked, so already here: taken without waiting
            taken = await sock.recv(wanted)
            head, wanted = head + taken, wanted - len(taken)
        if end is not None:
            return head


def connect_request(host: str, port: int, username: str | None, password: str | None) -> bytes:
    """The CONNECT request for ``host``/``port``, with Basic credentials (in UTF-8, as RFC
    7617 allows) if there is a user and a password.

    Raises:
        ConfigError: ``host`` is no name or address (it could carry a line of its own).
    """
    name = ascii_host(host)
    if name is None:
        raise ConfigError(f"{host}: TCP host unknown (not a valid name)")
    authority = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if username is not None and password is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return "".join(f"{line}\r\n" for line in [*lines, ""]).encode("ascii")


def reply_head_end(data: bytes) -> int | None:
    """Where the head of a CONNECT reply at the start of ``data`` ends (just after its blank
    line), or None while it has not come whole. Sans-IO: ``data`` is all that has come.

    Raises:
        ProxyError: ``data`` does not begin as an HTTP reply, or its head is too long.
    """
    line_end = data.find(b"\n")
    if not data.startswith(b"HTTP/"[: len(data)]) or (
        line_end >= 0 and not _STATUS_LINE.fullmatch(data[:line_end])
    ):
        first = data[: line_end if line_end >= 0 else SHOWN_ANSWER]
        raise ProxyError(f"{_BAD_STATUS}: {first.decode('latin-1').strip()}")
    ends = [at + len(mark) for mark in HEAD_ENDS if (at := data.find(mark)) >= 0]
    if ends:
        return min(ends)
    if len(data) >= MAX_REPLY_HEAD:
        raise ProxyError(f"Reply head too long (over {MAX_REPLY_HEAD} bytes)")
    return None


def reply_status(head: bytes) -> tuple[int, str]:
    """The status code of a reply's ``head`` (found whole by reply_head_end), and its status
    and reason as they may be shown: printable, and short."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    _, status = line.split(maxsplit=1)
    shown = "".join(c if c.isprintable() else "?" for c in status)[:SHOWN_STATUS]
    return int(status[:3]), shown.rstrip()


def explain(exc: Exception, proxy: ProxySettings, target: Address) -> str:
    """The line for a failure of ``proxy`` on the way to ``target``."""
    if isinstance(exc, ProxyConnectionError):
        cause = exc.__cause__
        if isinstance(cause, socket.gaierror):  # the proxy's name: the resolver's words
            why = cause.strerror or str(cause)
        else:  # the system's words, without the address Trio adds to them
            why = (
                os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(exc)
            )
        return f"cannot connect to the proxy {proxy}: {why}"
    if isinstance(exc, ProxyTimeoutError):
        return f"the proxy {proxy} did not answer"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return f"the proxy {proxy} closed the connection during its handshake"
    if isinstance(exc, OSError):
        return f"the proxy {proxy} failed during its handshake: {os.strerror(exc.errno or 0)}"
    code = getattr(exc, "error_code", None)
    answer = str(exc)
    if proxy.scheme == "http" and code is not None:
        return _http(code, answer, proxy, target)
    if code in SOCKS5_REPLIES:
        return f"the proxy {proxy} could not connect to {target}: {SOCKS5_REPLIES[code]}"
    if "authentication failure" in answer:
        return f"the proxy {proxy} refused our credentials (SOCKS5 username and password)"
    if "No acceptable authentication methods" in answer:
        return (
            f"the proxy {proxy} requires credentials: give the user in the URL "
            f"({proxy.scheme}://USER@{proxy.host}:{proxy.port}) and the password in "
            "--proxy-password-file or UDPTUNNEL_PROXY_PASSWORD"
        )
    if not answer or answer in HUNG_UP or "Incomplete" in type(exc.__cause__).__name__:
        return f"the proxy {proxy} closed the connection during its handshake"
    speaks = "HTTP CONNECT" if proxy.scheme == "http" else "SOCKS5"
    return f"the proxy {proxy} does not speak {speaks}: {_printable(answer)}"


def _http(code: int, answer: str, proxy: ProxySettings, target: Address) -> str:
    """The line for an HTTP proxy's refusal, its status ``code`` and ``answer``."""
    if code == HTTP_PROXY_AUTHENTICATION_REQUIRED:
        if proxy.username is None:
            return (
                f"the proxy {proxy} requires credentials ({answer}): give the user in the URL "
                f"(http://USER@{proxy.host}:{proxy.port}) and the password in "
                "--proxy-password-file or UDPTUNNEL_PROXY_PASSWORD"
            )
        return f"the proxy {proxy} refused our credentials ({answer})"
    if code == HTTP_FORBIDDEN:
        return (
            f"the proxy {proxy} forbids a connection to {target} ({answer}); many proxies, "
            "squid by default, allow CONNECT only to port 443: run the server on port 443, "
            f"or have the proxy allow port {target.port}"
        )
    if code in HTTP_NO_WAY_THROUGH:
        return f"the proxy {proxy} could not reach the server {target} ({answer})"
    return f"the proxy {proxy} refused the connection to {target} ({answer})"


def _printable(text: str) -> str:
    """An answer in an unknown protocol, short and printable, quoted."""
    shown = "".join(c if c in string.printable and c not in "\r\n\t\x0b\x0c" else "?" for c in text)
    return repr(shown[:SHOWN_ANSWER] + ("..." if len(shown) > SHOWN_ANSWER else ""))
