"""How long tunnels live: the pause between two attempts to connect, and the end of a tunnel
that carries nothing.

A client that reconnects at once, forever, would hammer a server that is down or refusing;
one that waits a fixed time would reconnect in step with every other client after an
outage. Each wait is therefore twice the one before, up to a cap, and spread at random over
its upper half.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

FIRST_WAIT = 0.5  # seconds before the first retry
DEFAULT_WAIT_MAX = 30.0  # seconds: the cap, unless the user sets another
IDLE_LOOKS = 8  # looks at the counters per idle timeout: it ends at most 1/8 late
DOUBLINGS_MAX = 32  # past this the cap rules anyway; more would overflow a float, in days
STEADY_AFTER = 10.0  # seconds: a tunnel up this long was a success, and the waits start over


class Backoff:
    """Exponential waits with jitter: 0.5 s, 1 s, 2 s, ... up to ``cap``, each drawn from
    the upper half of its range."""

    def __init__(self, cap: float = DEFAULT_WAIT_MAX, draw: Callable[[], float] = random.random):
        self._cap = cap
        self._draw = draw
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many waits since the last success."""
        return self._attempt

    def next(self) -> float:
        """The next wait, in seconds."""
        ceiling = min(self._cap, FIRST_WAIT * 2 ** min(self._attempt, DOUBLINGS_MAX))
        self._attempt += 1
        return float(ceiling * (0.5 + self._draw() / 2))

    def reset(self) -> None:
        self._attempt = 0


async def end_when_idle(
    traffic: Callable[[], int], seconds: float, end: Callable[[], object]
) -> None:
    """Call ``end()`` once ``traffic()`` (datagrams carried either way) has stayed the same
    for ``seconds``, give or take an eighth."""
    seen, since = traffic(), trio.current_time()
    while True:
        await trio.sleep(seconds / IDLE_LOOKS)
        if (now := traffic()) != seen:
            seen, since = now, trio.current_time()
        elif trio.current_time() - since >= seconds:
            log.info("No datagram for %g s; closing the tunnel", seconds)
            end()
            return
