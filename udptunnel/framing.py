"""The wire format, sans I/O: a 16-bit big-endian length, then that many bytes of datagram.

This is the original udptunnel's format (and early RTP-over-TCP drafts'), byte for byte.
``encode`` makes one frame; a ``Decoder`` is fed the TCP byte stream however it was split or
coalesced and hands back every complete datagram at once.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!H")  # the length field: 16 bits, network byte order
MAX_DATAGRAM = 0xFFFF  # the largest length the 16-bit field can carry


def encode(datagram: bytes) -> bytes:
    """Return the frame that carries ``datagram``.

    Raises:
        ValueError: if the datagram is longer than the length field can say.
    """
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(datagram)} bytes does not fit a frame")
    return HEADER.pack(len(datagram)) + datagram


class Decoder:
    """Turns a stream of bytes back into the datagrams it carries, without copying them.

    ``feed`` returns views into the bytes it was given: each stays valid as long as those
    bytes do. Only a frame split across two reads is copied, once, when it completes. At most
    one incomplete frame is kept between calls (under 64 KiB plus the header).
    """

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Add bytes from the stream; return every datagram they complete, in order."""
        view = memoryview(data)
        datagrams: list[memoryview] = []
        start = self._complete_partial(view, datagrams) if self._partial else 0
        end = len(view)
        while end - start >= HEADER.size:
            (length,) = HEADER.unpack_from(view, start)
            body = start + HEADER.size
            if end - body < length:
                break
            start = body + length
            datagrams.append(view[body:start])
        self._partial += view[start:]
        return datagrams

    def _complete_partial(self, view: memoryview, datagrams: list[memoryview]) -> int:
        """Move bytes from ``view`` to the incomplete frame; return how many were taken."""
        partial = self._partial
        taken = min(max(HEADER.size - len(partial), 0), len(view))
        partial += view[:taken]
        if len(partial) < HEADER.size:
            return taken
        (length,) = HEADER.unpack_from(partial)
        size = HEADER.size + int(length)
        more = min(size - len(partial), len(view) - taken)
        partial += view[taken : taken + more]
        if len(partial) == size:
            datagrams.append(memoryview(bytes(partial[HEADER.size :])))
            partial.clear()
        return taken + more

    @property
    def pending(self) -> int:
        """How many bytes of an incomplete frame are waiting for the rest."""
        return len(self._partial)

    @property
    def expected(self) -> int | None:
        """The size of the incomplete frame being collected, once its header is in."""
        if len(self._partial) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._partial)
        return HEADER.size + int(length)
