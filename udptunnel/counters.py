"""What a tunnel end has carried and dropped, and what it is doing: for the summary line,
SIGUSR1 and the service manager's status line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)  # kept by identity: two flows' counts may well be equal
class Counters:
    """Datagrams and bytes each way, and datagrams dropped, by cause.

    Only the relay's direction tasks write these; anyone may read them.
    """

    udp_to_tcp_datagrams: int = 0
    udp_to_tcp_bytes: int = 0
    tcp_to_udp_datagrams: int = 0
    tcp_to_udp_bytes: int = 0
    dropped_own: int = 0  # our own datagrams looped back to us (the original's self-loop)
    dropped_late: int = 0  # out of the tunnel: waited here longer than the maximum delay
    dropped_too_large: int = 0  # frames too long for one UDP datagram on this path
    dropped_unsent: int = 0  # UDP sends refused or unroutable at that moment
    dropped_no_tunnel: int = 0  # into the tunnel while none was up (--persist)
    dropped_disallowed: int = 0  # into the tunnel: from a source --allow-from does not allow
    dropped_queue: int = 0  # into a flow: more than its queue holds while it connects
    dropped_no_flow: int = 0  # into the tunnel: a new source, and no flow to be had for it
    flows_refused: int = 0  # flow mode: flows refused, all busy (each datagram, connection)
    flows_evicted: int = 0  # flow mode: idle flows ended to make room for a new one
    flows_lost: int = 0  # flow mode: flows ended by a failure (reset, refused, ...)
    tunnels: int = 0  # tunnels (in flow mode, flows) established since the start
    reconnects: int = 0  # a client's attempts to connect after the first
    state: str = "starting"  # what the tunnel end is doing, in a few words
    # Into the tunnel, the kernel drops when a receive queue is full and counts per socket:
    # those counts are read when wanted (live sockets) or were kept when a socket closed.
    _overflow_live: list[Callable[[], int]] = field(default_factory=list, repr=False)
    _overflow_closed: int = 0
    # Flow mode: each flow counts in a child of its own (for its idle timeout), added in
    # here when it ends; the totals include the live ones.
    _children: set[Counters] = field(default_factory=set, repr=False)

    def child(self) -> Counters:
        """A new Counters for one flow, part of these totals until ``retire``d into them."""
        child = Counters()
        self._children.add(child)
        return child

    def retire(self, child: Counters) -> None:
        """Add an ended flow's counts to these for good."""
        self._children.remove(child)
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(child, name))
        self._overflow_closed += child._kernel_drops()

    @property
    def flows(self) -> int:
        """Flows open now (flow mode)."""
        return len(self._children)

    def totals(self) -> Counters:
        """These counts with those of every live flow: a snapshot, for reports."""
        if not self._children:
            return self
        snapshot = Counters(state=self.state, _overflow_closed=self._kernel_drops())
        for name in _SUMMED:
            value = getattr(self, name) + sum(getattr(child, name) for child in self._children)
            setattr(snapshot, name, value)
        snapshot._overflow_closed += sum(child._kernel_drops() for child in self._children)
        return snapshot

    def watch_overflow(self, read: Callable[[], int]) -> Callable[[], None]:
        """Count a socket's kernel drops, read by ``read``; call the result before it closes."""
        self._overflow_live.append(read)

        def retire() -> None:
            self._overflow_closed += read()
            self._overflow_live.remove(read)

        return retire

    @property
    def dropped_overflow(self) -> int:
        """Into the tunnel: datagrams dropped because a queue was full, the kernel's receive
        queue or a flow's while it connects."""
        return self._kernel_drops() + self.dropped_queue

    def _kernel_drops(self) -> int:
        return self._overflow_closed + sum(read() for read in self._overflow_live)

    @property
    def dropped(self) -> int:
        """All datagrams dropped, whatever the cause."""
        return (
            self.dropped_own
            + self.dropped_overflow
            + self.dropped_late
            + self.dropped_too_large
            + self.dropped_unsent
            + self.dropped_no_tunnel
            + self.dropped_disallowed
            + self.dropped_no_flow
        )

    @property
    def traffic(self) -> int:
        """Datagrams carried either way: it changes while the tunnel is in use."""
        return self.udp_to_tcp_datagrams + self.tcp_to_udp_datagrams

    def summary(self) -> str:
        """One line for the log: traffic each way and drops by cause."""
        if self._children:
            return self.totals().summary()
        return (
            f"UDP to TCP: {self.udp_to_tcp_datagrams} datagrams, {self.udp_to_tcp_bytes} bytes; "
            f"TCP to UDP: {self.tcp_to_udp_datagrams} datagrams, {self.tcp_to_udp_bytes} bytes; "
            f"dropped: {self.dropped} ({self.dropped_own} own, {self.dropped_overflow} queue "
            f"full, {self.dropped_late} late, {self.dropped_too_large} too large, "
            f"{self.dropped_unsent} unsent{self._other_causes()})"
        )

    def _other_causes(self) -> str:
        """The causes that only some modes have, named when they happened."""
        parts = [
            f", {count} {name}"
            for count, name in (
                (self.dropped_no_tunnel, "no tunnel"),
                (self.dropped_disallowed, "not allowed"),
                (self.dropped_no_flow, "no flow"),
            )
            if count
        ]
        return "".join(parts)

    def report(self) -> str:
        """The summary with what only a long-running end has: tunnels and reconnections."""
        line = f"{self.summary()}; tunnels: {self.tunnels}, reconnects: {self.reconnects}"
        if self.flows or self.flows_refused or self.flows_evicted or self.flows_lost:
            line += (
                f"; flows: {self.flows} open, {self.flows_refused} refused, "
                f"{self.flows_evicted} evicted, {self.flows_lost} lost"
            )
        return line

    def status(self) -> str:
        """A short line for the service manager: the state and the totals."""
        totals = self.totals()
        return (
            f"{self.state}; {totals.udp_to_tcp_datagrams} datagrams to TCP, "
            f"{totals.tcp_to_udp_datagrams} from TCP, {totals.dropped} dropped"
        )


# The counts a flow's Counters adds to the tunnel end's when it ends.
_SUMMED = (
    "udp_to_tcp_datagrams",
    "udp_to_tcp_bytes",
    "tcp_to_udp_datagrams",
    "tcp_to_udp_bytes",
    "dropped_own",
    "dropped_late",
    "dropped_too_large",
    "dropped_unsent",
    "dropped_no_tunnel",
    "dropped_disallowed",
    "dropped_queue",
    "dropped_no_flow",
)
