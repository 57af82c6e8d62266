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
    """Turns a stream of bytes back into the datagrams it carries.

    Keeps at most one incomplete frame between calls (under 64 KiB plus the header).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes from the stream; return every datagram they complete, in order."""
        buffer = self._buffer
        buffer += data
        datagrams = []
        start, end = 0, len(buffer)
        while end - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            body = start + HEADER.size
            if end - body < length:
                break
            datagrams.append(bytes(buffer[body : body + length]))
            start = body + length
        del buffer[:start]
        return datagrams

    @property
    def pending(self) -> int:
        """How many bytes of an incomplete frame are waiting for the rest."""
        return len(self._buffer)

    @property
    def expected(self) -> int | None:
        """The size of the incomplete frame being collected, once its header is in."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        return HEADER.size + int(length)
