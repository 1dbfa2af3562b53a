"""Codecs: configs, round trips, error bounds, corrupt payloads, golden files, error feedback."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from kernels import codec as codecs
from kernels import quantize
from kernels.codec import ErrorFeedback, get_codec
from kernels.errors import (
    BadBufferError,
    CodecError,
    CorruptPayloadError,
    InvalidConfigError,
    NonFiniteInputError,
    UnknownCodecError,
)
from tests.codec_checks import (
    check_config_json,
    check_golden,
    check_golden_encode,
    check_no_input_mutation,
    check_roundtrip,
    load_golden_cases,
    load_golden_input,
)

CONFIGS = [
    {"id": "raw"},
    {"id": "affine_u8"},
    {"id": "block_i8"},
    {"id": "block_i8", "block_size": 12},
    {"id": "block_i4", "block_size": 32},
    {"id": "block_i2"},
    {"id": "block_i8", "stochastic": True, "seed": 5},
    {"id": "block_i4", "stochastic": True, "seed": 9, "block_size": 16},
    {"id": "topk", "fraction": 0.1},
    {"id": "topk", "fraction": 0.05, "exact": True},
    {"id": "topk", "fraction": 0.3, "trim": False},
    {"id": "zstd"},
    {"id": "zstd", "level": -3},
    {"id": "zlib", "level": 1},
    codecs.PRESETS["int8"],
    codecs.PRESETS["int4"],
    codecs.PRESETS["topk"],
    {"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.2}, {"id": "affine_u8"}]},
    {"id": "pipeline", "stages": [{"id": "block_i2"}, {"id": "zlib"}, {"id": "zstd"}]},
]
IDS = [json.dumps(c, sort_keys=True) for c in CONFIGS]

finite_vectors = arrays(
    np.float32,
    array_shapes(max_dims=1, min_side=0, max_side=600),
    elements=st.floats(-1e3, 1e3, width=32),
)


def error_bound(config: dict, x: np.ndarray) -> np.ndarray:
    """Per-element bound on |x - decode(encode(x))| that the codec documents."""
    codec = get_codec(config)
    stages = codec.get_config()["stages"] if config["id"] == "pipeline" else [config]
    ids = [s["id"] for s in stages]
    value = next(
        (s for s in stages if s["id"] in ("affine_u8", "block_i8", "block_i4", "block_i2")), None
    )
    if "topk" in ids:
        # dropped elements are off by their full magnitude; kept ones by the value codec's bound
        return np.abs(x) + (np.abs(x).max(initial=0.0) + 1e-6)
    if value is None:
        return np.full(x.shape, 1e-30, dtype=np.float64)
    if value["id"] == "affine_u8":
        lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
        return np.full(x.shape, (hi - lo) / 255 * 0.5 * 1.0001 + 1e-7)
    bits = int(value["id"][-1])
    qmax = (1 << (bits - 1)) - 1
    block = value.get("block_size", 64)
    blocks = np.pad(np.abs(x).astype(np.float64), (0, (-x.size) % block)).reshape(-1, block)
    scale = np.repeat(blocks.max(axis=1) / qmax, block)[: x.size]
    factor = 1.0 if value.get("stochastic") else 0.5
    return scale * factor * 1.0001 + 1e-7


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_config_survives_json(config: dict) -> None:
    check_config_json(get_codec(config))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_roundtrip_within_documented_bound(config: dict, rng: np.random.Generator) -> None:
    # Prepare
    x = rng.standard_normal(1001).astype(np.float32)
    x[::10] = 0.0
    codec = get_codec(config)
    # Execute / Assert
    check_roundtrip(codec, x, error_bound(config, x))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(x=finite_vectors)
def test_roundtrip_property(config: dict, x: np.ndarray) -> None:
    check_roundtrip(get_codec(config), x, error_bound(config, x))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 63, 64, 65, 127])
def test_small_and_odd_sizes(config: dict, n: int, rng: np.random.Generator) -> None:
    x = rng.standard_normal(n).astype(np.float32)
    check_roundtrip(get_codec(config), x, error_bound(config, x))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_zero_stays_zero(config: dict) -> None:
    x = np.zeros(300, dtype=np.float32)
    codec = get_codec(config)
    np.testing.assert_array_equal(codec.decode(codec.encode(x), np.ones_like(x)), x)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_constant_input(config: dict) -> None:
    x = np.full(130, -2.5, dtype=np.float32)
    check_roundtrip(get_codec(config), x, error_bound(config, x))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_decode_accumulate_matches_decode(config: dict, rng: np.random.Generator) -> None:
    # Prepare
    x = rng.standard_normal(777).astype(np.float32)
    codec = get_codec(config)
    payload = codec.encode(x)
    acc = rng.standard_normal(777).astype(np.float32)
    expected = acc + np.float32(0.25) * codec.decode(payload, np.empty_like(x))
    # Execute
    got = codec.decode_accumulate(payload, acc, 0.25)
    # Assert
    assert got is acc
    np.testing.assert_allclose(acc, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_payload_at_any_byte_offset_decodes_the_same(
    config: dict, shift: int, rng: np.random.Generator
) -> None:
    # A payload sliced out of a larger message (an envelope, a chunk) starts wherever
    # it starts; the float32 fields inside must not need 4-byte alignment (32-bit
    # ARM faults on unaligned float loads).
    # Prepare
    x = rng.standard_normal(777).astype(np.float32)
    codec = get_codec(config)
    payload = codec.encode(x)
    moved = memoryview(bytes(shift) + payload)[shift:]
    want = codec.decode(payload, np.empty_like(x))
    acc = np.zeros_like(x)
    # Execute
    got = codec.decode(moved, np.empty_like(x))
    codec.decode_accumulate(moved, acc, 1.0)
    # Assert
    assert np.array_equal(got, want)
    np.testing.assert_array_equal(acc, want)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_encode_does_not_mutate_input(config: dict, rng: np.random.Generator) -> None:
    x = rng.standard_normal(500).astype(np.float32)
    check_no_input_mutation(get_codec(config).encode, x)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(config: dict, bad: float) -> None:
    x = np.ones(100, dtype=np.float32)
    x[37] = bad
    with pytest.raises(NonFiniteInputError):
        get_codec(config).encode(x)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_truncation_is_an_error(config: dict, rng: np.random.Generator) -> None:
    # Prepare
    x = rng.standard_normal(150).astype(np.float32)
    codec = get_codec(config)
    payload = codec.encode(x)
    out = np.empty_like(x)
    # Execute / Assert: no prefix of a payload decodes
    for cut in range(len(payload)):
        with pytest.raises(CorruptPayloadError):
            codec.decode(payload[:cut], out)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_trailing_bytes_are_an_error(config: dict, rng: np.random.Generator) -> None:
    x = rng.standard_normal(150).astype(np.float32)
    codec = get_codec(config)
    with pytest.raises(CorruptPayloadError):
        codec.decode(codec.encode(x) + b"\x00", np.empty_like(x))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_wrong_output_size_is_an_error(config: dict, rng: np.random.Generator) -> None:
    x = rng.standard_normal(150).astype(np.float32)
    codec = get_codec(config)
    with pytest.raises(CodecError):
        codec.decode(codec.encode(x), np.empty(151, dtype=np.float32))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzzed_payload_errors_or_decodes_finite(config: dict, data: st.DataObject) -> None:
    # Prepare: a real payload with random bytes overwritten, or random bytes outright
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(200).astype(np.float32)
    codec = get_codec(config)
    payload = bytearray(codec.encode(x))
    if data.draw(st.booleans()) and payload:
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(payload) - 1))
            payload[pos] = data.draw(st.integers(0, 255))
    else:
        payload = bytearray(data.draw(st.binary(max_size=1200)))
    out = np.empty_like(x)
    # Execute / Assert: a typed error, or a finite vector
    try:
        codec.decode(bytes(payload), out)
    except CodecError:
        return
    assert np.isfinite(out).all()


def test_decompression_bomb_is_refused() -> None:
    # Prepare: a zstd frame of 10 MB of zeros, claimed to hold 100 raw floats
    import zstandard

    bomb = b"Z" + zstandard.ZstdCompressor().compress(bytes(10_000_000))
    # Execute / Assert
    with pytest.raises(CorruptPayloadError, match="bound"):
        get_codec({"id": "zstd"}).decode(bomb, np.empty(100, dtype=np.float32))


@pytest.mark.parametrize("byte_codec", [{"id": "zstd", "level": 3}, {"id": "zlib", "level": 6}])
def test_byte_codecs_store_what_they_cannot_shrink(byte_codec: dict) -> None:
    # Prepare: 9 floats of noise do not compress; 4,000 zeros do
    noise = np.random.default_rng(1).standard_normal(9).astype(np.float32)
    zeros = np.zeros(4000, dtype=np.float32)
    codec = get_codec({"id": "pipeline", "stages": [{"id": "raw"}, byte_codec]})
    # Execute
    small, large = codec.encode(noise), codec.encode(zeros)
    # Assert: stored costs one tag byte; both decode exactly
    assert small[:1] == b"S" and len(small) == 1 + 4 * 9
    assert large[:1] in (b"Z", b"z") and len(large) < 200
    np.testing.assert_array_equal(codec.decode(small, np.empty(9, np.float32)), noise)
    np.testing.assert_array_equal(codec.decode(large, np.empty(4000, np.float32)), zeros)


@pytest.mark.parametrize("codec_id", ["zstd", "zlib"])
def test_stored_payload_past_the_bound_is_refused(codec_id: str) -> None:
    # Prepare: a stored body longer than any payload for 10 floats could be
    payload = b"S" + bytes(4096)
    # Execute / Assert
    with pytest.raises(CorruptPayloadError, match="bound"):
        get_codec({"id": codec_id}).decode(payload, np.empty(10, dtype=np.float32))


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"id": "nope"}, UnknownCodecError),
        ({}, InvalidConfigError),
        ({"id": 3}, InvalidConfigError),
        ({"id": "block_i8", "block_size": 0}, InvalidConfigError),
        ({"id": "block_i8", "block_size": 6}, InvalidConfigError),
        ({"id": "block_i8", "block_size": "64"}, InvalidConfigError),
        ({"id": "block_i8", "stochastic": 1}, InvalidConfigError),
        ({"id": "block_i8", "seed": -1}, InvalidConfigError),
        ({"id": "block_i8", "colour": "red"}, InvalidConfigError),
        ({"id": "topk"}, InvalidConfigError),
        ({"id": "topk", "fraction": 0}, InvalidConfigError),
        ({"id": "topk", "fraction": 1.5}, InvalidConfigError),
        ({"id": "topk", "fraction": True}, InvalidConfigError),
        ({"id": "zstd", "level": 99}, InvalidConfigError),
        ({"id": "pipeline", "stages": []}, InvalidConfigError),
        ({"id": "pipeline", "stages": "raw"}, InvalidConfigError),
        ({"id": "pipeline", "stages": [{"id": "zstd"}, {"id": "block_i8"}]}, InvalidConfigError),
        (
            {"id": "pipeline", "stages": [{"id": "block_i8"}, {"id": "topk", "fraction": 0.1}]},
            InvalidConfigError,
        ),
        ({"id": "pipeline", "stages": [{"id": "block_i8"}, {"id": "raw"}]}, InvalidConfigError),
        (
            {"id": "pipeline", "stages": [{"id": "pipeline", "stages": [{"id": "raw"}]}]},
            InvalidConfigError,
        ),
    ],
)
def test_bad_config_is_a_typed_error(config: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        get_codec(config)


def test_unknown_id_lists_registered_ids() -> None:
    with pytest.raises(UnknownCodecError, match="block_i8"):
        get_codec({"id": "blok_i8"})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"id": "block_i8", "bits": 3},
            "no parameter 'bits'; it takes block_size, stochastic, seed",
        ),
        ({"id": "raw", "level": 1}, "no parameter 'level'; it takes no parameters"),
        ({"id": "topk"}, "needs 'fraction'; it takes fraction, exact, trim, seed"),
    ],
)
def test_bad_parameter_names_what_the_codec_takes(config: dict, message: str) -> None:
    with pytest.raises(InvalidConfigError, match=re.escape(message)):
        get_codec(config)


def test_not_a_mapping_is_a_typed_error() -> None:
    with pytest.raises(InvalidConfigError):
        get_codec(["raw"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((3, 4), dtype=np.float32),
        np.zeros(10, dtype=np.float64),
        np.zeros(20, dtype=np.float32)[::2],
        [1.0, 2.0],
    ],
    ids=["2d", "float64", "strided", "list"],
)
def test_bad_input_buffer_is_a_typed_error(x: object) -> None:
    with pytest.raises(BadBufferError):
        get_codec({"id": "block_i8"}).encode(x)  # type: ignore[arg-type]


def test_read_only_output_is_refused(rng: np.random.Generator) -> None:
    x = rng.standard_normal(10).astype(np.float32)
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(BadBufferError):
        get_codec({"id": "raw"}).decode(get_codec({"id": "raw"}).encode(x), out)


def test_parse_codec_presets_and_json() -> None:
    assert codecs.parse_codec("int8") == codecs.PRESETS["int8"]
    assert codecs.parse_codec('{"id": "block_i4"}')["block_size"] == 64
    with pytest.raises(InvalidConfigError, match="preset"):
        codecs.parse_codec("int9")


def test_int8_preset_is_several_times_smaller(rng: np.random.Generator) -> None:
    x = rng.standard_normal(100_000).astype(np.float32)
    assert 4 * x.size / len(get_codec(codecs.PRESETS["int8"]).encode(x)) >= 3.5


# ---------------------------------------------------------------------------- golden files

GOLDEN = load_golden_cases()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_payload_still_decodes(name: str) -> None:
    check_golden(name, GOLDEN[name])


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_payload_is_what_encoding_gives(name: str) -> None:
    # The kernels give the same bits everywhere (no FMA contraction, no
    # -ffast-math, rounding by bit pattern), so a payload made on x86-64 with
    # NumPy 2 is what an aarch64 Raspberry Pi with NumPy 1.24 makes too.
    check_golden_encode(name, GOLDEN[name], load_golden_input())


def test_every_codec_id_has_a_golden_file() -> None:
    covered = set()
    for case in GOLDEN.values():
        config = case["config"]
        covered.add(config["id"])
        covered.update(s["id"] for s in config.get("stages", []))
    assert covered >= set(codecs.codec_ids())


# ---------------------------------------------------------------------------- error feedback

EF_CONFIGS = [
    {"id": "block_i8"},
    {"id": "block_i4", "block_size": 32},
    {"id": "block_i2"},
    codecs.PRESETS["int4"],
    codecs.PRESETS["topk"],
    {"id": "topk", "fraction": 0.05},
    {"id": "topk", "fraction": 0.05, "exact": True},
    {"id": "affine_u8"},
    {"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.1}, {"id": "block_i4"}]},
]
EF_IDS = [json.dumps(c, sort_keys=True) for c in EF_CONFIGS]


def generic_feedback(codec: codecs.UpdateCodec, residual: np.ndarray, update: np.ndarray) -> bytes:
    """The definition: residual += update; send = encode(residual); residual -= decode(send)."""
    residual += update
    payload = codec.encode(residual)
    residual -= codec.decode(payload, np.empty_like(residual))
    return payload


@pytest.mark.parametrize("n", [1000, 70_000])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "double-buffered"])
@pytest.mark.parametrize("config", EF_CONFIGS, ids=EF_IDS)
def test_feedback_matches_its_definition(
    config: dict, in_place: bool, n: int, rng: np.random.Generator
) -> None:
    # Prepare: 70,000 elements span many chunks of the top-k candidate pass
    codec = get_codec(config)
    ef = ErrorFeedback(codec, n, in_place=in_place)
    reference = np.zeros(n, dtype=np.float32)
    for _ in range(4):
        update = rng.standard_normal(n).astype(np.float32)
        # Execute
        got = ef.encode(update)
        expected = generic_feedback(codec, reference, update)
        # Assert: the same bytes are sent and the same residual is kept, bit for bit
        assert got == expected
        assert ef.residual.tobytes() == reference.tobytes()


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "double-buffered"])
@pytest.mark.parametrize("config", EF_CONFIGS, ids=EF_IDS)
def test_feedback_sends_everything_eventually(
    config: dict, in_place: bool, rng: np.random.Generator
) -> None:
    # Prepare: the same update every round; the sum of what was sent tracks the sum of updates
    codec = get_codec(config)
    ef = ErrorFeedback(codec, 500, in_place=in_place)
    update = rng.standard_normal(500).astype(np.float32)
    sent = np.zeros(500, dtype=np.float64)
    rounds = 60
    # Execute
    for _ in range(rounds):
        sent += codec.decode(ef.encode(update), np.empty(500, dtype=np.float32))
    # Assert: sent + residual == rounds * update (nothing is lost), residual stays bounded
    np.testing.assert_allclose(
        sent + ef.residual, rounds * update.astype(np.float64), rtol=1e-4, atol=1e-3
    )
    assert np.abs(ef.residual).max() < np.abs(rounds * update).max() / 4


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "double-buffered"])
@pytest.mark.parametrize("config", EF_CONFIGS, ids=EF_IDS)
def test_feedback_leaves_residual_untouched_on_bad_input(
    config: dict, in_place: bool, rng: np.random.Generator
) -> None:
    # Prepare
    ef = ErrorFeedback(get_codec(config), 300, in_place=in_place)
    ef.encode(rng.standard_normal(300).astype(np.float32))
    before = ef.residual.copy()
    bad = rng.standard_normal(300).astype(np.float32)
    bad[250] = np.nan
    # Execute / Assert
    with pytest.raises(NonFiniteInputError):
        ef.encode(bad)
    with pytest.raises(BadBufferError):
        ef.encode(np.zeros(299, dtype=np.float32))
    np.testing.assert_array_equal(ef.residual, before)


def test_feedback_resumes_from_a_saved_residual(rng: np.random.Generator) -> None:
    # Prepare: run two rounds, "restart" from the saved residual, compare with an uninterrupted run
    codec = get_codec(codecs.PRESETS["topk"])
    updates = [rng.standard_normal(400).astype(np.float32) for _ in range(4)]
    straight = ErrorFeedback(codec, 400)
    expected = [straight.encode(u) for u in updates]
    first = ErrorFeedback(codec, 400)
    got = [first.encode(u) for u in updates[:2]]
    saved = first.residual.copy()
    # Execute
    second = ErrorFeedback(codec, 400, residual=saved)
    got += [second.encode(u) for u in updates[2:]]
    # Assert
    assert got == expected


@pytest.mark.parametrize("in_place", [True, False, None])
def test_feedback_never_modifies_the_residual_it_was_given(
    in_place: bool | None, rng: np.random.Generator
) -> None:
    # Prepare: a saved residual, as the agent passes its committed state
    saved = rng.standard_normal(700).astype(np.float32)
    before = saved.copy()
    ef = ErrorFeedback(get_codec(codecs.PRESETS["topk"]), 700, saved, in_place=in_place)
    # Execute: three rounds (a double-buffered object then reuses its own buffers)
    for _ in range(3):
        ef.encode(rng.standard_normal(700).astype(np.float32))
    # Assert
    np.testing.assert_array_equal(saved, before)
    assert not np.shares_memory(ef.residual, saved)


def test_feedback_keeps_two_buffers_and_alternates_them(rng: np.random.Generator) -> None:
    # Prepare
    ef = ErrorFeedback(get_codec({"id": "block_i8"}), 256, in_place=False)
    # Execute
    seen = []
    for _ in range(4):
        ef.encode(rng.standard_normal(256).astype(np.float32))
        seen.append(ef.residual)
    # Assert: round 3 reuses round 1's buffer, never the one in use
    assert seen[0] is not seen[1] and seen[2] is seen[0] and seen[3] is seen[1]


def test_feedback_double_buffers_unless_asked_for_one_buffer() -> None:
    # Execute / Assert
    default = ErrorFeedback(get_codec({"id": "block_i8"}), 1000)
    lean = ErrorFeedback(get_codec({"id": "block_i8"}), 1000, in_place=True)
    assert not default.in_place and lean.in_place


def test_feedback_rejects_a_residual_of_the_wrong_size() -> None:
    with pytest.raises(BadBufferError):
        ErrorFeedback(get_codec({"id": "block_i8"}), 10, residual=np.zeros(9, dtype=np.float32))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_max_block_scale_is_the_largest_with_a_finite_qmax_multiple(bits: int) -> None:
    # Prepare
    qmax = np.float32((1 << (bits - 1)) - 1)
    s = np.float32(quantize.max_block_scale(bits))
    # Execute / Assert
    with np.errstate(over="ignore"):
        assert np.isfinite(qmax * s)
        assert not np.isfinite(qmax * np.nextafter(s, np.float32(np.inf)))


@pytest.mark.parametrize("codec_id", ["block_i8", "block_i4", "block_i2"])
def test_block_codecs_round_trip_the_largest_floats(codec_id: str) -> None:
    # Prepare: FLT_MAX / 127 rounds up, so a block holding FLT_MAX used to decode to inf
    big = np.finfo(np.float32).max
    x = np.array([big, -big, 1.0, 0.0] * 16, dtype=np.float32)
    codec = get_codec({"id": codec_id})
    # Execute
    y = codec.decode(codec.encode(x), np.empty_like(x))
    # Assert
    assert np.isfinite(y).all()
    assert abs(float(y[0]) - big) <= big * 1e-6 and abs(float(y[1]) + big) <= big * 1e-6


@pytest.mark.parametrize(
    ("codec_id", "bits", "code_byte"),
    [("block_i8", 8, 0x80), ("block_i4", 4, 0x88), ("block_i2", 2, 0xAA)],
)
def test_code_no_encoder_writes_decodes_as_minus_qmax(
    codec_id: str, bits: int, code_byte: int
) -> None:
    # Prepare: the largest admissible scale and every code -(qmax + 1) (found by
    # fuzzing: -2 * FLT_MAX overflowed to -inf on block_i2 decode)
    codec = get_codec({"id": codec_id})
    qmax = (1 << (bits - 1)) - 1
    scale = np.float32(quantize.max_block_scale(bits))
    payload = bytearray(codec.encode(np.ones(64, dtype=np.float32)))
    payload[4:8] = scale.tobytes()
    payload[8:] = bytes([code_byte]) * (len(payload) - 8)
    out = np.empty(64, dtype=np.float32)
    acc = np.zeros(64, dtype=np.float32)
    # Execute
    codec.decode(bytes(payload), out)
    codec.decode_accumulate(bytes(payload), acc, 0.5)
    # Assert
    np.testing.assert_array_equal(out, np.float32(-qmax) * scale)
    assert np.isfinite(acc).all()


@pytest.mark.parametrize(
    ("codec_id", "scale"),
    [
        ("block_i8", np.finfo(np.float32).max),
        ("block_i4", np.finfo(np.float32).max),
        ("block_i2", np.inf),
        ("block_i8", np.nan),
        ("block_i4", -1.0),
    ],
)
def test_forged_scale_is_refused(codec_id: str, scale: float) -> None:
    # Prepare: a valid payload with a forged first scale (found by fuzzing:
    # qmax * scale overflowed float32 to inf on decode)
    codec = get_codec({"id": codec_id})
    payload = bytearray(codec.encode(np.ones(64, dtype=np.float32)))
    payload[4:8] = np.float32(scale).tobytes()
    # Execute / Assert
    with pytest.raises(CorruptPayloadError, match="scale"):
        codec.decode(bytes(payload), np.empty(64, dtype=np.float32))


# ---- the per-thread payload workspace ----

WORKSPACE_CONFIGS = [
    {"id": "block_i8"},
    {"id": "block_i4", "block_size": 32},
    codecs.PRESETS["int8"],
    {"id": "pipeline", "stages": [{"id": "block_i2"}]},
    codecs.PRESETS["topk"],
]


@pytest.mark.parametrize(
    "config", WORKSPACE_CONFIGS, ids=[json.dumps(c, sort_keys=True) for c in WORKSPACE_CONFIGS]
)
def test_payloads_survive_later_encodes(config: dict, rng: np.random.Generator) -> None:
    # Prepare: block payloads are laid out in a buffer each thread reuses
    codec = get_codec(config)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (5000, 700, 5000)]
    # Execute
    payloads = [codec.encode(x) for x in xs]
    snapshots = [bytes(p) for p in payloads]
    later = codec.encode(rng.standard_normal(9000).astype(np.float32))
    # Assert: every payload is its own bytes object, untouched by the encodes after it
    assert all(isinstance(p, bytes) for p in [*payloads, later])
    assert [bytes(p) for p in payloads] == snapshots
    for x, p in zip(xs, payloads, strict=True):
        assert p == get_codec(config).encode(x)


def test_encodes_on_many_threads_match_one_thread(rng: np.random.Generator) -> None:
    # Prepare
    codec = get_codec(codecs.PRESETS["int8"])
    xs = [rng.standard_normal(20_000 + 7 * i).astype(np.float32) for i in range(24)]
    expected = [codec.encode(x) for x in xs]
    # Execute: the kernels release the GIL, so the threads really interleave
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(codec.encode, xs))
    # Assert
    assert got == expected
