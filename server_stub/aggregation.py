"""Aggregation math: streaming weighted means, bounded buffers, robust statistics, clipping.

This module owns the numeric building blocks the strategies use; it knows nothing about
rounds, devices or the wire. Rules:

- Models and updates are flat float32 vectors (:data:`Float32Vector`); the tensor layout is
  handled elsewhere.
- An update is either a decoded vector or an encoded ``(codec, payload)`` pair
  (:data:`EncodedUpdate`). Encoded updates go straight into the float32 accumulator through the
  codec's fused ``decode_accumulate`` kernel, so :class:`WeightedMean` needs O(model) memory
  however many devices report.
- Coordinate median and trimmed mean need every update at once. They use a
  :class:`BoundedBuffer` of ``capacity`` rows, allocated up front: memory is
  ``capacity × size × 4`` bytes, and an update past ``capacity`` is refused with
  :class:`BufferFullError`.
- Weights and norms are computed in float64; the accumulator is float32 (the model's dtype).
- Nothing here reads a clock, draws random numbers or touches I/O.

The fused path trusts the codec to validate a payload completely (size, finiteness) *before*
it writes into the accumulator: a codec that fails half way leaves a partial sum behind, and
the round's accumulator is then poisoned. Decoded vectors are checked here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

Float32Vector: TypeAlias = npt.NDArray[np.float32]
"""A flat float32 model, delta or accumulator."""

_CHUNK = 1 << 16
"""Elements per chunk in float64 reductions, so temporaries stay small."""


class AggregationError(ValueError):
    """Base class of the errors raised by the aggregation building blocks."""


class UpdateShapeError(AggregationError):
    """An update is not a flat vector of the model's size."""


class NonFiniteUpdateError(AggregationError):
    """An update contains NaN or +/-Inf."""


class InvalidWeightError(AggregationError):
    """A weight is negative or not finite."""


class BufferFullError(AggregationError):
    """A :class:`BoundedBuffer` already holds ``capacity`` updates."""


@runtime_checkable
class SupportsDecodeAccumulate(Protocol):
    """The part of ``kernels.codec.UpdateCodec`` aggregation needs."""

    def decode(self, payload: bytes, out: Float32Vector) -> Float32Vector:
        """Decode ``payload`` into the caller's buffer ``out`` and return it."""
        ...

    def decode_accumulate(self, payload: bytes, acc: Float32Vector, weight: float) -> Float32Vector:
        """Add ``weight × decode(payload)`` to ``acc`` in place (fused) and return ``acc``."""
        ...


EncodedUpdate: TypeAlias = tuple[SupportsDecodeAccumulate, bytes]
"""An update still in wire form: the codec named by its envelope and the payload bytes."""

UpdateSource: TypeAlias = Float32Vector | EncodedUpdate
"""Either a decoded update or an encoded one."""


def check_vector(update: npt.NDArray[np.floating], size: int) -> None:
    """Raise unless ``update`` is a finite 1-D float vector of length ``size``.

    Raises
    ------
    UpdateShapeError
        Wrong dtype kind, rank or length.
    NonFiniteUpdateError
        NaN or infinity anywhere.
    """
    if update.ndim != 1 or update.shape[0] != size or update.dtype.kind != "f":
        raise UpdateShapeError(
            f"expected a flat float vector of {size} elements, "
            f"got shape {update.shape} dtype {update.dtype}"
        )
    if not _all_finite(update):
        raise NonFiniteUpdateError("update contains NaN or infinity")


def _all_finite(x: npt.NDArray[np.floating]) -> bool:
    # Chunked so a 10 M-element model does not allocate a 10 MB boolean temporary.
    return all(
        bool(np.isfinite(x[start : start + _CHUNK]).all()) for start in range(0, x.shape[0], _CHUNK)
    )


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not (math.isfinite(weight) and weight >= 0.0):
        raise InvalidWeightError(f"weight must be finite and >= 0, got {weight!r}")
    return weight


def decode_into(update: UpdateSource, out: Float32Vector) -> Float32Vector:
    """Write ``update`` into ``out`` (decoding it if encoded) and return ``out``.

    A decoded vector is validated with :func:`check_vector` first.
    """
    if isinstance(update, np.ndarray):
        check_vector(update, out.shape[0])
        np.copyto(out, update, casting="same_kind")
        return out
    codec, payload = update
    return codec.decode(payload, out)


def update_norm(update: npt.NDArray[np.floating]) -> float:
    """Return the L2 norm of ``update``, accumulated in float64.

    Examples
    --------
    >>> update_norm(np.array([3.0, 4.0], dtype=np.float32))
    5.0
    """
    total = 0.0
    for start in range(0, update.shape[0], _CHUNK):
        chunk = update[start : start + _CHUNK].astype(np.float64)
        total += float(np.dot(chunk, chunk))
    return math.sqrt(total)


def clip_by_norm(
    update: Float32Vector, max_norm: float, *, out: Float32Vector | None = None
) -> tuple[Float32Vector, float]:
    """Scale ``update`` so its L2 norm is at most ``max_norm``.

    Parameters
    ----------
    update
        The vector to clip; left unchanged unless ``out`` is ``update`` itself.
    max_norm
        Largest allowed L2 norm, > 0.
    out
        Optional buffer for the result (may be ``update`` for in-place clipping).

    Returns
    -------
    clipped, scale
        The clipped vector and the factor ``min(1, max_norm / ‖update‖)`` it was scaled by.

    Examples
    --------
    >>> clipped, scale = clip_by_norm(np.array([3.0, 4.0], dtype=np.float32), 1.0)
    >>> clipped.tolist(), scale
    ([0.6000000238418579, 0.800000011920929], 0.2)
    """
    if not (math.isfinite(max_norm) and max_norm > 0.0):
        raise AggregationError(f"max_norm must be a positive finite number, got {max_norm!r}")
    norm = update_norm(update)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    if out is None:
        out = np.empty_like(update)
    np.multiply(update, np.float32(scale), out=out)
    return out, scale


class WeightedMean:
    """Streaming weighted mean of updates in one float32 accumulator.

    Memory is the accumulator (``size`` float32) plus, only when decoded vectors are added,
    one scratch vector of the same size; it does not grow with the number of updates.
    ``reset`` clears both without reallocating, so one instance serves every round.

    Examples
    --------
    >>> mean = WeightedMean(2)
    >>> mean.add(np.array([1.0, 2.0], dtype=np.float32), weight=1.0)
    >>> mean.add(np.array([3.0, 6.0], dtype=np.float32), weight=3.0)
    >>> mean.result().tolist()
    [2.5, 5.0]
    """

    __slots__ = ("_acc", "_count", "_scratch", "_total_weight")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise AggregationError(f"size must be >= 0, got {size}")
        self._acc: Float32Vector = np.zeros(size, dtype=np.float32)
        self._scratch: Float32Vector | None = None
        self._total_weight = 0.0
        self._count = 0

    @property
    def size(self) -> int:
        """Number of model parameters."""
        return int(self._acc.shape[0])

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far (float64)."""
        return self._total_weight

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    @property
    def weighted_sum(self) -> Float32Vector:
        """Read-only view of the accumulator ``Σ weight × update``."""
        view = self._acc.view()
        view.flags.writeable = False
        return view

    def add(self, update: UpdateSource, weight: float) -> None:
        """Add ``weight × update`` to the accumulator.

        Parameters
        ----------
        update
            A decoded vector (validated: shape, finiteness) or a ``(codec, payload)`` pair
            (decoded and accumulated in one pass by ``codec.decode_accumulate``).
        weight
            Non-negative finite weight, e.g. the device's ``num_examples``.

        Raises
        ------
        UpdateShapeError, NonFiniteUpdateError, InvalidWeightError
            The update or weight is unusable; the accumulator is unchanged.
        kernels.errors.CodecError
            From the codec, for a payload it cannot decode.
        """
        weight = _check_weight(weight)
        if isinstance(update, np.ndarray):
            check_vector(update, self.size)
            if self._scratch is None:
                self._scratch = np.empty_like(self._acc)
            np.multiply(update, np.float32(weight), out=self._scratch, casting="same_kind")
            np.add(self._acc, self._scratch, out=self._acc)
        else:
            codec, payload = update
            codec.decode_accumulate(payload, self._acc, weight)
        self._total_weight += weight
        self._count += 1

    def add_partial(self, weighted_sum: Float32Vector, total_weight: float, count: int) -> None:
        """Merge a partial aggregate (another worker's ``weighted_sum`` and ``total_weight``).

        This is how hierarchical aggregation combines aggregator workers: each sends its
        accumulator and its total weight, and the leader adds them here.
        """
        total_weight = _check_weight(total_weight)
        check_vector(weighted_sum, self.size)
        np.add(self._acc, weighted_sum, out=self._acc, casting="same_kind")
        self._total_weight += total_weight
        self._count += count

    def result(self, out: Float32Vector | None = None) -> Float32Vector | None:
        """Return ``Σ w·u / Σ w`` as a new float32 vector (or in ``out``); None if no weight."""
        if self._total_weight <= 0.0:
            return None
        if out is None:
            out = np.empty_like(self._acc)
        np.multiply(self._acc, np.float32(1.0 / self._total_weight), out=out)
        return out

    def reset(self) -> None:
        """Forget every update, keeping the buffers."""
        self._acc.fill(0.0)
        self._total_weight = 0.0
        self._count = 0


def reset_or_new_mean(mean: WeightedMean | None, size: int) -> WeightedMean:
    """Return ``mean`` reset when it already holds ``size`` parameters, else a new one.

    How a strategy gets an empty accumulator each round without reallocating it.
    """
    if mean is None or mean.size != size:
        return WeightedMean(size)
    mean.reset()
    return mean


class BoundedBuffer:
    """Holds up to ``capacity`` decoded updates for statistics that need all of them.

    Memory is ``capacity × size × 4`` bytes, allocated when the buffer is created so that a
    configuration the coordinator cannot afford fails at start-up, not in the middle of a
    round. An update past ``capacity`` raises :class:`BufferFullError`.
    """

    __slots__ = ("_count", "_rows")

    def __init__(self, size: int, capacity: int) -> None:
        if size < 0:
            raise AggregationError(f"size must be >= 0, got {size}")
        if capacity < 1:
            raise AggregationError(f"capacity must be >= 1, got {capacity}")
        self._rows: npt.NDArray[np.float32] = np.zeros((capacity, size), dtype=np.float32)
        self._count = 0

    @property
    def size(self) -> int:
        """Number of model parameters per row."""
        return int(self._rows.shape[1])

    @property
    def capacity(self) -> int:
        """Most updates the buffer holds."""
        return int(self._rows.shape[0])

    @property
    def count(self) -> int:
        """Updates held now."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes the buffer allocated (``capacity × size × 4``)."""
        return int(self._rows.nbytes)

    def add(self, update: UpdateSource) -> None:
        """Decode or copy ``update`` into the next free row.

        Raises
        ------
        BufferFullError
            The buffer already holds ``capacity`` updates.
        UpdateShapeError, NonFiniteUpdateError
            A decoded vector is unusable; the buffer is unchanged.
        """
        if self._count >= self.capacity:
            raise BufferFullError(
                f"buffer holds its capacity of {self.capacity} updates; raise the strategy's "
                f"capacity (memory: capacity × model size × 4 bytes) or select fewer devices"
            )
        row = self._rows[self._count]
        decode_into(update, row)
        if not isinstance(update, np.ndarray) and not _all_finite(row):
            raise NonFiniteUpdateError("decoded update contains NaN or infinity")
        self._count += 1

    def rows(self) -> npt.NDArray[np.float32]:
        """Return the filled rows, shape ``(count, size)``, as a writable view (no copy)."""
        return self._rows[: self._count]

    def reset(self) -> None:
        """Forget every update, keeping the allocation."""
        self._count = 0


def _check_stack(updates: npt.NDArray[np.float32] | Sequence[Float32Vector]) -> np.ndarray:
    stack = np.asarray(updates)
    if stack.ndim != 2 or stack.shape[0] == 0:
        raise AggregationError(
            f"expected a non-empty (num_updates, size) stack, got shape {stack.shape}"
        )
    return stack


def coordinate_median(
    updates: npt.NDArray[np.float32] | Sequence[Float32Vector], *, overwrite_input: bool = False
) -> Float32Vector:
    """Return the coordinate-wise median of a ``(num_updates, size)`` stack (Yin et al. 2018).

    With an even number of updates the two middle values are averaged. With
    ``overwrite_input`` the stack is partially sorted in place instead of copied, which saves
    ``num_updates × size`` floats; the :class:`BoundedBuffer` rows may be passed that way.
    """
    stack = _check_stack(updates)
    median = np.median(stack, axis=0, overwrite_input=overwrite_input)
    return np.asarray(median, dtype=np.float32)


def trimmed_mean(
    updates: npt.NDArray[np.float32] | Sequence[Float32Vector],
    beta: float,
    *,
    overwrite_input: bool = False,
) -> Float32Vector:
    """Return the coordinate-wise β-trimmed mean (Yin et al. 2018).

    For each coordinate the ``floor(β·n)`` largest and ``floor(β·n)`` smallest values are
    dropped and the rest averaged (in float64). ``0 <= β < 0.5``; at least one value must
    remain.

    Examples
    --------
    >>> stack = np.array([[0.0], [1.0], [2.0], [100.0]], dtype=np.float32)
    >>> trimmed_mean(stack, 0.25).tolist()
    [1.5]
    """
    if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
        raise AggregationError(f"beta must be within [0, 0.5), got {beta!r}")
    stack = _check_stack(updates)
    n = stack.shape[0]
    trim = math.floor(beta * n)
    if overwrite_input:
        stack.sort(axis=0)
        ordered = stack
    else:
        ordered = np.sort(stack, axis=0)
    kept = ordered[trim : n - trim]
    return np.asarray(kept.mean(axis=0, dtype=np.float64), dtype=np.float32)


__all__ = [
    "AggregationError",
    "BoundedBuffer",
    "BufferFullError",
    "EncodedUpdate",
    "Float32Vector",
    "InvalidWeightError",
    "NonFiniteUpdateError",
    "SupportsDecodeAccumulate",
    "UpdateShapeError",
    "UpdateSource",
    "WeightedMean",
    "check_vector",
    "clip_by_norm",
    "coordinate_median",
    "decode_into",
    "trimmed_mean",
    "update_norm",
]
