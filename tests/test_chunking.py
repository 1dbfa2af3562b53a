"""Tests of edge.chunking: split/reassemble, duplicates, timeouts, memory bound, fuzzing."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.chunking import (
    CHUNK_HEADER_SIZE,
    DEFAULT_CHUNK_SIZE,
    Reassembler,
    chunk_count,
    parse_chunk,
    split,
)
from edge.wire import ChunkError, WireError

TID = bytes(range(16))


def test_default_chunk_size_is_well_under_mosquitto_limit() -> None:
    assert DEFAULT_CHUNK_SIZE <= 2_000_000 // 4


def test_chunk_layout() -> None:
    (chunk,) = split(b"hello", 100, TID)
    magic, version, flags, tid, index, count, total = struct.unpack_from("<2sBB16sIIQ", chunk)
    assert (magic, version, flags, tid, index, count, total) == (b"FC", 1, 0, TID, 0, 1, 5)
    assert chunk[CHUNK_HEADER_SIZE:] == b"hello"


def test_split_sizes() -> None:
    chunks = split(b"x" * 1000, 140, TID)
    assert len(chunks) == chunk_count(1000, 140) == 10
    assert all(len(c) <= 140 for c in chunks)


def test_empty_payload_is_one_chunk() -> None:
    chunks = split(b"", 100, TID)
    assert len(chunks) == 1
    assert Reassembler(10, 1.0).feed("a", chunks[0], 0.0) == b""


def test_chunk_size_must_leave_room() -> None:
    with pytest.raises(ValueError, match="no room"):
        split(b"x", CHUNK_HEADER_SIZE, TID)


@given(
    payload=st.binary(max_size=3000),
    chunk_size=st.integers(CHUNK_HEADER_SIZE + 1, 600),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_any_order_with_duplicates(payload: bytes, chunk_size: int, seed: int) -> None:
    chunks = split(payload, chunk_size, TID)
    rng = random.Random(seed)
    stream = chunks + rng.sample(chunks, k=min(3, len(chunks)))  # QoS-1 redeliveries
    rng.shuffle(stream)
    r = Reassembler(10_000, 5.0)
    results = [r.feed("dev", c, 0.0) for c in stream]
    done = [x for x in results if x is not None]
    assert done == [payload]
    assert r.stats.duplicates == len(stream) - len(chunks)
    assert r.pending == 0 and r.reserved_bytes == 0


def test_same_transfer_id_from_two_sources_is_independent() -> None:
    a, b = split(b"a" * 100, 90, TID), split(b"b" * 100, 90, TID)
    r = Reassembler(1000, 5.0)
    assert r.feed("dev1", a[0], 0.0) is None
    assert r.feed("dev2", b[0], 0.0) is None
    assert r.feed("dev1", a[1], 0.0) == b"a" * 100
    assert r.feed("dev2", b[1], 0.0) == b"b" * 100


def test_incomplete_transfer_expires() -> None:
    chunks = split(b"z" * 500, 100, TID)
    r = Reassembler(1000, timeout_s=2.0)
    r.feed("dev", chunks[0], now=0.0)
    assert r.expire(now=1.9) == 0
    assert r.expire(now=2.0) == 1
    assert r.stats.expired == 1 and r.reserved_bytes == 0
    # the rest arriving late starts a fresh transfer that never completes
    assert all(r.feed("dev", c, now=3.0) is None for c in chunks[1:])


def test_timeout_counts_from_the_last_chunk() -> None:
    chunks = split(b"z" * 300, 100, TID)
    r = Reassembler(1000, timeout_s=2.0)
    results = [r.feed("dev", c, now=1.5 * i) for i, c in enumerate(chunks)]
    assert len(chunks) > 2
    assert results[-1] == b"z" * 300


def test_late_duplicate_of_completed_transfer_is_ignored() -> None:
    chunks = split(b"q" * 200, 100, TID)
    r = Reassembler(1000, 5.0)
    for c in chunks:
        r.feed("dev", c, 0.0)
    assert r.feed("dev", chunks[0], 1.0) is None
    assert r.stats.duplicates == 1 and r.pending == 0


def test_memory_bound_rejects_transfer_that_does_not_fit() -> None:
    r = Reassembler(max_bytes=500, timeout_s=5.0)
    r.feed("dev1", split(b"a" * 400, 100, TID)[0], 0.0)
    with pytest.raises(ChunkError, match="does not fit"):
        r.feed("dev2", split(b"b" * 200, 100, TID)[0], 0.0)
    assert r.stats.rejected == 1


def test_per_source_bound() -> None:
    r = Reassembler(max_bytes=10_000, timeout_s=5.0, max_bytes_per_source=300)
    r.feed("dev1", split(b"a" * 200, 100, bytes(16))[0], 0.0)
    with pytest.raises(ChunkError, match="budget"):
        r.feed("dev1", split(b"b" * 200, 100, TID)[0], 0.0)
    assert r.feed("dev2", split(b"c" * 200, 100, TID)[0], 0.0) is None


def test_oversized_single_transfer_rejected() -> None:
    r = Reassembler(max_bytes=100, timeout_s=5.0)
    with pytest.raises(ChunkError):
        r.feed("dev", split(b"a" * 101, 60, TID)[0], 0.0)


def test_inconsistent_chunk_drops_transfer() -> None:
    r = Reassembler(10_000, 5.0)
    first = split(b"a" * 300, 100, TID)
    other = split(b"a" * 250, 100, TID)
    r.feed("dev", first[0], 0.0)
    with pytest.raises(ChunkError, match="transfer dropped"):
        r.feed("dev", other[1], 0.0)
    assert r.pending == 0 and r.reserved_bytes == 0


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda c: c[:10], "shorter"),
        (lambda c: b"XX" + c[2:], "magic|expected"),
        (lambda c: c[:2] + b"\x09" + c[3:], "version"),
        (lambda c: c[:-1] + bytes([c[-1] ^ 1]), "CRC"),
    ],
)
def test_malformed_chunk(mutate: object, words: str) -> None:
    chunk = split(b"payload", 100, TID)[0]
    r = Reassembler(1000, 5.0)
    with pytest.raises(ChunkError, match=words):
        r.feed("dev", mutate(chunk), 0.0)  # type: ignore[operator]
    assert r.stats.rejected == 1


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        parse_chunk(data)


@given(
    positions=st.sets(st.integers(0, 59), min_size=1, max_size=3),
    xor=st.integers(1, 255),
)
def test_fuzz_bit_flips_never_crash(positions: set[int], xor: int) -> None:
    chunks = split(b"0123456789" * 5, 60, TID)
    r = Reassembler(1000, 5.0)
    damaged = bytearray(chunks[0])
    for p in positions:
        damaged[p % len(damaged)] ^= xor
    with pytest.raises(ChunkError):
        r.feed("dev", bytes(damaged), 0.0)
