"""TLS for the tunnel's TCP connections: the standard library's ssl under ``trio.SSLStream``.

Plain TCP stays the default, byte for byte the original's wire format. With TLS, every
connection is TLS 1.3 (nothing older is offered or accepted), the client always verifies
the server's certificate and name, and a server given a CA demands a client certificate
signed by it (mutual TLS). There is no switch that turns verification off.

The contexts are built once, at the start, from the files named on the command line: keys
are read then and never again, and never logged. A file that cannot be read is a clear
configuration error, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
from pathlib import Path

import trio

from .config import Mode, TlsFiles
from .errors import ConfigError, TunnelError

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_3
HANDSHAKE_RECORD = 0x16  # the content type of the record every TLS client begins with
HEAD = 6  # bytes that tell a TLS record's type, version and length, and a handshake's type
# A ClientHello: a handshake record (SSL 3.0 to TLS 1.3 record versions), a length, type 1.
_CLIENT_HELLO = re.compile(rb"\x16\x03[\x00-\x04]..\x01", re.DOTALL)
# An alert record, sent in clear: its two bytes are a level and a description.
_ALERT = re.compile(rb"\x15\x03[\x00-\x04]\x00\x02")
# What a TLS server answers a client that sent something other than TLS, or nothing at
# all (a plain client sends nothing until its first datagram): a fatal unexpected_message
# alert in clear, which tells a plain udptunnel client that the server speaks TLS.
NOT_TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x0a"
ALERT_GRACE = 1.0  # seconds to send the alert that says why a handshake failed
# OpenSSL's reasons for a key that is not the certificate's: another key of its type, or a
# key of another type (RSA for an EC certificate), which fills no certificate's slot.
_NOT_ITS_KEY = {"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"}
_ALERT_NAME = re.compile(r"(?:SSLV3|TLSV1|TLSV13)_ALERT_(\w+)")  # OpenSSL's reason for one
_CERTIFICATE_ALERTS = {  # the alerts that refuse a certificate, in their RFC 8446 words
    "BAD_CERTIFICATE",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_UNKNOWN",
    "UNKNOWN_CA",
    "ACCESS_DENIED",
}


class Tls:
    """One tunnel end's TLS: its context, built once, and the handshake that every new
    connection must complete within the handshake timeout before it carries anything."""

    def __init__(self, files: TlsFiles, mode: Mode, handshake_timeout: float) -> None:
        self.server_side = mode is Mode.SERVER
        self.context = server_context(files) if self.server_side else client_context(files)
        self.server_name = files.server_name
        self.handshake_timeout = handshake_timeout

    async def secure(self, stream: trio.SocketStream, host: str | None) -> trio.abc.Stream:
        """``stream`` wrapped in TLS, once the handshake is done; a client checks that the
        server's certificate names ``--tls-server-name`` or else ``host``.

        Raises:
            TunnelError: the handshake failed or did not finish in time.
        """
        name = None if self.server_side else (self.server_name or host)
        with trio.move_on_after(self.handshake_timeout):
            return await handshake(
                stream, self.context, server_side=self.server_side, server_name=name
            )
        hint = "" if self.server_side else " (is the server started with --tls?)"
        raise TunnelError(f"TLS handshake unfinished after {self.handshake_timeout:g} s{hint}")


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The server's context: its certificate, and with a CA, mutual TLS.

    Raises:
        ConfigError: a file is missing, unreadable or not what it should be.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    if files.cert is None or files.key is None:
        raise ConfigError("A TLS server needs --tls-cert and --tls-key.")
    _load_chain(context, Path(files.cert), Path(files.key))
    if files.ca is not None:
        _load_ca(context, Path(files.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The client's context: the server verified against the CA or the system's store,
    its name checked; our certificate presented if we have one.

    Raises:
        ConfigError: a file is missing, unreadable or not what it should be.
    """
    if files.ca is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's store
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # this CA only; names checked
        _load_ca(context, Path(files.ca))
    context.minimum_version = MINIMUM_VERSION
    if files.cert is not None and files.key is not None:
        _load_chain(context, Path(files.cert), Path(files.key))
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    for path, what in ((cert, "certificate"), (key, "key")):
        _check_readable(path, what)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(_which_is_wrong(cert, key, exc)) from exc


def _which_is_wrong(cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """Which of the two files ``load_cert_chain`` refused, and why, in words: OpenSSL says
    neither (``PEM lib``, with no reason), so the certificate is tried on its own."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"{cert}: not a TLS certificate (PEM)"
    if exc.reason is None:
        return f"{key}: not a private key (PEM)"
    if exc.reason in _NOT_ITS_KEY:
        return f"{key}: not the key of {cert}"
    return f"{cert}, {key}: {exc.reason.lower().replace('_', ' ')}"


def _no_password() -> str:
    """Asked for when the key is encrypted: a daemon has no one to ask."""
    raise ConfigError(
        "the TLS key is encrypted; give an unencrypted key, readable by this user only"
    )


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    _check_readable(ca, "CA certificates")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"{ca}: no CA certificate in it") from exc


def _check_readable(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from exc


async def handshake(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_name: str | None,
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap ``stream`` in TLS and shake hands: as the server, or as a client that checks
    the server's certificate carries ``server_name``.

    Raises:
        TunnelError: the peer is not who it must be, or does not speak TLS 1.3.
    """
    # https_compatible: a connection ends with the transport's end, not a close_notify
    # alert, so that either end can close in order, reading to the other's end (see
    # sockets.Connections), without its kernel resetting data still on the way.
    wrapped = trio.SSLStream(
        stream,
        context,
        server_side=server_side,
        server_hostname=server_name,
        https_compatible=True,
    )
    try:
        await wrapped.do_handshake()
    except trio.BrokenResourceError as exc:
        await _send_alert(wrapped)
        peer = "client" if server_side else "server"
        raise TunnelError(f"TLS handshake failed: {reason(exc, peer=peer)}") from exc
    return wrapped


async def _send_alert(wrapped: trio.SSLStream[trio.abc.Stream]) -> None:
    """Send the alert that OpenSSL wrote when the handshake failed, which says why (a
    certificate missing or refused): trio.SSLStream leaves it unsent (python-trio/trio#3413),
    and without it the peer sees only the connection end."""
    outgoing = getattr(wrapped, "_outgoing", None)
    alert = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
    if alert:
        with (
            trio.move_on_after(ALERT_GRACE),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await wrapped.transport_stream.send_all(alert)


async def first_byte(stream: trio.SocketStream) -> bytes:
    """The first byte the peer sends, left in place for whoever reads next; b"" if the
    connection ends first."""
    try:
        return await stream.socket.recv(1, socket.MSG_PEEK)
    except OSError:
        return b""


def is_client_hello(head: bytes) -> bool:
    """Whether the first bytes of a connection are a TLS ClientHello."""
    return _CLIENT_HELLO.match(head) is not None


def is_alert(head: bytes) -> bool:
    """Whether the first bytes of a connection are a TLS alert in clear."""
    return _ALERT.match(head) is not None


def lost(stream: trio.abc.Stream, exc: trio.BrokenResourceError, doing: str) -> TunnelError:
    """The error for a connection that broke while ``doing`` something: ended by a TLS
    alert, the alert's meaning (it is the peer's reason, not a loss); otherwise lost, and
    why."""
    server_side = isinstance(stream, trio.SSLStream) and stream.server_side
    words = reason(exc, peer="client" if server_side else "server")
    if _alert(exc) is not None:
        return TunnelError(words)
    return TunnelError(f"TCP connection lost while {doing}: {words}")


def reason(exc: BaseException, *, peer: str) -> str:
    """Why a connection broke, from the error or the one behind it (a BrokenResourceError's
    cause): a certificate that failed verification, in OpenSSL's words; an alert that the
    ``peer`` ("client" or "server") ended it with, in what it means; the peer's end before
    a handshake was done; a system error in the system's words."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or "certificate verify failed"
        return f"the {peer}'s certificate failed verification: {why}"
    if (alert := _alert(exc)) is not None:
        if alert == "CERTIFICATE_REQUIRED":
            return "the server requires a client certificate (--tls-cert/--tls-key)"
        words = alert.lower().replace("_", " ").replace(" ca", " CA")
        if alert in _CERTIFICATE_ALERTS:
            return f"the {peer} refused our certificate: {words}"
        return f"the {peer} ended the handshake with the TLS alert {words!r}"
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):  # 3.11.2 gives the latter
        return f"the {peer} closed the connection" + (
            " (is it started with --tls?)" if peer == "server" else ""
        )
    if isinstance(cause, ssl.SSLError):
        if cause.reason == "WRONG_VERSION_NUMBER":
            return f"the {peer} does not speak TLS (is it started with --tls?)"
        if cause.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client sent no certificate"
        return cause.reason.lower().replace("_", " ") if cause.reason else str(cause)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or "the connection closed"


def _alert(exc: BaseException) -> str | None:
    """The name of the TLS alert the peer ended the connection with, if it did."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLError) and (match := _ALERT_NAME.fullmatch(cause.reason or "")):
        return match[1]
    return None
