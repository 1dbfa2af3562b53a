"""Validation of device updates before anything touches the model.

This module owns the content checks of an update; the round machine
(:mod:`server_stub.rounds`) owns the task checks (task id, round, nonce, duplicates).
Order, cheapest and most fundamental first; every failure is a :class:`Rejected` with a
reason code that goes into logs and metrics:

1. ``bad_envelope``: not a parseable update envelope (magic, CRC, header, size).
2. ``bad_signature``: HMAC missing or wrong (per-device keys when configured).
3. ``wrong_cid``: the header's ``cid`` is not the device whose topic carried it.
4. (task checks in the round machine)
5. ``layout_mismatch``: tensor names/shapes differ from the model (``ModelLayout.check_specs``),
   or a required aux tensor (SCAFFOLD's ``aux/scaffold``) is missing.
6. ``corrupt_payload``: a codec could not decode a tensor.
7. ``non_finite``: NaN or infinity in the decoded update.
8. ``norm_too_large``: L2 norm above ``max_update_norm``.
9. ``bad_num_examples``: ``num_examples`` is 0, or more than the device reported having.

Decoding goes into one preallocated scratch vector (``edge.modelio.decode_update``), so a bad
update never leaves a half-written accumulator behind. Nothing here raises on bad input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from edge.modelio import F32, LayoutError, ModelLayout, decode_update
from edge.wire import KeyLookup, ModelUpdate, SignatureError, WireError

SCAFFOLD_DELTA_AUX = "aux/scaffold"
"""Name of the SCAFFOLD control-variate change Δc_i in an update (flat, length = model size)."""
SCAFFOLD_C_AUX = "aux/scaffold_c"
"""Name of the server control variate ``c`` in the global model envelope (flat)."""


class RejectCode(StrEnum):
    """Reasons an update is rejected (the round machine adds its own task-level codes)."""

    BAD_ENVELOPE = "bad_envelope"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CID = "wrong_cid"
    LAYOUT_MISMATCH = "layout_mismatch"
    CORRUPT_PAYLOAD = "corrupt_payload"
    NON_FINITE = "non_finite"
    NORM_TOO_LARGE = "norm_too_large"
    BAD_NUM_EXAMPLES = "bad_num_examples"
    BAD_CHUNK = "bad_chunk"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A failed check."""

    reason: RejectCode
    detail: str


@dataclass(frozen=True, slots=True)
class Decoded:
    """A valid update, decoded into the validator's scratch vector."""

    update: ModelUpdate
    delta: F32
    """View of the scratch vector: valid until the next :meth:`UpdateValidator.decode`."""
    aux: dict[str, F32]
    norm: float


class UpdateValidator:
    """Checks updates of one model; holds the one scratch vector they are decoded into.

    Parameters
    ----------
    layout
        The model's tensors.
    keys
        HMAC key lookup by cid (None: no keys configured).
    require_signature
        Reject unsigned updates even from devices without a key.
    max_update_norm
        Reject updates whose L2 norm exceeds this (None: no bound).
    max_envelope_size
        Largest envelope accepted, in bytes.
    aux
        Extra tensors every update must carry, name → length (SCAFFOLD: Δc).
    """

    def __init__(
        self,
        layout: ModelLayout,
        *,
        keys: KeyLookup | None = None,
        require_signature: bool = False,
        max_update_norm: float | None = None,
        max_envelope_size: int = 64 * 1024 * 1024,
        aux: Mapping[str, int] | None = None,
    ) -> None:
        self.layout = layout
        self.keys = keys
        self.require_signature = require_signature
        self.max_update_norm = max_update_norm
        self.max_envelope_size = max_envelope_size
        self.aux = dict(aux or {})
        self._scratch: F32 = np.empty(layout.size, dtype=np.float32)

    def parse(self, data: bytes, topic_cid: str) -> ModelUpdate | Rejected:
        """Steps 1-3: envelope, signature and sender."""
        try:
            update = ModelUpdate.from_bytes(
                data,
                self.keys,
                max_size=self.max_envelope_size,
                require_signature=self.require_signature,
            )
        except SignatureError as exc:
            return Rejected(RejectCode.BAD_SIGNATURE, str(exc))
        except (WireError, ValueError, TypeError, OverflowError) as exc:
            return Rejected(RejectCode.BAD_ENVELOPE, str(exc))
        if update.cid != topic_cid:
            return Rejected(
                RejectCode.WRONG_CID,
                f"envelope says cid={update.cid!r}, it came on {topic_cid!r}'s topic",
            )
        return update

    def decode(self, update: ModelUpdate, *, max_examples: int | None = None) -> Decoded | Rejected:
        """Steps 5-9: decode into the scratch vector and check it."""
        if update.num_examples <= 0:
            return Rejected(RejectCode.BAD_NUM_EXAMPLES, "num_examples must be > 0")
        if max_examples is not None and max_examples > 0 and update.num_examples > max_examples:
            return Rejected(
                RejectCode.BAD_NUM_EXAMPLES,
                f"num_examples={update.num_examples} > the {max_examples} the device reported",
            )
        try:
            self.layout.check_specs(update.tensors, aux=self.aux)
        except LayoutError as exc:
            return Rejected(RejectCode.LAYOUT_MISMATCH, str(exc))
        names = {t.name for t in update.tensors}
        missing = sorted(set(self.aux) - names)
        if missing:
            return Rejected(RejectCode.LAYOUT_MISMATCH, f"missing extra tensors {missing}")
        try:
            aux = decode_update(update, self.layout, self._scratch, aux=self.aux)
        except (LayoutError, ValueError) as exc:
            # Codecs refuse non-finite values while decoding; report them as such.
            code = RejectCode.NON_FINITE if "non-finite" in str(exc) else RejectCode.CORRUPT_PAYLOAD
            return Rejected(code, str(exc))
        if not np.isfinite(self._scratch).all() or not all(
            np.isfinite(v).all() for v in aux.values()
        ):
            return Rejected(RejectCode.NON_FINITE, "update contains NaN or infinity")
        # BLAS dot (float32, pairwise): precise enough for a bound and 40x faster than the
        # float64 chunked update_norm; an overflow gives inf, which fails any bound.
        with np.errstate(over="ignore"):
            norm = float(np.sqrt(np.dot(self._scratch, self._scratch)))
        if self.max_update_norm is not None and norm > self.max_update_norm:
            return Rejected(
                RejectCode.NORM_TOO_LARGE,
                f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}",
            )
        return Decoded(update, self._scratch, aux, norm)


__all__ = [
    "SCAFFOLD_C_AUX",
    "SCAFFOLD_DELTA_AUX",
    "Decoded",
    "RejectCode",
    "Rejected",
    "UpdateValidator",
]
