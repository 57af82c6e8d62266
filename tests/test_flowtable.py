"""The flow table as a NAT table: bounded, reusing the slot idle longest, ending idle flows.

Virtual time (``autojump_clock``): nothing here touches a socket, and every ``trio.sleep``
is the time that passes in the scenario (the clock jumps at once), never a wait for another
task to get somewhere.
"""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from udptunnel.counters import Counters
from udptunnel.flowtable import EVICTABLE_AFTER, Flow, FlowTable

TIMEOUT = 60.0


def table(limit: int) -> FlowTable[Flow]:
    return FlowTable[Flow](limit, TIMEOUT, Counters())


def open_flow(flows: FlowTable[Flow], key: str) -> Flow | None:
    return flows.add(key, partial(Flow, key))


def carry(flow: Flow) -> None:
    """The flow carried a datagram just now."""
    flow.counters.udp_to_tcp_datagrams += 1


async def test_at_the_limit_the_flow_idle_longest_gives_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flows = table(limit=3)
    a, b, c = (open_flow(flows, key) for key in "abc")
    assert a and b and c
    await trio.sleep(5)
    carry(a)  # a was busy 5 s in; b and c have been idle since they came, c came last
    flows.get("b")  # looking a flow up is no activity
    await trio.sleep(EVICTABLE_AFTER)
    d = open_flow(flows, "d")
    assert d is not None
    assert [b.ended, a.ended, c.ended] == ["evicted", None, None]  # b: the first of the oldest
    assert flows.get("b") is None and len(flows) == 3
    assert flows.totals.flows_evicted == 1 and flows.totals.flows_refused == 0


async def test_when_every_flow_is_busy_a_newcomer_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flows = table(limit=2)
    a, b = open_flow(flows, "a"), open_flow(flows, "b")
    assert a and b
    await trio.sleep(EVICTABLE_AFTER / 2)
    assert open_flow(flows, "c") is None  # not idle long enough to give way
    await trio.sleep(EVICTABLE_AFTER)
    carry(a)
    carry(b)
    assert open_flow(flows, "c") is None  # busy just now
    assert flows.totals.flows_refused == 2 and a.ended is None and b.ended is None


async def test_an_ended_flow_frees_its_slot_and_its_counts_join_the_totals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flows = table(limit=1)
    a = open_flow(flows, "a")
    assert a is not None
    carry(a)
    flows.remove("a", a)
    assert len(flows) == 0 and flows.totals.udp_to_tcp_datagrams == 1
    assert flows.totals.flows == 0
    b = open_flow(flows, "a")  # the same source again: a new flow
    assert b is not None and b is not a


async def test_the_sweep_ends_flows_idle_for_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flows = table(limit=10)
    quiet, chatty = open_flow(flows, "q"), open_flow(flows, "c")
    assert quiet and chatty
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flows.sweep)
        for _ in range(int(TIMEOUT * 1.5 / 5)):
            carry(chatty)
            await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert quiet.ended == "idle" and quiet.scope.cancel_called
    assert chatty.ended is None
    assert flows.get("q") is None and flows.get("c") is chatty


async def test_a_flow_that_went_quiet_unseen_is_evictable_a_second_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The flows carried their datagram and went quiet between two looks at the table: the
    # sweep's looks must date that, or a burst of new sources finds no slot to take.
    flows = table(limit=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flows.sweep)
        a, b = open_flow(flows, "a"), open_flow(flows, "b")
        assert a and b
        carry(a)
        carry(b)
        await trio.sleep(2 * EVICTABLE_AFTER)
        assert open_flow(flows, "c") is not None
        assert a.ended == "evicted"
        nursery.cancel_scope.cancel()
