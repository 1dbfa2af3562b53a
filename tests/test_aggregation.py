"""Tests of server_stub.aggregation: streaming mean, bounded buffer, robust statistics, clipping."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kernels.errors import CorruptPayloadError
from server_stub.aggregation import (
    AggregationError,
    BoundedBuffer,
    BufferFullError,
    InvalidWeightError,
    NonFiniteUpdateError,
    SupportsDecodeAccumulate,
    UpdateShapeError,
    WeightedMean,
    clip_by_norm,
    coordinate_median,
    trimmed_mean,
    update_norm,
)
from tests.codec_checks import Float16Codec

F32 = npt.NDArray[np.float32]
SIZE = 257  # odd, not a multiple of any block size


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _updates(rng: np.random.Generator, n: int, size: int = SIZE) -> list[F32]:
    return [rng.normal(size=size).astype(np.float32) for _ in range(n)]


def test_fake_codec_satisfies_protocol() -> None:
    assert isinstance(Float16Codec(), SupportsDecodeAccumulate)


# ---- WeightedMean ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_weighted_mean_of_vectors_matches_numpy(rng: np.random.Generator, n: int) -> None:
    # Prepare
    updates = _updates(rng, n)
    weights = rng.integers(1, 1000, size=n).astype(np.float64)
    mean = WeightedMean(SIZE)
    # Execute
    for u, w in zip(updates, weights, strict=True):
        mean.add(u, float(w))
    result = mean.result()
    # Assert
    expected = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    assert result is not None
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_streaming_encoded_equals_in_memory_decoded(rng: np.random.Generator, n: int) -> None:
    # Prepare
    codec = Float16Codec()
    payloads = [codec.encode(u) for u in _updates(rng, n)]
    weights = rng.integers(1, 100, size=n).astype(np.float64)
    decoded = np.stack([codec.decode(p, np.empty(SIZE, np.float32)) for p in payloads])
    streaming = WeightedMean(SIZE)
    # Execute
    for p, w in zip(payloads, weights, strict=True):
        streaming.add((codec, p), float(w))
    result = streaming.result()
    # Assert
    expected = np.average(decoded.astype(np.float64), axis=0, weights=weights)
    assert result is not None
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_streaming_with_real_codec_equals_in_memory(rng: np.random.Generator) -> None:
    codec_module = pytest.importorskip("kernels.codec", exc_type=ImportError)
    # Prepare
    codec = codec_module.get_codec({"id": "block_i8", "block_size": 64})
    payloads = [codec.encode(u) for u in _updates(rng, 6)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0, 4.0]
    decoded = np.stack([codec.decode(p, np.empty(SIZE, np.float32)) for p in payloads])
    streaming = WeightedMean(SIZE)
    # Execute
    for p, w in zip(payloads, weights, strict=True):
        streaming.add((codec, p), w)
    result = streaming.result()
    # Assert
    expected = np.average(decoded.astype(np.float64), axis=0, weights=weights)
    assert result is not None
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_weighted_mean_memory_does_not_grow(rng: np.random.Generator) -> None:
    # Prepare
    codec = Float16Codec()
    mean = WeightedMean(SIZE)
    acc_before = mean.weighted_sum
    # Execute
    for u in _updates(rng, 100):
        mean.add((codec, codec.encode(u)), 1.0)
    # Assert: encoded input never allocates the scratch vector; the accumulator is the same buffer
    assert mean._scratch is None
    assert np.shares_memory(acc_before, mean.weighted_sum)


def test_weighted_mean_without_weight_is_none() -> None:
    mean = WeightedMean(4)
    mean.add(np.ones(4, np.float32), 0.0)
    assert mean.result() is None


def test_weighted_mean_reset_keeps_buffer(rng: np.random.Generator) -> None:
    # Prepare
    mean = WeightedMean(SIZE)
    mean.add(_updates(rng, 1)[0], 2.0)
    acc = mean.weighted_sum
    # Execute
    mean.reset()
    # Assert
    assert mean.count == 0
    assert mean.total_weight == 0.0
    assert np.shares_memory(acc, mean.weighted_sum)
    assert not mean.weighted_sum.any()


def test_weighted_sum_view_is_read_only() -> None:
    mean = WeightedMean(3)
    with pytest.raises(ValueError, match="read-only"):
        mean.weighted_sum[0] = 1.0


@pytest.mark.parametrize(
    ("update", "error"),
    [
        (np.ones(SIZE + 1, np.float32), UpdateShapeError),
        (np.ones((1, SIZE), np.float32), UpdateShapeError),
        (np.ones(SIZE, np.int32), UpdateShapeError),
        (np.full(SIZE, np.nan, np.float32), NonFiniteUpdateError),
        (np.concatenate([np.ones(SIZE - 1), [np.inf]]).astype(np.float32), NonFiniteUpdateError),
    ],
)
def test_weighted_mean_rejects_bad_vector_untouched(
    update: npt.NDArray[np.generic], error: type[Exception]
) -> None:
    # Prepare
    mean = WeightedMean(SIZE)
    # Execute / Assert
    with pytest.raises(error):
        mean.add(update, 1.0)  # type: ignore[arg-type]
    assert mean.count == 0
    assert not mean.weighted_sum.any()


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_weighted_mean_rejects_bad_weight(weight: float) -> None:
    with pytest.raises(InvalidWeightError):
        WeightedMean(2).add(np.ones(2, np.float32), weight)


def test_corrupt_payload_propagates_codec_error() -> None:
    codec = Float16Codec()
    with pytest.raises(CorruptPayloadError):
        WeightedMean(SIZE).add((codec, b"\x00" * 3), 1.0)


def test_add_partial_merges_worker_sums(rng: np.random.Generator) -> None:
    # Prepare: two aggregator workers each see half the updates
    updates = _updates(rng, 6)
    left, right, whole = WeightedMean(SIZE), WeightedMean(SIZE), WeightedMean(SIZE)
    for i, u in enumerate(updates):
        (left if i < 3 else right).add(u, i + 1.0)
        whole.add(u, i + 1.0)
    # Execute
    left.add_partial(right.weighted_sum, right.total_weight, right.count)
    # Assert
    merged, expected = left.result(), whole.result()
    assert merged is not None and expected is not None
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-6)
    assert left.count == 6


# ---- BoundedBuffer -----------------------------------------------------------------------------


def test_bounded_buffer_refuses_past_capacity(rng: np.random.Generator) -> None:
    # Prepare
    buffer = BoundedBuffer(SIZE, capacity=2)
    for u in _updates(rng, 2):
        buffer.add(u)
    # Execute / Assert
    with pytest.raises(BufferFullError, match="capacity"):
        buffer.add(_updates(rng, 1)[0])
    assert buffer.count == 2


def test_bounded_buffer_memory_is_capacity_times_model() -> None:
    assert BoundedBuffer(1000, capacity=8).nbytes == 8 * 1000 * 4


def test_bounded_buffer_decodes_encoded_updates(rng: np.random.Generator) -> None:
    # Prepare
    codec = Float16Codec()
    update = _updates(rng, 1)[0]
    buffer = BoundedBuffer(SIZE, capacity=1)
    # Execute
    buffer.add((codec, codec.encode(update)))
    # Assert
    np.testing.assert_array_equal(buffer.rows()[0], update.astype(np.float16).astype(np.float32))


def test_bounded_buffer_reset_empties_without_reallocating(rng: np.random.Generator) -> None:
    buffer = BoundedBuffer(SIZE, capacity=3)
    buffer.add(_updates(rng, 1)[0])
    base = buffer._rows
    buffer.reset()
    assert buffer.count == 0
    assert buffer._rows is base


@pytest.mark.parametrize("capacity", [0, -1])
def test_bounded_buffer_rejects_bad_capacity(capacity: int) -> None:
    with pytest.raises(AggregationError, match="capacity"):
        BoundedBuffer(4, capacity)


# ---- robust statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_coordinate_median_matches_numpy(rng: np.random.Generator, n: int) -> None:
    stack = np.stack(_updates(rng, n))
    np.testing.assert_allclose(coordinate_median(stack), np.median(stack, axis=0), rtol=1e-6)


def test_coordinate_median_ignores_minority_outliers(rng: np.random.Generator) -> None:
    # Prepare: 7 honest updates near 1.0, 3 attackers sending 1e6
    honest = [np.float32(1.0) + 0.01 * u for u in _updates(rng, 7)]
    attack = [np.full(SIZE, 1e6, np.float32)] * 3
    # Execute
    median = coordinate_median(np.stack(honest + attack))
    # Assert
    assert np.abs(median - 1.0).max() < 0.1


@pytest.mark.parametrize(("beta", "n"), [(0.0, 5), (0.1, 10), (0.2, 10), (0.25, 9), (0.4, 6)])
def test_trimmed_mean_matches_sorted_reference(
    rng: np.random.Generator, beta: float, n: int
) -> None:
    # Prepare
    stack = np.stack(_updates(rng, n))
    trim = int(np.floor(beta * n))
    expected = np.sort(stack.astype(np.float64), axis=0)[trim : n - trim].mean(axis=0)
    # Execute / Assert
    np.testing.assert_allclose(trimmed_mean(stack, beta), expected, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_drops_outliers(rng: np.random.Generator) -> None:
    honest = [np.float32(1.0) + 0.01 * u for u in _updates(rng, 8)]
    attack = [np.full(SIZE, 1e6, np.float32), np.full(SIZE, -1e6, np.float32)]
    result = trimmed_mean(np.stack(honest + attack), beta=0.1)
    assert np.abs(result - 1.0).max() < 0.1


def test_overwrite_input_gives_same_result(rng: np.random.Generator) -> None:
    stack = np.stack(_updates(rng, 9))
    expected = trimmed_mean(stack, 0.2)
    np.testing.assert_array_equal(trimmed_mean(stack.copy(), 0.2, overwrite_input=True), expected)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(AggregationError, match="beta"):
        trimmed_mean(np.ones((4, 2), np.float32), beta)


def test_robust_statistics_reject_empty_stack() -> None:
    with pytest.raises(AggregationError):
        coordinate_median(np.empty((0, 3), np.float32))


# ---- norms and clipping -----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(0, 300), elements=st.floats(-1e3, 1e3, width=32)))
def test_update_norm_matches_float64_norm(x: F32) -> None:
    expected = float(np.linalg.norm(x.astype(np.float64)))
    assert update_norm(x) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 10.0, 1e6])
def test_clip_by_norm_bounds_norm_and_keeps_direction(
    rng: np.random.Generator, max_norm: float
) -> None:
    # Prepare
    x = _updates(rng, 1)[0]
    # Execute
    clipped, scale = clip_by_norm(x, max_norm)
    # Assert
    norm = np.linalg.norm(x.astype(np.float64))
    assert update_norm(clipped) <= max_norm * (1 + 1e-6)
    assert scale == pytest.approx(min(1.0, max_norm / norm))
    np.testing.assert_allclose(clipped, x * scale, rtol=1e-6)


def test_clip_by_norm_does_not_modify_input(rng: np.random.Generator) -> None:
    x = _updates(rng, 1)[0]
    before = x.copy()
    clip_by_norm(x, 0.5)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf")])
def test_clip_by_norm_rejects_bad_bound(max_norm: float) -> None:
    with pytest.raises(AggregationError, match="max_norm"):
        clip_by_norm(np.ones(3, np.float32), max_norm)
