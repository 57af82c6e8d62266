"""Flow mode's table of flows, which behaves like a NAT's: bounded, and making room.

A flow holds a slot from its first datagram (or connection) to its end. ``--max-flows``
is the hard bound. At the bound, a new flow takes the slot of the least recently active
flow that has been idle for a while (EVICTABLE_AFTER), as a NAT reuses its oldest idle
mapping; only when every flow is busy is the newcomer refused. Flows idle for the flow
timeout end on their own. One task sweeps the whole table, twice a second, so that a
thousand flows cost one timer, not a thousand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

import trio

from .counters import Counters

log = logging.getLogger(__name__)

EVICTABLE_AFTER = 1.0  # seconds idle after which a flow may give up its slot to a new one
SWEEPS_PER_TIMEOUT = 8  # looks at the table per flow timeout: an idle flow ends at most 1/8 late
LOOKS_PER_EVICTABLE = 2  # looks per EVICTABLE_AFTER at least: idleness is known that closely


class Flow:
    """One flow's slot: its counters, the scope that ends it, and when it was last seen
    carrying anything. Kept by identity."""

    def __init__(self, name: str, counters: Counters, now: float) -> None:
        self.name = name
        self.counters = counters
        self.scope = trio.CancelScope()
        self.ended: str | None = None  # why the table ended it, if it did
        self._seen = counters.traffic
        self._since = now

    def idle(self, now: float) -> float:
        """Seconds without a datagram either way, as far as the looks so far can tell (never
        more than the truth)."""
        traffic = self.counters.traffic
        if traffic != self._seen:
            self._seen, self._since = traffic, now
        return now - self._since

    def end(self, why: str) -> None:
        """End the flow: its task leaves its scope, and closes its connection in order."""
        self.ended = why
        self.scope.cancel(reason=f"the flow was {why}")


F = TypeVar("F", bound=Flow)


class FlowTable(Generic[F]):
    """The flows of one flow-mode end, by key (a client's UDP sources; a server's
    connections), at most ``limit`` of them.

    Args:
        limit: ``--max-flows``.
        timeout: ``--flow-timeout``, seconds without a datagram that end a flow.
        totals: the end's counters; each flow counts in a child of them.
    """

    def __init__(self, limit: int, timeout: float, totals: Counters) -> None:
        self.limit = limit
        self.timeout = timeout
        self.totals = totals
        self._flows: dict[Hashable, F] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[F]:
        return iter(list(self._flows.values()))

    def get(self, key: Hashable) -> F | None:
        return self._flows.get(key)

    def add(self, key: Hashable, make: Callable[[Counters, float], F]) -> F | None:
        """A new flow for ``key``, made by ``make(counters, now)``; at the limit, in the slot
        of the least recently active idle flow, which ends. None if every flow is busy: the
        refusal is counted and logged at -v by the caller."""
        now = trio.current_time()
        if len(self._flows) >= self.limit and not self._evict(now):
            self.totals.flows_refused += 1
            return None
        flow = make(self.totals.child(), now)
        self._flows[key] = flow
        return flow

    def remove(self, key: Hashable, flow: F) -> None:
        """The flow has ended: its slot is free (unless another already took it) and its
        counts join the totals."""
        if self._flows.get(key) is flow:
            del self._flows[key]
        self.totals.retire(flow.counters)

    def _evict(self, now: float) -> bool:
        """End the least recently active flow idle for EVICTABLE_AFTER; False if none is."""
        key, idle = None, 0.0
        for candidate, flow in self._flows.items():  # in order of arrival: ties go oldest
            seconds = flow.idle(now)
            if seconds >= EVICTABLE_AFTER and (key is None or seconds > idle):
                key, idle = candidate, seconds
        if key is None:
            return False
        flow = self._flows.pop(key)
        flow.end("evicted")
        self.totals.flows_evicted += 1
        log.info("Flow from %s: idle %.1f s, ended to make room for a new one", flow.name, idle)
        return True

    async def sweep(self) -> None:
        """End every flow idle for the timeout, give or take an eighth; until cancelled.

        The looks also date each flow's last activity for eviction: a flow is known to be
        idle only from the first look that saw it so, so they come at least twice within
        EVICTABLE_AFTER. Before, a burst of new flows found none idle long enough until
        the next look, up to an eighth of the flow timeout later.
        """
        interval = min(self.timeout / SWEEPS_PER_TIMEOUT, EVICTABLE_AFTER / LOOKS_PER_EVICTABLE)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for key, flow in list(self._flows.items()):
                if flow.idle(now) >= self.timeout:
                    del self._flows[key]
                    flow.end("idle")
