"""The ``udptunnel`` command: options in, a running tunnel, an exit status out.

Exit status: 0 when the tunnel ends because the peer closed it or a signal asked it to; 1 when
something fails at run time; 2 for a bad command line or a host name that does not resolve.
Every error is one line on standard error, never a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any, NoReturn, TypeVar

import click
import trio

from . import __version__, launch
from .config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FLOW_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_DELAY,
    DEFAULT_MAX_FLOWS,
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_RECONNECT_MAX,
    MAX_CONNECTIONS,
    Config,
    build_config,
)
from .counters import Counters
from .errors import ConfigError, TunnelError, messages
from .launch import STOP_SIGNALS
from .systemd import NOTICE, JournalFormatter, Notifier, priority, writes_to_journal
from .tunnel import Ready, run_tunnel

log = logging.getLogger(__name__)

PROG = "udptunnel"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # what getopt-style tools, and the original, exit with on a bad command line
_LEVELS = {0: NOTICE, 1: logging.INFO}  # -v: connections; -vv and more: each packet
ENV = "UDPTUNNEL_"  # every option can also come from UDPTUNNEL_<NAME>, for systemd units
F = TypeVar("F", bound=Callable[..., Any])


class _OneLineErrors(click.Command):
    """A Click command whose usage errors are one line, ``udptunnel: message``."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        try:
            status = super().main(*args, **kwargs)
        except click.ClickException as exc:
            hint = f" (see '{PROG} --help')" if isinstance(exc, click.UsageError) else ""
            click.echo(f"{PROG}: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            sys.exit(EXIT_FAILURE)
        sys.exit(status)


class _BadConfig(click.ClickException):
    """A command line that parses but makes no sense; the message says why."""

    exit_code = EXIT_USAGE


def _env_name(name: str) -> str:
    """UDPTUNNEL_IDLE_TIMEOUT for --idle-timeout."""
    return name.removeprefix("--").replace("-", "_").upper()


def _option(*names: str, env: str, **attributes: Any) -> Callable[[F], F]:
    """A Click option that can also come from the variable UDPTUNNEL_<env>, shown in --help."""
    return click.option(*names, envvar=ENV + env, show_envvar=True, **attributes)


class _Whole(click.IntRange):
    """A whole number of some unit in a range, named in the error (click says "integer
    range", which reads as if a range were expected)."""

    def __init__(self, low: int, high: int, unit: str = "") -> None:
        super().__init__(low, high)
        self.name = f"whole number{f' of {unit}' if unit else ''}"


class _Seconds(click.FloatRange):
    """A number of seconds in a range; never NaN, which every range test lets through."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def _seconds(
    name: str, kind: click.ParamType[Any], default: float | None, text: str
) -> Callable[[F], F]:
    """An option of seconds, named after its long form (UDPTUNNEL_IDLE_TIMEOUT, ...)."""
    env = _env_name(name)
    shown = default is not None
    return _option(
        name, env=env, type=kind, default=default, show_default=shown, metavar="SECONDS", help=text
    )


def _limit(name: str, default: int, text: str) -> Callable[[F], F]:
    """An option counting things at once, 1 to 100,000."""
    env = _env_name(name)
    kind = _Whole(1, 100_000)
    return _option(
        name, env=env, type=kind, default=default, show_default=True, metavar="N", help=text
    )


def _tls_file(name: str, text: str) -> Callable[[F], F]:
    """An option naming a PEM file, which tls.py reads (and says why, if it cannot)."""
    env = _env_name(name)
    kind = click.Path(dir_okay=False, readable=False)
    return _option(name, env=env, type=kind, metavar="FILE", help=text)


@click.command(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Each datagram travels on TCP as a 16-bit big-endian length and its bytes, "
    "as with the original udptunnel. Exit status: 0 when the peer closed the tunnel or a "
    "signal stopped it, 1 when something failed, 2 for a bad command line. "
    "See udptunnel(1).",
)
@_option(
    "-s",
    "--server",
    "servers",
    env="SERVER",
    multiple=True,
    metavar="[TCP-ADDR/]TCP-PORT",
    help="Server mode: wait for the TCP connection on this port (on every address, or on "
    "TCP-ADDR), then relay.",
)
@_option(
    "-c",
    "--client",
    "clients",
    env="CLIENT",
    multiple=True,
    metavar="TCP-ADDR[/TCP-PORT]",
    help="Client mode: connect to this TCP address, then relay. The port defaults to UDP-PORT.",
)
@_option(
    "-r",
    "--rtp",
    env="RTP",
    is_flag=True,
    help="RTP mode: relay ports N and N+1 (RTP and RTCP), UDP and TCP. Ports must be even; "
    "use it on both ends.",
)
@_option(
    "--udp-bind",
    env="UDP_BIND",
    metavar="ADDR[/PORT]",
    help="Receive datagrams for the tunnel on this address and port, instead of every "
    "address and UDP-PORT. Lets both ends and the applications share one host.",
)
@_option(
    "--max-delay",
    "max_delay_ms",
    env="MAX_DELAY",
    type=_Whole(1, 60_000, "milliseconds"),
    default=round(DEFAULT_MAX_DELAY * 1000),
    show_default=True,
    metavar="MS",
    help="Drop a datagram from the tunnel that waited in this end longer than MS "
    "milliseconds, rather than deliver it late.",
)
@_option(
    "--connections",
    env="CONNECTIONS",
    type=_Whole(1, MAX_CONNECTIONS),
    default=1,
    show_default=True,
    metavar="N",
    help="Carry each port pair over N TCP connections, on both ends: a segment lost on the "
    "way holds back only the datagrams on its own connection, not all (for real-time "
    "traffic over lossy links). The server must be started with it too; otherwise the "
    "client carries on over one.",
)
@_option(
    "-v",
    "--verbose",
    env="VERBOSE",
    count=True,
    help="Report connections on standard error; twice, every datagram too.",
)
@_option(
    "--persist",
    is_flag=True,
    env="PERSIST",
    help="When a tunnel ends, make a new one instead of exiting: a server takes the next "
    "client, a client reconnects after a growing wait. Datagrams while no tunnel is up are "
    "dropped and counted.",
)
@_seconds(
    "--reconnect-max",
    _Seconds(0.5, 3600),
    DEFAULT_RECONNECT_MAX,
    "With --persist: the longest wait between two attempts to connect (from 0.5 s, doubling).",
)
@_seconds(
    "--keepalive",
    _Whole(1, 86_400, "seconds"),
    None,
    "Probe a silent peer after SECONDS, and end the tunnel if it has vanished, within about "
    "twice SECONDS.",
)
@_seconds(
    "--idle-timeout",
    _Seconds(0.1, 86_400 * 365),
    None,
    "End a tunnel that carried no datagram either way for SECONDS.",
)
@_seconds(
    "--connect-timeout",
    _Seconds(0.1, 3600),
    DEFAULT_CONNECT_TIMEOUT,
    "Give up a connection attempt that gets no answer in SECONDS.",
)
@_option(
    "--flows",
    is_flag=True,
    env="FLOWS",
    help="Flow mode, on both ends: each UDP source gets a TCP connection of its own, and "
    "its replies back (request/response traffic, many clients). The client receives on "
    "UDP-ADDR/UDP-PORT; the server sends each flow from a socket of its own.",
)
@_limit(
    "--max-flows",
    DEFAULT_MAX_FLOWS,
    "In flow mode: at most N flows at once; a new source or connection takes the slot of "
    "the flow idle longest (a second or more), and is refused only when all are busy.",
)
@_seconds(
    "--flow-timeout",
    _Seconds(0.1, 86_400),
    DEFAULT_FLOW_TIMEOUT,
    "In flow mode: end a flow that carried no datagram either way for SECONDS.",
)
@_option(
    "--allow-from",
    multiple=True,
    metavar="ADDR[/PREFIX][:PORT]",
    env="ALLOW_FROM",
    help="Accept datagrams into the tunnel only from these sources (repeatable; 10.0.0.0/8, "
    "192.0.2.7:5000, 10.0.0.0/8:53, [::1]:53, [2001:db8::/32]:443). Others are dropped and "
    "counted. Default: anyone.",
)
@_option(
    "--reuse-port",
    is_flag=True,
    env="REUSE_PORT",
    help="In a flow-mode server: let other processes listen on the same TCP port "
    "(SO_REUSEPORT); the kernel spreads the connections among them.",
)
@_option(
    "--tls",
    is_flag=True,
    env="TLS",
    help="TLS 1.3 on the TCP connection. A client verifies the server's certificate (against "
    "--tls-ca, or the system's CAs) and its name; a server needs --tls-cert and --tls-key.",
)
@_tls_file("--tls-cert", "The certificate chain (PEM) this end presents; TLS on, for a server.")
@_tls_file("--tls-key", "The private key (PEM) of --tls-cert. Read once, at the start.")
@_tls_file(
    "--tls-ca",
    "CA certificates (PEM) to verify the peer with: a client checks the server against these "
    "alone; a server demands client certificates signed by them (mutual TLS).",
)
@_option(
    "--tls-server-name",
    metavar="NAME",
    env="TLS_SERVER_NAME",
    help="The name the server's certificate must carry, if not the host connected to.",
)
@_seconds(
    "--handshake-timeout",
    _Seconds(0.1, 600),
    DEFAULT_HANDSHAKE_TIMEOUT,
    "Close a new connection that has not finished its TLS handshake in SECONDS (a flow-mode "
    "server: in plain TCP, that has not sent its first frame).",
)
@_limit(
    "--max-handshakes",
    DEFAULT_MAX_HANDSHAKES,
    "TLS or flow-mode server: at most N connections at once that have not finished their TLS "
    "handshake (or, in plain TCP, sent their first frame); a newer one pushes out the oldest.",
)
@_option(
    "--proxy",
    metavar="URL",
    env="PROXY",
    help="A client's way out: connect through this proxy, http://[USER@]HOST:PORT (HTTP "
    "CONNECT), socks5://... (the client resolves the server's name) or socks5h://... (the "
    "proxy does); 'env' takes it from https_proxy or all_proxy, honouring no_proxy, as curl.",
)
@_option(
    "--proxy-password-file",
    type=click.Path(dir_okay=False, readable=False),
    metavar="FILE",
    env="PROXY_PASSWORD_FILE",
    help="The proxy user's password, the file's first line; or give it in "
    "UDPTUNNEL_PROXY_PASSWORD. Never on the command line, where other users can read it.",
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.argument("udp", metavar="UDP-ADDR/UDP-PORT[/TTL]", envvar=ENV + "UDP")
def command(servers: Sequence[str], clients: Sequence[str], verbose: int, **options: Any) -> int:
    """Tunnel UDP datagrams both ways over one TCP connection.

    Datagrams arriving on UDP-PORT go into the tunnel; datagrams coming out of it are sent to
    UDP-ADDR/UDP-PORT (with TTL, default 1, if UDP-ADDR is a multicast group). Addresses are
    host names, IPv4 or IPv6: 127.0.0.1/5000, 127.0.0.1:5000, ::1/5000, [::1]:5000.

    Every option can also be set in the environment variable shown with it, and the
    UDP-ADDR/UDP-PORT in UDPTUNNEL_UDP; the command line wins. SIGUSR1 logs the counters.
    """
    # The other options are build_config's keyword arguments, named as Click names them.
    servers, clients = _mode_from_the_command_line(servers, clients)
    if len(servers) + len(clients) > 1:
        raise _BadConfig("Only one of -s and -c may be specified.")
    try:
        config = build_config(
            server=servers[0] if servers else None,
            client=clients[0] if clients else None,
            proxy_password=_proxy_password(options.pop("proxy_password_file")),
            environ=os.environ,
            **options,
        )
    except ConfigError as exc:
        raise _BadConfig(str(exc)) from exc
    _configure_logging(verbose)
    if config.proxy is not None and config.proxy.exposed:
        log.warning(
            "The proxy password is in the URL, where other users can read it (ps): give it "
            "in --proxy-password-file or UDPTUNNEL_PROXY_PASSWORD"
        )
    return run(config)


def _mode_from_the_command_line(
    servers: Sequence[str], clients: Sequence[str]
) -> tuple[Sequence[str], Sequence[str]]:
    """-s or -c on the command line overrides the other one's variable, as any option
    overrides its own: an instance's file may say UDPTUNNEL_SERVER, a test run -c."""
    source = click.get_current_context().get_parameter_source
    typed = click.core.ParameterSource.COMMANDLINE
    if source("clients") == typed and source("servers") != typed:
        servers = ()
    if source("servers") == typed and source("clients") != typed:
        clients = ()
    return servers, clients


def run(config: Config) -> int:
    """Run the tunnel end; return its exit status after reporting any error in one line."""
    counters = Counters()
    status = EXIT_OK
    notifier = Notifier()
    try:
        trio.run(_run, config, counters, notifier)
    except* ConfigError as group:
        _report(group)
        status = EXIT_USAGE
    except* (TunnelError, OSError) as group:
        _report(group)
        status = status or EXIT_FAILURE
    finally:
        notifier.notify(STOPPING=1, STATUS=f"stopped; {counters.status()}")
        notifier.close()
    return status


async def _run(config: Config, counters: Counters, notifier: Notifier) -> None:
    # The signals are ours until the very end, shutdown included: one that comes while the
    # tunnel closes waits unread in the receiver, instead of killing the process.
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            watch = partial(_watch_signals, signals, nursery.cancel_scope, counters, notifier)
            await nursery.start(watch)
            await nursery.start(_run_then_stop, config, counters, nursery.cancel_scope)
            notifier.notify(READY=1, STATUS=counters.status())
            nursery.start_soon(notifier.run, counters.status)


async def _run_then_stop(
    config: Config,
    counters: Counters,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Ready] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the tunnel end, reporting started when it is ready; its end ends everything."""
    await run_tunnel(config, counters, task_status=task_status)
    scope.cancel(reason="the tunnel ended")


async def _watch_signals(
    signals: AsyncIterator[int],
    scope: trio.CancelScope,
    counters: Counters,
    notifier: Notifier,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGINT, SIGTERM or SIGHUP ends the tunnel cleanly (sockets closed, exit 0), also one
    that came while the program started; SIGUSR1 logs the counters, at a level shown
    without -v, and the traffic goes on."""
    task_status.started()
    if launch.pending:
        _stop(launch.pending[0], scope, notifier)
    async for signum in signals:
        if signum == signal.SIGUSR1:
            state = counters.state
            log.log(NOTICE, "%s. %s", state[:1].upper() + state[1:], counters.report())
        else:
            _stop(signum, scope, notifier)


def _stop(signum: int, scope: trio.CancelScope, notifier: Notifier) -> None:
    name = signal.Signals(signum).name
    log.info("%s received, closing the tunnel", name)
    notifier.notify(STOPPING=1, STATUS=f"{name} received, closing the tunnel")
    scope.cancel(reason=f"{name} received")


def _proxy_password(path: str | None) -> str | None:
    """The proxy's password: the first line of ``path``, or UDPTUNNEL_PROXY_PASSWORD.

    Raises:
        ConfigError: the file cannot be read.
    """
    if path is None:
        return os.environ.get(ENV + "PROXY_PASSWORD")
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"{path}: cannot read the proxy password ({why})") from exc


def _report(group: BaseExceptionGroup[Any]) -> None:
    prefix = f"<{priority(logging.ERROR)}>" if writes_to_journal() else ""
    for message in messages(group):
        click.echo(f"{prefix}{PROG}: {message}", err=True)


class _Lines(logging.Formatter):
    """Bare messages, as the original printed them; a failure the program survives
    (WARNING and above, shown without -v) carries the program's name, as an error does."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"{PROG}: {line}" if record.levelno >= logging.WARNING else line


class _JournalLines(JournalFormatter, _Lines):
    """The same lines, each after its priority (``<4>udptunnel: ...``)."""


def _configure_logging(verbosity: int) -> None:
    """Messages on standard error; into the journal, each with its priority."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter((_JournalLines if writes_to_journal() else _Lines)("%(message)s"))
    package = logging.getLogger(__package__)
    package.handlers[:] = [handler]
    package.setLevel(_LEVELS.get(verbosity, logging.DEBUG))
    package.propagate = False


def main() -> NoReturn:
    """The command, run by launch.main once the signals are in hand."""
    command.main(prog_name=PROG)
