"""Public quantization functions: validate buffers, allocate what is missing, call a kernel.

This module owns argument checking for the quantize kernels; the kernels
themselves live in ``kernels._backend.quantize_impl`` (the compiled
``_quantize`` module, or its NumPy twin ``kernels._reference``), which give
identical codes and float32 bits.

Rules:

* Arrays are 1-D, C-contiguous, of the exact dtype (float32 values, uint8
  codes); anything else raises :class:`kernels.errors.BadBufferError` with the
  fix in the message. Nothing is converted silently: a float64 update is a bug
  upstream, not something to copy around on a Raspberry Pi.
* Bad parameters (bits, block_size, zero_point, seed) raise
  :class:`kernels.errors.InvalidConfigError`.
* NaN/+-Inf input raises :class:`kernels.errors.NonFiniteInputError`; the
  error-feedback residual and an accumulator are then left untouched. Block
  quantization checks as it goes (one read of the input), so its output buffers
  may hold part of the result; the codecs never hand those out.
* Inputs are never modified; ``residual`` and ``acc`` are updated in place.

Rounding is round-half-to-even (deterministic) or stochastic with a
counter-based hash of ``(seed, element index)``, so any slice of an array
gets the same codes as the whole.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from kernels import _backend, _reference
from kernels.errors import BadBufferError, InvalidConfigError, unaligned_message

Float32Vector = npt.NDArray[np.float32]
Uint8Vector = npt.NDArray[np.uint8]

BITS = (8, 4, 2)
"""Supported code widths of the block quantizer."""

MAX_BLOCK_SIZE = 1 << 20
"""Largest block_size; it must also be a multiple of 4, so packed blocks start on a byte."""

_SEED_LIMIT = 1 << 64


def _check_vector(name: str, a: Any, dtype: type[np.generic], *, writable: bool = False) -> None:
    if not isinstance(a, np.ndarray):
        raise BadBufferError(
            f"{name} must be a numpy array of {np.dtype(dtype).name}, got {type(a).__name__}; "
            f"wrap it with np.asarray(..., dtype=np.{np.dtype(dtype).name})"
        )
    if a.dtype != dtype:
        raise BadBufferError(
            f"{name} has dtype {a.dtype}, expected {np.dtype(dtype).name}; "
            f"convert it once with .astype(np.{np.dtype(dtype).name})"
        )
    if a.ndim != 1:
        raise BadBufferError(
            f"{name} has shape {a.shape}; pass a 1-D array (flatten with .reshape(-1))"
        )
    if not a.flags.c_contiguous:
        raise BadBufferError(
            f"{name} is not contiguous (a strided view?); pass np.ascontiguousarray({name})"
        )
    if not a.flags.aligned:
        raise BadBufferError(unaligned_message(name, a.itemsize))
    if writable and not a.flags.writeable:
        raise BadBufferError(f"{name} is read-only; pass a writable array")


def _check_size(name: str, a: npt.NDArray[Any], size: int) -> None:
    if a.shape[0] != size:
        raise BadBufferError(
            f"{name} has {a.shape[0]} elements, expected {size}; "
            "allocate it with the matching size or pass None to have it allocated"
        )


_Item = TypeVar("_Item", bound=np.generic)


def _output(
    name: str, out: npt.NDArray[_Item] | None, dtype: type[_Item], size: int
) -> npt.NDArray[_Item]:
    """``out`` checked as a writable ``size``-element output, or a new array when None."""
    if out is None:
        return np.empty(size, dtype=dtype)
    _check_vector(name, out, dtype, writable=True)
    _check_size(name, out, size)
    return out


def _check_block_config(bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise InvalidConfigError(f"bits must be one of {BITS}, got {bits!r}")
    if (
        not isinstance(block_size, int)
        or block_size < 4
        or block_size > MAX_BLOCK_SIZE
        or block_size % 4
    ):
        raise InvalidConfigError(
            f"block_size must be a multiple of 4 in [4, {MAX_BLOCK_SIZE}], got {block_size!r}; "
            "64 is a good default"
        )


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise InvalidConfigError(f"seed must be an int in [0, 2**64), got {seed!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise InvalidConfigError(f"n (number of elements) must be an int >= 0, got {n!r}")


def _check_zero_point(zero_point: int) -> None:
    if not isinstance(zero_point, int) or not 0 <= zero_point <= 255:
        raise InvalidConfigError(f"zero_point must be an int in [0, 255], got {zero_point!r}")


def num_blocks(n: int, block_size: int) -> int:
    """Return the number of blocks (and scales) for n elements.

    Parameters
    ----------
    n
        Number of elements.
    block_size
        Elements per block; the last block may be shorter.

    Examples
    --------
    >>> num_blocks(130, 64)
    3
    """
    _check_n(n)
    _check_block_config(8, block_size)
    return (n + block_size - 1) // block_size


def packed_nbytes(n: int, bits: int) -> int:
    """Return the size in bytes of n packed codes of the given width.

    Examples
    --------
    >>> packed_nbytes(5, 4)
    3
    """
    _check_n(n)
    if bits not in BITS:
        raise InvalidConfigError(f"bits must be one of {BITS}, got {bits!r}")
    return (n * bits + 7) // 8


def max_block_scale(bits: int) -> float:
    """Return the largest scale a block payload of this width can carry.

    It is the largest float32 ``s`` with ``qmax * s`` finite in float32; the
    quantizers cap their scales there (``FLT_MAX / 127`` itself rounds up, and
    127 times it is inf), and decoders refuse larger ones as corrupt.

    Examples
    --------
    >>> max_block_scale(2) == float(np.finfo(np.float32).max)
    True
    """
    if bits not in BITS:
        raise InvalidConfigError(f"bits must be one of {BITS}, got {bits!r}")
    return float(_reference._SCALE_MAX[bits])


def quantize_affine_u8(
    x: Float32Vector, out: Uint8Vector | None = None
) -> tuple[Uint8Vector, float, int]:
    """Quantize a float32 vector to uint8 codes with one scale and zero point.

    The range is ``[min(x, 0), max(x, 0)]``: it always includes 0, and the zero
    point is an integer code, so ``x == 0`` maps to ``zero_point`` and
    dequantizes to exactly ``0.0``. Codes are
    ``clip(rint(x / scale) + zero_point, 0, 255)`` (half to even).

    Parameters
    ----------
    x
        Values to quantize (1-D, contiguous float32, finite).
    out
        Optional uint8 buffer of ``len(x)`` elements for the codes.

    Returns
    -------
    codes, scale, zero_point
        ``scale`` is a float32 value (returned as a Python float). Empty or
        all-zero input gives ``scale = 1.0``, ``zero_point = 0`` and all codes 0.

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout of ``x`` or ``out``.
    NonFiniteInputError
        ``x`` contains NaN or +/-Inf; ``out`` is left untouched.

    Notes
    -----
    Error bound: ``|x - dequantize(codes)| <= scale / 2`` per element (up to
    float32 rounding of the scale).

    Examples
    --------
    >>> codes, scale, zp = quantize_affine_u8(np.array([-1.0, 0.0, 3.0], dtype=np.float32))
    >>> int(codes[1]) == zp
    True
    """
    _check_vector("x", x, np.float32)
    out = _output("out", out, np.uint8, x.shape[0])
    scale, zero_point = _backend.quantize_impl.quantize_affine_u8(x, out)
    return out, float(scale), int(zero_point)


def dequantize_affine_u8(
    codes: Uint8Vector, scale: float, zero_point: int, out: Float32Vector | None = None
) -> Float32Vector:
    """Return ``(codes - zero_point) * scale`` as float32.

    Parameters
    ----------
    codes
        uint8 codes from :func:`quantize_affine_u8`.
    scale, zero_point
        The parameters returned with them.
    out
        Optional float32 buffer of ``len(codes)`` elements.

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout.
    InvalidConfigError
        ``zero_point`` outside [0, 255].
    NonFiniteInputError
        ``scale`` is NaN or +/-Inf.

    Notes
    -----
    Error bound: ``|x - out| <= scale / 2`` for the ``x`` that produced the codes.
    """
    _check_vector("codes", codes, np.uint8)
    _check_zero_point(zero_point)
    out = _output("out", out, np.float32, codes.shape[0])
    _backend.quantize_impl.dequantize_affine_u8(codes, float(scale), zero_point, out)
    return out


def dequantize_affine_u8_accumulate(
    codes: Uint8Vector, scale: float, zero_point: int, weight: float, acc: Float32Vector
) -> Float32Vector:
    """Add ``weight * ((codes - zero_point) * scale)`` to ``acc`` in place (float32).

    The coordinator's streaming aggregation: each update is decoded straight into
    one accumulator, so memory stays O(model). Returns ``acc``.

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout.
    InvalidConfigError
        ``zero_point`` outside [0, 255].
    NonFiniteInputError
        ``scale`` or ``weight`` is not finite; ``acc`` is left untouched.

    Notes
    -----
    Error bound per element: ``|weight| * scale / 2`` plus float32 rounding of
    the product and the sum.
    """
    _check_vector("codes", codes, np.uint8)
    _check_vector("acc", acc, np.float32, writable=True)
    _check_size("acc", acc, codes.shape[0])
    _check_zero_point(zero_point)
    _backend.quantize_impl.dequantize_affine_u8_accumulate(
        codes, float(scale), zero_point, float(weight), acc
    )
    return acc


def _block_outputs(
    n: int,
    bits: int,
    block_size: int,
    packed_out: Uint8Vector | None,
    scales_out: Float32Vector | None,
) -> tuple[Uint8Vector, Float32Vector]:
    nbytes = (n * bits + 7) // 8
    nblocks = (n + block_size - 1) // block_size
    return (
        _output("packed_out", packed_out, np.uint8, nbytes),
        _output("scales_out", scales_out, np.float32, nblocks),
    )


def quantize_block(
    x: Float32Vector,
    bits: int = 8,
    block_size: int = 64,
    *,
    stochastic: bool = False,
    seed: int = 0,
    packed_out: Uint8Vector | None = None,
    scales_out: Float32Vector | None = None,
) -> tuple[Uint8Vector, Float32Vector]:
    """Quantize a float32 vector to signed codes with one float32 scale per block.

    Each block of ``block_size`` elements (the last may be shorter) gets
    ``scale = absmax / qmax`` (qmax = 127, 7, 1 for 8, 4, 2 bits; at least the
    smallest normal float32, so ``1 / scale`` stays finite) and codes
    ``clip(round(x / scale), -qmax, qmax)``. An all-zero block has scale 0 and
    codes 0. Codes are packed little-end first: one int8 per byte (two's
    complement) for 8 bits, element ``2i`` in the low nibble for 4 bits, element
    ``4i`` in the lowest two bits for 2 bits; padding codes are 0.

    Parameters
    ----------
    x
        Values to quantize (1-D, contiguous float32, finite).
    bits
        8, 4 or 2.
    block_size
        Elements per block: a multiple of 4 in [4, 2**20].
    stochastic
        Round up with probability equal to the fractional part (unbiased:
        ``E[dequantized] = x``) instead of to nearest (half to even).
    seed
        Seed of the counter-based hash that drives stochastic rounding, in
        [0, 2**64). The draw for element ``i`` depends only on ``(seed, i)``.
    packed_out, scales_out
        Optional buffers of ``packed_nbytes(len(x), bits)`` uint8 and
        ``num_blocks(len(x), block_size)`` float32 elements.

    Returns
    -------
    packed, scales

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout of an array.
    InvalidConfigError
        Unsupported ``bits``, ``block_size`` or ``seed``.
    NonFiniteInputError
        ``x`` contains NaN or +/-Inf. The check runs with the quantization, a
        group of blocks (at most 16 KiB of input) at a time, so the outputs then
        hold the codes and scales of the groups before the first bad value.

    Notes
    -----
    Error bound per element: ``|x - dequantized| <= scale / 2`` when
    deterministic, ``< scale`` when stochastic (up to float32 rounding).

    Examples
    --------
    >>> packed, scales = quantize_block(np.array([1.0, -0.5, 0.25, 0.0], dtype=np.float32))
    >>> packed.view(np.int8).tolist(), bool(scales[0] == np.float32(1.0) / np.float32(127))
    ([127, -64, 32, 0], True)
    """
    _check_vector("x", x, np.float32)
    _check_block_config(bits, block_size)
    _check_seed(seed)
    packed_out, scales_out = _block_outputs(x.shape[0], bits, block_size, packed_out, scales_out)
    _backend.quantize_impl.quantize_block(
        x, bits, block_size, bool(stochastic), seed, packed_out, scales_out
    )
    return packed_out, scales_out


def residual_add(
    residual: Float32Vector, update: Float32Vector, out: Float32Vector | None = None
) -> Float32Vector:
    """Return ``residual + update`` (float32): the first step of error feedback.

    The memory traffic of this one pass (read two model-sized arrays, write a
    third) is what every form of error feedback needs and a codec without it
    does not; ``fedge bench kernels`` times it as the floor of feedback's cost.
    :class:`kernels.codec.ErrorFeedback` uses it for codecs without a fused
    kernel. Arrays of 16 MiB and more are written with non-temporal stores on
    x86-64 (the same bits).

    Parameters
    ----------
    residual, update
        1-D contiguous float32 arrays of the same length; ``update`` is only read.
    out
        ``residual`` itself (updated in place), or a float32 array of the same
        length that overlaps neither input. Default: a new array.

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout, or ``out`` overlapping an input.
    NonFiniteInputError
        Some ``residual + update`` is NaN or +/-Inf. ``residual`` is left
        untouched (in place the sum is checked before any write); a separate
        ``out`` then holds unspecified values.

    Examples
    --------
    >>> r = np.array([0.5, -1.0], dtype=np.float32)
    >>> residual_add(r, np.array([0.25, 1.0], dtype=np.float32)).tolist()
    [0.75, 0.0]
    """
    _check_vector("update", update, np.float32)
    n = update.shape[0]
    _check_vector("residual", residual, np.float32, writable=out is residual)
    _check_size("residual", residual, n)
    out = _output("out", out, np.float32, n)
    _backend.quantize_impl.residual_add(residual, update, out)
    return out


def quantize_block_feedback(
    update: Float32Vector,
    residual: Float32Vector,
    bits: int = 8,
    block_size: int = 64,
    *,
    stochastic: bool = False,
    seed: int = 0,
    packed_out: Uint8Vector | None = None,
    scales_out: Float32Vector | None = None,
    residual_out: Float32Vector | None = None,
) -> tuple[Uint8Vector, Float32Vector]:
    """Quantize ``update`` with error feedback, updating ``residual`` in place.

    Equivalent to ``residual += update; packed, scales = quantize_block(residual);
    residual -= dequantize_block(packed, scales)`` (same codes, same float32 bits),
    done in one cache-resident pass over each group of blocks. The device keeps
    ``residual`` between rounds, so what quantization drops is sent later.

    With ``residual_out`` the new residual goes there instead and ``residual`` is
    only read. That is the faster form: in place, the whole sum must be checked
    for NaN/Inf before the first write (an extra read of both arrays), while into
    a separate array one pass suffices, since an error leaves ``residual`` intact
    whatever was written. :class:`kernels.codec.ErrorFeedback` alternates two
    buffers this way.

    Parameters
    ----------
    update
        This round's update (1-D, contiguous float32).
    residual
        The carried error, same length, float32; modified in place unless
        ``residual_out`` is given.
    bits, block_size, stochastic, seed, packed_out, scales_out
        As in :func:`quantize_block`.
    residual_out
        Where to write the new residual: an array of the same length that overlaps
        neither ``residual`` nor ``update``. On error its content is unspecified
        (as are ``packed_out`` and ``scales_out``).

    Returns
    -------
    packed, scales

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout of an array.
    InvalidConfigError
        Unsupported ``bits``, ``block_size`` or ``seed``.
    NonFiniteInputError
        Some ``residual + update`` is NaN or +/-Inf; ``residual`` is left
        untouched. In place, the outputs are untouched too (the whole sum is
        checked before any write).

    Notes
    -----
    After the call ``|residual| <= scale / 2`` per element when deterministic,
    ``< scale`` when stochastic (up to float32 rounding).

    Examples
    --------
    >>> update = np.array([0.5, -1.0, 0.25, 2.0], dtype=np.float32)
    >>> residual = np.zeros(4, dtype=np.float32)
    >>> new_residual = np.empty(4, dtype=np.float32)
    >>> packed, scales = quantize_block_feedback(
    ...     update, residual, 2, 4, residual_out=new_residual
    ... )
    >>> new_residual.tolist(), residual.tolist()
    ([0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0])
    """
    _check_vector("update", update, np.float32)
    n = update.shape[0]
    _check_vector("residual", residual, np.float32, writable=residual_out is None)
    _check_size("residual", residual, n)
    residual_out = (
        residual if residual_out is None else _output("residual_out", residual_out, np.float32, n)
    )
    _check_block_config(bits, block_size)
    _check_seed(seed)
    packed_out, scales_out = _block_outputs(n, bits, block_size, packed_out, scales_out)
    _backend.quantize_impl.quantize_block_feedback(
        update,
        residual,
        bits,
        block_size,
        bool(stochastic),
        seed,
        packed_out,
        scales_out,
        residual_out,
    )
    return packed_out, scales_out


def _check_block_inputs(
    packed: Uint8Vector, scales: Float32Vector, n: int, bits: int, block_size: int
) -> None:
    _check_n(n)
    _check_block_config(bits, block_size)
    _check_vector("packed", packed, np.uint8)
    _check_vector("scales", scales, np.float32)
    _check_size("packed", packed, (n * bits + 7) // 8)
    _check_size("scales", scales, (n + block_size - 1) // block_size)


def dequantize_block(
    packed: Uint8Vector,
    scales: Float32Vector,
    n: int,
    bits: int = 8,
    block_size: int = 64,
    out: Float32Vector | None = None,
) -> Float32Vector:
    """Return ``code * scale`` (float32) for the n elements of a block-quantized vector.

    Parameters
    ----------
    packed, scales
        Output of :func:`quantize_block`.
    n
        Number of elements encoded.
    bits, block_size
        As used to quantize.
    out
        Optional float32 buffer of n elements.

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout of an array.
    InvalidConfigError
        Unsupported ``bits``/``block_size`` or negative ``n``.
    NonFiniteInputError
        A scale is NaN or +/-Inf (a corrupt payload); ``out`` is left untouched.

    Notes
    -----
    Error bound per element: ``|x - out| <= scale / 2`` (deterministic) or
    ``< scale`` (stochastic) for the ``x`` that was quantized.
    """
    _check_block_inputs(packed, scales, n, bits, block_size)
    out = _output("out", out, np.float32, n)
    _backend.quantize_impl.dequantize_block(packed, scales, n, bits, block_size, out)
    return out


def dequantize_block_accumulate(
    packed: Uint8Vector,
    scales: Float32Vector,
    n: int,
    bits: int,
    block_size: int,
    weight: float,
    acc: Float32Vector,
) -> Float32Vector:
    """Add ``weight * (code * scale)`` to ``acc`` in place, in float32, in that order.

    The fused decode for the coordinator's streaming aggregation. Returns ``acc``.

    Raises
    ------
    BadBufferError
        Wrong dtype, shape, size or layout of an array.
    InvalidConfigError
        Unsupported ``bits``/``block_size`` or negative ``n``.
    NonFiniteInputError
        ``weight`` or a scale is not finite; ``acc`` is left untouched.

    Notes
    -----
    Error bound per element: ``|weight| * scale / 2`` (deterministic codes) or
    ``|weight| * scale`` (stochastic), plus float32 rounding of the product and sum.
    """
    _check_block_inputs(packed, scales, n, bits, block_size)
    _check_vector("acc", acc, np.float32, writable=True)
    _check_size("acc", acc, n)
    _backend.quantize_impl.dequantize_block_accumulate(
        packed, scales, n, bits, block_size, float(weight), acc
    )
    return acc


__all__ = [
    "BITS",
    "MAX_BLOCK_SIZE",
    "dequantize_affine_u8",
    "dequantize_affine_u8_accumulate",
    "dequantize_block",
    "dequantize_block_accumulate",
    "max_block_scale",
    "num_blocks",
    "packed_nbytes",
    "quantize_affine_u8",
    "quantize_block",
    "quantize_block_feedback",
    "residual_add",
]
