"""The command line: every bad input is one line naming the problem, and the right status."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from udptunnel import __version__
from udptunnel.cli import command

from .conftest import free_port


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No real name service (``.invalid`` names do not exist, ``.later`` ones time out), and
    the package's logging put back as it was after each run of the command."""
    real = trio.socket.getaddrinfo

    async def getaddrinfo(host: str | None, *args: Any, **kwargs: Any) -> Any:
        if host and host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host and host.endswith(".later"):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return await real(host, *args, **kwargs)

    monkeypatch.setattr(trio.socket, "getaddrinfo", getaddrinfo)
    package = logging.getLogger("udptunnel")
    saved = package.handlers[:], package.level, package.propagate
    yield
    package.handlers[:], package.level, package.propagate = saved


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(command, list(args), prog_name="udptunnel")
    return result.exit_code, result.stderr


def assert_one_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("udptunnel: ")
    assert message in stderr


BAD_INPUT = [
    # (arguments, text the single line must contain)
    (["--tls-ca", "ca.pem", "-c", "h", "h/5000"], "--tls-ca needs --tls: without it the tunnel"),
    (["--tls", "--tls-cert", "c.pem", "-c", "h", "h/5000"], "--tls-cert and --tls-key go"),
    (["--tls", "-s", "6000", "h/5000"], "A TLS server needs --tls-cert and --tls-key."),
    (["--tls-server-name", "n", "-s", "6000", "h/5000"], "--tls-server-name is for a client"),
    (["--tls", "--tls-ca", "/nonexistent/ca.pem", "-c", "h", "h/5000"], "cannot read TLS CA"),
    (["--flows", "-r", "-s", "6000", "h/5000"], "Flow mode (--flows) and RTP mode (-r) cannot"),
    (["--reuse-port", "-s", "6000", "h/5000"], "--reuse-port needs a flow-mode server"),
    (["--flows", "--reuse-port", "-c", "h", "h/5000"], "--reuse-port needs a flow-mode server"),
    (["--allow-from", "host.example", "-s", "6000", "h/5000"], "not an IP address or network"),
    (["--allow-from", "10.0.0.1/8:53", "-s", "6000", "h/5000"], "not the first address"),
    (["--allow-from", "10.0.0.0/8:0x35", "-s", "6000", "h/5000"], "'0x35': invalid port"),
    (["--max-flows", "0", "--flows", "-s", "6000", "h/5000"], "--max-flows"),
    (["127.0.0.1/5000"], "You must specify one of -s and -c."),
    (["-s", "6000", "-c", "h", "127.0.0.1/5000"], "Only one of -s and -c may be specified."),
    (["-s", "6000", "-s", "6002", "127.0.0.1/5000"], "Only one of -s and -c may be specified."),
    (["-c", "h", "-c", "h", "127.0.0.1/5000"], "Only one of -s and -c may be specified."),
    (["-s", "0", "127.0.0.1/5000"], "'0': invalid port number"),
    (["-s", "65536", "127.0.0.1/5000"], "'65536': invalid port number"),
    (["-s", "20002abc", "127.0.0.1/5000"], "'20002abc': invalid port number"),
    (["-s", "0x1F40", "127.0.0.1/5000"], "'0x1F40': invalid port number"),
    (["-s", "-5", "127.0.0.1/5000"], "'-5': invalid port number"),
    (["-s", "6000", "127.0.0.1/70000"], "'70000': invalid port number"),
    (["-s", "6000", "127.0.0.1/5000x"], "'5000x': invalid port number"),
    (["-c", "h/6000abc", "127.0.0.1/5000"], "'6000abc': invalid port number"),
    (["-c", "6000", "127.0.0.1/5000"], "'6000': a TCP host is missing (a bare number is not"),
    (["-c", "6000/6000", "127.0.0.1/5000"], "-c HOST/6000"),
    (["-s", "6000", "--udp-bind", "127.0.0.1/99999", "h/5000"], "'99999': invalid port"),
    (["-s", "6000", "239.1.1.1/5000/256"], "'256': invalid TTL"),
    (["-s", "6000", "239.1.1.1/5000/-1"], "'-1': invalid TTL"),
    (["-s", "6000", "239.1.1.1/5000/1e2"], "'1e2': invalid TTL"),
    (["-s", "6000", "127.0.0.1"], "missing UDP port"),
    (["-s", "6000", "/5000"], "missing host"),
    (["-s", "6000", "[::1/5000"], "missing ']'"),
    (["-s", "6000", "h/5000/1/2"], "too many fields"),
    (["-r", "-s", "6001", "127.0.0.1/5000"], "must be even when using RTP mode (TCP port 6001)"),
    (["-r", "-s", "6000", "127.0.0.1/5001"], "must be even when using RTP mode (UDP port 5001)"),
    (["-r", "-c", "h/6001", "127.0.0.1/5000"], "must be even when using RTP mode (TCP port 6001)"),
    (["-r", "-s", "6000", "--udp-bind", "5003", "h/5000"], "(UDP bind port 5003)"),
    (["-s", "6000", "127.0.0.1/5000", "extra"], "unexpected extra argument (extra)"),
    (["-s", "6000"], "Missing argument 'UDP-ADDR/UDP-PORT[/TTL]'"),
    (["-s"], "Option '-s' requires an argument"),
    (["-x", "-s", "6000", "h/5000"], "No such option"),
    (["-s", "6000", "no-such-host.invalid/5000"], "no-such-host.invalid: UDP host unknown"),
    (["-c", "no-such-host.invalid/6000", "127.0.0.1/5000"], "no-such-host.invalid: TCP host"),
    (["-s", "6000", "--udp-bind", "no-such-host.invalid", "127.0.0.1/5000"], "UDP bind host"),
    (["-s", "6000", "a..b/5000"], "a..b: UDP host unknown (not a valid name)"),
    (["-s", "6000", "a" * 70 + "/5000"], "UDP host unknown (not a valid name)"),
    (["-s", "6000", "::1:25000"], "an IPv6 address with a port is [::1]:5000 or ::1/5000"),
    (["-s", "6000", "127.0.0.1//5000"], "empty field"),
    (["-s", "6000", "--max-delay", "0", "127.0.0.1/5000"], "0 is not in the range 1<=x<=60000"),
    (["-s", "6000", "--max-delay", "5ms", "127.0.0.1/5000"], "'5ms' is not a valid whole number"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    status, stderr = invoke(*args)
    assert status == 2
    assert_one_line(stderr, message)


def test_connection_refused_is_one_line_and_exit_1() -> None:
    port = free_port()  # nothing listens there
    udp = free_port()
    status, stderr = invoke(
        "-c", f"127.0.0.1/{port}", "--udp-bind", f"127.0.0.1/{udp}", "127.0.0.1/9"
    )
    assert status == 1
    assert_one_line(stderr, f"cannot connect to TCP 127.0.0.1/{port}: Connection refused")


def test_tcp_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        udp = f"127.0.0.1/{free_port()}"
        status, stderr = invoke("-s", f"127.0.0.1/{port}", "--udp-bind", udp, "127.0.0.1/9")
    assert status == 1
    assert_one_line(stderr, f"cannot listen on TCP 127.0.0.1/{port}: Address already in use")


def test_udp_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        status, stderr = invoke("-s", "6000", "--udp-bind", f"127.0.0.1/{port}", "127.0.0.1/9")
    assert status == 1
    assert_one_line(stderr, f"cannot receive UDP on 127.0.0.1/{port}: Address already in use")


def test_permission_denied_is_one_line_and_exit_1() -> None:
    # Sending to the broadcast address needs SO_BROADCAST, which the tunnel does not set.
    status, stderr = invoke("-s", "6000", "255.255.255.255/5000")
    assert status == 1
    assert_one_line(stderr, "cannot send UDP to 255.255.255.255/5000: Permission denied")


def test_a_name_service_that_cannot_answer_now_is_a_failure_not_bad_input() -> None:
    status, stderr = invoke("-s", "6000", "some.host.later/5000")
    assert status == 1
    assert_one_line(stderr, "some.host.later: UDP host lookup failed: Temporary failure")


def test_help_and_version_exit_0() -> None:
    for flag in ("-h", "--help"):
        result = CliRunner().invoke(command, [flag], prog_name="udptunnel")
        assert result.exit_code == 0
        assert "UDP-ADDR/UDP-PORT[/TTL]" in result.stdout
    result = CliRunner().invoke(command, ["--version"], prog_name="udptunnel")
    assert result.exit_code == 0
    assert result.stdout == f"udptunnel {__version__}\n"


SECONDS_OPTIONS = [
    "--reconnect-max",
    "--idle-timeout",
    "--connect-timeout",
    "--flow-timeout",
    "--handshake-timeout",
]


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-inf", "infinity"])
@pytest.mark.parametrize("option", SECONDS_OPTIONS)
def test_seconds_are_never_nan_nor_infinite_on_the_command_line_or_in_the_environment(
    option: str, value: str
) -> None:
    status, stderr = invoke(option, value, "-s", "6000", "127.0.0.1/5000")
    assert status == 2
    assert_one_line(stderr, option)
    variable = "UDPTUNNEL_" + option.removeprefix("--").replace("-", "_").upper()
    runner = CliRunner(env={variable: value})
    result = runner.invoke(command, ["-s", "6000", "127.0.0.1/5000"], prog_name="udptunnel")
    assert result.exit_code == 2
    assert_one_line(result.stderr, option)
