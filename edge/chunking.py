"""Chunking: split one logical payload into MQTT-sized chunks and put it back together.

Every payload on an ``update`` or ``model/{version}/{index}`` topic is a chunk,
even when the logical message fits in one. A chunk is a 40-byte little-endian
header followed by a slice of the payload (layout in docs/PROTOCOL.md)::

    0  2  magic "FC"        2  1  version (1)      3  1  flags (0)
    4  16 transfer_id       20 4  index (u32)      24 4  count (u32)
    28 8  total_len (u64)   36 4  CRC-32C of bytes 0..35 followed by the data
    40 .. data

Rules: pure (the caller passes ``now``; nothing here reads a clock or starts a
thread), bounded memory (the reassembler reserves a transfer's ``total_len`` on
its first chunk and refuses what does not fit), QoS-1 redeliveries are counted
and ignored, incomplete transfers are dropped ``timeout_s`` after their last chunk.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, NoReturn

import google_crc32c

from edge.wire import PROTOCOL_VERSION, ChunkError

CHUNK_MAGIC: Final = b"FC"
_CHUNK = struct.Struct("<2sBB16sIIQ")
"""magic, version, flags, transfer_id, index, count, total_len (36 bytes), then u32 CRC."""
CHUNK_HEADER_SIZE: Final = _CHUNK.size + 4  # 40
TRANSFER_ID_SIZE: Final = 16
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
"""Default chunk size in bytes, header included: well under Mosquitto 2.1's 2,000,000-byte
``max_packet_size`` default and comfortable for a Raspberry Pi's socket buffers."""
MAX_CHUNK_COUNT: Final = 1 << 24
TRANSFER_OVERHEAD: Final = 1024
"""Bytes a pending transfer's bookkeeping costs, charged against a :class:`Reassembler`'s
budget when it is built with ``charge_overhead=True``."""
CHUNK_OVERHEAD: Final = 128
"""Bytes one held chunk's bookkeeping costs (dict slot, ``bytes`` object), charged per declared
chunk with ``charge_overhead=True``: otherwise millions of empty chunks of one transfer hold
gigabytes while reserving only its ``total_len``."""


def new_transfer_id() -> bytes:
    """A random 16-byte transfer id (``os.urandom``: ids must not repeat across restarts)."""
    return os.urandom(TRANSFER_ID_SIZE)


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The parsed fixed part of a chunk."""

    transfer_id: bytes
    index: int
    count: int
    total_len: int


def chunk_count(total_len: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """How many chunks :func:`split` makes of ``total_len`` bytes."""
    room = _room(chunk_size)
    return max(1, -(-total_len // room))


def _room(chunk_size: int) -> int:
    if chunk_size <= CHUNK_HEADER_SIZE:
        raise ValueError(
            f"chunk_size {chunk_size} leaves no room for data; it must exceed the "
            f"{CHUNK_HEADER_SIZE}-byte chunk header"
        )
    return chunk_size - CHUNK_HEADER_SIZE


def split(
    payload: bytes | bytearray | memoryview,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: bytes | None = None,
) -> list[bytes]:
    """Split ``payload`` into chunks of at most ``chunk_size`` bytes each (header included).

    An empty payload gives one chunk with no data.

    Examples
    --------
    >>> chunks = split(b"x" * 100, chunk_size=90, transfer_id=bytes(16))
    >>> [len(c) for c in chunks]
    [90, 90]
    >>> Reassembler(1000, 10.0).feed("dev", chunks[1], now=0.0) is None
    True
    """
    tid = new_transfer_id() if transfer_id is None else bytes(transfer_id)
    if len(tid) != TRANSFER_ID_SIZE:
        raise ValueError(f"transfer_id must be {TRANSFER_ID_SIZE} bytes, got {len(tid)}")
    mv = memoryview(payload).cast("B")
    total = len(mv)
    room = _room(chunk_size)
    count = chunk_count(total, chunk_size)
    if count > MAX_CHUNK_COUNT:
        raise ValueError(f"{count} chunks exceed the limit of {MAX_CHUNK_COUNT}; raise chunk_size")
    out = []
    for index in range(count):
        data = mv[index * room : (index + 1) * room]
        head = _CHUNK.pack(CHUNK_MAGIC, PROTOCOL_VERSION, 0, tid, index, count, total)
        crc = google_crc32c.extend(google_crc32c.value(head), bytes(data))
        out.append(b"".join((head, struct.pack("<I", crc), data)))
    return out


def parse_chunk(chunk: bytes | bytearray | memoryview) -> tuple[ChunkHeader, memoryview]:
    """Check a chunk's header and CRC; return the header and the data slice."""
    mv = memoryview(chunk).cast("B")
    if len(mv) < CHUNK_HEADER_SIZE:
        raise ChunkError(
            f"chunk is {len(mv)} bytes, shorter than its {CHUNK_HEADER_SIZE}-byte header"
        )
    magic, version, flags, tid, index, count, total = _CHUNK.unpack_from(mv, 0)
    if magic != CHUNK_MAGIC:
        raise ChunkError(f"chunk starts with {bytes(magic)!r}, expected {CHUNK_MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ChunkError(f"chunk version {version}, this code speaks {PROTOCOL_VERSION}")
    if flags != 0:
        raise ChunkError(f"unknown chunk flags 0x{flags:02x}")
    (crc,) = struct.unpack_from("<I", mv, _CHUNK.size)
    data = mv[CHUNK_HEADER_SIZE:]
    actual = google_crc32c.extend(google_crc32c.value(bytes(mv[: _CHUNK.size])), bytes(data))
    if crc != actual:
        raise ChunkError(f"chunk CRC-32C is 0x{actual:08x}, the header says 0x{crc:08x}")
    if count < 1 or count > MAX_CHUNK_COUNT:
        raise ChunkError(f"chunk count {count} is outside 1..{MAX_CHUNK_COUNT}")
    if index >= count:
        raise ChunkError(f"chunk index {index} is not below its count {count}")
    if len(data) > total:
        raise ChunkError(f"chunk carries {len(data)} bytes of a {total}-byte transfer")
    if count > max(1, total):
        raise ChunkError(f"{count} chunks cannot make a {total}-byte transfer")
    return ChunkHeader(bytes(tid), index, count, total), data


@dataclass(slots=True)
class _Transfer:
    count: int
    total_len: int
    last_seen: float
    cost: int
    """Bytes reserved against the budget (``total_len``, plus bookkeeping if charged)."""
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


@dataclass(slots=True)
class ReassemblerStats:
    """Counters of a :class:`Reassembler` (monotonic; read them, never reset them)."""

    completed: int = 0
    duplicates: int = 0
    """QoS-1 redeliveries and repeats of completed transfers, ignored."""
    expired: int = 0
    """Incomplete transfers dropped after the timeout."""
    rejected: int = 0
    """Chunks refused with a :class:`ChunkError` (malformed, inconsistent or over budget)."""


class Reassembler:
    """Put chunks back together, per ``(source_key, transfer_id)``, within a memory bound.

    ``max_bytes`` bounds the sum of ``total_len`` of all pending transfers;
    ``max_bytes_per_source`` (default ``max_bytes``) stops one sender (e.g. one
    device id) from taking the whole budget. A transfer that sees no chunk for
    ``timeout_s`` is dropped by :meth:`expire`, which :meth:`feed` also calls.

    With ``charge_overhead`` (what a receiver of untrusted input should use) a transfer
    reserves ``total_len + TRANSFER_OVERHEAD + count * CHUNK_OVERHEAD``, so the budget
    bounds the memory really held, bookkeeping included, whatever the sender declares.
    """

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float,
        *,
        max_bytes_per_source: int | None = None,
        remember_completed: int = 4096,
        charge_overhead: bool = False,
    ) -> None:
        if max_bytes < 0 or timeout_s <= 0:
            raise ValueError("max_bytes must be >= 0 and timeout_s > 0")
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_bytes_per_source = (
            max_bytes if max_bytes_per_source is None else max_bytes_per_source
        )
        self.stats = ReassemblerStats()
        self._pending: dict[tuple[str, bytes], _Transfer] = {}
        self._reserved = 0
        self._reserved_by_source: dict[str, int] = {}
        self._completed: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._remember = remember_completed
        self._charge_overhead = charge_overhead

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by pending transfers."""
        return self._reserved

    @property
    def pending(self) -> int:
        """Number of incomplete transfers."""
        return len(self._pending)

    def feed(
        self, source_key: str, chunk: bytes | bytearray | memoryview, now: float
    ) -> bytes | None:
        """Take one chunk; return the whole payload when this chunk completes it.

        Returns None for a chunk that leaves its transfer incomplete and for a
        duplicate. Raises :class:`~edge.wire.ChunkError` (and counts it as
        rejected) for a malformed chunk, one inconsistent with earlier chunks of its
        transfer, or a transfer that does not fit the memory bound.
        """
        self.expire(now)
        try:
            header, data = parse_chunk(chunk)
        except ChunkError:
            self.stats.rejected += 1
            raise
        key = (source_key, header.transfer_id)
        if key in self._completed:
            self.stats.duplicates += 1
            return None
        transfer = self._pending.get(key)
        if transfer is None:
            if header.count == 1:
                if len(data) != header.total_len:
                    self._reject(f"single chunk has {len(data)} of {header.total_len} bytes")
                self._complete(key, now)
                return bytes(data)
            transfer = self._open(key, header, now)
        elif transfer.count != header.count or transfer.total_len != header.total_len:
            self._drop(key)
            self._reject(
                f"chunk says {header.count} chunks / {header.total_len} bytes, its transfer "
                f"said {transfer.count} / {transfer.total_len}; transfer dropped"
            )
        transfer.last_seen = now
        if header.index in transfer.parts:
            self.stats.duplicates += 1
            return None
        transfer.parts[header.index] = bytes(data)
        transfer.received += len(data)
        if transfer.received > transfer.total_len:
            self._drop(key)
            self._reject(
                f"chunks add up to more than the declared {transfer.total_len} bytes; "
                "transfer dropped"
            )
        if len(transfer.parts) < transfer.count:
            return None
        self._drop(key)
        if transfer.received != transfer.total_len:
            self._reject(
                f"all {transfer.count} chunks hold {transfer.received} bytes, "
                f"the transfer declared {transfer.total_len}"
            )
        self._complete(key, now)
        return b"".join(transfer.parts[i] for i in range(transfer.count))

    def expire(self, now: float) -> int:
        """Drop transfers idle for ``timeout_s`` or longer; return how many were dropped."""
        stale = [k for k, t in self._pending.items() if now - t.last_seen >= self.timeout_s]
        for key in stale:
            self._drop(key)
        self.stats.expired += len(stale)
        while self._completed and now - next(iter(self._completed.values())) >= self.timeout_s:
            self._completed.popitem(last=False)
        return len(stale)

    def _open(self, key: tuple[str, bytes], header: ChunkHeader, now: float) -> _Transfer:
        source = key[0]
        used = self._reserved_by_source.get(source, 0)
        cost = header.total_len
        if self._charge_overhead:
            cost += TRANSFER_OVERHEAD + header.count * CHUNK_OVERHEAD
        if self._reserved + cost > self.max_bytes:
            self._reject(
                f"transfer of {header.total_len} bytes ({cost} reserved) does not fit: "
                f"{self._reserved} of {self.max_bytes} bytes already reserved"
            )
        if used + cost > self.max_bytes_per_source:
            self._reject(
                f"transfer of {header.total_len} bytes ({cost} reserved) from {source!r} "
                f"exceeds its {self.max_bytes_per_source}-byte budget ({used} in use)"
            )
        transfer = _Transfer(header.count, header.total_len, now, cost=cost)
        self._pending[key] = transfer
        self._reserved += cost
        self._reserved_by_source[source] = used + cost
        return transfer

    def _drop(self, key: tuple[str, bytes]) -> None:
        transfer = self._pending.pop(key)
        self._reserved -= transfer.cost
        left = self._reserved_by_source[key[0]] - transfer.cost
        if left:
            self._reserved_by_source[key[0]] = left
        else:
            del self._reserved_by_source[key[0]]

    def _complete(self, key: tuple[str, bytes], now: float) -> None:
        self.stats.completed += 1
        self._completed[key] = now
        self._completed.move_to_end(key)
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)

    def _reject(self, reason: str) -> NoReturn:
        self.stats.rejected += 1
        raise ChunkError(reason)
