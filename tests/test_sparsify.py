"""Tests of the sparsification kernels: kernels.sparsify, kernels._sparsify and their twins.

The compiled functions are compared with their NumPy twins in ``kernels._reference``
on hypothesis-generated input (bottleneck ``slow/`` style): identical indices and
identical float32 bits, and both raise or neither. The public wrappers are tested
against the definitions (stable argsort for top-k, ``np.add.at`` for scatters).
When the compiled module is missing, the twin comparisons skip, unless
``FEDGE_REQUIRE_COMPILED=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from kernels import _reference, sparsify
from kernels.errors import (
    BadBufferError,
    CorruptPayloadError,
    InvalidConfigError,
    NonFiniteInputError,
)

F32 = npt.NDArray[np.float32]
U32 = npt.NDArray[np.uint32]

FEW = settings(max_examples=60, deadline=None)

# Vectors as the house style prescribes, plus vectors made of a few values (many
# ties, duplicates and signed zeros), which exercise the tie-breaking rule.
VECTORS = arrays(
    np.float32,
    array_shapes(max_dims=1, min_side=0, max_side=4096),
    elements=st.floats(-1e3, 1e3, width=32),
)
TIED_VECTORS = arrays(
    np.float32,
    array_shapes(max_dims=1, min_side=0, max_side=4096),
    elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e3]),
)
ANY_VECTOR = st.one_of(VECTORS, TIED_VECTORS)


# ---- helpers ----


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    try:
        from kernels import _sparsify
    except ImportError as exc:
        if os.environ.get("FEDGE_REQUIRE_COMPILED") == "1":
            pytest.fail(f"FEDGE_REQUIRE_COMPILED=1 but kernels._sparsify is missing: {exc}")
        pytest.skip(f"compiled kernels not built: {exc}")
    module: ModuleType = _sparsify
    return module


def _definition(x: F32, k: int) -> npt.NDArray[np.intp]:
    return np.sort(np.argsort(-np.abs(x), kind="stable")[:k])


def _bits(a: npt.NDArray[Any]) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """Result of fn(*args) plus the bytes of every array argument afterwards, or the error."""
    try:
        result = fn(*args)
    except (ValueError, OverflowError) as exc:
        return ("raised", type(exc), str(exc))
    return ("returned", result, *(_bits(a) for a in args if isinstance(a, np.ndarray)))


def _sampled_args(
    x: F32, k: int, *, seed: int, size: int, rank: int, capacity: int, exact: bool
) -> list[Any]:
    out_len = k if exact else max(k, capacity)
    return [
        x,
        k,
        seed,
        size,
        rank,
        exact,
        np.zeros(capacity, dtype=np.uint32),
        np.zeros(max(size, capacity), dtype=np.uint32),
        np.zeros(out_len, dtype=np.uint32),
        np.zeros(out_len, dtype=np.float32),
    ]


def _compare_sampled_outputs(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    # Scratch buffers (cand, scratch) may differ; results and outputs may not.
    assert a[0] == b[0]
    if a[0] == "raised":
        assert a[1:] == b[1:]
        return
    count = a[1]
    assert count == b[1]
    x_bits, out_i, out_v = a[2], a[-2], a[-1]
    assert (x_bits, out_i[: 4 * count], out_v[: 4 * count]) == (
        b[2],
        b[-2][: 4 * count],
        b[-1][: 4 * count],
    )


@st.composite
def sampled_cases(draw: st.DrawFn) -> tuple[F32, int, int, int, int, int, bool]:
    x = draw(ANY_VECTOR)
    n = x.shape[0]
    k = draw(st.integers(0, n))
    size = draw(st.integers(0, 64))
    rank = draw(st.integers(1, size)) if size else 0
    capacity = draw(st.integers(0, n))
    return x, k, draw(st.integers(0, 2**64 - 1)), size, rank, capacity, draw(st.booleans())


def _unfused_feedback(
    update: F32, residual: F32, k: int, seed: int, exact: bool
) -> tuple[U32, F32]:
    residual += update
    return sparsify.topk_sampled(residual, k, seed=seed, exact=exact)


# ---- compiled kernels vs their NumPy twins ----


@FEW
@given(x=ANY_VECTOR, data=st.data())
def test_compiled_topk_exact_matches_reference(
    compiled: ModuleType, x: F32, data: st.DataObject
) -> None:
    # Prepare
    k = data.draw(st.integers(0, x.shape[0]))
    args = [x, k, np.zeros(k, np.uint32), np.zeros(k, np.float32)]
    # Execute
    ref = _outcome(
        _reference.topk_exact, *[a.copy() if isinstance(a, np.ndarray) else a for a in args]
    )
    got = _outcome(compiled.topk_exact, *args)
    # Assert
    assert got == ref


@FEW
@given(case=sampled_cases())
def test_compiled_topk_sampled_matches_reference(
    compiled: ModuleType, case: tuple[F32, int, int, int, int, int, bool]
) -> None:
    # Prepare
    x, k, seed, size, rank, capacity, exact = case
    # Execute
    ref = _outcome(
        _reference.topk_sampled,
        *_sampled_args(
            x.copy(), k, seed=seed, size=size, rank=rank, capacity=capacity, exact=exact
        ),
    )
    got = _outcome(
        compiled.topk_sampled,
        *_sampled_args(x, k, seed=seed, size=size, rank=rank, capacity=capacity, exact=exact),
    )
    # Assert
    _compare_sampled_outputs(got, ref)


@FEW
@given(case=sampled_cases(), in_place=st.booleans(), data=st.data())
def test_compiled_topk_feedback_matches_reference(
    compiled: ModuleType,
    case: tuple[F32, int, int, int, int, int, bool],
    in_place: bool,
    data: st.DataObject,
) -> None:
    # Prepare
    residual, k, seed, size, rank, capacity, exact = case
    update = data.draw(arrays(np.float32, residual.shape, elements=st.floats(-1e3, 1e3, width=32)))

    def run(fn: Callable[..., Any]) -> tuple[Any, ...]:
        args = _sampled_args(
            residual.copy(), k, seed=seed, size=size, rank=rank, capacity=capacity, exact=exact
        )
        out = args[0] if in_place else np.zeros_like(residual)
        outcome = _outcome(fn, update.copy(), *args, out)
        return outcome if in_place else (*outcome[:4], _bits(out), *outcome[4:-1])

    # Execute
    ref, got = run(_reference.topk_feedback), run(compiled.topk_feedback)
    # Assert: same count, update, residual and outputs; residual only read unless in place
    assert got[:4] == ref[:4]
    if got[0] == "returned":
        count = got[1]
        if not in_place:
            assert got[3] == _bits(residual)
            assert got[4] == ref[4]  # residual_out
        assert got[-2][: 4 * count] == ref[-2][: 4 * count]
        assert got[-1][: 4 * count] == ref[-1][: 4 * count]


@pytest.mark.parametrize("name", ["topk_exact", "topk_sampled", "topk_feedback"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", [0, 17, 999])
def test_compiled_nonfinite_error_matches_reference(
    compiled: ModuleType, name: str, bad: float, position: int
) -> None:
    # Prepare
    x = np.random.default_rng(position).standard_normal(1000).astype(np.float32)
    x[position] = bad
    x[-1] = bad  # a later bad value must not be the one reported
    prefix = [np.zeros(1000, np.float32)] if name == "topk_feedback" else []
    args = [*prefix, *_sampled_args(x, 10, seed=0, size=64, rank=8, capacity=200, exact=True)]
    if name == "topk_feedback":
        args.append(np.zeros(1000, np.float32))  # residual_out
    if name == "topk_exact":
        args = [x, 10, np.zeros(10, np.uint32), np.zeros(10, np.float32)]
    # Execute
    ref = _outcome(
        getattr(_reference, name), *[a.copy() if isinstance(a, np.ndarray) else a for a in args]
    )
    got = _outcome(getattr(compiled, name), *args)
    # Assert
    assert got == ref
    assert got[0] == "raised" and got[1] is NonFiniteInputError
    assert f"[{position}]" in got[2]


@FEW
@given(data=st.data())
def test_compiled_scatter_accumulate_matches_reference(
    compiled: ModuleType, data: st.DataObject
) -> None:
    # Prepare
    acc = data.draw(VECTORS)
    m = data.draw(st.integers(0, 64))
    high = max(acc.shape[0] + 2, 1)  # some indices out of range
    indices = data.draw(arrays(np.uint32, m, elements=st.integers(0, high)))
    values = data.draw(arrays(np.float32, m, elements=st.floats(-1e3, 1e3, width=32)))
    weight = data.draw(st.floats(-10, 10))
    # Execute
    ref = _outcome(_reference.scatter_accumulate, indices.copy(), values.copy(), weight, acc.copy())
    got = _outcome(compiled.scatter_accumulate, indices, values, weight, acc)
    # Assert
    assert got == ref


@FEW
@pytest.mark.parametrize("name", ["subtract_at", "put_at"])
@given(data=st.data())
def test_compiled_residual_scatter_matches_reference(
    compiled: ModuleType, name: str, data: st.DataObject
) -> None:
    # Prepare: repeated and out-of-range indices included
    residual = data.draw(VECTORS)
    m = data.draw(st.integers(0, 64))
    indices = data.draw(arrays(np.uint32, m, elements=st.integers(0, residual.shape[0] + 2)))
    values = data.draw(arrays(np.float32, m, elements=st.floats(-1e3, 1e3, width=32)))
    # Execute
    ref = _outcome(getattr(_reference, name), residual.copy(), indices.copy(), values.copy())
    got = _outcome(getattr(compiled, name), residual, indices, values)
    # Assert
    assert got == ref


@FEW
@given(
    indices=arrays(np.uint32, st.integers(0, 300), elements=st.integers(0, 2**32 - 2)),
    n=st.sampled_from([1, 300, 2**20, 2**32 - 1]),
)
def test_compiled_encode_indices_matches_reference(
    compiled: ModuleType, indices: U32, n: int
) -> None:
    # Prepare: sometimes valid (sorted unique), sometimes not
    candidates = [indices, np.unique(indices), np.unique(indices % n).astype(np.uint32)]
    for idx in candidates:
        out_len = sparsify.max_encoded_index_nbytes(idx.shape[0])
        # Execute
        ref = _outcome(_reference.encode_indices, idx.copy(), n, np.zeros(out_len, np.uint8))
        got = _outcome(compiled.encode_indices, idx, n, np.zeros(out_len, np.uint8))
        # Assert
        assert got[:2] == ref[:2]
        if got[0] == "returned":
            assert got[-1][: got[1]] == ref[-1][: ref[1]]


@FEW
@given(
    buf=st.binary(max_size=64), count=st.integers(0, 40), n=st.sampled_from([0, 5, 1000, 2**32 - 1])
)
def test_compiled_decode_indices_matches_reference_on_fuzzed_bytes(
    compiled: ModuleType, buf: bytes, count: int, n: int
) -> None:
    # Prepare
    data = np.frombuffer(buf, dtype=np.uint8)
    # Execute
    ref = _outcome(_reference.decode_indices, data, count, n, np.zeros(count, np.uint32))
    got = _outcome(compiled.decode_indices, data, count, n, np.zeros(count, np.uint32))
    # Assert: both raise (the same error type) or both decode the same
    assert got[0] == ref[0]
    if got[0] == "raised":
        assert got[1] is ref[1] is CorruptPayloadError
    else:
        assert got[1:] == ref[1:]


# ---- top-k semantics (public API, whichever backend is loaded) ----


@FEW
@given(x=ANY_VECTOR, data=st.data())
def test_topk_exact_matches_stable_argsort_definition(x: F32, data: st.DataObject) -> None:
    # Prepare
    k = data.draw(st.integers(0, x.shape[0]))
    expected = _definition(x, k)
    # Execute
    indices, values = sparsify.topk_exact(x, k)
    # Assert
    assert indices.dtype == np.uint32 and values.dtype == np.float32
    np.testing.assert_array_equal(indices, expected)
    assert _bits(values) == _bits(x[expected])


def test_topk_exact_orders_subnormals_by_magnitude() -> None:
    # Float comparisons flush subnormals to zero in NumPy on 32-bit ARM; the kernels
    # and their twins compare magnitude bits, which order subnormals exactly.
    # Prepare
    x = np.array([1e-40, 0.0, -2e-40, 1e-45, -0.0, 3e-41], dtype=np.float32)
    # Execute
    indices, values = sparsify.topk_exact(x, 3)
    # Assert
    assert indices.tolist() == [0, 2, 5]
    assert _bits(values) == _bits(x[[0, 2, 5]])


@FEW
@given(x=ANY_VECTOR, data=st.data())
def test_topk_sampled_exact_equals_topk_exact_on_small_samples(x: F32, data: st.DataObject) -> None:
    # Prepare: tiny samples force every path (trim, too few candidates, overflow)
    k = data.draw(st.integers(0, x.shape[0]))
    size = data.draw(st.integers(0, 64))
    seed = data.draw(st.integers(0, 2**64 - 1))
    # Execute
    indices, values = sparsify.topk_sampled(x, k, seed=seed, sample_size=size)
    # Assert
    np.testing.assert_array_equal(indices, _definition(x, k))
    assert _bits(values) == _bits(x[indices])


@pytest.mark.parametrize("kind", ["gaussian", "rounded", "sparse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1])
def test_topk_sampled_exact_equals_topk_exact_with_default_sample(
    kind: str, seed: int, fraction: float
) -> None:
    # Prepare
    n = 400_000
    gen = np.random.default_rng(seed)
    x = gen.standard_normal(n).astype(np.float32)
    if kind == "rounded":  # heavy ties at the threshold
        x = (np.round(x * 4) / 4).astype(np.float32)
    if kind == "sparse":  # mostly zeros
        x[gen.random(n) < 0.95] = 0.0
    k = sparsify.topk_count(n, fraction)
    # Execute
    indices, values = sparsify.topk_sampled(x, k, seed=seed)
    # Assert
    np.testing.assert_array_equal(indices, _definition(x, k))
    assert _bits(values) == _bits(x[indices])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05])
def test_topk_sampled_inexact_recall_on_gaussian_data(seed: int, fraction: float) -> None:
    # Prepare
    n = 1 << 20
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    k = sparsify.topk_count(n, fraction)
    exact = set(_definition(x, k).tolist())
    # Execute
    indices, values = sparsify.topk_sampled(x, k, seed=seed, exact=False)
    # Assert
    recall = len(exact.intersection(indices.tolist())) / k
    assert recall >= 0.95
    assert k <= indices.shape[0] <= 2 * k
    assert np.all(np.diff(indices.astype(np.int64)) > 0)
    assert _bits(values) == _bits(x[indices])


def test_topk_sampled_in_threads_matches_one_thread() -> None:
    # Prepare: each thread keeps its own scratch; sizes differ so buffers get reused
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(n).astype(np.float32) for n in (300_000, 90_000, 500_000)] * 3
    expected = [sparsify.topk_sampled(x, x.shape[0] // 100) for x in inputs]

    def select(x: F32) -> tuple[U32, F32]:
        return sparsify.topk_sampled(x, x.shape[0] // 100)

    # Execute
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(select, inputs))
    # Assert
    for (gi, gv), (ei, ev) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(gi, ei)
        assert _bits(gv) == _bits(ev)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n", [0, 1, 7, 5000, 300_000])
def test_topk_sampled_with_k_zero_returns_nothing(
    n: int, exact: bool, rng: np.random.Generator
) -> None:
    # Prepare
    x = rng.standard_normal(n).astype(np.float32)
    # Execute
    indices, values = sparsify.topk_sampled(x, 0, exact=exact)
    # Assert
    assert indices.shape == values.shape == (0,)


SELECTORS: list[Callable[[F32, int], tuple[U32, F32]]] = [
    sparsify.topk_exact,
    sparsify.topk_sampled,
    lambda x, k: sparsify.topk_sampled(x, k, exact=False),
]
"""The public top-k selections: exact, sampled and trimmed, sampled untrimmed."""
SELECTOR_IDS = ["exact", "sampled", "sampled-inexact"]


@pytest.mark.parametrize(
    "select",
    [*SELECTORS, lambda x, k: sparsify.topk_feedback(x, np.zeros_like(x), k)],
    ids=[*SELECTOR_IDS, "feedback"],
)
@pytest.mark.parametrize("n", [1, 7, 5000, 300_000])
def test_topk_with_k_equal_n_returns_everything(
    select: Callable[[F32, int], tuple[U32, F32]], n: int, rng: np.random.Generator
) -> None:
    # Prepare
    x = rng.standard_normal(n).astype(np.float32)
    # Execute
    indices, values = select(x.copy(), n)
    # Assert
    np.testing.assert_array_equal(indices, np.arange(n))
    assert _bits(values) == _bits(x)


@pytest.mark.parametrize("select", SELECTORS, ids=SELECTOR_IDS)
@pytest.mark.parametrize("value", [0.0, -0.0, 3.5, -1e30])
def test_topk_of_constant_vector_takes_the_first_k(
    select: Callable[[F32, int], tuple[U32, F32]], value: float
) -> None:
    # Prepare
    n, k = 300_000, 3000
    x = np.full(n, value, dtype=np.float32)
    # Execute
    indices, values = select(x, k)
    # Assert: every magnitude ties, so exactly the lowest indices (inexact: all candidates)
    np.testing.assert_array_equal(indices[:k], np.arange(k))
    assert _bits(values) == _bits(x[indices])


@pytest.mark.parametrize(
    "select",
    [sparsify.topk_exact, sparsify.topk_sampled],
    ids=["exact", "sampled"],
)
def test_topk_of_empty_vector_is_empty(select: Callable[[F32, int], tuple[U32, F32]]) -> None:
    # Prepare
    x = np.zeros(0, dtype=np.float32)
    # Execute
    indices, values = select(x, 0)
    # Assert
    assert indices.shape == values.shape == (0,)


@pytest.mark.parametrize("select", SELECTORS, ids=SELECTOR_IDS)
@pytest.mark.parametrize("n", [100, 300_000])
def test_topk_does_not_modify_its_input(
    select: Callable[[F32, int], tuple[U32, F32]], n: int, rng: np.random.Generator
) -> None:
    # Prepare
    x = rng.standard_normal(n).astype(np.float32)
    before = x.copy()
    # Execute
    select(x, n // 50)
    # Assert
    assert _bits(x) == _bits(before)


@pytest.mark.parametrize("select", SELECTORS, ids=SELECTOR_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("k", [0, 10, 3000])
def test_topk_of_nonfinite_input_raises_naming_the_first_bad_index(
    select: Callable[[F32, int], tuple[U32, F32]], bad: float, k: int, rng: np.random.Generator
) -> None:
    # Prepare
    x = rng.standard_normal(300_000).astype(np.float32)
    x[[1234, 200_000]] = bad
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=r"x\[1234\]"):
        select(x, k)


# ---- error feedback ----


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("n", [1, 1000, 300_000, (1 << 22) + 5])  # the last: streamed stores
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "into-residual_out"])
def test_topk_feedback_fused_equals_unfused(n: int, exact: bool, seed: int, in_place: bool) -> None:
    # Prepare
    gen = np.random.default_rng(seed)
    update = gen.standard_normal(n).astype(np.float32)
    residual = gen.standard_normal(n).astype(np.float32) * np.float32(0.5)
    k = sparsify.topk_count(n, 0.01)
    unfused_residual = residual.copy()
    expected_indices, expected_values = _unfused_feedback(update, unfused_residual, k, seed, exact)
    sparsify.subtract_at(unfused_residual, expected_indices, expected_values)
    before = residual.copy()
    out = None if in_place else np.empty_like(residual)
    # Execute
    indices, values = sparsify.topk_feedback(
        update, residual, k, exact=exact, seed=seed, residual_out=out
    )
    if out is not None:
        assert _bits(residual) == _bits(before)  # only read
        residual = out
    sparsify.subtract_at(residual, indices, values)
    # Assert
    np.testing.assert_array_equal(indices, expected_indices)
    assert _bits(values) == _bits(expected_values)
    assert _bits(residual) == _bits(unfused_residual)
    assert np.all(residual[indices] == 0)


def test_topk_feedback_does_not_modify_the_update(rng: np.random.Generator) -> None:
    # Prepare
    update = rng.standard_normal(300_000).astype(np.float32)
    before = update.copy()
    # Execute
    sparsify.topk_feedback(update, np.zeros_like(update), 3000)
    # Assert
    assert _bits(update) == _bits(before)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("update", np.nan, r"update\[777\]"),
        ("update", -np.inf, r"update\[777\]"),
        ("residual", np.inf, r"residual\[777\]"),
        ("both", 3e38, r"residual\[777\] \+ update\[777\].*overflows"),
    ],
)
@pytest.mark.parametrize("k", [0, 3000])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "into-residual_out"])
def test_topk_feedback_nonfinite_raises_and_leaves_residual_untouched(
    where: str, value: float, message: str, k: int, in_place: bool, rng: np.random.Generator
) -> None:
    # Prepare
    update = rng.standard_normal(300_000).astype(np.float32)
    residual = rng.standard_normal(300_000).astype(np.float32)
    if where in ("update", "both"):
        update[[777, 250_000]] = value
    if where in ("residual", "both"):
        residual[[777, 250_000]] = value
    before = residual.copy()
    # Execute / Assert
    out = None if in_place else np.zeros_like(residual)
    with pytest.raises(NonFiniteInputError, match=message):
        sparsify.topk_feedback(update, residual, k, residual_out=out)
    assert _bits(residual) == _bits(before)


# ---- scatter ----


def _draw_scatter(data: st.DataObject) -> tuple[F32, U32, F32]:
    """A target vector and in-range (possibly repeated) indices with finite values."""
    target = data.draw(VECTORS)
    n = target.shape[0]
    m = data.draw(st.integers(0, 64)) if n else 0
    indices = data.draw(arrays(np.uint32, m, elements=st.integers(0, max(n - 1, 0))))
    values = data.draw(arrays(np.float32, m, elements=st.floats(-1e3, 1e3, width=32)))
    return target, indices, values


@FEW
@given(data=st.data())
def test_scatter_accumulate_matches_add_at_definition(data: st.DataObject) -> None:
    # Prepare
    acc, indices, values = _draw_scatter(data)
    weight = data.draw(st.floats(-10, 10))
    expected = acc.copy()
    np.add.at(expected, indices, np.float32(weight) * values)
    # Execute
    sparsify.scatter_accumulate(indices, values, weight, acc)
    # Assert
    assert _bits(acc) == _bits(expected)


@FEW
@given(data=st.data())
def test_put_at_last_write_wins(data: st.DataObject) -> None:
    # Prepare
    residual, indices, values = _draw_scatter(data)
    expected = residual.copy()
    for i, v in zip(indices.tolist(), values.tolist(), strict=True):
        expected[i] = v
    # Execute
    sparsify.put_at(residual, indices, values)
    # Assert
    assert _bits(residual) == _bits(expected)


scatter_calls = pytest.mark.parametrize(
    "call",
    [
        lambda i, v, a: sparsify.scatter_accumulate(i, v, 0.5, a),
        lambda i, v, a: sparsify.subtract_at(a, i, v),
        lambda i, v, a: sparsify.put_at(a, i, v),
    ],
    ids=["scatter_accumulate", "subtract_at", "put_at"],
)
"""The scatter writers, as ``call(indices, values, target)``."""


@scatter_calls
def test_scatter_with_out_of_range_index_raises_and_writes_nothing(
    call: Callable[[U32, F32, F32], None],
) -> None:
    # Prepare
    acc = np.ones(10, dtype=np.float32)
    indices = np.array([1, 10], dtype=np.uint32)
    values = np.ones(2, dtype=np.float32)
    # Execute / Assert
    with pytest.raises(BadBufferError, match=r"indices\[1\] = 10 is out of range"):
        call(indices, values, acc)
    assert np.all(acc == 1)


@scatter_calls
def test_scatter_with_nonfinite_value_raises_and_writes_nothing(
    call: Callable[[U32, F32, F32], None],
) -> None:
    # Prepare
    acc = np.ones(10, dtype=np.float32)
    indices = np.array([1, 2, 3], dtype=np.uint32)
    values = np.array([1.0, np.nan, 1.0], dtype=np.float32)
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=r"values\[1\]"):
        call(indices, values, acc)
    assert np.all(acc == 1)


@pytest.mark.parametrize("weight", [np.nan, np.inf, 1e300])
def test_scatter_accumulate_with_nonfinite_weight_raises(weight: float) -> None:
    # Prepare
    acc = np.zeros(4, dtype=np.float32)
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match="weight"):
        sparsify.scatter_accumulate(
            np.array([0], np.uint32), np.array([1.0], np.float32), weight, acc
        )


# ---- index coding ----


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[U32, int]:
    n = draw(st.sampled_from([1, 2, 130, 20_000, 2**28, 2**32 - 1]))
    chosen = draw(st.lists(st.integers(0, n - 1), max_size=300, unique=True))
    if draw(st.booleans()):  # dense runs: gaps of one
        start = draw(st.integers(0, n - 1))
        chosen += list(range(start, min(n, start + 50)))
    return np.unique(np.array(chosen, dtype=np.uint32)), n


@FEW
@given(case=index_sets())
def test_index_coding_round_trips(case: tuple[U32, int]) -> None:
    # Prepare
    indices, n = case
    # Execute
    payload = sparsify.encode_indices(indices, n)
    decoded, consumed = sparsify.decode_indices(payload, indices.shape[0], n)
    # Assert
    np.testing.assert_array_equal(decoded, indices)
    assert consumed == len(payload) <= sparsify.max_encoded_index_nbytes(indices.shape[0])


@FEW
@given(case=index_sets(), data=st.data())
def test_decoding_a_truncated_payload_raises(case: tuple[U32, int], data: st.DataObject) -> None:
    # Prepare
    indices, n = case
    payload = sparsify.encode_indices(indices, n)
    if not payload:
        return
    cut = data.draw(st.integers(0, len(payload) - 1))
    # Execute / Assert
    with pytest.raises(CorruptPayloadError):
        sparsify.decode_indices(payload[:cut], indices.shape[0], n)


@FEW
@given(
    buf=st.binary(max_size=80), count=st.integers(0, 60), n=st.sampled_from([0, 3, 100, 2**32 - 1])
)
def test_decoding_arbitrary_bytes_raises_or_yields_valid_indices(
    buf: bytes, count: int, n: int
) -> None:
    # Execute
    try:
        decoded, consumed = sparsify.decode_indices(buf, count, n)
    except CorruptPayloadError:
        return
    # Assert
    assert decoded.shape == (count,)
    assert 0 <= consumed <= len(buf)
    assert np.all(np.diff(decoded.astype(np.int64)) > 0)
    assert np.all(decoded < n)


@pytest.mark.parametrize(
    ("payload", "count", "n", "message"),
    [
        (b"\x80\x80\x80\x80\x80\x01", 1, 2**32 - 1, "32 bits"),  # six bytes
        (b"\xff\xff\xff\xff\x10", 1, 2**32 - 1, "32 bits"),  # 2**32 needs a 33rd bit
        (b"\x05", 1, 5, "out of range"),
        (b"\x01\x02", 2, 4, "out of range"),  # 1, then 1 + 2 + 1 = 4
        (b"\x01\x82", 2, 1000, "truncated"),
        (b"", 1, 10, "truncated"),
        (b"\x00\x00", 3, 10, "truncated"),
        (b"\x00\x00", 2, 1, "cannot all be below"),
    ],
)
def test_decoding_a_corrupt_payload_raises(
    payload: bytes, count: int, n: int, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(CorruptPayloadError, match=message):
        sparsify.decode_indices(payload, count, n)


def test_decoding_stops_at_count_and_reports_consumed_bytes() -> None:
    # Prepare
    payload = sparsify.encode_indices(np.array([3, 4, 200], np.uint32), 1000) + b"\xff"
    out = np.zeros(5, dtype=np.uint32)
    # Execute
    decoded, consumed = sparsify.decode_indices(payload, 3, 1000, out=out)
    # Assert
    assert decoded.tolist() == [3, 4, 200] and consumed == 4
    assert out[:3].tolist() == [3, 4, 200]


@pytest.mark.parametrize(
    ("indices", "n", "message"),
    [
        ([1, 1], 10, "strictly increasing"),
        ([5, 2], 10, "strictly increasing"),
        ([3, 10], 10, "out of range"),
    ],
)
def test_encoding_invalid_indices_raises(indices: list[int], n: int, message: str) -> None:
    # Execute / Assert
    with pytest.raises(BadBufferError, match=message):
        sparsify.encode_indices(np.array(indices, dtype=np.uint32), n)


# ---- wrapper validation ----


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(0, 0.5, 0), (1000, 0.01, 10), (100, 0.07, 7), (5, 0.01, 1), (10, 1.0, 10), (3, 0.5, 2)],
)
def test_topk_count(n: int, fraction: float, expected: int) -> None:
    # Execute / Assert
    assert sparsify.topk_count(n, fraction) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_topk_count_rejects_fraction_outside_unit_interval(fraction: float) -> None:
    # Execute / Assert
    with pytest.raises(InvalidConfigError, match="outside"):
        sparsify.topk_count(10, fraction)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros(10, dtype=np.float64),
        np.zeros((2, 5), dtype=np.float32),
        np.zeros(20, dtype=np.float32)[::2],
        [0.0, 1.0],
    ],
    ids=["float64", "2-d", "strided", "list"],
)
def test_topk_rejects_bad_buffers_with_a_fix(x: Any) -> None:
    # Execute / Assert
    with pytest.raises(BadBufferError, match=r"np\.ascontiguousarray"):
        sparsify.topk_exact(x, 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda u: sparsify.topk_exact(u, 1),
        lambda u: sparsify.topk_sampled(u, 1),
        lambda u: sparsify.topk_feedback(np.ones(10, np.float32), u, 1),
        lambda u: sparsify.put_at(u, np.array([1], np.uint32), np.ones(1, np.float32)),
        lambda u: sparsify.scatter_accumulate(
            np.array([1], np.uint32), u[:1], 1.0, np.ones(10, np.float32)
        ),
    ],
    ids=["exact", "sampled", "feedback-residual", "put_at", "scatter-values"],
)
def test_unaligned_buffers_are_refused_untouched(call: Callable[[F32], object]) -> None:
    # A float32 view at an odd byte offset: 32-bit ARM faults on such loads.
    # Prepare
    u = np.frombuffer(bytearray(41), dtype=np.float32, count=10, offset=1)
    assert not u.flags.aligned
    # Execute / Assert
    with pytest.raises(BadBufferError, match="not aligned"):
        call(u)
    assert not u.any()


@pytest.mark.parametrize("k", [-1, 11, 2.0, True])
def test_topk_rejects_k_outside_range(k: Any) -> None:
    # Execute / Assert
    with pytest.raises(InvalidConfigError, match="k"):
        sparsify.topk_sampled(np.zeros(10, dtype=np.float32), k)


def test_topk_feedback_rejects_read_only_residual() -> None:
    # Prepare
    residual = np.zeros(10, dtype=np.float32)
    residual.flags.writeable = False
    # Execute / Assert
    with pytest.raises(BadBufferError, match="read-only"):
        sparsify.topk_feedback(np.zeros(10, dtype=np.float32), residual, 1)


def test_topk_feedback_rejects_length_mismatch() -> None:
    # Execute / Assert
    with pytest.raises(BadBufferError, match="model's length"):
        sparsify.topk_feedback(np.zeros(9, np.float32), np.zeros(10, np.float32), 1)
