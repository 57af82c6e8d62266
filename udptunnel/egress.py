"""Datagrams out of the tunnel: frames from TCP sent to UDP, many per system call.

A UDP send costs most of its time in the kernel's trip through the stack, once per call.
Linux's UDP segmentation offload (UDP_SEGMENT, 4.18 and later) takes a run of datagrams of
one size in one call and cuts them apart at the bottom of the stack, so the receiver still
gets each datagram as it was sent. Frames from TCP come in such runs whenever one
application sends: media, WireGuard and the benchmark's load all send equal sizes. Here
each run of equal-sized frames (the last may be shorter, as the kernel allows) goes out in
one ``sendmsg`` straight from the decoder's views, and anything else, one by one.

Where the kernel or the path will not segment (no offload on the device, a segment larger
than the path's MTU, an older kernel), the sender learns it from the first refusal and sends
those datagrams one by one from then on; the refused run itself is resent that way, so
nothing is lost to the attempt.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from functools import partial

import trio

from .counters import Counters
from .errors import TunnelError
from .sockets import SockAddr

log = logging.getLogger(__name__)

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux <linux/udp.h>; Python 3.12 names it
SEGMENTS_MAX = 64  # UDP_MAX_SEGMENTS of Linux before 6.9: datagrams per call
SEGMENTED_BYTES_MAX = 65000  # a run must fit one IP packet's 16-bit length, headers included
YIELD_EVERY = 1024  # datagrams sent between two looks at the scheduler
_SEGMENT_SIZE = struct.Struct("=H")  # the UDP_SEGMENT control message: u16 segment size
# Refusals that say the kernel cannot segment at all here: no checksum offload on the
# device (EIO), or no UDP_SEGMENT in this kernel.
_NO_SEGMENTATION = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
# Refusals that say this segment size is too large for the path (its MTU).
_SEGMENT_TOO_LARGE = frozenset({errno.EINVAL, errno.EMSGSIZE})
# Errors that ICMP leaves on a UDP socket for a datagram sent earlier: any call on the
# socket, a receive included, may return one, once. They concern that datagram, never the
# tunnel: the service behind it may be restarting.
ICMP_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)
# UDP send failures that concern one datagram, not the tunnel: routes come and go, and a
# firewall may refuse one destination (EPERM).
_TRANSIENT_SEND_ERRORS = ICMP_ERRORS | {errno.ENOBUFS, errno.EPERM}


class UdpSender:
    """Sends frames from the tunnel through a non-blocking UDP socket, to ``destination``
    (or, if None, to the address the socket is connected to).

    It counts what it sends and drops in ``counters``. Several senders may share a socket
    (a flow client's flows all answer from one) if they share a ``gate``: only one task at a
    time may wait for room in a socket.
    """

    def __init__(
        self,
        sock: socket.socket,
        counters: Counters,
        *,
        destination: SockAddr | None = None,
        gate: trio.Lock | None = None,
        segment: bool = True,
    ) -> None:
        self._sock = sock
        self.counters = counters
        self._destination = destination
        self._gate = gate or trio.Lock()
        self._verbose = log.isEnabledFor(logging.DEBUG)
        # Runs of datagrams up to this size go out segmented; 0 turns segmentation off.
        self._segment_max = SEGMENTED_BYTES_MAX // 2 if segment else 0
        self._unyielded = 0
        if destination is None:
            self._send_one: Callable[[memoryview], int] = sock.send
        else:
            self._send_one = partial(_send_to, sock, destination)

    async def send(self, frames: list[memoryview]) -> tuple[int, int]:
        """Send ``frames`` in order, each as one datagram.

        Returns:
            How many datagrams, and how many bytes of them, left.

        Raises:
            TunnelError: if UDP sending fails for good.
        """
        sent = sent_bytes = 0  # in all, returned
        counted = counted_bytes = 0  # of those, already added to the counters
        start, count = 0, len(frames)
        while start < count:
            size = len(frames[start])
            end = start + 1
            if 0 < size <= self._segment_max:
                limit = min(count, start + SEGMENTS_MAX, start + SEGMENTED_BYTES_MAX // size)
                while end < limit and len(frames[end]) == size:
                    end += 1
                if end < limit and 0 < len(frames[end]) < size:  # a shorter one may end it
                    end += 1
            if self._verbose:
                for frame in frames[start:end]:
                    log.debug("Received packet on TCP, length %d; sending as UDP", len(frame))
            if end - start > 1 and self._send_segmented(frames, start, end, size):
                run_sent, run_bytes = end - start, size * (end - start - 1) + len(frames[end - 1])
            else:
                run_sent, run_bytes = await self._send_each(frames, start, end)
            sent += run_sent
            sent_bytes += run_bytes
            self._unyielded += end - start
            if self._unyielded >= YIELD_EVERY:  # many tiny frames must not hold up the rest
                self._unyielded = 0
                self.counters.tcp_to_udp_datagrams += sent - counted
                self.counters.tcp_to_udp_bytes += sent_bytes - counted_bytes
                counted, counted_bytes = sent, sent_bytes
                await trio.lowlevel.checkpoint()
            start = end
        self.counters.tcp_to_udp_datagrams += sent - counted
        self.counters.tcp_to_udp_bytes += sent_bytes - counted_bytes
        return sent, sent_bytes

    def _send_segmented(self, frames: list[memoryview], start: int, end: int, size: int) -> bool:
        """Send frames[start:end] in one call, cut into datagrams of ``size`` by the kernel.
        False if the kernel refused it: then nothing of the run was sent."""
        control = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
        try:
            if self._destination is None:
                self._sock.sendmsg(frames[start:end], control)
            else:
                self._sock.sendmsg(frames[start:end], control, 0, self._destination)
        except OSError as exc:
            if exc.errno in _NO_SEGMENTATION:
                self._segment_max = 0
                log.debug("UDP segmentation refused (%s); sending one by one", exc.strerror)
            elif exc.errno in _SEGMENT_TOO_LARGE:
                self._segment_max = min(self._segment_max, size - 1)
                log.debug("UDP segmentation refused for %d-byte datagrams", size)
            elif exc.errno in ICMP_ERRORS:  # as in _send_slowly: the error is now read
                log.debug("ECONNREFUSED on udp_send_sock; clearing.")
            # Anything else (a full buffer, a refusal from the destination) is for the
            # one-by-one path to handle, datagram by datagram.
            return False
        return True

    async def _send_each(self, frames: list[memoryview], start: int, end: int) -> tuple[int, int]:
        """Send frames[start:end] one call each; returns datagrams and bytes sent."""
        send = self._send_one
        sent = sent_bytes = 0
        for index in range(start, end):
            datagram = frames[index]
            try:
                send(datagram)
            except OSError as exc:
                if not await self._send_slowly(datagram, exc):
                    continue
            sent += 1
            sent_bytes += len(datagram)
        return sent, sent_bytes

    async def _send_slowly(self, datagram: memoryview, failure: OSError) -> bool:
        """Deal with a UDP send that failed: wait and retry, or drop. True if it was sent."""
        cleared = False
        while True:
            if isinstance(failure, BlockingIOError):  # the socket's send buffer is full: wait
                async with self._gate:
                    await trio.lowlevel.wait_writable(self._sock)
            elif failure.errno in ICMP_ERRORS and not cleared:
                # An ICMP answer to an earlier datagram (port unreachable, say) left its
                # error on the socket, and this send failed with it before sending anything.
                # The original lost this datagram; here it goes out on the second try.
                log.debug("%s on udp_send_sock; clearing.", errno.errorcode[failure.errno])
                cleared = True
            else:
                break
            try:
                self._send_one(datagram)
            except OSError as exc:
                failure = exc
            else:
                return True
        if failure.errno == errno.EMSGSIZE:
            self.counters.dropped_too_large += 1
            log.info("Dropped a %d-byte frame from TCP: too large for UDP", len(datagram))
        elif failure.errno in _TRANSIENT_SEND_ERRORS:
            self.counters.dropped_unsent += 1
            log.debug("Dropped a %d-byte frame from TCP: %s", len(datagram), failure.strerror)
        else:
            raise TunnelError(f"cannot send UDP datagram: {failure.strerror}") from failure
        return False


def _send_to(sock: socket.socket, destination: SockAddr, datagram: memoryview) -> int:
    return sock.sendto(datagram, destination)
