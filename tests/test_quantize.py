"""Quantization kernels: compiled vs NumPy twin, error bounds, edge cases, buffer checks.

The compiled module (``kernels._quantize``) is compared with ``kernels._reference``
directly, whatever backend ``kernels._backend`` picked. When the compiled module is
missing these comparisons skip, unless ``FEDGE_REQUIRE_COMPILED=1`` (CI's compiled
run), where a missing module is a failure.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import hypothesis.strategies as st
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import array_shapes, arrays

from kernels import _reference, quantize, sparsify
from kernels.errors import BadBufferError, InvalidConfigError, NonFiniteInputError

F32 = npt.NDArray[np.float32]


def _load_compiled() -> ModuleType | None:
    try:
        return importlib.import_module("kernels._quantize")
    except ImportError:
        return None


COMPILED = _load_compiled()
REQUIRE_COMPILED = os.environ.get("FEDGE_REQUIRE_COMPILED") == "1"

FLOATS = arrays(
    np.float32,
    array_shapes(max_dims=1, max_side=4096),
    elements=st.floats(-1e3, 1e3, width=32),
)
BITS = st.sampled_from([8, 4, 2])
BLOCK_SIZES = st.sampled_from([4, 8, 12, 32, 64, 100, 256, 1024])
SEEDS = st.integers(0, 2**64 - 1)
CONFIGS = st.tuples(BITS, BLOCK_SIZES, st.booleans(), SEEDS)
"""(bits, block_size, stochastic, seed)"""
Config = tuple[int, int, bool, int]
HYPO = settings(max_examples=200, deadline=None)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    if COMPILED is None:
        if REQUIRE_COMPILED:
            pytest.fail("FEDGE_REQUIRE_COMPILED=1 but kernels._quantize is not built")
        pytest.skip("kernels._quantize is not built")
    return COMPILED


@pytest.fixture(params=["reference", "compiled"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each kernel module in turn (the compiled one only when built)."""
    if request.param == "reference":
        return _reference
    return request.getfixturevalue("compiled")  # type: ignore[no-any-return]


def _bits_equal(a: F32, b: F32) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _block_buffers(n: int, bits: int, block_size: int) -> tuple[Any, Any]:
    return (
        np.zeros(quantize.packed_nbytes(n, bits), dtype=np.uint8),
        np.zeros(quantize.num_blocks(n, block_size), dtype=np.float32),
    )


def _run_block(mod: ModuleType, x: F32, config: Config) -> tuple[Any, Any]:
    bits, bs, stochastic, seed = config
    packed, scales = _block_buffers(x.shape[0], bits, bs)
    mod.quantize_block(x, bits, bs, stochastic, seed, packed, scales)
    return packed, scales


def _dequantize(packed: Any, scales: Any, n: int, bits: int, bs: int) -> F32:
    out = np.zeros(n, dtype=np.float32)
    _reference.dequantize_block(packed, scales, n, bits, bs, out)
    return out


# ---- compiled == reference (hypothesis) ----


@HYPO
@given(x=FLOATS, config=CONFIGS)
def test_quantize_block_matches_reference(compiled: ModuleType, x: F32, config: Config) -> None:
    # Prepare / Execute
    want = _run_block(_reference, x, config)
    got = _run_block(compiled, x, config)
    # Assert
    assert np.array_equal(got[0], want[0])
    assert _bits_equal(got[1], want[1])


@HYPO
@given(x=FLOATS, bits=BITS, bs=BLOCK_SIZES, weight=st.floats(-4, 4, width=32))
def test_dequantize_block_and_accumulate_match_reference(
    compiled: ModuleType, x: F32, bits: int, bs: int, weight: float
) -> None:
    # Prepare
    n = x.shape[0]
    packed, scales = _run_block(_reference, x, (bits, bs, False, 0))
    outs = [np.zeros(n, dtype=np.float32) for _ in range(2)]
    accs = [np.linspace(-1, 1, n, dtype=np.float32) for _ in range(2)]
    # Execute
    for mod, out, acc in zip((_reference, compiled), outs, accs, strict=True):
        mod.dequantize_block(packed, scales, n, bits, bs, out)
        mod.dequantize_block_accumulate(packed, scales, n, bits, bs, weight, acc)
    # Assert
    assert _bits_equal(outs[0], outs[1])
    assert _bits_equal(accs[0], accs[1])


@HYPO
@given(update=FLOATS, config=CONFIGS, in_place=st.booleans(), data=st.data())
def test_quantize_block_feedback_matches_reference(
    compiled: ModuleType, update: F32, config: Config, in_place: bool, data: st.DataObject
) -> None:
    # Prepare
    bits, bs, stochastic, seed = config
    n = update.shape[0]
    residual = data.draw(arrays(np.float32, n, elements=st.floats(-10, 10, width=32)))
    results = []
    # Execute
    for mod in (_reference, compiled):
        r = residual.copy()
        out = r if in_place else np.full(n, np.nan, dtype=np.float32)
        packed, scales = _block_buffers(n, bits, bs)
        mod.quantize_block_feedback(update, r, bits, bs, stochastic, seed, packed, scales, out)
        results.append((packed, scales, out))
        if not in_place:
            assert _bits_equal(r, residual)  # only read
    # Assert
    (p0, s0, r0), (p1, s1, r1) = results
    assert np.array_equal(p0, p1)
    assert _bits_equal(s0, s1)
    assert _bits_equal(r0, r1)


@HYPO
@given(x=FLOATS, weight=st.floats(-4, 4, width=32))
def test_affine_u8_matches_reference(compiled: ModuleType, x: F32, weight: float) -> None:
    # Prepare
    n = x.shape[0]
    codes = [np.zeros(n, dtype=np.uint8) for _ in range(2)]
    outs = [np.zeros(n, dtype=np.float32) for _ in range(2)]
    accs = [np.ones(n, dtype=np.float32) for _ in range(2)]
    params = []
    # Execute
    for mod, c, out, acc in zip((_reference, compiled), codes, outs, accs, strict=True):
        scale, zp = mod.quantize_affine_u8(x, c)
        params.append((scale, zp))
        mod.dequantize_affine_u8(c, scale, zp, out)
        mod.dequantize_affine_u8_accumulate(c, scale, zp, weight, acc)
    # Assert
    assert params[0] == params[1]
    assert np.array_equal(codes[0], codes[1])
    assert _bits_equal(outs[0], outs[1])
    assert _bits_equal(accs[0], accs[1])


SUBNORMAL_INPUTS = [
    [2.73e-43],
    [1e-39, -3e-39, 0.0, 5e-45, -1e-45],
    [-1.0, 1e-40, 0.0, 2.0],
    [1e-40] * 7 + [0.0],
    [-1e-38, 1.1e-38, -1.2e-38, 1.17e-38],
]


@pytest.mark.parametrize("values", SUBNORMAL_INPUTS)
@pytest.mark.parametrize("config", [(8, 4, False, 0), (4, 8, True, 3), (2, 4, False, 0)])
def test_subnormal_input_matches_reference(
    compiled: ModuleType, values: list[float], config: Config
) -> None:
    # NumPy's float min/max flush subnormals to zero on 32-bit ARM (NEON); the
    # twins take extremes from the bit patterns, as the kernels do, so both agree
    # on every platform. Hypothesis found this under qemu-arm.
    # Prepare
    x = np.array(values, dtype=np.float32)
    codes = [np.zeros(x.size, dtype=np.uint8) for _ in range(2)]
    # Execute
    want = _run_block(_reference, x, config)
    got = _run_block(compiled, x, config)
    affine = [
        m.quantize_affine_u8(x, c) for m, c in zip((_reference, compiled), codes, strict=True)
    ]
    # Assert
    assert np.array_equal(got[0], want[0])
    assert _bits_equal(got[1], want[1])
    assert affine[0] == affine[1]
    assert np.array_equal(codes[0], codes[1])


# ---- error bounds ----


def _bound_slack(x: F32) -> F32:
    """Float32 rounding of x * (1/scale) and of code * scale: a few ulp of |x|."""
    return (4 * np.finfo(np.float32).eps * np.abs(x)).astype(np.float32)


@HYPO
@given(x=FLOATS, config=CONFIGS)
def test_block_roundtrip_error_within_bound(x: F32, config: Config) -> None:
    bits, bs, stochastic, seed = config
    # Prepare / Execute
    packed, scales = quantize.quantize_block(x, bits, bs, stochastic=stochastic, seed=seed)
    deq = quantize.dequantize_block(packed, scales, x.shape[0], bits, bs)
    # Assert
    step = np.repeat(scales, bs)[: x.shape[0]]
    err = np.abs(x - deq)
    if stochastic:  # strictly below one step, or exact (zero blocks)
        assert np.all((err < step + _bound_slack(x)) | (err == 0))
    else:
        assert np.all(err <= step / 2 + _bound_slack(x))


@HYPO
@given(x=FLOATS)
def test_affine_roundtrip_error_within_bound(x: F32) -> None:
    # Prepare / Execute
    codes, scale, zp = quantize.quantize_affine_u8(x)
    deq = quantize.dequantize_affine_u8(codes, scale, zp)
    # Assert
    assert np.all(np.abs(x - deq) <= scale / 2 * (1 + 1e-5) + _bound_slack(x))


@pytest.mark.parametrize(("bits", "max_rel_l2"), [(8, 0.007), (4, 0.11)])
def test_block_quality_on_gaussian(rng: np.random.Generator, bits: int, max_rel_l2: float) -> None:
    # Prepare
    x = rng.standard_normal(1 << 16).astype(np.float32)
    # Execute
    packed, scales = quantize.quantize_block(x, bits, 64)
    deq = quantize.dequantize_block(packed, scales, x.shape[0], bits, 64)
    # Assert
    assert np.linalg.norm(x - deq) / np.linalg.norm(x) <= max_rel_l2


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stochastic_rounding_is_unbiased(rng: np.random.Generator, bits: int) -> None:
    # Prepare: one block's worth of values repeated, so every copy has the same scale
    base = rng.standard_normal(64).astype(np.float32)
    x = np.tile(base, 1 << 13)
    # Execute
    packed, scales = quantize.quantize_block(x, bits, 64, stochastic=True, seed=7)
    deq = quantize.dequantize_block(packed, scales, x.shape[0], bits, 64)
    # Assert: the mean error per position and overall vanish
    err = (deq - x).astype(np.float64)
    assert abs(err.mean()) <= 1e-3 * x.std()
    per_position = err.reshape(-1, 64).mean(axis=0)
    assert np.all(np.abs(per_position) <= 6 * scales[0] / np.sqrt(1 << 13))


def test_stochastic_codes_depend_only_on_seed_and_index(rng: np.random.Generator) -> None:
    # Prepare
    x = rng.standard_normal(1000).astype(np.float32)
    # Execute
    whole, _ = quantize.quantize_block(x, 8, 64, stochastic=True, seed=3)
    prefix, _ = quantize.quantize_block(x[:640], 8, 64, stochastic=True, seed=3)
    other, _ = quantize.quantize_block(x, 8, 64, stochastic=True, seed=4)
    # Assert
    assert np.array_equal(whole[:640], prefix)
    assert not np.array_equal(whole, other)


# ---- edge cases (both implementations) ----


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_empty_block_input_writes_nothing(impl: ModuleType, bits: int) -> None:
    # Prepare
    x = np.zeros(0, dtype=np.float32)
    packed, scales = np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.float32)
    out = np.zeros(0, dtype=np.float32)
    # Execute
    impl.quantize_block(x, bits, 64, False, 0, packed, scales)
    impl.dequantize_block(packed, scales, 0, bits, 64, out)
    # Assert
    assert packed.size == scales.size == out.size == 0


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n", [1, 3, 5, 7, 67, 130])
def test_all_zero_block_gives_zero_scale_and_codes(impl: ModuleType, bits: int, n: int) -> None:
    # Prepare
    x = np.zeros(n, dtype=np.float32)
    packed, scales = _block_buffers(n, bits, 64)
    packed[:] = 0xAA
    # Execute
    impl.quantize_block(x, bits, 64, True, 1, packed, scales)
    # Assert
    assert not packed.any()
    assert not scales.any()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n", [1, 3, 5, 7, 67])
def test_constant_and_odd_length_block_roundtrip_exactly(
    impl: ModuleType, bits: int, n: int
) -> None:
    # Prepare: a constant block is its own absmax, so it is represented exactly
    x = np.full(n, -2.5, dtype=np.float32)
    packed, scales = _block_buffers(n, bits, 64)
    out = np.zeros(n, dtype=np.float32)
    # Execute
    impl.quantize_block(x, bits, 64, False, 0, packed, scales)
    impl.dequantize_block(packed, scales, n, bits, 64, out)
    # Assert
    assert np.allclose(out, x, rtol=1e-6)


@pytest.mark.parametrize(
    ("bits", "codes", "packed"),
    [
        (4, [1, -1, 7, -7, 3], [0xF1, 0x97, 0x03]),
        (2, [1, -1, 0, 1, -1], [0b01001101, 0b00000011]),
    ],
)
def test_packing_layout(impl: ModuleType, bits: int, codes: list[int], packed: list[int]) -> None:
    # Prepare: absmax == qmax, so the scale is 1 and the codes equal the values
    x = np.array(codes, dtype=np.float32)
    got, scales = _block_buffers(len(codes), bits, 64)
    # Execute
    impl.quantize_block(x, bits, 64, False, 0, got, scales)
    # Assert
    assert scales[0] == np.float32(1.0)
    assert got.tolist() == packed


@pytest.mark.parametrize("x", [[], [0.0], [0.0, -0.0, 0.0]])
def test_affine_empty_or_zero_gives_unit_scale(impl: ModuleType, x: list[float]) -> None:
    # Prepare
    arr = np.array(x, dtype=np.float32)
    codes = np.full(arr.shape[0], 9, dtype=np.uint8)
    # Execute
    scale, zp = impl.quantize_affine_u8(arr, codes)
    # Assert
    assert (scale, zp) == (1.0, 0)
    assert not codes.any()


@pytest.mark.parametrize(
    "x", [[-1.0, 0.0, 3.0], [0.0, 5.0], [-4.0, -1.0, 0.0], [2.0], [-0.5], [0.0, 1e-30, -7.0]]
)
def test_affine_zero_is_exact(impl: ModuleType, x: list[float]) -> None:
    # Prepare
    arr = np.array([*x, 0.0], dtype=np.float32)
    codes = np.zeros(arr.shape[0], dtype=np.uint8)
    out = np.ones(arr.shape[0], dtype=np.float32)
    # Execute
    scale, zp = impl.quantize_affine_u8(arr, codes)
    impl.dequantize_affine_u8(codes, scale, zp, out)
    # Assert
    assert codes[-1] == zp
    assert out[-1] == 0.0


# ---- non-finite input ----


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 77, 1500, 2999])
def test_nonfinite_block_input_raises_and_writes_nothing_from_its_group(
    impl: ModuleType, rng: np.random.Generator, bad: float, where: int
) -> None:
    # Prepare: 3000 elements span three groups of 16 blocks of 64
    x = rng.standard_normal(3000).astype(np.float32)
    x[where] = bad
    packed, scales = _block_buffers(3000, 8, 64)
    packed[:] = 0x5A
    scales[:] = 3.0
    group_start = where // 1024 * 1024
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=rf"x\[{where}\]"):
        impl.quantize_block(x, 8, 64, False, 0, packed, scales)
    assert np.all(packed[group_start:] == 0x5A)
    assert np.all(scales[group_start // 64 :] == 3.0)


@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_nonfinite_affine_input_raises_and_leaves_codes(impl: ModuleType, bad: float) -> None:
    # Prepare
    x = np.array([1.0, 2.0, bad, 3.0], dtype=np.float32)
    codes = np.full(4, 7, dtype=np.uint8)
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=r"x\[2\]"):
        impl.quantize_affine_u8(x, codes)
    assert np.all(codes == 7)


@pytest.mark.parametrize(
    ("update_value", "residual_value"),
    [(np.nan, 0.0), (1.0, np.inf), (3e38, 3e38)],  # the last overflows in the sum
    ids=["nan-update", "inf-residual", "overflowing-sum"],
)
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "into-residual_out"])
@pytest.mark.parametrize("n", [300, 70_000])  # one group of blocks; many, the bad one late
def test_nonfinite_feedback_leaves_residual_untouched(
    impl: ModuleType,
    rng: np.random.Generator,
    update_value: float,
    residual_value: float,
    in_place: bool,
    n: int,
) -> None:
    # Prepare
    update = rng.standard_normal(n).astype(np.float32)
    residual = rng.standard_normal(n).astype(np.float32)
    bad = n - 50
    update[bad], residual[bad] = update_value, residual_value
    update[-1] = update_value  # a later bad value must not be the one reported
    before = residual.copy()
    packed, scales = _block_buffers(n, 4, 64)
    out = residual if in_place else np.zeros_like(residual)
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=rf"\[{bad}\]"):
        impl.quantize_block_feedback(update, residual, 4, 64, False, 0, packed, scales, out)
    assert _bits_equal(residual, before)
    if in_place:  # checked before any write; into residual_out the outputs are scratch
        assert not packed.any()
        assert not scales.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_scale_in_payload_leaves_accumulator(impl: ModuleType, bad: float) -> None:
    # Prepare
    packed = np.ones(128, dtype=np.uint8)
    scales = np.array([1.0, bad], dtype=np.float32)
    acc = np.zeros(128, dtype=np.float32)
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=r"scales\[1\]"):
        impl.dequantize_block_accumulate(packed, scales, 128, 8, 64, 1.0, acc)
    assert not acc.any()


# ---- inputs are not modified; fused == unfused ----


def _feedback_in_place(impl: ModuleType, x: F32) -> None:
    """Feedback of update x into a residual of ones, passed as residual and residual_out."""
    ones = np.ones_like(x)
    impl.quantize_block_feedback(x, ones, 8, 64, False, 0, *_block_buffers(x.shape[0], 8, 64), ones)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: m.quantize_block(x, 4, 64, True, 1, *_block_buffers(x.shape[0], 4, 64)),
        lambda m, x: m.quantize_affine_u8(x, np.zeros(x.shape[0], dtype=np.uint8)),
        _feedback_in_place,
        lambda m, x: m.quantize_block_feedback(
            x,
            np.ones_like(x),
            8,
            64,
            False,
            0,
            *_block_buffers(x.shape[0], 8, 64),
            np.empty_like(x),
        ),
    ],
    ids=["quantize_block", "quantize_affine_u8", "feedback-in-place", "feedback-residual_out"],
)
def test_kernels_do_not_modify_inputs(
    impl: ModuleType, rng: np.random.Generator, call: Callable[[ModuleType, F32], object]
) -> None:
    # Prepare
    x = rng.standard_normal(301).astype(np.float32)
    before = x.copy()
    # Execute
    call(impl, x)
    # Assert
    assert _bits_equal(x, before)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "into-residual_out"])
@pytest.mark.parametrize("bs", [64, 12, 8192])  # 8192: a block larger than a group
def test_feedback_fused_equals_unfused_sequence(
    impl: ModuleType,
    rng: np.random.Generator,
    bits: int,
    stochastic: bool,
    in_place: bool,
    bs: int,
) -> None:
    # Prepare
    n = 20_001
    update = rng.standard_normal(n).astype(np.float32)
    residual = (0.1 * rng.standard_normal(n)).astype(np.float32)
    fused_residual = residual.copy() if in_place else np.empty_like(residual)
    fused = _block_buffers(n, bits, bs)
    # Execute
    impl.quantize_block_feedback(
        update,
        residual if not in_place else fused_residual,
        bits,
        bs,
        stochastic,
        9,
        *fused,
        fused_residual,
    )
    unfused_residual = residual + update
    unfused = _block_buffers(n, bits, bs)
    impl.quantize_block(unfused_residual, bits, bs, stochastic, 9, *unfused)
    deq = np.zeros(n, dtype=np.float32)
    impl.dequantize_block(*unfused, n, bits, bs, deq)
    unfused_residual -= deq
    # Assert
    assert np.array_equal(fused[0], unfused[0])
    assert _bits_equal(fused[1], unfused[1])
    assert _bits_equal(fused_residual, unfused_residual)


@pytest.mark.parametrize("overlap", ["residual", "update"])
@pytest.mark.parametrize(
    "feedback",
    [
        lambda u, r, out: quantize.quantize_block_feedback(u, r, residual_out=out),
        lambda u, r, out: sparsify.topk_feedback(u, r, 1, residual_out=out),
    ],
    ids=["block", "topk"],
)
def test_feedback_rejects_residual_out_overlapping_its_inputs(
    feedback: Callable[[F32, F32, F32], object], overlap: str
) -> None:
    # Prepare: residual_out is a view shifted by one element over one of the inputs
    base = np.arange(129, dtype=np.float32)
    shared, out = base[:128], base[1:]
    other = np.ones(128, dtype=np.float32)
    update, residual = (other, shared) if overlap == "residual" else (shared, other)
    before = base.copy()
    # Execute / Assert
    with pytest.raises(BadBufferError, match=f"overlaps {overlap}"):
        feedback(update, residual, out)
    assert _bits_equal(base, before)


def test_feedback_into_residual_out_streams_large_arrays_with_the_same_bits(
    rng: np.random.Generator,
) -> None:
    # Prepare: past 16 MiB the new residual is written with non-temporal stores
    n = (1 << 22) + 13
    update = rng.standard_normal(n).astype(np.float32)
    residual = (0.1 * rng.standard_normal(n)).astype(np.float32)
    in_place = residual.copy()
    out = np.empty_like(residual)
    # Execute
    p0, s0 = quantize.quantize_block_feedback(update, in_place)
    p1, s1 = quantize.quantize_block_feedback(update, residual, residual_out=out)
    # Assert
    assert np.array_equal(p0, p1)
    assert _bits_equal(s0, s1)
    assert _bits_equal(in_place, out)


def test_feedback_into_residual_out_accepts_a_read_only_residual() -> None:
    # Prepare
    residual = np.zeros(8, dtype=np.float32)
    residual.flags.writeable = False
    out = np.empty(8, dtype=np.float32)
    # Execute
    quantize.quantize_block_feedback(np.ones(8, dtype=np.float32), residual, residual_out=out)
    # Assert
    assert np.all(residual == 0) and np.allclose(out, 0, atol=1e-2)


# ---- residual_add ----


@HYPO
@given(update=FLOATS, in_place=st.booleans(), data=st.data())
def test_residual_add_matches_reference(
    compiled: ModuleType, update: F32, in_place: bool, data: st.DataObject
) -> None:
    # Prepare
    n = update.shape[0]
    residual = data.draw(arrays(np.float32, n, elements=st.floats(-1e3, 1e3, width=32)))
    results = []
    # Execute
    for mod in (_reference, compiled):
        r = residual.copy()
        out = r if in_place else np.full(n, np.nan, dtype=np.float32)
        mod.residual_add(r, update, out)
        results.append(out)
        if not in_place:
            assert _bits_equal(r, residual)  # only read
    # Assert
    assert _bits_equal(results[0], results[1])
    assert _bits_equal(results[0], residual + update)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "into-out"])
@pytest.mark.parametrize(
    ("update_value", "residual_value"), [(np.nan, 0.0), (np.inf, 0.0), (3e38, 3e38)]
)
def test_residual_add_nonfinite_sum_names_the_first_and_keeps_the_residual(
    impl: ModuleType, in_place: bool, update_value: float, residual_value: float
) -> None:
    # Prepare
    n = 5000
    update = np.ones(n, dtype=np.float32)
    residual = np.full(n, 0.5, dtype=np.float32)
    update[4000], residual[4000] = update_value, residual_value
    update[-1] = np.nan  # a later bad value must not be the one reported
    before = residual.copy()
    out = residual if in_place else np.zeros_like(residual)
    # Execute / Assert
    with pytest.raises(NonFiniteInputError, match=r"residual \+ update\[4000\]"):
        impl.residual_add(residual, update, out)
    assert _bits_equal(residual, before)


def test_residual_add_streams_large_arrays_with_the_same_bits(rng: np.random.Generator) -> None:
    # Prepare: past 16 MiB the sum is written with non-temporal stores
    n = (1 << 22) + 13
    update = rng.standard_normal(n).astype(np.float32)
    residual = rng.standard_normal(n).astype(np.float32)
    expected = residual + update
    # Execute
    into = quantize.residual_add(residual, update)
    quantize.residual_add(residual, update, out=residual)
    # Assert
    assert _bits_equal(into, expected)
    assert _bits_equal(residual, expected)


@pytest.mark.parametrize("overlap", ["residual", "update"])
def test_residual_add_rejects_out_overlapping_an_input(overlap: str) -> None:
    # Prepare: out is a view shifted by one element over one of the inputs
    base = np.arange(129, dtype=np.float32)
    shared, out = base[:128], base[1:]
    other = np.ones(128, dtype=np.float32)
    residual, update = (shared, other) if overlap == "residual" else (other, shared)
    before = base.copy()
    # Execute / Assert
    with pytest.raises(BadBufferError, match=f"overlaps {overlap}"):
        quantize.residual_add(residual, update, out=out)
    assert _bits_equal(base, before)


@pytest.mark.parametrize(
    ("residual", "update", "out", "match"),
    [
        (np.zeros(3, np.float32), np.zeros(4, np.float32), None, "residual"),
        (np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(3, np.float32), "out"),
        (np.zeros(4, np.float64), np.zeros(4, np.float32), None, "residual"),
        (np.zeros(4, np.float32), np.zeros((2, 2), np.float32), None, "update"),
        (np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.int32), "out"),
    ],
    ids=["short-residual", "short-out", "float64", "2-d", "int-out"],
)
def test_residual_add_rejects_bad_buffers(residual: Any, update: Any, out: Any, match: str) -> None:
    # Execute / Assert
    with pytest.raises(BadBufferError, match=match):
        quantize.residual_add(residual, update, out=out)


def test_residual_add_empty() -> None:
    # Execute
    out = quantize.residual_add(np.zeros(0, np.float32), np.zeros(0, np.float32))
    # Assert
    assert out.shape == (0,) and out.dtype == np.float32


# ---- public wrappers: buffers and config ----

GOOD = np.zeros(10, dtype=np.float32)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros(10, dtype=np.float64),
        np.zeros((2, 5), dtype=np.float32),
        np.zeros(20, dtype=np.float32)[::2],
        [0.0] * 10,
    ],
    ids=["float64", "2-d", "strided", "list"],
)
@pytest.mark.parametrize(
    "fn", [quantize.quantize_block, quantize.quantize_affine_u8], ids=["block", "affine"]
)
def test_bad_input_buffer_raises(fn: Callable[[Any], object], x: Any) -> None:
    with pytest.raises(BadBufferError):
        fn(x)


def _unaligned_f32(n: int) -> F32:
    """A writable float32 view one byte into a buffer: its items are not 4-byte aligned."""
    view = np.frombuffer(bytearray(4 * n + 1), dtype=np.float32, count=n, offset=1)
    assert not view.flags.aligned
    return view


@pytest.mark.parametrize(
    "call",
    [
        quantize.quantize_block,
        quantize.quantize_affine_u8,
        lambda u: quantize.dequantize_block(np.zeros(10, np.uint8), u[:1], 10),
        lambda u: quantize.dequantize_block_accumulate(
            np.zeros(10, np.uint8), np.ones(1, np.float32), 10, 8, 64, 1.0, u
        ),
        lambda u: quantize.residual_add(u, np.ones(10, np.float32)),
        lambda u: quantize.quantize_block_feedback(np.ones(10, np.float32), u),
    ],
    ids=["quantize", "affine", "scales", "accumulator", "residual_add", "feedback-residual"],
)
def test_unaligned_buffer_raises_and_is_left_alone(call: Callable[[F32], object]) -> None:
    # 32-bit ARM stops a process that loads floats at unaligned addresses (SIGBUS),
    # so every platform refuses them up front with the fix in the message.
    # Prepare
    u = _unaligned_f32(10)
    before = u.copy()
    # Execute / Assert
    with pytest.raises(BadBufferError, match=r"not aligned.*np\.array"):
        call(u)
    assert np.array_equal(u, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"packed_out": np.zeros(9, dtype=np.uint8)},
        {"packed_out": np.zeros(10, dtype=np.int8)},
        {"scales_out": np.zeros(2, dtype=np.float32)},
        {"scales_out": np.zeros(1, dtype=np.float64)},
    ],
    ids=["short-packed", "int8-packed", "long-scales", "float64-scales"],
)
def test_bad_output_buffer_raises(kwargs: dict[str, Any]) -> None:
    with pytest.raises(BadBufferError):
        quantize.quantize_block(GOOD, 8, 64, **kwargs)


def test_read_only_accumulator_raises() -> None:
    # Prepare
    packed, scales = quantize.quantize_block(GOOD)
    acc = np.zeros(10, dtype=np.float32)
    acc.flags.writeable = False
    # Execute / Assert
    with pytest.raises(BadBufferError, match="read-only"):
        quantize.dequantize_block_accumulate(packed, scales, 10, 8, 64, 1.0, acc)


def test_residual_size_mismatch_raises() -> None:
    with pytest.raises(BadBufferError, match="residual"):
        quantize.quantize_block_feedback(GOOD, np.zeros(11, dtype=np.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 3},
        {"bits": 16},
        {"block_size": 0},
        {"block_size": 6},
        {"block_size": 1 << 21},
        {"seed": -1},
        {"seed": 1 << 64},
    ],
)
def test_bad_block_config_raises(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError):
        quantize.quantize_block(GOOD, **kwargs)


@pytest.mark.parametrize("zero_point", [-1, 256])
def test_bad_zero_point_raises(zero_point: int) -> None:
    with pytest.raises(InvalidConfigError, match="zero_point"):
        quantize.dequantize_affine_u8(np.zeros(3, dtype=np.uint8), 1.0, zero_point)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kernel_rejects_short_buffers_itself(impl: ModuleType, bits: int) -> None:
    # Prepare: called directly, without the wrapper's checks
    x = np.ones(65, dtype=np.float32)
    packed, scales = _block_buffers(65, bits, 64)
    # Execute / Assert
    with pytest.raises(BadBufferError):
        impl.quantize_block(x, bits, 64, False, 0, packed[:-1], scales)
    with pytest.raises(BadBufferError):
        impl.quantize_block(x, bits, 64, False, 0, packed, scales[:-1])


def test_accumulate_adds_weighted_values(rng: np.random.Generator) -> None:
    # Prepare
    x = rng.standard_normal(500).astype(np.float32)
    packed, scales = quantize.quantize_block(x, 8, 64)
    deq = quantize.dequantize_block(packed, scales, 500, 8, 64)
    acc = np.full(500, 2.0, dtype=np.float32)
    # Execute
    quantize.dequantize_block_accumulate(packed, scales, 500, 8, 64, 0.25, acc)
    # Assert
    assert _bits_equal(acc, np.float32(2.0) + np.float32(0.25) * deq)
