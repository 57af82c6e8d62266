"""The ``udptunnel`` command's first step: signals are taken in hand from the very start.

Starting the program (importing trio, click and ssl) takes a noticeable moment, and so does
its shutdown. A signal then would meet Python's defaults: SIGINT a KeyboardInterrupt
traceback, SIGTERM, SIGHUP and SIGUSR1 death by that signal, which a service manager takes
for a crash. So, before anything else is imported, a stop signal (SIGINT, SIGTERM, SIGHUP)
is only remembered, and the tunnel ends as soon as it has started (cli.py looks); SIGUSR1
is ignored. While the tunnel runs, cli.py's own watcher takes every one of them; once it
has ended, they are ignored until the process exits.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
pending: list[int] = []  # stop signals that came before the watcher was there


def _remember(signum: int, frame: FrameType | None) -> None:
    pending.append(signum)


def main() -> None:
    """The console script's entry point."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        from .cli import main as command  # the slow part, now safe from signals

        command()
    finally:
        # Python's own shutdown puts the default back for every signal a Python function
        # handled: from here to the exit, a stop signal would kill the process.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
