"""Through a proxy: a client's TCP connection made by way of an HTTP proxy (CONNECT) or a
SOCKS5 proxy, where a firewall lets only its proxy out.

python-socks does the handshakes. Its Trio back end hands back the connected socket, which
becomes a ``trio.SocketStream`` like any other: the relay's fast path, and TLS on top (end
to end: the certificate and the name checked are the server's, never the proxy's), are the
same as for a direct connection. This module chooses what to ask the proxy for, and turns
each failure into one line that names its cause. A proxy is shown as ``scheme://host:port``:
credentials never reach the log.
"""

from __future__ import annotations

import logging
import math
import os
import string

import trio
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.trio import Proxy as SocksClient

from .config import Address, ProxySettings
from .errors import TunnelError
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
HUNG_UP = {"Invalid proxy response", "Empty connect reply"}  # python-socks: nothing came
SHOWN_ANSWER = 40  # characters of an answer in an unknown protocol shown in the error
_TYPES = {"http": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5}


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
        targets: list[SockAddr] = [(label.host, label.port)]
    else:
        targets = [address[:2] for _, address in addresses]
    client = SocksClient(
        proxy_type=_TYPES[proxy.scheme],
        host=proxy.host,
        port=proxy.port,
        username=proxy.username,
        password=proxy.password,
        rdns=proxy.resolves_names,
    )
    failure = ProxyFailure(f"cannot connect to TCP {label} through the proxy {proxy}: no address")
    for target in targets:
        log.info("Connecting to %s/%d through the proxy %s", target[0], target[1], proxy)
        try:
            sock = await client.connect(target[0], target[1], timeout=math.inf)
        except (ProxyError, ProxyConnectionError, ProxyTimeoutError, OSError) as exc:
            failure = ProxyFailure(explain(exc, proxy, Address(str(target[0]), target[1])))
            failure.__cause__ = exc
            continue
        return trio.SocketStream(sock), target
    raise failure


def explain(exc: Exception, proxy: ProxySettings, target: Address) -> str:
    """The line for a failure of ``proxy`` on the way to ``target``."""
    if isinstance(exc, ProxyConnectionError):
        cause = exc.__cause__
        why = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(exc)
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
        return f"the proxy {proxy} refused our credentials (SOCKS5 user {proxy.username!r})"
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
        return f"the proxy {proxy} refused our credentials for user {proxy.username!r} ({answer})"
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
