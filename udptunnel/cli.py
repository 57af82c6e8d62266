"""The ``udptunnel`` command: options in, a running tunnel, an exit status out.

Exit status: 0 when the tunnel ends because the peer closed it or a signal asked it to; 1 when
something fails at run time; 2 for a bad command line or a host name that does not resolve.
Every error is one line on standard error, never a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import click
import trio

from . import __version__
from .config import DEFAULT_MAX_DELAY, Config, build_config
from .counters import Counters
from .errors import ConfigError, TunnelError
from .tunnel import run_tunnel

log = logging.getLogger(__name__)

PROG = "udptunnel"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # what getopt-style tools, and the original, exit with on a bad command line
_LEVELS = {0: logging.WARNING, 1: logging.INFO}  # -v: connections; -vv and more: each packet


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


@click.command(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Each datagram travels on TCP as a 16-bit big-endian length and its bytes, "
    "as with the original udptunnel. Exit status: 0 when the peer closed the tunnel or a "
    "signal stopped it, 1 when something failed, 2 for a bad command line. "
    "See udptunnel(1).",
)
@click.option(
    "-s",
    "--server",
    "servers",
    multiple=True,
    metavar="[TCP-ADDR/]TCP-PORT",
    help="Server mode: wait for the TCP connection on this port (on every address, or on "
    "TCP-ADDR), then relay.",
)
@click.option(
    "-c",
    "--client",
    "clients",
    multiple=True,
    metavar="TCP-ADDR[/TCP-PORT]",
    help="Client mode: connect to this TCP address, then relay. The port defaults to UDP-PORT.",
)
@click.option(
    "-r",
    "--rtp",
    is_flag=True,
    help="RTP mode: relay ports N and N+1 (RTP and RTCP), UDP and TCP. Ports must be even; "
    "use it on both ends.",
)
@click.option(
    "--udp-bind",
    metavar="ADDR[/PORT]",
    help="Receive datagrams for the tunnel on this address and port, instead of every "
    "address and UDP-PORT. Lets both ends and the applications share one host.",
)
@click.option(
    "--max-delay",
    "max_delay_ms",
    type=click.IntRange(1, 60_000),
    default=round(DEFAULT_MAX_DELAY * 1000),
    show_default=True,
    metavar="MS",
    help="Drop a datagram from the tunnel that waited in this end longer than MS "
    "milliseconds, rather than deliver it late.",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Report connections on standard error; twice, every datagram too.",
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.argument("udp", metavar="UDP-ADDR/UDP-PORT[/TTL]")
def command(
    servers: Sequence[str],
    clients: Sequence[str],
    rtp: bool,
    udp_bind: str | None,
    max_delay_ms: int,
    verbose: int,
    udp: str,
) -> int:
    """Tunnel UDP datagrams both ways over one TCP connection.

    Datagrams arriving on UDP-PORT go into the tunnel; datagrams coming out of it are sent to
    UDP-ADDR/UDP-PORT (with TTL, default 1, if UDP-ADDR is a multicast group). Addresses are
    host names, IPv4 or IPv6: 127.0.0.1/5000, 127.0.0.1:5000, ::1/5000, [::1]:5000.
    """
    if len(servers) + len(clients) > 1:
        raise _BadConfig("Only one of -s and -c may be specified.")
    try:
        config = build_config(
            server=servers[0] if servers else None,
            client=clients[0] if clients else None,
            udp=udp,
            udp_bind=udp_bind,
            rtp=rtp,
            max_delay_ms=max_delay_ms,
        )
    except ConfigError as exc:
        raise _BadConfig(str(exc)) from exc
    _configure_logging(verbose)
    return run(config)


def run(config: Config) -> int:
    """Run the tunnel end; return its exit status after reporting any error in one line."""
    counters = Counters()
    status = EXIT_OK
    try:
        trio.run(_run, config, counters)
    except* ConfigError as group:
        _report(group)
        status = EXIT_USAGE
    except* (TunnelError, OSError) as group:
        _report(group)
        status = status or EXIT_FAILURE
    return status


async def _run(config: Config, counters: Counters) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, nursery.cancel_scope)
        await run_tunnel(config, counters)
        nursery.cancel_scope.cancel(reason="the tunnel ended")


async def _stop_on_signal(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGINT, SIGTERM or SIGHUP ends the tunnel cleanly: sockets closed, exit 0."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("%s received, closing the tunnel", name)
            scope.cancel(reason=f"{name} received")
            return


def _report(group: BaseExceptionGroup[Any]) -> None:
    for message in _messages(group):
        click.echo(f"{PROG}: {message}", err=True)


def _messages(group: BaseExceptionGroup[Any]) -> Iterator[str]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _messages(exc)
        else:
            yield str(exc)


def _configure_logging(verbosity: int) -> None:
    """Bare messages on standard error, as the original printed them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger(__package__)
    package.handlers[:] = [handler]
    package.setLevel(_LEVELS.get(verbosity, logging.DEBUG))
    package.propagate = False


def main() -> NoReturn:
    """The console script's entry point."""
    command.main(prog_name=PROG)
