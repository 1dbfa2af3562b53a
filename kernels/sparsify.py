"""Top-k sparsification of model updates: selection, error feedback, index coding.

This module owns the validated public entry points of the sparsify kernels. The
kernels themselves live in ``kernels._sparsify`` (compiled) and
``kernels._reference`` (the NumPy twin, which defines the semantics); this module
checks every argument, allocates the outputs and scratch buffers, and calls
whichever backend ``kernels._backend`` loaded. Rules:

* Vectors are 1-D C-contiguous float32 arrays, indices 1-D C-contiguous uint32;
  anything else raises :class:`kernels.errors.BadBufferError` naming the fix.
  Parameters out of range raise :class:`kernels.errors.InvalidConfigError`.
* Top-k is by magnitude, ties go to the lower index, and indices come back in
  ascending order with the original signed values.
* NaN/+-Inf raises :class:`kernels.errors.NonFiniteInputError` naming the first bad
  index, and nothing (not even the error-feedback residual) is modified.
* Inputs are never modified, except the arguments named ``residual`` and ``acc``.

Index coding (the wire format of a sparse update's positions): the first index,
then each gap minus one, each as an unsigned LEB128 varint of at most 5 bytes.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Final, TypeVar

import numpy as np
import numpy.typing as npt

from kernels import _backend
from kernels._workspace import thread_buffer
from kernels.errors import (
    BadBufferError,
    CorruptPayloadError,
    InvalidConfigError,
    unaligned_message,
)

if TYPE_CHECKING:
    # Both backends expose the same signatures; type-check against the reference.
    from kernels import _reference as _impl
else:
    _impl = _backend.sparsify_impl

Float32Vector = npt.NDArray[np.float32]
Uint32Vector = npt.NDArray[np.uint32]
_Scalar = TypeVar("_Scalar", bound=np.generic)

MAX_LENGTH: Final = 2**32 - 1
"""Longest vector the kernels accept: indices are uint32."""
VARINT_MAX_NBYTES: Final = 5
"""Bytes one coded index may take at most (LEB128 of a 32-bit value)."""

SAMPLE_MIN: Final = 4096
"""Smallest default threshold sample."""
SAMPLE_MAX: Final = 1 << 16
"""Largest default threshold sample (it is read at random positions: cache misses)."""
SAMPLE_PER_SELECTED: Final = 256
"""Default sample size aims for this many sampled elements above the threshold."""
SAFETY_SIGMAS: Final = 3.0
"""The threshold is set this many binomial standard deviations low, so that the
candidate pass finds at least k elements in all but ~0.1 % of calls (then the
exact fallback runs, so results stay correct, only slower)."""
CANDIDATE_SLACK: Final = 1.5
"""Candidate buffer capacity relative to the expected candidate count."""


# ---- argument checks ----


def _1d_vector(x: object, name: str, dtype: type[_Scalar]) -> npt.NDArray[_Scalar]:
    """Return ``x`` if it is a contiguous 1-D numpy array of ``dtype``; else `BadBufferError`."""
    dtype_name = np.dtype(dtype).name
    if not isinstance(x, np.ndarray) or x.dtype != dtype or x.ndim != 1:
        got = (
            f"{type(x).__name__} of dtype {x.dtype} with {x.ndim} dimension(s)"
            if isinstance(x, np.ndarray)
            else type(x).__name__
        )
        raise BadBufferError(
            f"{name} must be a 1-D {dtype_name} numpy array, got {got}: "
            f"pass np.ascontiguousarray({name}, dtype=np.{dtype_name}).ravel()"
        )
    if not x.flags.c_contiguous:
        raise BadBufferError(f"{name} is not contiguous: pass np.ascontiguousarray({name})")
    if not x.flags.aligned:
        raise BadBufferError(unaligned_message(name, x.itemsize))
    return x


def _f32_vector(x: object, name: str, *, writable: bool = False) -> Float32Vector:
    checked = _1d_vector(x, name, np.float32)
    if writable and not checked.flags.writeable:
        raise BadBufferError(f"{name} is read-only but is updated in place: pass a writable copy")
    if checked.shape[0] > MAX_LENGTH:
        raise BadBufferError(
            f"{name} has {checked.shape[0]} entries, more than {MAX_LENGTH}: split it"
        )
    return checked


def _u32_vector(x: object, name: str, *, writable: bool = False) -> Uint32Vector:
    checked = _1d_vector(x, name, np.uint32)
    if writable and not checked.flags.writeable:
        raise BadBufferError(f"{name} is read-only but is written: pass a writable array")
    return checked


def _int_param(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidConfigError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise InvalidConfigError(f"{name} = {value} is outside [{low}, {high}]")
    return int(value)


def _check_k(k: object, n: int) -> int:
    return _int_param(k, "k", 0, n)


def _sample_plan(n: int, k: int, sample_size: int | None) -> tuple[int, int, int]:
    """Return (sample size, sample rank of the threshold, candidate capacity); 0s = exact."""
    if k == 0 or k >= n:
        return 0, 0, 0
    if sample_size is None:
        size = min(SAMPLE_MAX, max(SAMPLE_MIN, math.ceil(SAMPLE_PER_SELECTED * n / k)))
        if 8 * size > n:  # a small vector: the exact path costs about the same
            return 0, 0, 0
    else:
        size = sample_size
        if size == 0:
            return 0, 0, 0
    p = k / n
    # The number of sampled elements above the true k-th largest is Binomial(size, p);
    # rank the threshold SAFETY_SIGMAS deviations above its mean so it lands low.
    mean = size * p
    rank = min(size, math.ceil(mean + SAFETY_SIGMAS * math.sqrt(mean * (1.0 - p))) + 1)
    expected = n * rank / size
    capacity = min(n, max(k, math.ceil(CANDIDATE_SLACK * expected) + 1024))
    return size, rank, capacity


# ---- public API ----


def topk_count(n: int, fraction: float) -> int:
    """Return how many entries a top-``fraction`` selection keeps out of ``n``.

    Parameters
    ----------
    n
        Vector length, >= 0.
    fraction
        Share of entries to keep, in (0, 1]. It is read as the shortest decimal
        that round-trips (0.07 means 7/100), so ``topk_count(100, 0.07) == 7``.

    Returns
    -------
    int
        0 when ``n == 0``, else ``max(1, ceil(fraction * n))``.

    Examples
    --------
    >>> topk_count(1000, 0.01)
    10
    >>> topk_count(5, 0.01)
    1
    """
    n = _int_param(n, "n", 0, MAX_LENGTH)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating):
        raise InvalidConfigError(f"fraction must be a float, got {type(fraction).__name__}")
    if not 0.0 < float(fraction) <= 1.0:
        raise InvalidConfigError(
            f"fraction = {fraction!r} is outside (0, 1]: pass e.g. 0.01 to keep 1 %"
        )
    if n == 0:
        return 0
    return max(1, math.ceil(Fraction(repr(float(fraction))) * n))


def topk_exact(x: Float32Vector, k: int) -> tuple[Uint32Vector, Float32Vector]:
    """Select the ``k`` entries of largest magnitude, exactly.

    Parameters
    ----------
    x
        1-D contiguous float32 vector (not modified).
    k
        Number of entries to keep, in [0, len(x)].

    Returns
    -------
    indices, values
        Ascending uint32 indices and the original signed values. Ties in magnitude
        go to the lower index: the result equals
        ``np.sort(np.argsort(-np.abs(x), kind="stable")[:k])``.

    Examples
    --------
    >>> idx, val = topk_exact(np.array([0.5, -3.0, 2.0, -2.0], dtype=np.float32), 2)
    >>> idx.tolist(), val.tolist()
    ([1, 2], [-3.0, 2.0])
    """
    x = _f32_vector(x, "x")
    k = _check_k(k, x.shape[0])
    out_indices = np.empty(k, dtype=np.uint32)
    out_values = np.empty(k, dtype=np.float32)
    _impl.topk_exact(x, k, out_indices, out_values)
    return out_indices, out_values


def _scratch(capacity: int, size: int) -> tuple[Uint32Vector, Uint32Vector]:
    """The candidate and scratch buffers of a sampled top-k call.

    They hold a few MB for a large model and live only during the call, so they
    come from this thread's reused workspace (see :mod:`kernels._workspace`).
    """
    need = capacity + max(size, capacity)
    buf = thread_buffer("topk", np.uint32, need)
    return buf[:capacity], buf[capacity:need]


def _sampled_buffers(
    n: int, k: int, exact: bool, sample_size: int | None
) -> tuple[int, int, Uint32Vector, Uint32Vector, Uint32Vector, Float32Vector]:
    size, rank, capacity = _sample_plan(n, k, sample_size)
    cand, scratch = _scratch(capacity, size)
    out_len = k if exact else max(k, capacity)
    return (
        size,
        rank,
        cand,
        scratch,
        np.empty(out_len, dtype=np.uint32),
        np.empty(out_len, dtype=np.float32),
    )


def _check_sampling(seed: object, exact: object, sample_size: object) -> int | None:
    _int_param(seed, "seed", 0, 2**64 - 1)
    if not isinstance(exact, bool | np.bool_):
        raise InvalidConfigError(f"exact must be a bool, got {type(exact).__name__}")
    if sample_size is None:
        return None
    return _int_param(sample_size, "sample_size", 0, MAX_LENGTH)


def topk_sampled(
    x: Float32Vector,
    k: int,
    *,
    seed: int = 0,
    exact: bool = True,
    sample_size: int | None = None,
) -> tuple[Uint32Vector, Float32Vector]:
    """Select about (or, with ``exact``, exactly) the ``k`` largest-magnitude entries, fast.

    A threshold is estimated from ``sample_size`` positions drawn by a splitmix64
    hash of ``(seed, i)`` and set a little low; one streaming pass collects every
    entry at or above it. With ``exact`` the candidates are trimmed to the exact
    top-k (same result as :func:`topk_exact`). Too few candidates, or more than the
    buffer holds, fall back to the exact selection.

    Parameters
    ----------
    x
        1-D contiguous float32 vector (not modified).
    k
        Number of entries to keep, in [0, len(x)].
    seed
        Sample seed in [0, 2**64); the result only depends on it when ``exact`` is False.
    exact
        Trim the candidates to exactly ``k``; False returns every candidate
        (usually a little more than ``k``, never fewer).
    sample_size
        Number of sampled positions; 0 forces the exact path. The default,
        ``clip(256 * len(x) / k, 4096, 65536)``, uses the exact path on vectors
        shorter than 8 samples' worth.

    Returns
    -------
    indices, values
        Ascending uint32 indices and the original signed values.

    Examples
    --------
    >>> x = np.array([0.5, -3.0, 2.0, -2.0], dtype=np.float32)
    >>> topk_sampled(x, 2)[0].tolist()
    [1, 2]
    """
    x = _f32_vector(x, "x")
    n = x.shape[0]
    k = _check_k(k, n)
    size_arg = _check_sampling(seed, exact, sample_size)
    size, rank, cand, scratch, out_indices, out_values = _sampled_buffers(
        n, k, bool(exact), size_arg
    )
    count = _impl.topk_sampled(
        x, k, int(seed), size, rank, bool(exact), cand, scratch, out_indices, out_values
    )
    return out_indices[:count], out_values[:count]


def topk_feedback(
    update: Float32Vector,
    residual: Float32Vector,
    k: int,
    *,
    exact: bool = True,
    seed: int = 0,
    sample_size: int | None = None,
    residual_out: Float32Vector | None = None,
) -> tuple[Uint32Vector, Float32Vector]:
    """Add ``update`` into the error-feedback ``residual`` and select its top-k, in one pass.

    Equivalent to ``residual += update`` followed by :func:`topk_sampled` of
    ``residual``, but reading memory once. The caller then removes what it actually
    sent with :func:`subtract_at` (the dequantized values, when the values are
    quantized afterwards), or, faster for large arrays, writes ``values - sent``
    back with :func:`put_at` (the same bits: the returned values are the residual
    entries, exactly).

    With ``residual_out`` the sum goes there and ``residual`` is only read: one
    pass over memory, where the in-place form first checks the whole sum for
    NaN/Inf (an extra read of both arrays) so that an error leaves it intact.

    Parameters
    ----------
    update
        This round's update (not modified).
    residual
        Error-feedback memory, same length, updated in place unless
        ``residual_out`` is given. Left untouched when ``residual + update`` has
        a NaN/Inf (which raises :class:`kernels.errors.NonFiniteInputError`).
    k
        Number of entries to keep, in [0, len(residual)].
    exact, seed, sample_size
        As in :func:`topk_sampled`.
    residual_out
        Where to write ``residual + update``: same length, overlapping neither
        ``residual`` nor ``update``. Its content is unspecified after an error.

    Returns
    -------
    indices, values
        Ascending uint32 indices and the values of the updated residual there.

    Examples
    --------
    >>> residual = np.array([1.0, 0.0, -1.0], dtype=np.float32)
    >>> update = np.array([0.5, 4.0, 0.5], dtype=np.float32)
    >>> idx, val = topk_feedback(update, residual, 1)
    >>> idx.tolist(), val.tolist(), residual.tolist()
    ([1], [4.0], [1.5, 4.0, -0.5])
    >>> subtract_at(residual, idx, val)
    >>> residual.tolist()
    [1.5, 0.0, -0.5]
    """
    update = _f32_vector(update, "update")
    residual = _f32_vector(residual, "residual", writable=residual_out is None)
    n = residual.shape[0]
    if update.shape[0] != n:
        raise BadBufferError(
            f"update has {update.shape[0]} entries but residual has {n}: "
            "the residual must have the model's length"
        )
    if residual_out is None:
        residual_out = residual
    else:
        residual_out = _f32_vector(residual_out, "residual_out", writable=True)
        if residual_out.shape[0] != n:
            raise BadBufferError(
                f"residual_out has {residual_out.shape[0]} entries but residual has {n}"
            )
    k = _check_k(k, n)
    size_arg = _check_sampling(seed, exact, sample_size)
    size, rank, cand, scratch, out_indices, out_values = _sampled_buffers(
        n, k, bool(exact), size_arg
    )
    count = _impl.topk_feedback(
        update,
        residual,
        k,
        int(seed),
        size,
        rank,
        bool(exact),
        cand,
        scratch,
        out_indices,
        out_values,
        residual_out,
    )
    return out_indices[:count], out_values[:count]


def subtract_at(residual: Float32Vector, indices: Uint32Vector, values: Float32Vector) -> None:
    """Subtract what was sent from the error-feedback residual: ``residual[idx] -= values``.

    Parameters
    ----------
    residual
        Error-feedback memory, updated in place (float32 arithmetic, in index order).
    indices
        Positions in ``residual`` (uint32, each < len(residual)).
    values
        What was sent for each position (float32, same length as ``indices``).
    """
    residual = _f32_vector(residual, "residual", writable=True)
    indices = _u32_vector(indices, "indices")
    values = _f32_vector(values, "values")
    _impl.subtract_at(residual, indices, values)


def put_at(residual: Float32Vector, indices: Uint32Vector, values: Float32Vector) -> None:
    """Write values into the error-feedback residual: ``residual[idx] = values``.

    Stores only, so on a model far larger than the CPU caches it is faster than
    :func:`subtract_at`, which must wait for each entry to arrive before
    subtracting. With repeated indices the last write wins.

    Parameters
    ----------
    residual
        Error-feedback memory, updated in place.
    indices
        Positions in ``residual`` (uint32, each < len(residual)).
    values
        The new entries (float32, finite, same length as ``indices``).

    Examples
    --------
    >>> residual = np.zeros(4, dtype=np.float32)
    >>> put_at(residual, np.array([1, 3], np.uint32), np.array([0.5, -2.0], np.float32))
    >>> residual.tolist()
    [0.0, 0.5, 0.0, -2.0]
    """
    residual = _f32_vector(residual, "residual", writable=True)
    indices = _u32_vector(indices, "indices")
    values = _f32_vector(values, "values")
    _impl.put_at(residual, indices, values)


def scatter_accumulate(
    indices: Uint32Vector, values: Float32Vector, weight: float, acc: Float32Vector
) -> None:
    """Add a weighted sparse update into a dense accumulator: ``acc[idx] += weight * values``.

    Each product is ``float32(weight) * values[i]`` in float32, added in index
    order, so the result does not depend on the backend.

    Parameters
    ----------
    indices
        Positions in ``acc`` (uint32, each < len(acc)).
    values
        Sparse values (float32, same length as ``indices``).
    weight
        Aggregation weight, e.g. ``num_examples / total_examples``.
    acc
        Dense float32 accumulator, updated in place.
    """
    indices = _u32_vector(indices, "indices")
    values = _f32_vector(values, "values")
    acc = _f32_vector(acc, "acc", writable=True)
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.floating):
        raise InvalidConfigError(f"weight must be a float, got {type(weight).__name__}")
    _impl.scatter_accumulate(indices, values, float(weight), acc)


def max_encoded_index_nbytes(count: int) -> int:
    """Return the most bytes :func:`encode_indices` can write for ``count`` indices.

    Examples
    --------
    >>> max_encoded_index_nbytes(3)
    15
    """
    return VARINT_MAX_NBYTES * _int_param(count, "count", 0, MAX_LENGTH)


def encode_indices(indices: Uint32Vector, n: int) -> bytes:
    """Code strictly increasing indices below ``n`` as delta-minus-one LEB128 varints.

    Parameters
    ----------
    indices
        Strictly increasing uint32 positions, each < ``n``.
    n
        Length of the dense vector they index.

    Returns
    -------
    bytes
        The first index, then ``indices[i] - indices[i - 1] - 1`` for each next one,
        each as an unsigned LEB128 varint (1 to 5 bytes).

    Examples
    --------
    >>> encode_indices(np.array([3, 4, 200], dtype=np.uint32), 1000).hex()
    '0300c301'
    """
    indices = _u32_vector(indices, "indices")
    n = _int_param(n, "n", 0, MAX_LENGTH)
    out = np.empty(max_encoded_index_nbytes(indices.shape[0]), dtype=np.uint8)
    nbytes = _impl.encode_indices(indices, n, out)
    return out[:nbytes].tobytes()


def decode_indices(
    buf: bytes | bytearray | memoryview | npt.NDArray[np.uint8],
    count: int,
    n: int,
    out: Uint32Vector | None = None,
) -> tuple[Uint32Vector, int]:
    """Decode ``count`` indices written by :func:`encode_indices`.

    Parameters
    ----------
    buf
        Payload bytes; decoding starts at its first byte and may stop before its end.
    count
        Number of indices announced by the payload's header.
    n
        Length of the dense vector; every decoded index must be below it.
    out
        Optional uint32 buffer of at least ``count`` entries to decode into.

    Returns
    -------
    indices, consumed
        The decoded indices (a view of ``out`` when given) and how many bytes of
        ``buf`` they used; callers check for trailing bytes themselves.

    Raises
    ------
    kernels.errors.CorruptPayloadError
        Truncated data, a varint above 32 bits, or an index >= ``n``. The decoder
        never reads past ``buf``.

    Examples
    --------
    >>> decode_indices(bytes.fromhex("0300c301"), 3, 1000)[0].tolist()
    [3, 4, 200]
    """
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise BadBufferError(
                "buf must be bytes or a 1-D contiguous uint8 array: pass bytes(buf)"
            )
        data = buf
    else:
        try:
            data = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise BadBufferError(
                f"buf must be a contiguous bytes-like object ({exc}): pass bytes(buf)"
            ) from exc
    count = _int_param(count, "count", 0, MAX_LENGTH)
    n = _int_param(n, "n", 0, MAX_LENGTH)
    # Check before allocating: count comes from the network.
    if count > data.shape[0]:
        raise CorruptPayloadError(
            f"index data truncated: {count} indices announced but only {data.shape[0]} bytes"
        )
    if count > n:
        raise CorruptPayloadError(f"{count} strictly increasing indices cannot all be below {n}")
    if out is None:
        out = np.empty(count, dtype=np.uint32)
    else:
        out = _u32_vector(out, "out", writable=True)
        if out.shape[0] < count:
            raise BadBufferError(f"out has {out.shape[0]} entries but {count} are needed")
    consumed = _impl.decode_indices(data, count, n, out)
    return out[:count], consumed


__all__ = [
    "MAX_LENGTH",
    "VARINT_MAX_NBYTES",
    "decode_indices",
    "encode_indices",
    "max_encoded_index_nbytes",
    "put_at",
    "scatter_accumulate",
    "subtract_at",
    "topk_count",
    "topk_exact",
    "topk_feedback",
    "topk_sampled",
]
