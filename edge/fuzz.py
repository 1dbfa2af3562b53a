"""Malformed protocol messages for fuzzing the coordinator and the device agent.

This module owns the *bad input* generator of the reliability tests and of
``fedge bench fuzz``. Every :class:`FuzzCase` is one MQTT message (topic + payload) that a
receiver must refuse, together with the reason the receiver must count it under
(:attr:`FuzzCase.expect`). Cases are built by mutating valid messages made by
:mod:`edge.wire`, :mod:`edge.chunking` and :mod:`edge.modelio` (truncation, bit flips,
wrong magic or version, wrong JSON shapes, NaN/Infinity, invalid UTF-8, huge declared
lengths, forged ids) and from scratch (random bytes, chunk storms).

Rules:

- Pure and seeded: the caller passes a ``random.Random``; the same seed gives the same cases.
  No sockets, threads or clocks.
- Every case is garbage by construction, and re-checked with the shared decoders where a
  random mutation could leave a message valid (such a candidate is discarded and drawn
  again), so a fuzz run never issues a real task, status or manifest.
- ``expect`` follows the receivers' documented behaviour (docs/PROTOCOL.md §7,
  docs/COORDINATOR.md): the coordinator counts ``bad_topic``, ``bad_status``, ``bad_chunk``,
  ``bad_envelope``, ``bad_signature``, ``wrong_cid``, ``unknown_task``; the agent counts
  ``bad_topic``, ``bad_task``, ``bad_manifest``, ``bad_chunk``. Two outcomes are not
  rejections: ``held`` (a well-formed first chunk of a transfer that never completes; it
  stays in the reassembler, within its budget, until it expires) and ``duplicate`` (a QoS-1
  redelivery of a chunk already taken, ignored and counted by the reassembler).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import google_crc32c

from edge.chunking import CHUNK_HEADER_SIZE, CHUNK_MAGIC, MAX_CHUNK_COUNT, split
from edge.wire import (
    FIXED_HEADER_SIZE,
    MAGIC,
    BatteryInfo,
    Caps,
    CpuInfo,
    MemInfo,
    ModelManifest,
    ModelUpdate,
    NetInfo,
    NetKind,
    SignatureError,
    Status,
    TensorSpec,
    Topics,
    TrainInfo,
    TrainParams,
    TrainTask,
    WireError,
    decode_envelope,
)
from kernels.codec import PRESETS

__all__ = [
    "AGENT_REASONS",
    "COORDINATOR_REASONS",
    "Expect",
    "FuzzCase",
    "FuzzGenerator",
    "FuzzTargets",
    "Target",
    "check_decoders",
    "expected_counts",
]

_CHUNK_HEAD = struct.Struct("<2sBB16sIIQ")
_ENV_FIXED = struct.Struct("<4sBBHIIQ")


class Target(StrEnum):
    """Which process a case is aimed at."""

    COORDINATOR = "coordinator"
    AGENT = "agent"


class Expect(StrEnum):
    """What the receiver must do with a case (rejection reasons, plus two non-rejections)."""

    BAD_TOPIC = "bad_topic"
    BAD_STATUS = "bad_status"
    BAD_CHUNK = "bad_chunk"
    BAD_ENVELOPE = "bad_envelope"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CID = "wrong_cid"
    UNKNOWN_TASK = "unknown_task"
    BAD_TASK = "bad_task"
    BAD_MANIFEST = "bad_manifest"
    HELD = "held"
    """A first chunk of a transfer that never completes: held within budget, then expired."""
    DUPLICATE = "duplicate"
    """A redelivered chunk of a transfer already taken: ignored, counted as a duplicate."""


COORDINATOR_REASONS: Final = frozenset(
    {
        Expect.BAD_TOPIC,
        Expect.BAD_STATUS,
        Expect.BAD_CHUNK,
        Expect.BAD_ENVELOPE,
        Expect.BAD_SIGNATURE,
        Expect.WRONG_CID,
        Expect.UNKNOWN_TASK,
    }
)
"""Reasons the coordinator counts in ``CoordinatorMetrics.rejects``."""
AGENT_REASONS: Final = frozenset(
    {Expect.BAD_TOPIC, Expect.BAD_TASK, Expect.BAD_MANIFEST, Expect.BAD_CHUNK}
)
"""Reasons the agent counts in ``AgentStats.rejected``."""


@dataclass(frozen=True, slots=True)
class FuzzCase:
    """One malformed message and what its receiver must do with it."""

    target: Target
    family: str
    """Generator family, e.g. ``update.chunk.bad_magic`` (for reports and shrinking by hand)."""
    topic: str
    payload: bytes
    expect: Expect


@dataclass(frozen=True, slots=True)
class FuzzTargets:
    """Where the cases go and what the receivers are configured with."""

    fleet: str
    agent_cid: str
    """The real agent under test: its ``task`` topic and the model topics are fuzzed."""
    model_version: int
    """The agent's current model version; chunk garbage goes to newer versions."""
    forged_cids: tuple[str, ...] = tuple(f"fz-{i:03d}" for i in range(32))
    """Valid ids with no account and no task: the coordinator's other garbage sources."""
    max_envelope_size: int = 64 * 1024 * 1024
    """The coordinator's ``validation.max_envelope_mb`` in bytes."""
    signed_cids: frozenset[str] = frozenset()
    """Devices the coordinator has an HMAC key for (their forged envelopes: ``bad_signature``)."""


# ----------------------------------------------------------------------------- valid messages


def _status() -> Status:
    return Status(
        online=True,
        ts=1_700_000_000.5,
        battery=BatteryInfo(82.5, False),
        cpu=CpuInfo(0.42, 4, 51.2),
        mem=MemInfo(1536.0),
        net=NetInfo(NetKind.WIFI, False, 12.5),
        train=TrainInfo(1797, 850.0),
        caps=Caps(("numpy",), ("raw", "block_i8"), 2_000_000),
        agent="fedge/0.1",
        state="idle",
    )


def _task(rng: random.Random) -> TrainTask:
    return TrainTask(
        task_id=f"fuzz-{rng.getrandbits(64):016x}",
        round_no=rng.randrange(1, 1000),
        model_version=rng.randrange(0, 1000),
        deadline_ts=1_700_000_060.0,
        train=TrainParams(epochs=1, batch_size=32, lr=0.05, prox_mu=0.01),
        uplink_codec={"id": "raw"},
        nonce=f"n-{rng.getrandbits(32):08x}",
        error_feedback=False,
        strategy={"id": "fedavg"},
    )


def _manifest(rng: random.Random, version: int) -> ModelManifest:
    return ModelManifest(
        model_version=version,
        transfer_id=f"{rng.getrandbits(128):032x}",
        chunk_count=rng.randrange(1, 8),
        total_len=rng.randrange(100, 10_000),
        sha256=f"{rng.getrandbits(256):064x}",
    )


def _update(rng: random.Random, cid: str) -> ModelUpdate:
    n = rng.randrange(1, 5)
    shape = (n, 2)
    payload = struct.pack(f"<{2 * n}f", *(rng.uniform(-1, 1) for _ in range(2 * n)))
    return ModelUpdate(
        task_id=f"fuzz-{rng.getrandbits(64):016x}",
        round_no=rng.randrange(1, 100),
        model_version=rng.randrange(0, 100),
        cid=cid,
        num_examples=rng.randrange(1, 2000),
        tensors=(TensorSpec("w0", shape, {"id": "raw"}),),
        payloads=(payload,),
        metrics={"loss": 0.5},
        nonce="n-0",
    )


# ----------------------------------------------------------------------------- byte helpers


def _chunk(
    tid: bytes,
    index: int,
    count: int,
    total: int,
    data: bytes,
    *,
    magic: bytes = CHUNK_MAGIC,
    version: int = 1,
    flags: int = 0,
) -> bytes:
    """A chunk with a correct CRC for whatever (possibly inconsistent) fields it is given."""
    head = _CHUNK_HEAD.pack(magic, version, flags, tid, index, count, total)
    crc = google_crc32c.extend(google_crc32c.value(head), data)
    return head + struct.pack("<I", crc) + data


def _seal_envelope(body: bytes, key: bytes | None = None, *, fix_total: bool = True) -> bytes:
    """Append CRC (and HMAC) to an envelope body; rewrite ``total_len`` to match if asked."""
    out = bytearray(body)
    if fix_total and len(out) >= FIXED_HEADER_SIZE:
        total = len(out) + 4 + (32 if key is not None else 0)
        struct.pack_into("<Q", out, 16, total)
    out += struct.pack("<I", google_crc32c.value(bytes(out)))
    if key is not None:
        out += hmac.new(key, bytes(out), hashlib.sha256).digest()
    return bytes(out)


def _envelope_body(
    header: Mapping[str, Any] | bytes, payloads: list[bytes], flags: int = 0
) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    fixed = _ENV_FIXED.pack(MAGIC, 1, flags, 0, len(raw), len(payloads), 0)
    lengths = struct.pack(f"<{len(payloads)}Q", *(len(p) for p in payloads))
    return fixed + raw + lengths + b"".join(payloads)


def _flip(data: bytes, rng: random.Random, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


# ----------------------------------------------------------------------------- JSON mutations

_WRONG_VALUES: Final[tuple[Any, ...]] = (
    None, True, -1, 0, 2**64, 1.5, -1e308, "", "x" * 300, "\u0000", [], [1, "a"], {}, {"a": []},
)  # fmt: skip
_BAD_JSON: Final[tuple[bytes, ...]] = (
    b"", b"{", b"}", b"[]", b"null", b"1", b'"v"', b"{'v': 1}", b'{"v":1,}', b"\xff\xfe{}",
    b'{"v":1' + b"\xc3\x28" + b"}", b'{"v": NaN}', b'{"v": Infinity}', b'{"v": -Infinity}',
    b'{"v":1}\x00', b"\xef\xbb\xbf{}", b'{"v":2}', b'{"v":"1"}', b'{"v":1.0}', b'{"v":true}',
)  # fmt: skip


def _mutate_json(obj: dict[str, Any], rng: random.Random) -> bytes:
    """A JSON text derived from ``obj`` by one of several mutations (may still be valid)."""
    doc: Any = json.loads(json.dumps(obj))
    choice = rng.randrange(10)
    if choice == 0:  # drop a field, possibly nested
        target = _random_object(doc, rng)
        if target:
            del target[rng.choice(sorted(target))]
    elif choice == 1:  # wrong type or out-of-range value somewhere
        target = _random_object(doc, rng)
        if target:
            target[rng.choice(sorted(target))] = rng.choice(_WRONG_VALUES)
    elif choice == 2:  # NaN / Infinity where a number goes
        target = _random_object(doc, rng)
        if target:
            key = rng.choice(sorted(target))
            text = json.dumps(doc, allow_nan=True)
            token = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
            return text.replace(json.dumps(target[key]), token, 1).encode()
    elif choice == 3:  # version
        doc["v"] = rng.choice([0, 2, 255, -1, "1", 1.0, None, [1]])
    elif choice == 4:  # wrong top-level shape
        return json.dumps(rng.choice([[doc], doc.get("v"), "status", None, 3.25])).encode()
    elif choice == 5:  # truncated
        encoded = json.dumps(doc).encode()
        return encoded[: rng.randrange(len(encoded))]
    elif choice == 6:  # invalid UTF-8 spliced in
        encoded = json.dumps(doc).encode()
        at = rng.randrange(len(encoded) + 1)
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88"])
        return encoded[:at] + bad + encoded[at:]
    elif choice == 7:  # deep nesting (recursion)
        depth = rng.choice([100, 5000, 100_000])
        return b'{"v":1,"x":' + b"[" * depth + b"]" * depth + b"}"
    elif choice == 8:  # a huge string value
        target = _random_object(doc, rng)
        if target:
            target[rng.choice(sorted(target))] = "A" * rng.choice([257, 4096, 300_000])
    else:  # known-bad literal
        return rng.choice(_BAD_JSON)
    return json.dumps(doc).encode()


def _random_object(doc: Any, rng: random.Random) -> dict[str, Any] | None:
    """A random JSON object inside ``doc`` (``doc`` itself or a nested one)."""
    objects: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            objects.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return rng.choice(objects) if objects else None


def _rejects(parse: Callable[[bytes], object], payload: bytes) -> bool:
    try:
        parse(payload)
    except WireError:
        return True
    return False


# ----------------------------------------------------------------------------- the generator


_BAD_IDS: Final = ("-lead", ".dot", "a b", "x" * 65, "ünï", "a$b", "@at", ":c", "é")
"""One topic level each (no ``/ + #`` or NUL, which the broker itself refuses) but not ids."""


class FuzzGenerator:
    """Draws :class:`FuzzCase` objects for one coordinator and one agent.

    Parameters
    ----------
    targets
        Fleet, the agent's id and model version, forged ids, receiver limits.
    rng
        The only source of randomness (seed it for reproducible runs).
    weights
        Relative frequency of each family group; default: most cases go to update chunks.
    """

    def __init__(
        self,
        targets: FuzzTargets,
        rng: random.Random,
        *,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.targets = targets
        self.rng = rng
        self.topics = Topics(targets.fleet)
        self._status = _status().to_json()
        self._last_single: FuzzCase | None = None
        groups: dict[str, Callable[[], FuzzCase | None]] = {
            "update.chunk": self._update_chunk,
            "update.envelope": self._update_envelope,
            "update.held": self._update_held,
            "update.duplicate": self._update_duplicate,
            "status": self._status_case,
            "coordinator.bad_topic": self._coordinator_bad_topic,
            "task": self._task_case,
            "manifest": self._manifest_case,
            "model.chunk": self._model_chunk,
            "agent.bad_topic": self._agent_bad_topic,
        }
        default = {
            "update.chunk": 20, "update.envelope": 20, "update.held": 4, "update.duplicate": 2,
            "status": 14, "coordinator.bad_topic": 4, "task": 14, "manifest": 8,
            "model.chunk": 10, "agent.bad_topic": 4,
        }  # fmt: skip
        chosen = {**default, **(weights or {})}
        unknown = set(chosen) - set(groups)
        if unknown:
            raise ValueError(f"unknown fuzz groups {sorted(unknown)}; known: {sorted(groups)}")
        self._groups = [groups[name] for name in chosen if chosen[name] > 0]
        self._weights = [chosen[name] for name in chosen if chosen[name] > 0]

    def case(self) -> FuzzCase:
        """The next case."""
        while True:
            make = self.rng.choices(self._groups, self._weights)[0]
            case = make()
            if case is not None:
                return case

    def cases(self, n: int) -> list[FuzzCase]:
        """The next ``n`` cases."""
        return [self.case() for _ in range(n)]

    # -- coordinator: update chunks -------------------------------------------------------

    def _source(self) -> str:
        pool = (*self.targets.forged_cids, self.targets.agent_cid)
        return self.rng.choice(pool)

    def _update_chunk(self) -> FuzzCase:
        """A chunk the chunk layer itself must refuse (``bad_chunk``)."""
        rng = self.rng
        cid = self._source()
        valid = split(
            rng.randbytes(rng.randrange(0, 400)),
            rng.choice([64, 100, 300, 4096]),
            rng.randbytes(16),
        )
        base = rng.choice(valid)
        tid = rng.randbytes(16)
        kind = rng.randrange(12)
        if kind == 0:
            family, payload = "truncated_header", base[: rng.randrange(CHUNK_HEADER_SIZE)]
        elif kind == 1:
            family, payload = "bad_magic", rng.choice([b"FD", b"\x00\x00", b"fc", b"CF"]) + base[2:]
        elif kind == 2:
            version = rng.choice([0, 2, 255])
            family, payload = "bad_version", _chunk(tid, 0, 1, 4, b"abcd", version=version)
        elif kind == 3:
            flags = rng.randrange(1, 256)
            family, payload = "bad_flags", _chunk(tid, 0, 1, 4, b"abcd", flags=flags)
        elif kind == 4:
            family, payload = "bit_flips", _flip(base, rng, rng.randrange(1, 4))
        elif kind == 5:
            family, payload = "count_zero", _chunk(tid, 0, 0, 10, b"")
        elif kind == 6:
            count = rng.randrange(1, 100)
            index = rng.choice([count, count + 1, 2**32 - 1])
            family, payload = "index_ge_count", _chunk(tid, index, count, 1000, b"x")
        elif kind == 7:
            total = rng.randrange(0, 10)
            data = rng.randbytes(total + rng.randrange(1, 50))
            family, payload = "data_gt_total", _chunk(tid, 0, 2, total, data)
        elif kind == 8:
            count = rng.choice([2**24 + 1, 2**32 - 1])
            family, payload = "count_too_large", _chunk(tid, 0, count, 2**40, b"")
        elif kind == 9:  # a declared transfer far beyond any budget
            count = rng.randrange(2, 2**24)
            total = rng.choice([2**40, 2**63, 2**64 - 1, self.targets.max_envelope_size * 8])
            family, payload = "huge_declared_length", _chunk(tid, 0, count, total, b"x")
        elif kind == 10:  # a single chunk whose data is not the declared whole
            data = rng.randbytes(rng.randrange(0, 50))
            total = len(data) + rng.randrange(1, 1000)
            family, payload = "single_chunk_short", _chunk(tid, 0, 1, total, data)
        else:
            size = rng.choice([0, 1, 39, 40, 41, 500, 300_000]) if rng.random() < 0.3 else None
            size = rng.randrange(0, 2000) if size is None else size
            family, payload = "random_bytes", rng.randbytes(size)
        if not _chunk_layer_rejects(payload):
            return self._update_chunk()  # a mutation that happened to stay valid: draw again
        return FuzzCase(
            Target.COORDINATOR, f"update.chunk.{family}", self.topics.update(cid), payload,
            Expect.BAD_CHUNK,
        )  # fmt: skip

    def _update_envelope(self) -> FuzzCase:
        """A well-formed single chunk carrying a malformed or forged envelope."""
        rng = self.rng
        cid = self._source()
        update = _update(rng, cid)
        header = update.header.to_json()
        kind = rng.randrange(14)
        key = None
        if kind == 0:
            family, env = "truncated", update.to_bytes()[: rng.randrange(FIXED_HEADER_SIZE + 40)]
        elif kind == 1:
            magic = rng.choice([b"FEDH", b"\x00" * 4, b"GDEF", b"fedg"])
            family, env = "bad_magic", magic + update.to_bytes()[4:]
        elif kind == 2:
            body = bytearray(_envelope_body(header, list(update.payloads)))
            body[4] = rng.choice([0, 2, 255])
            family, env = "bad_version", _seal_envelope(bytes(body))
        elif kind == 3:
            body = bytearray(_envelope_body(header, list(update.payloads)))
            if rng.random() < 0.5:
                body[5] = rng.randrange(2, 256)
            else:
                struct.pack_into("<H", body, 6, rng.randrange(1, 65536))
            family, env = "bad_flags_or_reserved", _seal_envelope(bytes(body))
        elif kind == 4:
            buf = bytearray(update.to_bytes())
            struct.pack_into("<Q", buf, 16, rng.choice([0, len(buf) - 1, len(buf) + 1, 2**63]))
            family, env = "wrong_total_len", bytes(buf)
        elif kind == 5:
            family, env = "bit_flips", _flip(update.to_bytes(), rng, rng.randrange(1, 4))
        elif kind == 6:
            body = bytearray(_envelope_body(header, list(update.payloads)))
            struct.pack_into("<I", body, 8, rng.choice([2**31, 2**32 - 1, 2 * 1024 * 1024]))
            family, env = "huge_header_len", _seal_envelope(bytes(body))
        elif kind == 7:
            raw = _mutate_json(header, rng)
            family, env = (
                "bad_header_json",
                _seal_envelope(_envelope_body(raw, list(update.payloads))),
            )
        elif kind == 8:
            bad_shape: Any = rng.choice([[-1, 2], [2**63], [1] * 33, "2,2", [1.5], [[2]], None])
            header["tensors"] = [{"name": "w0", "shape": bad_shape, "codec": {"id": "raw"}}]
            family, env = (
                "bad_shapes",
                _seal_envelope(_envelope_body(header, list(update.payloads))),
            )
        elif kind == 9:
            payloads = [*update.payloads, b"extra"] if rng.random() < 0.5 else []
            family, env = "payload_count", _seal_envelope(_envelope_body(header, payloads))
        elif kind == 10:
            body = bytearray(_envelope_body(header, list(update.payloads)))
            struct.pack_into("<Q", body, FIXED_HEADER_SIZE + int.from_bytes(body[8:12], "little"),
                             rng.choice([0, 2**64 - 1, 7]))  # fmt: skip
            family, env = "payload_lengths", _seal_envelope(bytes(body))
        elif kind == 11:  # a valid envelope whose header names another device
            other = rng.choice([c for c in self.targets.forged_cids if c != cid] or ["zz"])
            forged = _update(rng, other)
            family, env = (
                "forged_cid",
                forged.to_bytes(rng.randbytes(32) if rng.random() < 0.5 else None),
            )
        elif kind == 12:  # a structurally valid update for a task nobody issued
            key = rng.randbytes(32) if rng.random() < 0.5 else None
            family, env = "unknown_task", update.to_bytes(key)
        else:  # a global-model envelope sent as an update
            model_header = dict(header, kind="model")
            family, env = (
                "model_kind",
                _seal_envelope(_envelope_body(model_header, list(update.payloads))),
            )
        case = FuzzCase(
            Target.COORDINATOR, f"update.envelope.{family}", self.topics.update(cid),
            _chunk(rng.randbytes(16), 0, 1, len(env), env),
            self._envelope_reason(env, cid),
        )  # fmt: skip
        self._last_single = case
        return case

    def _envelope_reason(self, envelope: bytes, topic_cid: str) -> Expect:
        """What the coordinator's parse step must say (docs/PROTOCOL.md §4.1, §4.2)."""
        signed = self.targets.signed_cids

        def no_key_known(cid: str | None) -> bytes | None:
            # A forger does not know a signed device's key: any key it used is wrong.
            return b"\x00-unknown-key" if cid in signed else None

        try:
            update = ModelUpdate.from_bytes(
                envelope, no_key_known, max_size=self.targets.max_envelope_size
            )
        except SignatureError:
            return Expect.BAD_SIGNATURE
        except (WireError, ValueError, TypeError, OverflowError):
            return Expect.BAD_ENVELOPE
        if update.cid != topic_cid:
            return Expect.WRONG_CID
        return Expect.UNKNOWN_TASK

    def _update_held(self) -> FuzzCase:
        """A well-formed first chunk of a small transfer that never completes."""
        rng = self.rng
        cid = self._source()
        count = rng.randrange(2, 5)
        total = rng.randrange(count, 64)
        index = rng.randrange(count)
        data = rng.randbytes(rng.randrange(1, total // count + 1))
        payload = _chunk(rng.randbytes(16), index, count, total, data)
        return FuzzCase(
            Target.COORDINATOR, "update.held.chunk_storm", self.topics.update(cid), payload,
            Expect.HELD,
        )  # fmt: skip

    def _update_duplicate(self) -> FuzzCase | None:
        """The previous single-chunk envelope case again (a QoS-1 redelivery)."""
        last = self._last_single
        if last is None:
            return None
        self._last_single = None
        return FuzzCase(
            Target.COORDINATOR, "update.duplicate.redelivery", last.topic, last.payload,
            Expect.DUPLICATE,
        )  # fmt: skip

    # -- coordinator: status and topics -----------------------------------------------------

    def _status_case(self) -> FuzzCase:
        rng = self.rng
        cid = self._source()
        if rng.random() < 0.15:
            family, payload = "random_bytes", rng.randbytes(rng.randrange(1, 300))
        else:
            family, payload = "json_mutation", _mutate_json(self._status, rng)
        if not payload or not _rejects(Status.from_bytes, payload):
            return self._status_case()  # empty (a retained clear) or still valid: draw again
        return FuzzCase(
            Target.COORDINATOR, f"status.{family}", self.topics.status(cid), payload,
            Expect.BAD_STATUS,
        )  # fmt: skip

    def _coordinator_bad_topic(self) -> FuzzCase:
        rng = self.rng
        bad = rng.choice(_BAD_IDS)
        leaf = rng.choice(["status", "update"])
        prefix = self.topics.prefix
        # Even a perfectly valid payload is refused on a topic whose id is not an id.
        payload = (
            _status().to_bytes() if leaf == "status" else split(b"x", 100, rng.randbytes(16))[0]
        )
        return FuzzCase(
            Target.COORDINATOR, f"topic.forged_id.{leaf}", f"{prefix}/clients/{bad}/{leaf}",
            payload, Expect.BAD_TOPIC,
        )  # fmt: skip

    # -- agent ------------------------------------------------------------------------------

    def _task_case(self) -> FuzzCase:
        rng = self.rng
        if rng.random() < 0.15:
            family, payload = "random_bytes", rng.randbytes(rng.randrange(1, 300))
        else:
            family, payload = "json_mutation", _mutate_json(_task(rng).to_json(), rng)
        if not payload or not _rejects(TrainTask.from_bytes, payload):
            return self._task_case()
        return FuzzCase(
            Target.AGENT, f"task.{family}", self.topics.task(self.targets.agent_cid), payload,
            Expect.BAD_TASK,
        )  # fmt: skip

    def _manifest_case(self) -> FuzzCase:
        rng = self.rng
        manifest = _manifest(rng, self.targets.model_version + rng.randrange(1, 5))
        if rng.random() < 0.15:
            family, payload = "random_bytes", rng.randbytes(rng.randrange(1, 300))
        else:
            family, payload = "json_mutation", _mutate_json(manifest.to_json(), rng)
        if not payload or not _rejects(ModelManifest.from_bytes, payload):
            return self._manifest_case()
        return FuzzCase(
            Target.AGENT, f"manifest.{family}", self.topics.model_manifest(), payload,
            Expect.BAD_MANIFEST,
        )  # fmt: skip

    def _model_chunk(self) -> FuzzCase:
        rng = self.rng
        version = self.targets.model_version + rng.randrange(1, 4)
        topic = self.topics.model_chunk(version, rng.randrange(0, 8))
        if rng.random() < 0.15:
            held = self._update_held()
            return FuzzCase(
                Target.AGENT, "model.held.chunk_storm", topic, held.payload, Expect.HELD
            )
        bad = self._update_chunk()
        if not bad.payload:
            return self._model_chunk()  # an empty payload on a model topic is a retained clear
        return FuzzCase(
            Target.AGENT, bad.family.replace("update.", "model.", 1), topic, bad.payload,
            Expect.BAD_CHUNK,
        )  # fmt: skip

    def _agent_bad_topic(self) -> FuzzCase:
        rng = self.rng
        prefix = self.topics.prefix
        leaf = rng.choice(["abc/1", "1/x", "1/2/3", "manifest/1", "-1/0", "1.5/0", "٣/0", "1/"])
        return FuzzCase(
            Target.AGENT, "topic.model_shape", f"{prefix}/model/{leaf}", rng.randbytes(40),
            Expect.BAD_TOPIC,
        )  # fmt: skip


def _chunk_layer_rejects(payload: bytes) -> bool:
    """True if a fresh reassembler refuses ``payload`` as the first chunk from a source."""
    from edge.chunking import Reassembler, parse_chunk

    try:
        header, data = parse_chunk(payload)
    except WireError:
        return True
    if header.count == 1:
        return len(data) != header.total_len
    try:
        Reassembler(2**31, 60.0, charge_overhead=True).feed("x", payload, 0.0)
    except WireError:
        return True
    return False


def expected_counts(cases: Iterable[FuzzCase]) -> dict[Target, Counter[str]]:
    """How many cases each target must count under each :class:`Expect` value."""
    out: dict[Target, Counter[str]] = {Target.COORDINATOR: Counter(), Target.AGENT: Counter()}
    for case in cases:
        out[case.target][case.expect.value] += 1
    return out


# Codec configs a device may name for an update tensor: the presets (raw among them)
# and stages with unusual parameters, so the fuzzer reaches every payload parser and kernel.
_PAYLOAD_CODECS: Final[tuple[Mapping[str, Any], ...]] = (
    *PRESETS.values(),
    {"id": "affine_u8"},
    {"id": "block_i8"},
    {"id": "block_i4", "block_size": 12},
    {"id": "block_i2", "block_size": 4},
    {"id": "topk", "fraction": 0.1},
    {"id": "zstd", "level": 1},
    {"id": "zlib"},
    {"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.01}, {"id": "block_i8"}]},
    {"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.2}, {"id": "affine_u8"}]},
    {"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.3}, {"id": "block_i2"}]},
)


def _decode_update_tensor(data: bytes) -> None:
    """One tensor payload decoded, then accumulated, as the coordinator does.

    Behind an update's HMAC a fuzzer cannot reach the payloads through
    :meth:`ModelUpdate.from_bytes`, so this builds the update directly: byte 0 picks
    the codec, bytes 1-2 the tensor's length, the rest is the payload. A payload the
    decoder accepts must decode to finite values and accumulate without error.
    """
    import numpy as np

    from edge.modelio import ModelLayout, accumulate_update, decode_update

    if len(data) < 3:
        return
    codec = _PAYLOAD_CODECS[data[0] % len(_PAYLOAD_CODECS)]
    n = int.from_bytes(data[1:3], "little") % 2049
    layout = ModelLayout((("w", (n,)),))
    update = ModelUpdate(
        task_id="t", round_no=0, model_version=0, cid="c", num_examples=1,
        tensors=(TensorSpec("w", (n,), codec),), payloads=(data[3:],),
    )  # fmt: skip
    out = np.empty(n, dtype=np.float32)
    decode_update(update, layout, out)  # LayoutError (a WireError) on a corrupt payload
    if not np.isfinite(out).all():
        raise AssertionError(f"{codec} accepted a payload that decodes to NaN/Inf")
    acc = np.zeros(n, dtype=np.float32)
    accumulate_update(update, layout, acc, 0.5)
    if not np.isfinite(acc).all():
        raise AssertionError(f"{codec} accumulated NaN/Inf from a payload it accepted")


def check_decoders(data: bytes) -> None:
    """Feed ``data`` to every decoder of the protocol; only :class:`WireError` may escape.

    The in-process fuzz target (atheris, hypothesis): any other exception, a hang or a
    crash is a bug. The first byte picks the decoder, the rest is its input; the last
    decoder is an update tensor's codec payload (:func:`_decode_update_tensor`).
    """
    from edge.chunking import Reassembler, parse_chunk

    if not data:
        return
    which, body = data[0] % 8, data[1:]
    decoders: list[Callable[[bytes], object]] = [
        Status.from_bytes,
        TrainTask.from_bytes,
        ModelManifest.from_bytes,
        lambda b: decode_envelope(b, max_size=1 << 20),
        lambda b: ModelUpdate.from_bytes(b, b"key", max_size=1 << 20),
        parse_chunk,
        lambda b: Reassembler(1 << 20, 10.0, charge_overhead=True).feed("x", b, 0.0),
        _decode_update_tensor,
    ]
    with contextlib.suppress(WireError):
        decoders[which](body)


# Keep MAX_CHUNK_COUNT referenced: count_too_large relies on it being 2**24.
assert MAX_CHUNK_COUNT == 2**24
