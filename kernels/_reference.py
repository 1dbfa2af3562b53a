"""NumPy twins of every compiled kernel: same names, same signatures, and the semantics.

The compiled kernels in ``_quantize.pyx`` and ``_sparsify.pyx`` must give the same
integer codes and the same float bits (within 1 ulp where documented) as these
functions; the tests compare the two on hypothesis-generated input. Where the
two disagree, this file is right.

Conventions shared by both: outputs are written into caller-provided buffers;
inputs are never modified (except in-place arguments named ``residual`` or ``acc``);
non-finite input raises :class:`kernels.errors.NonFiniteInputError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kernels.errors import NonFiniteInputError

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# ---- quantize section (owned by the quantize kernels; edit only between these markers) ----

# Twins of kernels/_quantize.pyx. Float32 operations happen in the same order as
# in _quantize_simd.h, so codes and float bits are identical. Rounding is
# round-half-to-even (np.rint; the compiled side's 1.5 * 2**23 add-and-subtract
# trick gives the same result for every |v| < 2**22, and codes never exceed 256).

# Imported here, not in the shared header, so this section stays self-contained.
from kernels.errors import BadBufferError, InvalidConfigError  # noqa: E402

I8 = npt.NDArray[np.int8]

MAX_BLOCK_SIZE = 1 << 20
_QMAX = {8: 127, 4: 7, 2: 1}
_FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32
# The largest float32 scale s with float32(qmax) * s finite. FLT_MAX / 127 rounds up,
# so without this cap a block holding values near FLT_MAX would decode to inf.
_SCALE_MAX = {
    8: np.uint32(0x7C010203).view(np.float32),
    4: np.uint32(0x7E124924).view(np.float32),
    2: np.uint32(0x7F7FFFFF).view(np.float32),
}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _qmax(bits: int) -> int:
    try:
        return _QMAX[bits]
    except KeyError:
        raise InvalidConfigError(f"bits must be 8, 4 or 2, got {bits}") from None


def _check_block_size(block_size: int) -> None:
    if block_size < 4 or block_size > MAX_BLOCK_SIZE or block_size % 4 != 0:
        raise InvalidConfigError(
            f"block_size must be a multiple of 4 in [4, {MAX_BLOCK_SIZE}], got {block_size}"
        )


def _check_len(name: str, have: int, need: int) -> None:
    if have < need:
        raise BadBufferError(
            f"{name} holds {have} elements but {need} are needed; allocate at least {need}"
        )


def _num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def _packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _nonfinite(what: str, index: int, value: float) -> NonFiniteInputError:
    return NonFiniteInputError(
        f"{what}[{index}] is {value!r}: the kernels quantize only finite values; "
        "drop or repair the update (NaN/Inf usually means training diverged)"
    )


def _check_finite(name: str, x: F32) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argmax(bad))
        raise _nonfinite(name, i, float(x[i]))


def quantize_affine_u8(x: F32, out_u8: U8) -> tuple[float, int]:
    """Quantize x to uint8 codes in out_u8; return (scale, zero_point).

    The range is [min(x, 0), max(x, 0)], so 0 is inside it, and zero_point is an
    integer code, so x == 0 gives code zero_point, which dequantizes to exactly 0.
    Empty or all-zero input gives scale 1.0, zero_point 0 (and codes 0).
    """
    n = x.shape[0]
    _check_len("out_u8", out_u8.shape[0], n)
    if n == 0:
        return 1.0, 0
    _check_finite("x", x)
    x_lo, x_hi = _min_max(x)
    lo = min(x_lo, 0.0)
    hi = max(x_hi, 0.0)
    if hi == lo:
        out_u8[:n] = 0
        return 1.0, 0
    scale = max(np.float32((hi - lo) / 255.0), _FLT_MIN)  # difference in float64
    zp = min(max(round(-lo / float(scale)), 0), 255)  # round(): half to even, as rint
    inv = np.float32(1.0) / scale
    q = np.rint(x * inv) + np.float32(zp)
    out_u8[:n] = np.clip(q, np.float32(0), np.float32(255)).astype(np.uint8)
    return float(scale), zp


def dequantize_affine_u8(codes: U8, scale: float, zero_point: int, out: F32) -> None:
    """Write (code - zero_point) * scale into out (float32)."""
    n = codes.shape[0]
    _check_len("out", out.shape[0], n)
    s = np.float32(scale)
    if not np.isfinite(s):
        raise _nonfinite("scale", 0, float(s))
    out[:n] = (codes.astype(np.float32) - np.float32(zero_point)) * s


def dequantize_affine_u8_accumulate(
    codes: U8, scale: float, zero_point: int, weight: float, acc: F32
) -> None:
    """acc += weight * ((code - zero_point) * scale), float32, in that order."""
    n = codes.shape[0]
    _check_len("acc", acc.shape[0], n)
    s = np.float32(scale)
    w = np.float32(weight)
    if not np.isfinite(s):
        raise _nonfinite("scale", 0, float(s))
    if not np.isfinite(w):
        raise NonFiniteInputError(f"weight is {float(w)!r}; pass a finite aggregation weight")
    acc[:n] += w * ((codes.astype(np.float32) - np.float32(zero_point)) * s)


def _uniform(seed: int, start: int, count: int) -> F32:
    """splitmix64 outputs number start+1 .. start+count of a generator seeded with seed,
    top 24 bits as float32 in [0, 1) (counter-based: any slice is reproducible)."""
    index = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z = np.uint64(seed) + index * _GOLDEN  # uint64 arrays wrap silently, as in C
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def _min_max(x: F32) -> tuple[float, float]:
    """min(x), max(x) of finite x through an order-preserving int32 key of the bits,
    as the kernel computes them (exact for subnormals, which NumPy's float min/max
    flush to zero on 32-bit ARM)."""
    bits = x.view(np.int32)
    keys = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # negative floats: reverse order
    ends = np.array([keys.min(), keys.max()], dtype=np.int32)
    ends ^= (ends >> 31) & np.int32(0x7FFFFFFF)  # the key map is its own inverse
    lo, hi = ends.view(np.float32)
    return float(lo), float(hi)


def _block_codes(x: F32, bits: int, block_size: int, stochastic: bool, seed: int) -> tuple[I8, F32]:
    """Codes (int8, length n) and per-block scales of finite x."""
    n = x.shape[0]
    qmax = np.float32(_qmax(bits))
    nb = _num_blocks(n, block_size)
    xp = np.zeros(nb * block_size, dtype=np.float32)
    xp[:n] = x
    blocks = xp.reshape(nb, block_size)
    # absmax from the bit patterns, as the kernel does: NumPy's float max flushes
    # subnormals to zero on 32-bit ARM (NEON), an integer max is exact everywhere.
    absbits = (blocks.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1)
    absmax = absbits.view(np.float32)
    scales = np.where(
        absbits > 0,
        np.minimum(np.maximum(absmax / qmax, _FLT_MIN), _SCALE_MAX[bits]),
        np.float32(0),
    )
    inv = np.zeros_like(scales)
    np.divide(np.float32(1.0), scales, out=inv, where=scales > 0)
    v = (blocks * inv[:, None]).ravel()[:n]
    if stochastic:
        f = np.floor(v)
        u = _uniform(seed, 0, n)
        q = f + (u < v - f).astype(np.float32)  # floor(v) + 1 with probability v - floor(v)
    else:
        q = np.rint(v)
    codes = np.clip(q, -qmax, qmax).astype(np.int8)
    return codes, scales.astype(np.float32)


def _pack(codes: I8, bits: int, packed_out: U8) -> None:
    per_byte = 8 // bits
    n = codes.shape[0]
    if bits == 8:
        packed_out[:n] = codes.view(np.uint8)
        return
    nbytes = _packed_nbytes(n, bits)
    flat = np.zeros(nbytes * per_byte, dtype=np.uint8)  # padding codes are 0
    flat[:n] = codes.view(np.uint8) & np.uint8((1 << bits) - 1)
    fields = flat.reshape(nbytes, per_byte) << np.arange(0, 8, bits, dtype=np.uint8)
    packed_out[:nbytes] = np.bitwise_or.reduce(fields, axis=1).astype(np.uint8)


def _unpack(packed: U8, n: int, bits: int) -> I8:
    if bits == 8:
        return packed[:n].view(np.int8)
    per_byte = 8 // bits
    nbytes = _packed_nbytes(n, bits)
    shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)  # move each field to the top
    top = (packed[:nbytes, None] << shifts).astype(np.uint8).view(np.int8)
    return (top >> np.int8(8 - bits)).reshape(nbytes * per_byte)[:n]  # arithmetic: sign


def quantize_block(
    x: F32,
    bits: int,
    block_size: int,
    stochastic: bool,
    seed: int,
    packed_out: U8,
    scales_out: F32,
) -> None:
    """Quantize x in blocks of block_size to packed signed codes and per-block scales.

    scale = absmax / qmax per block (qmax = 127, 7, 1 for 8, 4, 2 bits; at least the
    smallest normal float32 so 1/scale stays finite); an all-zero block has scale 0
    and codes 0. Codes are rint(x * (1/scale)) or, when stochastic, floor + a
    Bernoulli(frac) draw from a counter-based hash of (seed, element index),
    clamped to [-qmax, qmax].
    """
    _qmax(bits)
    _check_block_size(block_size)
    n = x.shape[0]
    _check_len("packed_out", packed_out.shape[0], _packed_nbytes(n, bits))
    _check_len("scales_out", scales_out.shape[0], _num_blocks(n, block_size))
    if n == 0:
        return
    _check_finite("x", x)
    codes, scales = _block_codes(x, bits, block_size, stochastic, seed)
    scales_out[: scales.shape[0]] = scales
    _pack(codes, bits, packed_out)


def _same_buffer(a: F32, b: F32) -> bool:
    """True when a and b are views of the same memory, element for element."""
    return bool(
        a.shape == b.shape and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _check_apart(a_name: str, a: F32, b_name: str, b: F32) -> None:
    if np.may_share_memory(a, b):
        raise BadBufferError(
            f"{a_name} overlaps {b_name}; pass a separate array, or the residual "
            "itself to update it in place"
        )


def _check_feedback_lengths(n: int, residual: F32, out_name: str, out: F32) -> None:
    if residual.shape[0] != n:
        raise BadBufferError(
            f"residual has {residual.shape[0]} elements but update has {n}; "
            "keep one residual per parameter vector"
        )
    if out.shape[0] != n:
        raise BadBufferError(f"{out_name} has {out.shape[0]} elements but update has {n}")


def _feedback_sum(residual: F32, update: F32, out_name: str, out: F32) -> F32:
    """residual + update, for writing into ``out`` (``residual`` itself, or apart from
    both inputs); raises on a NaN/Inf sum before anything is written."""
    if not _same_buffer(out, residual):
        _check_apart(out_name, out, "residual", residual)
        _check_apart(out_name, out, "update", update)
    with np.errstate(over="ignore"):  # an overflowing sum is reported just below
        total = residual + update
    _check_finite("residual + update", total)
    return total


def residual_add(residual: F32, update: F32, out: F32) -> None:
    """out = residual + update; ``out`` is ``residual`` itself or apart from both inputs.

    In place, a NaN/Inf sum raises before anything is written; into a separate
    array ``residual`` is only read, and ``out`` holds the sums on error.
    """
    n = update.shape[0]
    _check_feedback_lengths(n, residual, "out", out)
    if n == 0:
        return
    out[:] = _feedback_sum(residual, update, "out", out)


def quantize_block_feedback(
    update: F32,
    residual: F32,
    bits: int,
    block_size: int,
    stochastic: bool,
    seed: int,
    packed_out: U8,
    scales_out: F32,
    residual_out: F32,
) -> None:
    """residual_out = residual + update - dequantize(quantize(residual + update)).

    ``residual_out`` is ``residual`` itself (in place) or a separate array; either
    way ``residual`` keeps its value when the sum has a NaN/Inf.
    """
    _qmax(bits)
    _check_block_size(block_size)
    n = update.shape[0]
    _check_feedback_lengths(n, residual, "residual_out", residual_out)
    _check_len("packed_out", packed_out.shape[0], _packed_nbytes(n, bits))
    _check_len("scales_out", scales_out.shape[0], _num_blocks(n, block_size))
    if n == 0:
        return
    total = _feedback_sum(residual, update, "residual_out", residual_out)  # before any write
    codes, scales = _block_codes(total, bits, block_size, stochastic, seed)
    scales_out[: scales.shape[0]] = scales
    _pack(codes, bits, packed_out)
    residual_out[:] = total - codes.astype(np.float32) * np.repeat(scales, block_size)[:n]


def _block_values(packed: U8, scales: F32, n: int, bits: int, block_size: int) -> F32:
    nb = _num_blocks(n, block_size)
    _check_len("packed", packed.shape[0], _packed_nbytes(n, bits))
    _check_len("scales", scales.shape[0], nb)
    s = scales[:nb]
    if not np.isfinite(s).all():
        b = int(np.argmax(~np.isfinite(s)))
        raise _nonfinite("scales", b, float(s[b]))
    # Encoders never write -(qmax + 1); a corrupt payload can, and with the largest
    # scale a payload may carry (FLT_MAX / qmax) it would overflow, so it decodes as -qmax.
    codes = np.maximum(_unpack(packed, n, bits), np.int8(-_qmax(bits)))
    return codes.astype(np.float32) * np.repeat(s, block_size)[:n]


def dequantize_block(packed: U8, scales: F32, n: int, bits: int, block_size: int, out: F32) -> None:
    """Write code * scale of the first n elements into out (float32)."""
    _qmax(bits)
    _check_block_size(block_size)
    if n < 0:
        raise InvalidConfigError(f"n must be >= 0, got {n}")
    _check_len("out", out.shape[0], n)
    if n == 0:
        _block_values(packed, scales, n, bits, block_size)  # same size checks
        return
    out[:n] = _block_values(packed, scales, n, bits, block_size)


def dequantize_block_accumulate(
    packed: U8, scales: F32, n: int, bits: int, block_size: int, weight: float, acc: F32
) -> None:
    """acc[i] += weight * (code * scale) for the first n elements, float32, in that order."""
    _qmax(bits)
    _check_block_size(block_size)
    if n < 0:
        raise InvalidConfigError(f"n must be >= 0, got {n}")
    _check_len("acc", acc.shape[0], n)
    w = np.float32(weight)
    if not np.isfinite(w):
        raise NonFiniteInputError(f"weight is {float(w)!r}; pass a finite aggregation weight")
    values = _block_values(packed, scales, n, bits, block_size)
    acc[:n] += w * values


# ---- end of quantize section ----


# ---- sparsify section (owned by the sparsify kernels; edit only between these markers) ----

# Twins of kernels/_sparsify.pyx (hot loops in kernels/_sparsify_simd.h).
#
# Magnitudes are compared as integer "keys": the float32 bits with the sign bit
# cleared. For finite values key order is |x| order and -0.0 ties with +0.0; ties
# are always broken by the lower index. Sample positions come from a counter-based
# splitmix64 hash of (seed, m), so both twins read the same sample and derive the
# same threshold, which makes even ``exact=False`` results identical.
#
# Index coding: strictly increasing indices are stored as the first index, then
# each gap minus one (``idx[i] - idx[i-1] - 1``, so a run of neighbours costs one
# zero byte each), every value as an unsigned LEB128 varint of at most 5 bytes.
# A non-increasing sequence is therefore unrepresentable on the wire.

from kernels import errors as _sp_errors  # noqa: E402

U32 = npt.NDArray[np.uint32]

MAX_SPARSE_LENGTH = 2**32 - 1
"""Largest vector length the sparsify kernels accept (indices are uint32)."""
VARINT_MAX_NBYTES = 5
"""Bytes a LEB128 varint of a 32-bit value may take at most."""

_SP_ABS_MASK = np.uint32(0x7FFFFFFF)
_SP_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SP_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_SP_MIX2 = np.uint64(0x94D049BB133111EB)


def _sp_bad(message: str) -> _sp_errors.BadBufferError:
    return _sp_errors.BadBufferError(message)


def _sp_nonfinite_message(name: str, i: int, value: float) -> str:
    return (
        f"{name}[{i}] is {value!r}, not finite: the update diverged; "
        "drop it or clip it before sparsifying"
    )


def _sp_check_finite(x: F32, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteInputError(_sp_nonfinite_message(name, i, float(x[i])))


def _sp_check_sum_finite(update: F32, residual: F32, total: F32) -> None:
    bad = ~np.isfinite(total)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    if not np.isfinite(residual[i]):
        raise NonFiniteInputError(_sp_nonfinite_message("residual", i, float(residual[i])))
    if not np.isfinite(update[i]):
        raise NonFiniteInputError(_sp_nonfinite_message("update", i, float(update[i])))
    raise NonFiniteInputError(
        f"residual[{i}] + update[{i}] = {float(residual[i])!r} + {float(update[i])!r} "
        "overflows float32: clip the update before sparsifying"
    )


def _sp_check_topk_args(n: int, k: int, out_indices: U32, out_values: F32, need: int) -> None:
    if n > MAX_SPARSE_LENGTH:
        raise _sp_bad(f"length {n} exceeds {MAX_SPARSE_LENGTH}: split the vector")
    if not 0 <= k <= n:
        raise _sp_bad(f"k = {k} is outside [0, {n}]")
    if out_indices.shape[0] < need or out_values.shape[0] < need:
        raise _sp_bad(
            f"out_indices and out_values need at least {need} entries, "
            f"got {out_indices.shape[0]} and {out_values.shape[0]}"
        )


def _sp_check_sample_args(
    n: int,
    k: int,
    *,
    sample_size: int,
    sample_rank: int,
    exact: bool,
    cand: U32,
    scratch: U32,
    out_indices: U32,
    out_values: F32,
) -> None:
    if sample_size < 0 or (sample_size > 0 and not 1 <= sample_rank <= sample_size):
        raise _sp_bad(
            f"sample_size = {sample_size}, sample_rank = {sample_rank}: need sample_size >= 0 "
            "and 1 <= sample_rank <= sample_size (sample_size 0 selects the exact path)"
        )
    if scratch.shape[0] < max(sample_size, cand.shape[0]):
        raise _sp_bad(
            f"scratch needs at least max(sample_size, len(cand)) = "
            f"{max(sample_size, cand.shape[0])} entries, got {scratch.shape[0]}"
        )
    _sp_check_topk_args(n, k, out_indices, out_values, k if exact else max(k, cand.shape[0]))


def _sp_keys(x: F32) -> U32:
    return np.ascontiguousarray(x).view(np.uint32) & _SP_ABS_MASK


def _sp_sample_positions(seed: int, count: int, n: int) -> npt.NDArray[np.uint64]:
    """Position m (0-based) = ((splitmix64(seed, m + 1) >> 32) * n) >> 32."""
    m = np.arange(1, count + 1, dtype=np.uint64)
    z = np.uint64(seed) + m * _SP_GAMMA
    z = (z ^ (z >> np.uint64(30))) * _SP_MIX1
    z = (z ^ (z >> np.uint64(27))) * _SP_MIX2
    z ^= z >> np.uint64(31)
    return ((z >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)


def _sp_exact_positions(x: F32, k: int) -> npt.NDArray[np.intp]:
    """The definition: the k largest |x|, ties to the lower index, ascending.

    Sorted by the magnitude bits (for finite floats their order is that of |x|),
    so that no float comparison can flush a subnormal (NumPy on 32-bit ARM)."""
    return np.sort(np.argsort(~_sp_keys(x), kind="stable")[:k])


def _sp_write(x: F32, chosen: npt.NDArray[np.intp], out_indices: U32, out_values: F32) -> int:
    count = chosen.shape[0]
    out_indices[:count] = chosen
    out_values[:count] = x[chosen]
    return int(count)


def _sp_select(
    x: F32,
    k: int,
    *,
    seed: int,
    sample_size: int,
    sample_rank: int,
    exact: bool,
    capacity: int,
    out_indices: U32,
    out_values: F32,
) -> int:
    """The top-k of `topk_sampled` and `topk_feedback`, on finite ``x`` and checked arguments.

    ``k == 0`` writes nothing; ``sample_size == 0`` or ``k == len(x)`` takes the exact path;
    otherwise the threshold pass, with room for ``capacity`` candidates.
    """
    if k == 0:
        return 0
    if sample_size == 0 or k == x.shape[0]:
        return _sp_write(x, _sp_exact_positions(x, k), out_indices, out_values)
    keys = _sp_keys(x)
    sample = np.sort(keys[_sp_sample_positions(seed, sample_size, x.shape[0])])
    threshold = sample[sample_size - sample_rank]  # the sample_rank-th largest key
    found = np.flatnonzero(keys >= threshold)
    if found.shape[0] > capacity or found.shape[0] < k:
        return _sp_write(x, _sp_exact_positions(x, k), out_indices, out_values)
    if exact:
        # Every element of the exact top k has key >= threshold, so the exact rule
        # on the candidates gives the same k indices as on the whole vector.
        found = found[_sp_exact_positions(x[found], k)]
    return _sp_write(x, found, out_indices, out_values)


def topk_exact(x: F32, k: int, out_indices: U32, out_values: F32) -> int:
    """Write the exact top-k (by |x|, ties to the lower index), ascending; return k."""
    n = x.shape[0]
    _sp_check_topk_args(n, k, out_indices, out_values, k)
    _sp_check_finite(x, "x")
    return _sp_write(x, _sp_exact_positions(x, k), out_indices, out_values)


def topk_sampled(
    x: F32,
    k: int,
    seed: int,
    sample_size: int,
    sample_rank: int,
    exact: bool,
    cand: U32,
    scratch: U32,
    out_indices: U32,
    out_values: F32,
) -> int:
    """Top-k through a threshold estimated from a hashed sample; return the count written.

    The threshold is the ``sample_rank``-th largest key among ``sample_size`` sampled
    positions; candidates are all i with key(x[i]) >= threshold. With ``len(cand)``
    or fewer candidates and at least k, ``exact`` trims them to the exact top-k
    (identical to :func:`topk_exact`) and ``exact=False`` returns them all; otherwise
    the exact top-k is returned. ``sample_size == 0`` or ``k == n`` takes the exact path.
    """
    n = x.shape[0]
    _sp_check_sample_args(
        n,
        k,
        sample_size=sample_size,
        sample_rank=sample_rank,
        exact=exact,
        cand=cand,
        scratch=scratch,
        out_indices=out_indices,
        out_values=out_values,
    )
    _sp_check_finite(x, "x")
    return _sp_select(
        x,
        k,
        seed=seed,
        sample_size=sample_size,
        sample_rank=sample_rank,
        exact=exact,
        capacity=cand.shape[0],
        out_indices=out_indices,
        out_values=out_values,
    )


def topk_feedback(
    update: F32,
    residual: F32,
    k: int,
    seed: int,
    sample_size: int,
    sample_rank: int,
    exact: bool,
    cand: U32,
    scratch: U32,
    out_indices: U32,
    out_values: F32,
    residual_out: F32,
) -> int:
    """``residual_out = residual + update``, then :func:`topk_sampled` of it, in one pass.

    ``residual_out`` is ``residual`` itself (in place) or a separate array. The
    sample is read as ``residual[j] + update[j]``. On a non-finite sum ``residual``
    keeps its value. The caller subtracts what it sent with :func:`subtract_at`.
    """
    n = residual.shape[0]
    if update.shape[0] != n:
        raise _sp_bad(f"update has {update.shape[0]} entries but residual has {n}")
    if residual_out.shape[0] != n:
        raise _sp_bad(f"residual_out has {residual_out.shape[0]} entries but residual has {n}")
    _sp_check_sample_args(
        n,
        k,
        sample_size=sample_size,
        sample_rank=sample_rank,
        exact=exact,
        cand=cand,
        scratch=scratch,
        out_indices=out_indices,
        out_values=out_values,
    )
    if n and not _same_buffer(residual_out, residual):
        _check_apart("residual_out", residual_out, "residual", residual)
        _check_apart("residual_out", residual_out, "update", update)
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below
        total = residual + update
    _sp_check_sum_finite(update, residual, total)
    residual_out[:] = total
    return _sp_select(
        residual_out,
        k,
        seed=seed,
        sample_size=sample_size,
        sample_rank=sample_rank,
        exact=exact,
        capacity=cand.shape[0],
        out_indices=out_indices,
        out_values=out_values,
    )


def _sp_check_scatter(indices: U32, values: F32, target: F32, name: str) -> None:
    if indices.shape[0] != values.shape[0]:
        raise _sp_bad(f"indices has {indices.shape[0]} entries but values has {values.shape[0]}")
    out_of_range = indices >= target.shape[0]
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise _sp_bad(
            f"indices[{i}] = {int(indices[i])} is out of range for {name} of length "
            f"{target.shape[0]}"
        )
    _sp_check_finite(values, "values")


def subtract_at(residual: F32, indices: U32, values: F32) -> None:
    """``residual[indices[i]] -= values[i]`` for each i in order (float32)."""
    _sp_check_scatter(indices, values, residual, "residual")
    np.subtract.at(residual, indices, values)


def put_at(residual: F32, indices: U32, values: F32) -> None:
    """``residual[indices[i]] = values[i]`` for each i in order (the last write wins)."""
    _sp_check_scatter(indices, values, residual, "residual")
    if indices.shape[0] > 1 and not np.all(indices[1:] > indices[:-1]):
        # NumPy leaves the order of repeated fancy-index writes unspecified: keep
        # only the last write to each position.
        last = indices.shape[0] - 1 - np.unique(indices[::-1], return_index=True)[1]
        indices, values = indices[last], values[last]
    residual[indices] = values


def scatter_accumulate(indices: U32, values: F32, weight: float, acc: F32) -> None:
    """``acc[indices[i]] += float32(weight) * values[i]`` for each i in order (float32)."""
    with np.errstate(over="ignore"):
        w = np.float32(weight)
    if not np.isfinite(w):
        raise NonFiniteInputError(f"weight {weight!r} is not a finite float32")
    _sp_check_scatter(indices, values, acc, "acc")
    np.add.at(acc, indices, w * values)


def encode_indices(indices: U32, n: int, out: U8) -> int:
    """Write strictly increasing indices < n as delta-minus-one LEB128; return the byte count."""
    count = indices.shape[0]
    if out.shape[0] < VARINT_MAX_NBYTES * count:
        raise _sp_bad(
            f"out needs {VARINT_MAX_NBYTES} * {count} bytes (max_encoded_index_nbytes), "
            f"got {out.shape[0]}"
        )
    if count == 0:
        return 0
    wide = indices.astype(np.int64)
    bad_order = np.zeros(count, dtype=bool)
    bad_order[1:] = wide[1:] <= wide[:-1]
    bad = bad_order | (wide >= n)
    if bad.any():
        i = int(np.argmax(bad))
        if bad_order[i]:
            raise _sp_bad(
                f"indices must be strictly increasing: indices[{i}] = {int(wide[i])} "
                f"follows {int(wide[i - 1])}"
            )
        raise _sp_bad(f"indices[{i}] = {int(wide[i])} is out of range for n = {n}")
    deltas = np.empty(count, dtype=np.uint64)
    deltas[0] = wide[0]
    deltas[1:] = np.diff(wide) - 1
    lengths = np.ones(count, dtype=np.int64)
    for b in range(1, VARINT_MAX_NBYTES):
        lengths += (deltas >> np.uint64(7 * b)) != 0
    starts = np.cumsum(lengths) - lengths
    for b in range(VARINT_MAX_NBYTES):
        has = lengths > b
        group = (deltas[has] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (lengths[has] > b + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + b] = group | more
    return int(lengths.sum())


def decode_indices(buf: U8, count: int, n: int, out: U32) -> int:
    """Decode ``count`` indices written by :func:`encode_indices`; return the bytes consumed.

    Raises :class:`kernels.errors.CorruptPayloadError` on truncation, a varint longer
    than 5 bytes or above 32 bits, or an index >= n. Never reads past ``buf``.
    """
    if count < 0 or out.shape[0] < count:
        raise _sp_bad(f"out needs at least count = {count} entries, got {out.shape[0]}")
    if count == 0:
        return 0
    data = np.asarray(buf, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)[:count]  # the last byte of each varint
    if ends.shape[0] < count:
        raise _sp_errors.CorruptPayloadError(
            f"index data truncated: {count} indices announced, {ends.shape[0]} complete "
            f"in {data.shape[0]} bytes"
        )
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    too_wide = (lengths > VARINT_MAX_NBYTES) | (
        (lengths == VARINT_MAX_NBYTES) & (data[ends] > 0x0F)
    )
    if too_wide.any():
        i = int(np.argmax(too_wide))
        raise _sp_errors.CorruptPayloadError(f"varint {i} does not fit in 32 bits")
    values = np.zeros(count, dtype=np.uint64)
    for b in range(VARINT_MAX_NBYTES):
        has = lengths > b
        group = data[starts[has] + b].astype(np.uint64) & np.uint64(0x7F)
        values[has] |= group << np.uint64(7 * b)
    decoded = np.cumsum(values + np.uint64(1), dtype=np.uint64) - np.uint64(1)
    if decoded[-1] >= n:  # strictly increasing, so the last is the largest
        i = int(np.argmax(decoded >= n))
        raise _sp_errors.CorruptPayloadError(
            f"decoded index {int(decoded[i])} (position {i}) is out of range for n = {n}"
        )
    out[:count] = decoded
    return int(ends[-1]) + 1


# ---- end of sparsify section ----
