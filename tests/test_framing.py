"""The wire codec, without sockets: every split, every chunking, the size limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udptunnel.framing import HEADER, MAX_DATAGRAM, Decoder, encode

LARGEST = bytes(range(256)) * 255 + bytes(range(255))  # 65535 bytes, every byte value
datagrams = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"\x00", LARGEST, bytes(MAX_DATAGRAM - 1)]),
)


def decode_in_chunks(stream: bytes, cuts: list[int]) -> tuple[list[bytes], Decoder]:
    decoder = Decoder()
    out: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    return out, decoder


def test_frame_is_big_endian_length_then_bytes() -> None:
    assert encode(b"abc") == b"\x00\x03abc"
    assert encode(b"") == b"\x00\x00"
    assert encode(LARGEST)[:2] == b"\xff\xff"


def test_a_datagram_longer_than_the_length_field_is_refused() -> None:
    with pytest.raises(ValueError, match="65536 bytes"):
        encode(bytes(MAX_DATAGRAM + 1))


@given(st.lists(datagrams, max_size=20), st.data())
def test_any_chunking_gives_back_every_datagram(sent: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(map(encode, sent))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    received, decoder = decode_in_chunks(stream, cuts)
    assert received == sent
    assert decoder.pending == 0


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6))
def test_every_split_offset(sent: list[bytes]) -> None:
    stream = b"".join(map(encode, sent))
    for offset in range(len(stream) + 1):
        received, decoder = decode_in_chunks(stream, [offset])
        assert received == sent, offset
        assert decoder.pending == 0


def test_byte_at_a_time_with_the_largest_and_empty_datagrams() -> None:
    sent = [LARGEST, b"", b"x", LARGEST]
    stream = b"".join(map(encode, sent))
    received, _ = decode_in_chunks(stream, list(range(len(stream))))
    assert received == sent


def test_coalesced_frames_all_come_out_of_one_feed() -> None:
    sent = [i.to_bytes(2, "big") * (i % 7) for i in range(5000)]
    assert Decoder().feed(b"".join(map(encode, sent))) == sent


@given(st.lists(datagrams, min_size=1, max_size=5), st.data())
def test_a_truncated_frame_waits_and_says_how_much_it_has(
    sent: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(map(encode, sent))
    last = len(encode(sent[-1]))
    keep = data.draw(st.integers(1, last - 1))
    cut = len(stream) - last + keep
    decoder = Decoder()
    assert decoder.feed(stream[:cut]) == sent[:-1]
    assert decoder.pending == keep
    assert decoder.expected == (last if keep >= HEADER.size else None)
