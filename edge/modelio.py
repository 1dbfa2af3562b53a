"""Model tensors in and out of envelopes: the part of the contract that knows about codecs.

Both sides import this module (with ``edge.wire``, ``edge.chunking`` and
``edge.transport`` it forms the shared contract; it imports nothing else of
``edge``). A model is a mapping of tensor name to float32 array, in a fixed
order, described by a :class:`ModelLayout`. On the wire each tensor is one
entry of the envelope's ``tensors`` list, with its own codec config, and one
payload; the coordinator keeps flat float32 vectors and uses the layout's
offsets to address each tensor's slice.

Rules:

* Global models go down as ``raw`` float32 (exact; devices must train on the
  same weights the coordinator holds), optionally zstd-compressed.
* An update carries ``new - global`` for each tensor, encoded with the codec
  the task named; extra vectors (SCAFFOLD's control-variate delta) travel as
  extra tensors whose names start with ``"aux/"``.
* Decoding checks names, shapes and codecs against the expected layout first
  and raises :class:`LayoutError` naming the mismatch, so a bad update never
  touches an accumulator half-way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from edge.wire import GlobalModel, JSONValue, MessageError, ModelUpdate, TensorSpec
from kernels.codec import ErrorFeedback, UpdateCodec, get_codec
from kernels.errors import CodecError

F32 = npt.NDArray[np.float32]
Weights = dict[str, F32]

AUX_PREFIX: Final = "aux/"
"""Name prefix of extra vectors in an update (e.g. ``aux/scaffold``), not model tensors."""

RAW: Final[dict[str, JSONValue]] = {"id": "raw"}


class LayoutError(MessageError):
    """An envelope's tensors do not match the model they claim to belong to."""


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """Names and shapes of a model's tensors, in order, and their offsets in a flat vector.

    Examples
    --------
    >>> layout = ModelLayout((("w0", (64, 10)), ("b0", (10,))))
    >>> layout.size, layout.offsets
    (650, (0, 640))
    """

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        entries = tuple((str(name), tuple(int(d) for d in shape)) for name, shape in self.entries)
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            raise LayoutError(f"duplicate tensor names in layout: {names}")
        if any(d < 0 for _, shape in entries for d in shape):
            raise LayoutError("tensor dimensions must be >= 0")
        object.__setattr__(self, "entries", entries)

    @classmethod
    def of(cls, weights: Mapping[str, npt.NDArray[np.generic]]) -> ModelLayout:
        """The layout of a weights mapping (its iteration order is the layout's order)."""
        return cls(tuple((name, tuple(arr.shape)) for name, arr in weights.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for _, shape in self.entries)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for size in self.sizes:
            out.append(pos)
            pos += size
        return tuple(out)

    @property
    def size(self) -> int:
        """Total number of parameters."""
        return sum(self.sizes)

    def slices(self) -> Iterator[tuple[str, tuple[int, ...], slice]]:
        """Yield ``(name, shape, slice into the flat vector)`` for each tensor."""
        for (name, shape), start, size in zip(self.entries, self.offsets, self.sizes, strict=True):
            yield name, shape, slice(start, start + size)

    def flatten(self, weights: Mapping[str, npt.NDArray[np.generic]]) -> F32:
        """Concatenate ``weights`` (which must match the layout) into one float32 vector."""
        self.check_weights(weights)
        return (
            np.concatenate(
                [np.asarray(weights[name], dtype=np.float32).ravel() for name in self.names]
            )
            if self.entries
            else np.zeros(0, dtype=np.float32)
        )

    def unflatten(self, flat: F32) -> Weights:
        """Split a flat vector into named tensors (copies)."""
        if flat.shape != (self.size,):
            raise LayoutError(
                f"flat vector has shape {flat.shape}, the layout needs ({self.size},)"
            )
        return {
            name: flat[sl].reshape(shape).astype(np.float32, copy=True)
            for name, shape, sl in self.slices()
        }

    def check_weights(self, weights: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Raise :class:`LayoutError` unless ``weights`` has this layout's names and shapes."""
        if list(weights) != list(self.names):
            raise LayoutError(
                f"tensors {list(weights)} do not match the model's {list(self.names)}"
            )
        for name, shape in self.entries:
            if tuple(weights[name].shape) != shape:
                raise LayoutError(
                    f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}"
                )

    def check_specs(
        self, tensors: Sequence[TensorSpec], *, aux: Mapping[str, int] | None = None
    ) -> None:
        """Check an envelope's tensor list: the model's tensors in order, then allowed aux vectors.

        ``aux`` maps each allowed extra tensor name to its length (1-D).
        """
        model_specs = [t for t in tensors if not t.name.startswith(AUX_PREFIX)]
        aux_specs = [t for t in tensors if t.name.startswith(AUX_PREFIX)]
        got = [(t.name, t.shape) for t in model_specs]
        if got != list(self.entries):
            raise LayoutError(f"tensors {got} do not match the model's {list(self.entries)}")
        allowed = dict(aux or {})
        for spec in aux_specs:
            if spec.name not in allowed:
                raise LayoutError(f"unexpected extra tensor {spec.name!r}")
            if spec.shape != (allowed[spec.name],):
                raise LayoutError(
                    f"extra tensor {spec.name!r} has shape {spec.shape}, "
                    f"expected ({allowed[spec.name]},)"
                )
        if tensors and [t.name for t in tensors] != [t.name for t in model_specs + aux_specs]:
            raise LayoutError("extra tensors must come after the model's tensors")

    def to_json(self) -> list[JSONValue]:
        return [[name, list(shape)] for name, shape in self.entries]

    @classmethod
    def from_json(cls, obj: object) -> ModelLayout:
        if not isinstance(obj, list):
            raise LayoutError(f"a layout is a list of [name, shape] pairs, got {obj!r}")
        try:
            return cls(tuple((str(name), tuple(shape)) for name, shape in obj))
        except (TypeError, ValueError):
            raise LayoutError(f"a layout is a list of [name, shape] pairs, got {obj!r}") from None


def _codec_for(spec: TensorSpec) -> UpdateCodec:
    try:
        return get_codec(spec.codec)
    except CodecError as exc:
        raise LayoutError(f"tensor {spec.name!r}: {exc}") from None


# ---------------------------------------------------------------------------- global model


def pack_model(
    weights: Mapping[str, npt.NDArray[np.generic]],
    *,
    model_version: int,
    round_no: int,
    codec: Mapping[str, JSONValue] = RAW,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, JSONValue] | None = None,
) -> GlobalModel:
    """Build the :class:`~edge.wire.GlobalModel` envelope of ``weights``."""
    c = get_codec(codec)
    specs, payloads = [], []
    for name, arr in weights.items():
        flat = np.ascontiguousarray(arr, dtype=np.float32).ravel()
        specs.append(TensorSpec(name, tuple(arr.shape), c.get_config()))
        payloads.append(c.encode(flat))
    return GlobalModel(
        model_version=model_version,
        round_no=round_no,
        tensors=tuple(specs),
        payloads=tuple(payloads),
        metrics=dict(metrics or {}),
        extra=dict(extra or {}),
    )


def unpack_model(model: GlobalModel, layout: ModelLayout | None = None) -> Weights:
    """Decode every tensor of a global model; check it against ``layout`` when given."""
    if layout is not None:
        layout.check_specs(model.tensors)
    out: Weights = {}
    for spec, payload in zip(model.tensors, model.payloads, strict=True):
        if spec.name in out:
            raise LayoutError(f"tensor {spec.name!r} appears twice")
        vec = np.empty(spec.size, dtype=np.float32)
        try:
            _codec_for(spec).decode(payload, vec)
        except CodecError as exc:
            raise LayoutError(f"tensor {spec.name!r}: {exc}") from None
        out[spec.name] = vec.reshape(spec.shape)
    return out


# ---------------------------------------------------------------------------- updates


def encode_update(
    delta: Mapping[str, npt.NDArray[np.generic]],
    codec: Mapping[str, JSONValue],
    *,
    feedback: Mapping[str, ErrorFeedback] | None = None,
    aux: Mapping[str, F32] | None = None,
) -> tuple[tuple[TensorSpec, ...], tuple[bytes, ...]]:
    """Encode an update's tensors (``new - global``) with ``codec``.

    With ``feedback`` (one :class:`~kernels.codec.ErrorFeedback` per tensor
    name, built on the same codec) the residuals carry what compression
    dropped into later rounds. ``aux`` vectors (names must start with
    ``"aux/"``) go raw. Returns the tensor specs and payloads for a
    :class:`~edge.wire.ModelUpdate`.
    """
    c = get_codec(codec)
    config = c.get_config()
    specs: list[TensorSpec] = []
    payloads: list[bytes] = []
    for name, arr in delta.items():
        flat = np.ascontiguousarray(arr, dtype=np.float32).ravel()
        ef = None if feedback is None else feedback.get(name)
        payloads.append(c.encode(flat) if ef is None else ef.encode(flat))
        specs.append(TensorSpec(name, tuple(arr.shape), config))
    raw = get_codec(RAW)
    for name, vec in (aux or {}).items():
        if not name.startswith(AUX_PREFIX):
            raise LayoutError(f"extra tensor {name!r} must be named {AUX_PREFIX}...")
        flat = np.ascontiguousarray(vec, dtype=np.float32).ravel()
        specs.append(TensorSpec(name, (flat.size,), raw.get_config()))
        payloads.append(raw.encode(flat))
    return tuple(specs), tuple(payloads)


def decode_update(
    update: ModelUpdate,
    layout: ModelLayout,
    out: F32,
    *,
    aux: Mapping[str, int] | None = None,
) -> dict[str, F32]:
    """Decode the model tensors of ``update`` into the flat vector ``out``; return aux vectors.

    Raises :class:`LayoutError` (names, shapes, codecs, corrupt payloads) before
    or instead of returning; ``out`` may then hold partial data, so decode into
    scratch space, never into an accumulator.
    """
    layout.check_specs(update.tensors, aux=aux)
    if out.shape != (layout.size,):
        raise LayoutError(f"output has shape {out.shape}, the layout needs ({layout.size},)")
    aux_out: dict[str, F32] = {}
    specs = iter(zip(update.tensors, update.payloads, strict=True))
    for (_name, _shape, sl), (spec, payload) in zip(layout.slices(), specs, strict=False):
        try:
            _codec_for(spec).decode(payload, out[sl])
        except CodecError as exc:
            raise LayoutError(f"tensor {spec.name!r}: {exc}") from None
    for spec, payload in specs:
        vec = np.empty(spec.size, dtype=np.float32)
        try:
            _codec_for(spec).decode(payload, vec)
        except CodecError as exc:
            raise LayoutError(f"tensor {spec.name!r}: {exc}") from None
        aux_out[spec.name] = vec
    return aux_out


def accumulate_update(update: ModelUpdate, layout: ModelLayout, acc: F32, weight: float) -> None:
    """Add ``weight`` x the update's model tensors to the flat accumulator ``acc``.

    Uses each codec's fused decode-and-accumulate kernel. Call it only for an
    update that :func:`decode_update` already accepted: the payloads are then
    known to decode, so the accumulator is never left half-updated.
    """
    for (_name, _shape, sl), spec, payload in zip(
        layout.slices(), update.tensors, update.payloads, strict=False
    ):
        _codec_for(spec).decode_accumulate(payload, acc[sl], weight)
