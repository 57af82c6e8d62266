"""What the command line asks for, as frozen data, and the pure parsers that build it.

Addresses are written as the original wrote them, ``host/port[/ttl]`` or ``host:port[:ttl]``,
and also ``[v6-literal]:port`` or ``v6-literal/port`` for IPv6; an ``--allow-from`` rule is
the exception, where ``/`` gives a network's prefix length and only ``:`` a port. Nothing here
resolves a name or opens a socket: that is ``tunnel.py``'s job.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

MIN_PORT = 1  # port 0 would mean "any port", which a tunnel end cannot be found at
MAX_PORT = 0xFFFF  # 16-bit port numbers
MAX_TTL = 255  # 8-bit IP TTL / IPv6 hop limit
DEFAULT_TTL = 1  # as the original: multicast stays on the local network unless asked
RTP_PAIR = 2  # RTP mode relays an even port and the odd port above it (RTP and RTCP)
DEFAULT_MAX_DELAY = 0.01  # seconds a datagram may wait in a tunnel end: a media jitter budget
MAX_MAX_DELAY = 60.0  # seconds: longer is no bound at all
MAX_CONNECTIONS = 16  # --connections: TCP connections per port pair
DEFAULT_MAX_FLOWS = 256  # flows at once in flow mode: each costs a TCP connection (and a socket)
DEFAULT_FLOW_TIMEOUT = 60.0  # seconds without a datagram that end a flow
DEFAULT_MAX_HANDSHAKES = 128  # connections still proving themselves, past which the oldest go
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection has to complete its TLS handshake
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds a client waits for the server to answer
DEFAULT_RECONNECT_MAX = 30.0  # seconds: the longest wait between two attempts (--persist)

_DECIMAL = re.compile(r"[0-9]+")  # no sign, no hex, no trailing garbage (defect 11)
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_SEPARATORS = re.compile(r"[/:]")


@dataclass(frozen=True)
class Rule:
    """Sources in ``network``, from ``port`` if it is not None."""

    network: _IPNetwork
    port: int | None

    def __str__(self) -> str:
        """The rule as ``--allow-from`` takes it."""
        network = self.network
        if network.prefixlen == network.max_prefixlen:
            text = str(network.network_address)
        else:
            text = str(network)
        if self.port is None:
            return text
        return f"[{text}]:{self.port}" if network.version == 6 else f"{text}:{self.port}"


def parse_rule(text: str) -> Rule:
    """Parse one ``--allow-from`` value.

    An address (``192.0.2.7``, ``2001:db8::7``) or a network (``10.0.0.0/8``,
    ``2001:db8::/32``), and after it, optionally, ``:PORT``: ``192.0.2.7:5000``,
    ``10.0.0.0/8:53``; an IPv6 address or network with a port is written in brackets,
    ``[::1]:53``, ``[2001:db8::/32]:443``. ``/`` always gives a prefix length and ``:`` a port,
    so neither can be taken for the other; the original's ``ADDR/PORT`` is an error that
    says what to write instead. Host names are not accepted: a rule must not depend on the
    resolver.

    Raises:
        ConfigError: naming the text.
    """
    if text.startswith("["):
        spec, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"{text!r}: missing ']' after the IPv6 address")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{text!r}: expected ':PORT' after ']' (as in [::1]:53)")
        port_text: str | None = rest[1:] if rest else None
    elif text.count(":") == 1:  # IPv4 and a port; an IPv6 address has two colons or more
        spec, _, port_text = text.partition(":")
    else:
        spec, port_text = text, None
    if port_text == "":
        raise ConfigError(f"{text!r}: missing port after ':'")
    port = None if port_text is None else parse_port(port_text)
    return Rule(_network(text, spec, port), port)


def _network(text: str, spec: str, port: int | None) -> _IPNetwork:
    """The address or network ``spec`` (``ADDR`` or ``NET/PREFIX``) of the rule ``text``.

    Raises:
        ConfigError: naming the text, and if it looks like the original's ``ADDR/PORT``,
            saying how a port is written.
    """
    host, slash, prefix = spec.partition("/")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{text!r}: not an IP address or network (a rule takes no host names)"
        ) from None
    if not slash:
        return ipaddress.ip_network(address)
    longest = address.max_prefixlen
    if "/" in prefix:  # NET/PREFIX/PORT
        prefix, _, old_port = prefix.partition("/")
        raise ConfigError(
            f"{text!r}: a port follows a colon: {_with_port(f'{host}/{prefix}', old_port)}"
        )
    if not _DECIMAL.fullmatch(prefix):
        raise ConfigError(f"{text!r}: invalid prefix length {prefix!r} (expected 0-{longest})")
    bits = int(prefix)
    instead = "" if port is not None else f"; for port {bits}, write {_with_port(host, prefix)}"
    if bits > longest:
        raise ConfigError(f"{text!r}: prefix length {bits} is over {longest}{instead}")
    try:
        return ipaddress.ip_network(spec, strict=True)
    except ValueError:
        network = ipaddress.ip_network(spec, strict=False)
        raise ConfigError(
            f"{text!r}: {host} is not the first address of a /{bits} network "
            f"(that is {network}){instead}"
        ) from None


def _with_port(spec: str, port: str) -> str:
    """How the address or network ``spec`` is written with a port."""
    return f"[{spec}]:{port}" if ":" in spec else f"{spec}:{port}"


@dataclass(frozen=True)
class TlsFiles:
    """TLS for the TCP connections: the certificate chain and key this end presents, the CA
    certificates it verifies its peer against (a client: None means the system's store; a
    server: None means no client certificate is asked for), and the name the server's
    certificate must carry (a client: None means the host name it connects to)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None


class Mode(enum.Enum):
    """Which end of the TCP connection this tunnel end is."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True)
class Address:
    """A host and a port; ``host`` None means every local address (the wildcard)."""

    host: str | None
    port: int

    def __str__(self) -> str:
        return f"{self.host or '*'}/{self.port}"

    def shifted(self, offset: int) -> Address:
        """The same host, ``offset`` ports higher (the RTCP half of an RTP pair)."""
        return Address(self.host, self.port + offset)


@dataclass(frozen=True)
class Relay:
    """One port pair: a TCP connection and the UDP address it carries datagrams for.

    ``udp`` is where datagrams from the tunnel are sent; ``udp_bind`` is where datagrams for
    the tunnel are received.
    """

    tcp: Address
    udp: Address
    udp_bind: Address


PROXY_SCHEMES = ("http", "socks5", "socks5h")  # CONNECT; SOCKS5, we resolve; it resolves
MAX_NAME = 253  # characters of a DNS name in its ASCII form (RFC 1035, without the final dot)
SOCKS5_CREDENTIAL = (1, 255)  # bytes of a SOCKS5 user or password: one length byte (RFC 1929)
_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # letters, digits, - and _ in labels
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")  # as curl reads them
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


@dataclass(frozen=True)
class ProxySettings:
    """A client's proxy: ``scheme://[user[:password]@]host:port``. Shown without the
    credentials, which never reach a log; ``exposed``: the password was in the URL, where
    other users can read it (``ps``)."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    exposed: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def resolves_names(self) -> bool:
        """The proxy resolves the server's name (HTTP CONNECT, socks5h); for socks5 the
        client does, and asks for an address."""
        return self.scheme != "socks5"


def parse_proxy(text: str) -> ProxySettings:
    """Parse a ``--proxy`` URL: ``http://``, ``socks5://`` or ``socks5h://``, an optional
    ``user[:password]@`` (percent-encoded), a host (``[v6]`` in brackets) and a port.

    Raises:
        ConfigError: naming the text and what is wrong with it.
    """
    forms = "expected http://, socks5:// or socks5h://[USER@]HOST:PORT"
    shown = _without_credentials(text)
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:  # its words may quote the credentials
        raise ConfigError(f"{shown!r}: invalid port ({forms})") from exc
    scheme = url.scheme.lower()
    if scheme not in PROXY_SCHEMES or not url.netloc:
        raise ConfigError(f"{shown!r}: {forms}")
    if not url.hostname:
        raise ConfigError(f"{shown!r}: no proxy host ({forms})")
    if port is None:
        raise ConfigError(f"{shown!r}: a port is needed ({forms})")
    if not MIN_PORT <= port <= MAX_PORT:
        raise ConfigError(f"{shown!r}: invalid port {port} (expected {MIN_PORT}-{MAX_PORT})")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(f"{shown!r}: nothing may follow the port ({forms})")
    host = url.netloc.rpartition("@")[2].rpartition(":")[0].strip("[]")  # as written, not lowered
    if ascii_host(host) is None:
        raise ConfigError(f"{shown!r}: the proxy host {host!r} is not a valid name or address")
    username = unquote(url.username) if url.username is not None else None
    password = unquote(url.password) if url.password is not None else None
    return ProxySettings(scheme, host, port, username, password, exposed=password is not None)


def _without_credentials(text: str) -> str:
    """A proxy URL as it may be shown: whatever stands before its last ``@`` (the user and
    the password, however mistyped) replaced by ``***``."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else text


def ascii_host(host: str) -> str | None:
    """``host`` as it goes on the wire: an IP address as written, a name in its ASCII (IDNA)
    form; None if it is neither (a label too long, a space, a line break)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return host
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return name if len(name.rstrip(".")) <= MAX_NAME and _NAME.fullmatch(name) else None


def _check_credentials(proxy: ProxySettings) -> None:
    """Refuse credentials that the proxy's protocol cannot carry, without showing them.

    Raises:
        ConfigError: an empty user; for HTTP Basic, a ``:`` in the user; for SOCKS5, a user
            or password that is not 1 to 255 ASCII characters (RFC 1929).
    """
    if proxy.username is None:
        return
    if not proxy.username:
        raise ConfigError(f"{proxy}: the proxy user is empty")
    if proxy.scheme == "http":
        if ":" in proxy.username:
            raise ConfigError(
                f"{proxy}: the proxy user may not contain ':' (HTTP Basic authentication "
                "cannot carry it)"
            )
        return
    low, high = SOCKS5_CREDENTIAL
    for what, value in (("user", proxy.username), ("password", proxy.password)):
        if value is not None and not (value.isascii() and low <= len(value) <= high):
            raise ConfigError(
                f"{proxy}: the proxy {what} must be {low} to {high} ASCII characters for SOCKS5 "
                "(RFC 1929)"
            )


def proxy_from_environment(
    environ: Mapping[str, str], host: str, port: int
) -> ProxySettings | None:
    """The proxy for a connection to ``host``/``port`` that the environment names, as curl
    chooses it for an HTTPS URL: ``https_proxy``, ``HTTPS_PROXY``, ``all_proxy``,
    ``ALL_PROXY`` (the first set; a value without a scheme is ``http://``), unless
    ``no_proxy`` or ``NO_PROXY`` names the host: ``*``, a domain (``example.org`` and
    ``.example.org`` both cover its subdomains), an address or a network, each with an
    optional ``:PORT``.

    Raises:
        ConfigError: the variable's value is not a proxy URL.
    """
    for name in PROXY_VARIABLES:
        if value := environ.get(name, "").strip():
            break
    else:
        return None
    exceptions = next((environ[n] for n in NO_PROXY_VARIABLES if environ.get(n)), "")
    if any(_bypasses(entry.strip().lower(), host.lower(), port) for entry in exceptions.split(",")):
        return None
    try:
        return parse_proxy(value if "://" in value else f"http://{value}")
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def _bypasses(entry: str, host: str, port: int) -> bool:
    """Whether one ``no_proxy`` entry covers ``host``/``port``."""
    if not entry:
        return False
    if entry == "*":
        return True
    if (match := re.fullmatch(r"(.*[^:]):([0-9]+)", entry)) and not _is_network(entry):
        if int(match[2]) != port:
            return False
        entry = match[1].strip("[]")
    if _is_network(entry):
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False  # a name is not in a network
    domain = entry.lstrip(".")
    return host == domain or host.endswith("." + domain)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _proxy(
    mode: Mode,
    proxy: str | None,
    password: str | None,
    tcp: Address,
    environ: Mapping[str, str],
) -> ProxySettings | None:
    """The client's proxy: ``--proxy URL``, or ``--proxy env`` from ``environ``; the
    password, if given apart from the URL, in place of none.

    Raises:
        ConfigError: a server given a proxy, a bad URL, or a password given twice.
    """
    if proxy is None:
        if password is not None:
            raise ConfigError("a proxy password without --proxy")
        return None
    if mode is Mode.SERVER:
        raise ConfigError("--proxy is for a client (-c): a server makes no connections")
    assert tcp.host is not None  # a client always names its server
    if proxy == "env":
        settings = proxy_from_environment(environ, tcp.host, tcp.port)
    else:
        settings = parse_proxy(proxy)
    if settings is None:
        return None
    if password is not None:
        if settings.exposed:
            raise ConfigError("the proxy password is given twice: in the URL and apart from it")
        if settings.username is None:
            raise ConfigError(
                "a proxy password without a user: give the user in the URL "
                f"({settings.scheme}://USER@{settings.host}:{settings.port})"
            )
        settings = replace(settings, password=password)
    _check_credentials(settings)
    return settings


@dataclass(frozen=True)
class Config:
    """One tunnel end, checked: every port in range, RTP ports even."""

    mode: Mode
    tcp: Address
    udp: Address
    udp_bind: Address
    ttl: int = DEFAULT_TTL
    rtp: bool = False
    max_delay: float = DEFAULT_MAX_DELAY
    persist: bool = False  # re-establish a tunnel that ends, instead of exiting
    reconnect_max: float = DEFAULT_RECONNECT_MAX
    keepalive: int | None = None  # seconds idle before TCP keepalive probes; None: off
    idle_timeout: float | None = None  # seconds without a datagram that end a tunnel
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    flows: bool = False  # one TCP connection per UDP source, many at once
    max_flows: int = DEFAULT_MAX_FLOWS
    flow_timeout: float = DEFAULT_FLOW_TIMEOUT
    allow_from: tuple[Rule, ...] = ()  # accepted UDP sources; empty: everyone
    reuse_port: bool = False  # let several flow-mode servers share the TCP port
    tls: TlsFiles | None = None  # None: plain TCP, the original's wire format
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES  # flow server: unproven connections at once
    proxy: ProxySettings | None = None  # a client's way out: HTTP CONNECT or SOCKS5
    connections: int = 1  # TCP connections per port pair (lanes.py); both ends must ask

    @property
    def relays(self) -> tuple[Relay, ...]:
        """The port pairs to run: one, or two consecutive ones in RTP mode."""
        count = RTP_PAIR if self.rtp else 1
        return tuple(
            Relay(self.tcp.shifted(i), self.udp.shifted(i), self.udp_bind.shifted(i))
            for i in range(count)
        )


def _tls_files(
    mode: Mode,
    tls: bool,
    cert: str | None,
    key: str | None,
    ca: str | None,
    server_name: str | None,
) -> TlsFiles | None:
    """Whether this end uses TLS, and with what; never plain TCP when a TLS file is named.

    Raises:
        ConfigError: a TLS option that would be ignored, or one missing.
    """
    named = [
        option
        for option, value in (
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--tls-ca", ca),
            ("--tls-server-name", server_name),
        )
        if value is not None
    ]
    if mode is Mode.SERVER:
        if server_name is not None:
            raise ConfigError("--tls-server-name is for a client (-c --tls)")
        if not (tls or named):
            return None
        if cert is None or key is None:
            raise ConfigError("A TLS server needs --tls-cert and --tls-key.")
    else:
        if not tls:
            if named:
                raise ConfigError(f"{named[0]} needs --tls: without it the tunnel is plain TCP")
            return None
        if (cert is None) != (key is None):
            raise ConfigError("--tls-cert and --tls-key go together.")
    return TlsFiles(cert, key, ca, server_name)


def parse_port(text: str) -> int:
    """Parse a port number strictly: decimal digits only, 1 to 65535.

    Raises:
        ConfigError: naming the text, if it is not such a number.
    """
    if not _DECIMAL.fullmatch(text) or not MIN_PORT <= int(text) <= MAX_PORT:
        raise ConfigError(f"{text!r}: invalid port number (expected {MIN_PORT}-{MAX_PORT})")
    return int(text)


def parse_ttl(text: str) -> int:
    """Parse a multicast TTL strictly: decimal digits only, 0 to 255.

    Raises:
        ConfigError: naming the text, if it is not such a number.
    """
    if not _DECIMAL.fullmatch(text) or int(text) > MAX_TTL:
        raise ConfigError(f"{text!r}: invalid TTL (expected 0-{MAX_TTL})")
    return int(text)


def split_address(text: str) -> tuple[str, list[str]]:
    """Split ``host/field/...`` into the host and the fields after it.

    ``/`` always separates; ``:`` separates too unless the host is a bare IPv6 literal, which
    is written ``[::1]:5000`` or ``::1/5000`` instead.

    Raises:
        ConfigError: if the host is empty or a ``[`` is not closed.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"{text!r}: missing ']' after the IPv6 address")
        if rest and rest[0] not in "/:":
            raise ConfigError(f"{text!r}: expected '/' or ':' after ']'")
        fields = _SEPARATORS.split(rest[1:]) if rest else []
    elif "/" in text:
        host, *fields = text.split("/")
    elif text.count(":") > 1 and _is_ipv6(text):
        host, fields = text, []
    else:
        host, *fields = text.split(":")
        if "::" in text:
            raise ConfigError(f"{text!r}: an IPv6 address with a port is [::1]:5000 or ::1/5000")
    if not host:
        raise ConfigError(f"{text!r}: missing host")
    if "" in fields:
        raise ConfigError(f"{text!r}: empty field")
    return host, fields


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_udp(text: str) -> tuple[Address, int]:
    """Parse the positional ``UDP-addr/UDP-port[/ttl]``.

    Returns:
        The UDP destination and the multicast TTL (the default when not given).

    Raises:
        ConfigError: naming the bad part.
    """
    host, fields = split_address(text)
    if not fields:
        raise ConfigError(f"{text!r}: missing UDP port (expected UDP-ADDR/UDP-PORT[/TTL])")
    if len(fields) > 2:
        raise ConfigError(f"{text!r}: too many fields (expected UDP-ADDR/UDP-PORT[/TTL])")
    port = parse_port(fields[0])
    return Address(host, port), parse_ttl(fields[1]) if len(fields) == 2 else DEFAULT_TTL


def parse_local(text: str, *, port_only: bool = False) -> tuple[str | None, int | None]:
    """Parse ``[addr/]port``, ``addr[/port]`` or ``port`` for a local address.

    Args:
        text: the value to parse.
        port_only: read one field as the port, not the host (``-s 6000``).

    Returns:
        The host (None: all addresses) and the port (None: not given).

    Raises:
        ConfigError: naming the bad part.
    """
    if _DECIMAL.fullmatch(text) or (port_only and not _SEPARATORS.search(text)):
        return None, parse_port(text)
    host, fields = split_address(text)
    if len(fields) > 1:
        raise ConfigError(f"{text!r}: too many fields (expected ADDR/PORT)")
    return host, parse_port(fields[0]) if fields else None


def parse_remote(text: str) -> tuple[str, int | None]:
    """Parse the client's ``TCP-addr[/TCP-port]``.

    Returns:
        The host and the port (None: not given, so it defaults to the UDP port).

    Raises:
        ConfigError: naming the bad part.
    """
    host, fields = split_address(text)
    if len(fields) > 1:
        raise ConfigError(f"{text!r}: too many fields (expected TCP-ADDR[/TCP-PORT])")
    if _DECIMAL.fullmatch(host):  # the resolver would take 6000 for the address 0.0.23.112
        raise ConfigError(
            f"{text!r}: a TCP host is missing (a bare number is not a host: -c HOST/{host})"
        )
    return host, parse_port(fields[0]) if fields else None


def build_config(
    *,
    server: str | None,
    client: str | None,
    udp: str,
    udp_bind: str | None = None,
    rtp: bool = False,
    max_delay_ms: int = round(DEFAULT_MAX_DELAY * 1000),
    persist: bool = False,
    reconnect_max: float = DEFAULT_RECONNECT_MAX,
    keepalive: int | None = None,
    idle_timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    flows: bool = False,
    max_flows: int = DEFAULT_MAX_FLOWS,
    flow_timeout: float = DEFAULT_FLOW_TIMEOUT,
    allow_from: Sequence[str] = (),
    reuse_port: bool = False,
    tls: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    proxy: str | None = None,
    proxy_password: str | None = None,
    connections: int = 1,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Check the command line as a whole and turn it into a Config.

    Args:
        server: the ``-s`` value, ``[TCP-addr/]TCP-port``.
        client: the ``-c`` value, ``TCP-addr[/TCP-port]``.
        udp: the positional ``UDP-addr/UDP-port[/ttl]``.
        udp_bind: the ``--udp-bind`` value, ``ADDR[/PORT]``.
        rtp: RTP mode, two consecutive even/odd port pairs.
        max_delay_ms: how long a datagram may wait in this tunnel end before it is dropped.
        persist, reconnect_max, keepalive, idle_timeout, connect_timeout, flows,
            max_flows, flow_timeout, reuse_port: as in Config.
        allow_from: the ``--allow-from`` values, parsed by ``parse_rule``.
        tls, tls_cert, tls_key, tls_ca, tls_server_name: ``--tls`` and its files; a server
            uses TLS when given a certificate, a client when given ``--tls``.
        handshake_timeout: seconds a connection has for its TLS handshake.
        proxy: the ``--proxy`` value, a URL or ``env``; proxy_password: its password, read
            from ``--proxy-password-file`` or UDPTUNNEL_PROXY_PASSWORD; environ: where
            ``--proxy env`` looks (the process's environment).
        connections: TCP connections per port pair.

    Raises:
        ConfigError: with the original's wording where it had one.
    """
    if server is not None and client is not None:
        raise ConfigError("Only one of -s and -c may be specified.")
    udp_address, ttl = parse_udp(udp)
    if server is not None:
        mode, (tcp_host, tcp_port) = Mode.SERVER, parse_local(server, port_only=True)
        if tcp_port is None:
            raise ConfigError(f"{server!r}: missing TCP port (expected [TCP-ADDR/]TCP-PORT)")
    elif client is not None:
        mode, (tcp_host, tcp_port) = Mode.CLIENT, parse_remote(client)
    else:
        raise ConfigError("You must specify one of -s and -c.")
    bind_host, bind_port = parse_local(udp_bind) if udp_bind is not None else (None, None)
    tcp = Address(tcp_host, udp_address.port if tcp_port is None else tcp_port)
    config = Config(
        mode=mode,
        tcp=tcp,
        udp=udp_address,
        udp_bind=Address(bind_host, udp_address.port if bind_port is None else bind_port),
        ttl=ttl,
        rtp=rtp,
        max_delay=max_delay_ms / 1000,
        persist=persist,
        reconnect_max=reconnect_max,
        keepalive=keepalive,
        idle_timeout=idle_timeout,
        connect_timeout=connect_timeout,
        flows=flows,
        max_flows=max_flows,
        flow_timeout=flow_timeout,
        allow_from=tuple(parse_rule(rule) for rule in allow_from),
        reuse_port=reuse_port,
        tls=_tls_files(mode, tls, tls_cert, tls_key, tls_ca, tls_server_name),
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
        proxy=_proxy(mode, proxy, proxy_password, tcp, {} if environ is None else environ),
        connections=connections,
    )
    if flows and rtp:
        raise ConfigError("Flow mode (--flows) and RTP mode (-r) cannot be combined.")
    if flows and connections > 1:
        raise ConfigError(
            "--connections does not combine with flow mode (--flows): each flow has a "
            "connection of its own"
        )
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ConfigError(
            f"{connections}: invalid number of connections (expected 1-{MAX_CONNECTIONS})"
        )
    if reuse_port and not (flows and mode is Mode.SERVER):
        raise ConfigError("--reuse-port needs a flow-mode server (-s and --flows).")
    if not 1 <= max_delay_ms <= MAX_MAX_DELAY * 1000:
        raise ConfigError(f"{max_delay_ms}: invalid maximum delay (expected 1-60000 ms)")
    if rtp:
        for role, address in (
            ("UDP", config.udp),
            ("UDP bind", config.udp_bind),
            ("TCP", config.tcp),
        ):
            if address.port % 2:
                raise ConfigError(
                    f"Port numbers must be even when using RTP mode ({role} port {address.port})."
                )
    return config
