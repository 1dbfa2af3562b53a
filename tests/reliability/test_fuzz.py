"""Bad input: malformed messages through a real broker to a real coordinator and a real agent.

What is counted (``edge.fuzz``, ``server_stub.bench_fuzz.FuzzRig.observed``): every garbage
message a receiver gets is exactly one of

- a rejection counted by reason — coordinator ``metrics.rejects``: ``bad_topic``,
  ``bad_status``, ``bad_chunk``, ``bad_envelope``, ``wrong_cid``, ``unknown_task`` (and
  ``bad_signature`` with HMAC keys, see test_access.py); agent ``stats.rejected``:
  ``bad_topic``, ``bad_task``, ``bad_manifest``, ``bad_chunk``;
- ``held``: a well-formed first chunk of a transfer that never completes (each such case
  uses its own transfer id), pending in the reassembler within its budget until it expires;
- ``duplicate``: a redelivery of a chunk already taken, counted by the reassembler.

Multi-chunk garbage is therefore never "reassembled into" a count: a case is one MQTT message.
The broker test asserts ``counted since the start == expected_counts(cases)`` per reason, on
both sides, for more than 10,000 cases.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.chunking import CHUNK_OVERHEAD, TRANSFER_OVERHEAD, Reassembler
from edge.fuzz import (
    _PAYLOAD_CODECS,
    Expect,
    FuzzGenerator,
    FuzzTargets,
    Target,
    _decode_update_tensor,
    check_decoders,
    expected_counts,
)
from edge.transport import InMemoryBroker
from edge.wire import ChunkError, ModelManifest, Status, Topics, TrainTask, WireError
from kernels.codec import get_codec
from server_stub.bench_fuzz import FuzzRig, rss_bytes
from server_stub.config import config_from_dict
from server_stub.coordinator import Coordinator
from server_stub.metrics import CoordinatorMetrics
from server_stub.store import Store
from tests.broker import MosquittoBroker

CASES = 12_000
"""Malformed messages of the broker test (the issue asks for at least 10,000)."""
RSS_BOUND = 150 * 1024 * 1024
"""Allowed RSS growth of the test process (coordinator + agent + fuzzers) over the run."""
TARGETS = FuzzTargets("fuzz", "pi-fuzz", model_version=0)


# ------------------------------------------------------------------ through the real broker


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_garbage_through_the_broker_is_counted_and_changes_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Prepare: a real coordinator and a real agent on a real broker; the agent holds model 0
    with FuzzRig(tmp_path, broker_url=mosquitto.url, seed=0) as rig:
        cases = rig.generator(seed=0).cases(CASES)
        expected = expected_counts(cases)
        before, fingerprint, rss_before = rig.observed(), rig.fingerprint(), rss_bytes()
        # Execute
        rig.send(cases)
        counted = rig.wait_counted(before, cases, timeout=90)
        rss_after = rss_bytes()
        # Assert: nothing crashed, every message counted once under its reason, model kept
        assert rig.alive()
        assert counted[Target.COORDINATOR] == +expected[Target.COORDINATOR]
        assert counted[Target.AGENT] == +expected[Target.AGENT]
        assert rig.fingerprint() == fingerprint
        assert rss_after - rss_before < RSS_BOUND
        # ... and the system still works: one real round with the legitimate agent
        record = rig.legit_round(timeout=60)
        assert record["outcome"] == "aggregated" and record["model_version"] == 1
        assert record["participants"] == 1
        agent = rig.agent
        assert agent is not None and agent.runner.stats.updates_sent == 1


# ------------------------------------------------------------------ the generator


@pytest.mark.parametrize("seed", range(3))
def test_generator_is_deterministic(seed: int) -> None:
    a = FuzzGenerator(TARGETS, random.Random(seed)).cases(300)
    b = FuzzGenerator(TARGETS, random.Random(seed)).cases(300)
    assert a == b


def test_generator_covers_every_outcome_on_both_targets() -> None:
    counts = expected_counts(FuzzGenerator(TARGETS, random.Random(0)).cases(3000))
    assert set(counts[Target.COORDINATOR]) == {
        "bad_topic", "bad_status", "bad_chunk", "bad_envelope", "wrong_cid", "unknown_task",
        "held", "duplicate",
    }  # fmt: skip
    assert set(counts[Target.AGENT]) == {
        "bad_topic",
        "bad_task",
        "bad_manifest",
        "bad_chunk",
        "held",
    }


def test_signed_devices_forged_envelopes_expect_bad_signature() -> None:
    targets = FuzzTargets(
        "fuzz", "pi-fuzz", 0, forged_cids=("pi-fuzz",), signed_cids=frozenset({"pi-fuzz"})
    )
    gen = FuzzGenerator(
        targets, random.Random(1), weights={n: 0 for n in _ALL_GROUPS} | {"update.envelope": 1}
    )
    reasons = {c.expect for c in gen.cases(400)}
    assert Expect.BAD_SIGNATURE in reasons and Expect.UNKNOWN_TASK not in reasons


_ALL_GROUPS = (
    "update.chunk", "update.envelope", "update.held", "update.duplicate", "status",
    "coordinator.bad_topic", "task", "manifest", "model.chunk", "agent.bad_topic",
)  # fmt: skip


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_every_json_case_is_refused_by_the_shared_decoder(seed: int) -> None:
    for case in FuzzGenerator(TARGETS, random.Random(seed)).cases(40):
        decoder = {
            Expect.BAD_STATUS: Status.from_bytes,
            Expect.BAD_TASK: TrainTask.from_bytes,
            Expect.BAD_MANIFEST: ModelManifest.from_bytes,
        }.get(case.expect)
        if decoder is not None:
            with pytest.raises(WireError):
                decoder(case.payload)


# ------------------------------------------------------------------ decoders, in process


@given(data=st.binary(max_size=600))
@settings(max_examples=400, deadline=None)
def test_decoders_raise_only_wire_errors(data: bytes) -> None:
    check_decoders(data)  # anything but WireError escaping is a bug


@pytest.mark.parametrize("which", range(len(_PAYLOAD_CODECS)))
def test_update_tensor_target_takes_valid_payloads_and_refuses_cut_ones(which: int) -> None:
    # The fuzz target's codec entry must reach the decoders: a real payload decodes and
    # accumulates, and the same payload cut short is refused with a WireError.
    codec = get_codec(_PAYLOAD_CODECS[which])
    n = 300
    x = np.random.default_rng(which).standard_normal(n).astype(np.float32)
    head = bytes([which]) + n.to_bytes(2, "little")
    payload = codec.encode(x)
    _decode_update_tensor(head + payload)
    check_decoders(bytes([7]) + head + payload)
    with pytest.raises(WireError):
        _decode_update_tensor(head + payload[: len(payload) // 2])


@given(
    which=st.integers(0, len(_PAYLOAD_CODECS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_update_tensor_payloads_with_flipped_bytes(
    which: int, flips: list[tuple[int, int]]
) -> None:
    # Mutations of real payloads get past the first checks far more often than random
    # bytes do: whatever a decoder accepts must be finite, everything else a WireError.
    n = 200
    x = np.random.default_rng(which).standard_normal(n).astype(np.float32)
    payload = bytearray(get_codec(_PAYLOAD_CODECS[which]).encode(x))
    for pos, xor in flips:
        payload[pos % len(payload)] ^= xor
    check_decoders(bytes([7, which]) + n.to_bytes(2, "little") + bytes(payload))


def test_coordinator_counts_bad_status_and_bad_topic(tmp_path: Path) -> None:
    # Prepare: the coordinator on an in-memory broker (no network needed for this rule)
    config = config_from_dict({"fleet": "fuzz", "state": {"db": str(tmp_path / "c.db")}})
    layout, weights = config.layout_and_weights()
    broker = InMemoryBroker()
    with Store(config.state_db) as store:
        coord = Coordinator(
            config, broker.connect("coordinator"), store, layout=layout,
            initial_weights=weights, metrics=CoordinatorMetrics(),
        )  # fmt: skip
        topics = Topics("fuzz")
        from edge.transport import Message

        # Execute
        coord.handle_message(Message(topics.status("pi-1"), b'{"v":1,"online":"yes"}'), 0.0)
        coord.handle_message(Message("fl/v1/fuzz/clients/-x/status", b"{}"), 0.0)
        # Assert: both counted, neither registered a device
        assert coord.metrics.rejects == {"bad_status": 1, "bad_topic": 1}
        assert len(coord.registry) == 0
        coord.close()


# ------------------------------------------------------------------ the memory bound (bug fix)


def _empty_chunk(tid: bytes, index: int, count: int, total: int) -> bytes:
    head = struct.pack("<2sBB16sIIQ", b"FC", 1, 0, tid, index, count, total)
    return head + struct.pack("<I", google_crc32c.value(head))


def test_empty_chunk_storm_cannot_exceed_the_reassemblers_budget() -> None:
    # A transfer declaring 2**24 chunks of 2**24 bytes reserved only its 16 MiB, then held
    # one bookkeeping entry per empty chunk: a million chunks took ~80 MB of RSS. Charging the
    # bookkeeping against the budget refuses the transfer before the first chunk is held.
    r = Reassembler(64 << 20, 60.0, charge_overhead=True)
    with pytest.raises(ChunkError, match=r"budget|does not fit"):
        r.feed("dev", _empty_chunk(bytes(16), 0, 1 << 24, 1 << 24), 0.0)
    assert r.pending == 0 and r.reserved_bytes == 0


def test_many_tiny_transfers_are_bounded_by_their_bookkeeping() -> None:
    budget = 100 * (TRANSFER_OVERHEAD + 2 * CHUNK_OVERHEAD + 2)
    r = Reassembler(budget, 60.0, charge_overhead=True)
    accepted = rejected = 0
    for i in range(1000):
        try:
            r.feed("dev", _empty_chunk(i.to_bytes(16, "little"), 0, 2, 2), 0.0)
            accepted += 1
        except ChunkError:
            rejected += 1
    assert (accepted, rejected) == (100, 900)
    assert r.reserved_bytes <= budget


def test_charged_budget_still_takes_a_legitimate_transfer() -> None:
    from edge.chunking import split

    payload = random.Random(0).randbytes(1 << 20)
    chunks = split(payload, 64 * 1024)
    r = Reassembler(2 << 20, 60.0, charge_overhead=True)
    out = [r.feed("dev", c, 0.0) for c in chunks]
    assert out[-1] == payload and r.reserved_bytes == 0
