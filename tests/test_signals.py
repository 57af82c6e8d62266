"""Signals at awkward moments: while the program starts, and while it closes.

A stop signal (SIGINT, SIGTERM, SIGHUP) at any moment ends the program with exit status 0
and no traceback; SIGUSR1 never ends it. Before the program has taken the signals in hand
(the interpreter's own start, some tens of milliseconds) the system's defaults apply, as
for any program: the tests wait until the process has installed its handlers (SigCgt in
/proc/PID/status) before signalling it.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import UDPTUNNEL, WAIT, Process, free_port
from .netns import wait_until

LOOPBACK = "127.0.0.1"
EXIT_LOOK = 0.002  # seconds between signals while waiting for the process to exit


def in_hand(pid: int) -> bool:
    """Whether the process has taken the signals in hand: it catches SIGHUP (Python itself
    catches only SIGINT), and catches or ignores SIGUSR1."""
    masks = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("SigCgt", "SigIgn"):
            masks[name] = int(value, 16)

    def has(mask: str, signum: int) -> bool:
        return bool(masks.get(mask, 0) >> (signum - 1) & 1)

    usr1 = has("SigCgt", signal.SIGUSR1) or has("SigIgn", signal.SIGUSR1)
    return has("SigCgt", signal.SIGHUP) and usr1


def server(spawn: type[Process]) -> Process:
    return spawn([UDPTUNNEL, "-v", "--flows", "-s", f"{LOOPBACK}/{free_port()}", f"{LOOPBACK}/9"])


def stopping_server(spawn: type[Process]) -> Process:
    """A server that was ready and has just been sent SIGTERM."""
    process = server(spawn)
    process.wait_for("Listening for TCP connections")
    process.signal(signal.SIGTERM)
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_starting_ends_it_cleanly(
    spawn: type[Process], signum: signal.Signals
) -> None:
    process = server(spawn)
    wait_until(lambda: in_hand(process.proc.pid), WAIT, "the signals in hand")
    process.signal(signal.SIGUSR1)  # ignored until the counters exist
    process.signal(signum)
    assert process.wait() == 0
    assert "Traceback" not in process.stderr
    assert f"{signum.name} received, closing the tunnel" in process.stderr


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_second_signal_while_closing_changes_nothing(
    spawn: type[Process], second: signal.Signals
) -> None:
    process = stopping_server(spawn)
    process.signal(second)
    assert process.wait() == 0
    assert "Traceback" not in process.stderr
    assert process.stderr.count("received, closing the tunnel") >= 1
    assert "Closed. " in process.stderr  # the summary, once all was closed


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_last_word_changes_nothing(
    spawn: type[Process], second: signal.Signals
) -> None:
    # Python's own shutdown, after the tunnel has closed, gives every signal a Python
    # function handled back to the system's default: the program must not die of one then.
    process = stopping_server(spawn)
    process.wait_for("Closed. ")
    while True:  # again and again, until it has exited: through the interpreter's shutdown
        process.signal(second)
        try:
            process.proc.wait(timeout=EXIT_LOOK)
        except subprocess.TimeoutExpired:
            continue
        break
    assert process.wait() == 0
