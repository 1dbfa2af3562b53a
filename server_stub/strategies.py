"""Federated strategies: what devices are told to do, and how their updates become a model.

This module owns the :class:`Strategy` lifecycle and every server-side update rule. Rules:

- A strategy is a set of hooks and nothing else (Flower's ``Strategy``):
  :meth:`Strategy.configure_round` says how selected devices train, and the streaming trio
  :meth:`~Strategy.begin_round` / :meth:`~Strategy.accept` / :meth:`~Strategy.finish` turns
  the accepted updates of one round into the next model. :meth:`Strategy.aggregate` runs the
  trio over a list, for tests and small fleets.
- Updates are *deltas* (device model − global model), decoded or still encoded
  (``(codec, payload)``). Mean-based strategies decode straight into one float32 accumulator,
  so memory is O(model) however many devices report. :class:`CoordinateMedian` and
  :class:`TrimmedMean` need every update and keep a :class:`~server_stub.aggregation.BoundedBuffer`
  of ``capacity × model`` floats instead.
- A bad update is *data*: :meth:`Strategy.accept` returns a :class:`Verdict` with a
  :class:`RejectReason`; nothing rejected touches the model. ``finish`` returns None (keep the
  old model) when too few updates were accepted, and logs why.
- Server optimizer state (momentum, Adam moments, SCAFFOLD's control variate) goes in and out
  as ``dict[str, np.ndarray]`` through :meth:`Strategy.state_dict` and
  :meth:`Strategy.load_state_dict`, for checkpoints.
- Pure: no clock, no randomness, no I/O.

Equations (Δ_i is a device's delta, Δ̄ the weighted mean of the round's deltas):

- FedAvg / FedProx: ``x ← x + Δ̄``.
- FedAvgM (Hsu et al. 2019): ``v ← βv + Δ̄``; ``x ← x + η v``.
- FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2): ``m ← β1 m + (1−β1) Δ̄``;
  Adam ``v ← β2 v + (1−β2) Δ̄²``, Yogi ``v ← v − (1−β2) Δ̄² sign(v − Δ̄²)``;
  ``x ← x + η m / (√v + τ)``, with ``m₀ = 0`` and ``v₀ = τ²``.
- SCAFFOLD (Karimireddy et al. 2020, Algorithm 1): ``x ← x + η_g Δ̄``;
  ``c ← c + (|S|/N) mean(Δc_i)``.
- FedBuff (Nguyen et al. 2022): ``x ← x + η Σ s(τ_i) Δ_i / B`` every B updates, with
  ``s(τ) = 1/√(1+τ)``.
"""

from __future__ import annotations

import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np

from kernels.errors import CodecError
from server_stub.aggregation import (
    BoundedBuffer,
    BufferFullError,
    Float32Vector,
    InvalidWeightError,
    NonFiniteUpdateError,
    UpdateShapeError,
    UpdateSource,
    WeightedMean,
    clip_by_norm,
    coordinate_median,
    decode_into,
    reset_or_new_mean,
    trimmed_mean,
)

logger = logging.getLogger(__name__)

JSONScalar: TypeAlias = str | int | float | bool | None
WeightBy: TypeAlias = Literal["examples", "examples*capability", "uniform"]
WEIGHT_BY_CHOICES: tuple[str, ...] = ("examples", "examples*capability", "uniform")


# ---------------------------------------------------------------------------------------------
# Errors


class StrategyError(ValueError):
    """Base class of the errors this module raises."""


class StrategyConfigError(StrategyError):
    """A strategy was configured with an unknown name, a missing or an out-of-range parameter."""


class UnknownStrategyError(StrategyConfigError):
    """``make_strategy`` got a name that is not a registered strategy id."""


class StrategyStateError(StrategyError):
    """The lifecycle was misused (``accept`` before ``begin_round``) or a state dict is wrong."""


# ---------------------------------------------------------------------------------------------
# Data


def _real(
    name: str,
    value: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Return ``value`` as a float, or raise a :class:`StrategyConfigError` that names the range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StrategyConfigError(f"{name} must be a number, got {value!r}")
    out = float(value)
    lo_ok = lo is None or (out > lo if lo_open else out >= lo)
    hi_ok = hi is None or (out < hi if hi_open else out <= hi)
    if not (math.isfinite(out) and lo_ok and hi_ok):
        lo_txt = "" if lo is None else f"{'(' if lo_open else '['}{lo}"
        hi_txt = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
        raise StrategyConfigError(
            f"{name} must be a finite number in {lo_txt or '(-inf'}, {hi_txt or 'inf)'}, "
            f"got {value!r}"
        )
    return out


def _integer(name: str, value: object, *, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StrategyConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise StrategyConfigError(f"{name} must be >= {lo}, got {value!r}")
    return value


def _weight_by(value: object) -> WeightBy:
    if value == "examples":
        return "examples"
    if value == "examples*capability":
        return "examples*capability"
    if value == "uniform":
        return "uniform"
    raise StrategyConfigError(f"weight_by must be one of {WEIGHT_BY_CHOICES}, got {value!r}")


@dataclass(frozen=True, slots=True)
class TrainParams:
    """Local training settings sent to one device in its task."""

    epochs: int = 1
    """Local epochs over the device's data."""
    batch_size: int = 32
    """Local minibatch size."""
    lr: float = 0.01
    """Local (client) learning rate."""
    prox_mu: float = 0.0
    """FedProx proximal coefficient μ; 0 means plain local SGD."""
    extra: Mapping[str, JSONScalar] = field(default_factory=dict)
    """Further JSON-safe settings passed to the trainer unchanged."""

    def __post_init__(self) -> None:
        _integer("epochs", self.epochs, lo=1)
        _integer("batch_size", self.batch_size, lo=1)
        _real("lr", self.lr, lo=0.0, lo_open=True)
        _real("prox_mu", self.prox_mu, lo=0.0)
        if not isinstance(self.extra, Mapping):
            raise StrategyConfigError(f"extra must be a table of settings, got {self.extra!r}")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


@dataclass(frozen=True, slots=True)
class RoundConfig:
    """What :meth:`Strategy.configure_round` decided for one round."""

    round_no: int
    """The round (for FedBuff: the model version devices start from)."""
    train: Mapping[str, TrainParams]
    """Training settings per selected device id."""
    send_control_variate: bool = False
    """True for SCAFFOLD: tasks carry the server control variate ``c``, updates must carry Δc_i."""
    control_variate: Float32Vector | None = None
    """Read-only view of the server control variate ``c`` when ``send_control_variate``.

    None before the first round (the strategy does not know the model size yet): devices
    then start from ``c = 0``, which is what SCAFFOLD initialises ``c`` to."""


@dataclass(frozen=True, slots=True)
class AcceptedUpdate:
    """One device update that passed the coordinator's checks (envelope, task id, nonce)."""

    cid: str
    """Device id."""
    num_examples: int
    """Examples the device trained on this round."""
    delta: UpdateSource
    """Device model − global model: a float32 vector or a ``(codec, payload)`` pair."""
    capability: float = 1.0
    """Device capability score (≥ 0) for ``weight_by="examples*capability"``."""
    staleness: int = 0
    """Model versions between the one the device trained on and the current one (FedBuff)."""
    control_delta: UpdateSource | None = None
    """SCAFFOLD: the device's control-variate change Δc_i = c_i⁺ − c_i."""

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise StrategyError(f"num_examples must be >= 0, got {self.num_examples}")
        if self.staleness < 0:
            raise StrategyError(f"staleness must be >= 0, got {self.staleness}")
        if not (math.isfinite(self.capability) and self.capability >= 0.0):
            raise StrategyError(f"capability must be finite and >= 0, got {self.capability!r}")


@dataclass(frozen=True, slots=True)
class FailedUpdate:
    """A selected device that did not deliver a usable update (timeout, decline, error)."""

    cid: str
    reason: str


class RejectReason(StrEnum):
    """Why :meth:`Strategy.accept` refused an update; the value is the code for logs and metrics."""

    DUPLICATE = "duplicate"
    """The device already contributed to this round."""
    NO_WEIGHT = "no_weight"
    """The update's aggregation weight is zero (no examples, zero capability)."""
    SHAPE_MISMATCH = "shape_mismatch"
    """The decoded update is not a vector of the model's size."""
    NON_FINITE = "non_finite"
    """The update contains NaN or infinity."""
    CORRUPT_PAYLOAD = "corrupt_payload"
    """The codec could not decode the payload."""
    MISSING_CONTROL_VARIATE = "missing_control_variate"
    """SCAFFOLD needs Δc_i with every update."""
    BUFFER_FULL = "buffer_full"
    """The strategy's buffer is full (median/trimmed mean capacity, or FedBuff awaiting finish)."""
    TOO_STALE = "too_stale"
    """FedBuff: staleness above ``max_staleness``."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :meth:`Strategy.accept`."""

    accepted: bool
    reason: RejectReason | None = None
    """Why the update was rejected; None when accepted."""
    ready: bool = False
    """FedBuff: the buffer reached ``buffer_size``; call :meth:`Strategy.finish` now."""
    detail: str = ""
    """Human-readable detail for the log line."""


ACCEPTED = Verdict(accepted=True)


@dataclass(frozen=True, slots=True)
class AggregateResult:
    """A new global model and how it was made."""

    model: Float32Vector
    num_updates: int
    """Updates that went into the model."""
    num_examples: int
    """Sum of their ``num_examples``."""
    rejected: Mapping[RejectReason, int]
    """How many updates were rejected, by reason."""


# ---------------------------------------------------------------------------------------------
# Base class


def _as_model(global_model: Float32Vector) -> Float32Vector:
    if global_model.ndim != 1 or global_model.dtype != np.float32:
        raise StrategyStateError(
            f"the global model must be a flat float32 vector, "
            f"got shape {global_model.shape} dtype {global_model.dtype}"
        )
    return global_model


class Strategy(ABC):
    """Lifecycle hooks of a federated strategy.

    Synchronous use, one round::

        config = strategy.configure_round(round_no, selected)   # -> tasks
        strategy.begin_round(model, round_no=round_no)
        verdict = strategy.accept(update)                       # per update, as it arrives
        new_model = strategy.finish()                           # None: keep the old model

    ``finish`` never modifies the array passed to ``begin_round``; it returns a new one.
    Server optimizer state changes only when ``finish`` returns a model.
    """

    strategy_id: ClassVar[str]
    """The name :func:`make_strategy` knows this class by."""
    state_keys: ClassVar[tuple[str, ...]] = ()
    """Names of the server-state vectors in :meth:`state_dict`."""
    reject_duplicate_cids: ClassVar[bool] = True
    """Whether one device may contribute only once per round."""

    def __init__(self, *, train: TrainParams | None = None, min_updates: int = 1) -> None:
        self.train = train if train is not None else TrainParams()
        """Training settings sent to every selected device."""
        self.min_updates = _integer("min_updates", min_updates, lo=1)
        """``finish`` keeps the old model when fewer updates were accepted."""
        self._state: dict[str, Float32Vector] = {}
        self._model: Float32Vector | None = None
        self._round_no: int | None = None
        self._cids: set[str] = set()
        self._num_accepted = 0
        self._num_examples = 0
        self._rejected: Counter[RejectReason] = Counter()

    # -- configuration -------------------------------------------------------------------------

    def train_params(self) -> TrainParams:
        """Return the training settings for this round's devices (FedProx adds ``prox_mu``)."""
        return self.train

    def configure_round(self, round_no: int, selected: Sequence[str]) -> RoundConfig:
        """Return the training settings for each selected device."""
        params = self.train_params()
        return RoundConfig(round_no=round_no, train=dict.fromkeys(selected, params))

    # -- streaming aggregation -------------------------------------------------------------------

    def begin_round(self, global_model: Float32Vector, *, round_no: int | None = None) -> None:
        """Start collecting updates against ``global_model`` (not copied; do not modify it).

        Calling it again before ``finish`` abandons the open round: its updates are dropped
        and the server state is untouched.
        """
        model = _as_model(global_model)
        size = int(model.shape[0])
        if self._state:
            self._check_state_size(size)
        else:
            self._init_state(size)
        self._prepare(size)
        self._model = model
        self._round_no = round_no
        self._cids.clear()
        self._num_accepted = 0
        self._num_examples = 0
        self._rejected.clear()

    def accept(self, update: AcceptedUpdate) -> Verdict:
        """Fold ``update`` into the round, or say why not.

        Returns
        -------
        Verdict
            ``accepted`` and, for FedBuff, ``ready``; otherwise a :class:`RejectReason`.
            A rejected update leaves the round's aggregate unchanged.

        Raises
        ------
        StrategyStateError
            Called outside ``begin_round`` … ``finish``.
        """
        if self._model is None:
            raise StrategyStateError("accept() called before begin_round()")
        if self.reject_duplicate_cids and update.cid in self._cids:
            verdict = Verdict(False, RejectReason.DUPLICATE, detail=f"{update.cid} already in")
        else:
            try:
                verdict = self._accept(update)
            except UpdateShapeError as exc:
                verdict = Verdict(False, RejectReason.SHAPE_MISMATCH, detail=str(exc))
            except NonFiniteUpdateError as exc:
                verdict = Verdict(False, RejectReason.NON_FINITE, detail=str(exc))
            except InvalidWeightError as exc:
                verdict = Verdict(False, RejectReason.NO_WEIGHT, detail=str(exc))
            except BufferFullError as exc:
                verdict = Verdict(False, RejectReason.BUFFER_FULL, detail=str(exc))
            except CodecError as exc:
                verdict = Verdict(False, RejectReason.CORRUPT_PAYLOAD, detail=str(exc))
        if verdict.accepted:
            self._cids.add(update.cid)
            self._num_accepted += 1
            self._num_examples += update.num_examples
        else:
            assert verdict.reason is not None
            self._rejected[verdict.reason] += 1
            logger.info(
                "%s: rejected update from %s: %s %s",
                self.strategy_id,
                update.cid,
                verdict.reason.value,
                verdict.detail,
            )
        return verdict

    def finish(self) -> Float32Vector | None:
        """Close the round; return the new model, or None to keep the old one (logged)."""
        if self._model is None:
            raise StrategyStateError("finish() called before begin_round()")
        model, self._model = self._model, None
        if self._num_accepted < self.min_updates:
            logger.warning(
                "%s round %s: %d accepted update(s) < min_updates=%d (rejected: %s); "
                "keeping the current model",
                self.strategy_id,
                self._round_no,
                self._num_accepted,
                self.min_updates,
                dict(self._rejected),
            )
            return None
        return self._finish(model)

    @property
    def num_accepted(self) -> int:
        """Updates accepted in the current (or last) round."""
        return self._num_accepted

    @property
    def rejected(self) -> Mapping[RejectReason, int]:
        """Rejections in the current (or last) round, by reason."""
        return MappingProxyType(dict(self._rejected))

    def aggregate(
        self,
        round_no: int,
        global_model: Float32Vector,
        accepted: Sequence[AcceptedUpdate],
        failures: Sequence[FailedUpdate] = (),
    ) -> AggregateResult | None:
        """Aggregate a whole round's updates at once; None keeps the old model.

        Failures do not stop the round (they are logged); quorum is ``min_updates``.
        """
        if failures:
            logger.info(
                "%s round %d: %d device(s) failed: %s",
                self.strategy_id,
                round_no,
                len(failures),
                ", ".join(f"{f.cid} ({f.reason})" for f in failures),
            )
        self.begin_round(global_model, round_no=round_no)
        for update in accepted:
            self.accept(update)
        num_updates, num_examples = self._num_accepted, self._num_examples
        model = self.finish()
        if model is None:
            return None
        return AggregateResult(model, num_updates, num_examples, self.rejected)

    # -- server state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return copies of the server optimizer state (empty before the first round)."""
        return {name: vec.copy() for name, vec in self._state.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore server state saved by :meth:`state_dict` (copied in).

        Raises
        ------
        StrategyStateError
            Keys differ from :attr:`state_keys`, or a vector is not flat float32 of a common size.
        """
        if not state:
            self._state = {}
            return
        if set(state) != set(self.state_keys):
            raise StrategyStateError(
                f"{self.strategy_id} state needs keys {sorted(self.state_keys)}, "
                f"got {sorted(state)}"
            )
        sizes = {np.shape(vec) for vec in state.values()}
        loaded: dict[str, Float32Vector] = {}
        for name in self.state_keys:
            vec = np.asarray(state[name])
            if vec.ndim != 1 or vec.dtype != np.float32 or len(sizes) != 1:
                raise StrategyStateError(
                    f"{self.strategy_id} state {name!r} must be a flat float32 vector of the "
                    f"same size as the others, got shape {vec.shape} dtype {vec.dtype}"
                )
            loaded[name] = vec.copy()
        self._state = loaded

    def _check_state_size(self, size: int) -> None:
        for name, vec in self._state.items():
            if vec.shape[0] != size:
                raise StrategyStateError(
                    f"{self.strategy_id} state {name!r} has {vec.shape[0]} elements but the "
                    f"model has {size}; load a state saved for this model"
                )

    def _init_state(self, size: int) -> None:
        """Create fresh server state for a model of ``size`` parameters (none by default)."""
        self._state = {}

    # -- subclass hooks --------------------------------------------------------------------------

    @abstractmethod
    def _prepare(self, size: int) -> None:
        """Reset (allocating once per model size) the round's accumulators."""

    @abstractmethod
    def _accept(self, update: AcceptedUpdate) -> Verdict:
        """Fold one update in; raise aggregation/codec errors or return a rejecting verdict."""

    @abstractmethod
    def _finish(self, global_model: Float32Vector) -> Float32Vector | None:
        """Return the new model from the round's aggregate (at least ``min_updates`` accepted)."""


# ---------------------------------------------------------------------------------------------
# Weighted-mean family


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): ``x ← x + Σ w_i Δ_i / Σ w_i``.

    ``weight_by="examples"`` weights by ``num_examples``; ``"examples*capability"`` also by the
    update's capability score (the seed's adaptive aggregation); ``"uniform"`` weights each
    device equally. Memory: one float32 accumulator (plus a scratch vector for decoded input).
    """

    strategy_id = "fedavg"

    def __init__(
        self,
        *,
        weight_by: WeightBy = "examples",
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(train=train, min_updates=min_updates)
        self.weight_by: WeightBy = _weight_by(weight_by)
        self._mean: WeightedMean | None = None

    def _prepare(self, size: int) -> None:
        self._mean = reset_or_new_mean(self._mean, size)

    def _weight(self, update: AcceptedUpdate) -> float:
        if self.weight_by == "uniform":
            return 1.0
        if self.weight_by == "examples":
            return float(update.num_examples)
        return float(update.num_examples) * update.capability

    def _accept(self, update: AcceptedUpdate) -> Verdict:
        assert self._mean is not None
        weight = self._weight(update)
        if weight <= 0.0:
            return Verdict(False, RejectReason.NO_WEIGHT, detail=f"weight_by={self.weight_by}")
        self._mean.add(update.delta, weight)
        return ACCEPTED

    def _mean_delta(self) -> Float32Vector | None:
        assert self._mean is not None
        return self._mean.result()

    def _finish(self, global_model: Float32Vector) -> Float32Vector | None:
        delta = self._mean_delta()
        if delta is None:
            return None
        return self._apply(global_model, delta)

    def _apply(self, global_model: Float32Vector, mean_delta: Float32Vector) -> Float32Vector:
        """Turn the round's mean delta into the new model (server optimizers override)."""
        np.add(global_model, mean_delta, out=mean_delta)
        return mean_delta


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation; devices add ``μ/2 ‖w − w_global‖²``."""

    strategy_id = "fedprox"

    def __init__(
        self,
        *,
        mu: float = 0.01,
        weight_by: WeightBy = "examples",
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(weight_by=weight_by, train=train, min_updates=min_updates)
        self.mu = _real("mu", mu, lo=0.0)
        """Proximal coefficient sent to devices as ``prox_mu``."""

    def train_params(self) -> TrainParams:
        """Return the base settings with ``prox_mu = mu``."""
        t = self.train
        return TrainParams(t.epochs, t.batch_size, t.lr, self.mu, t.extra)


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019): ``v ← βv + Δ̄``; ``x ← x + η v``."""

    strategy_id = "fedavgm"
    state_keys = ("momentum",)

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        weight_by: WeightBy = "examples",
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(weight_by=weight_by, train=train, min_updates=min_updates)
        self.server_lr = _real("server_lr", server_lr, lo=0.0, lo_open=True)
        self.momentum = _real("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)

    def _init_state(self, size: int) -> None:
        self._state = {"momentum": np.zeros(size, dtype=np.float32)}

    def _apply(self, global_model: Float32Vector, mean_delta: Float32Vector) -> Float32Vector:
        v = self._state["momentum"]
        v *= np.float32(self.momentum)
        v += mean_delta
        np.multiply(v, np.float32(self.server_lr), out=mean_delta)
        mean_delta += global_model
        return mean_delta


class _AdaptiveServerOpt(FedAvg):
    """Shared body of FedAdam and FedYogi (Reddi et al. 2021, Algorithm 2)."""

    state_keys = ("m", "v")

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weight_by: WeightBy = "examples",
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(weight_by=weight_by, train=train, min_updates=min_updates)
        self.server_lr = _real("server_lr", server_lr, lo=0.0, lo_open=True)
        """Server learning rate η."""
        self.beta1 = _real("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
        self.beta2 = _real("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
        self.tau = _real("tau", tau, lo=0.0, lo_open=True)
        """Adaptivity τ: bounds the step where ``v`` is small; also ``v₀ = τ²``."""

    def _init_state(self, size: int) -> None:
        self._state = {
            "m": np.zeros(size, dtype=np.float32),
            # Algorithm 2 requires v₋₁ ≥ τ².
            "v": np.full(size, self.tau * self.tau, dtype=np.float32),
        }

    @abstractmethod
    def _update_v(self, v: Float32Vector, delta_sq: Float32Vector) -> None:
        """Update the second moment ``v`` in place from ``Δ̄²``."""

    def _apply(self, global_model: Float32Vector, mean_delta: Float32Vector) -> Float32Vector:
        m, v = self._state["m"], self._state["v"]
        m *= np.float32(self.beta1)
        m += np.float32(1.0 - self.beta1) * mean_delta
        np.square(mean_delta, out=mean_delta)  # mean_delta now holds Δ̄²
        self._update_v(v, mean_delta)
        step = mean_delta
        np.sqrt(v, out=step)
        step += np.float32(self.tau)
        np.divide(m, step, out=step)
        step *= np.float32(self.server_lr)
        step += global_model
        return step


class FedAdam(_AdaptiveServerOpt):
    """FedAdam: ``v ← β2 v + (1−β2) Δ̄²``; ``x ← x + η m / (√v + τ)`` (no bias correction)."""

    strategy_id = "fedadam"

    def _update_v(self, v: Float32Vector, delta_sq: Float32Vector) -> None:
        v *= np.float32(self.beta2)
        v += np.float32(1.0 - self.beta2) * delta_sq


class FedYogi(_AdaptiveServerOpt):
    """FedYogi: ``v ← v − (1−β2) Δ̄² sign(v − Δ̄²)``; ``x ← x + η m / (√v + τ)``."""

    strategy_id = "fedyogi"

    def _update_v(self, v: Float32Vector, delta_sq: Float32Vector) -> None:
        v -= np.float32(1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)


class ClippedFedAvg(FedAvg):
    """FedAvg over deltas clipped to L2 norm ``max_norm``: ``Δ_i ← Δ_i · min(1, C/‖Δ_i‖)``.

    Needs the decoded delta for its norm, so an encoded update is decoded into one scratch
    vector first (memory: two model-sized vectors besides the accumulator).
    """

    strategy_id = "clipped"

    def __init__(
        self,
        *,
        max_norm: float,
        weight_by: WeightBy = "examples",
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(weight_by=weight_by, train=train, min_updates=min_updates)
        self.max_norm = _real("max_norm", max_norm, lo=0.0, lo_open=True)
        self._decoded: Float32Vector | None = None
        self.num_clipped = 0
        """Updates clipped in the current (or last) round."""

    def _prepare(self, size: int) -> None:
        super()._prepare(size)
        if self._decoded is None or self._decoded.shape[0] != size:
            self._decoded = np.empty(size, dtype=np.float32)
        self.num_clipped = 0

    def _accept(self, update: AcceptedUpdate) -> Verdict:
        assert self._mean is not None and self._decoded is not None
        weight = self._weight(update)
        if weight <= 0.0:
            return Verdict(False, RejectReason.NO_WEIGHT, detail=f"weight_by={self.weight_by}")
        decoded = decode_into(update.delta, self._decoded)
        _, scale = clip_by_norm(decoded, self.max_norm, out=decoded)
        self._mean.add(decoded, weight)
        self.num_clipped += scale < 1.0
        return ACCEPTED


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020), server side of Algorithm 1.

    Tasks carry the server control variate ``c``; each update carries the device's delta
    Δy_i and its control-variate change Δc_i (:attr:`AcceptedUpdate.control_delta`).
    ``x ← x + η_g Δ̄y`` with Δ̄y the (by default uniform) mean of the deltas, and
    ``c ← c + (|S|/N) mean(Δc_i)`` with |S| the accepted updates and N = ``num_clients``
    the fleet size (the ratio is capped at 1). Memory: two accumulators and one scratch vector.
    """

    strategy_id = "scaffold"
    state_keys = ("c",)

    def __init__(
        self,
        *,
        num_clients: int,
        server_lr: float = 1.0,
        weight_by: WeightBy = "uniform",
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(weight_by=weight_by, train=train, min_updates=min_updates)
        self.num_clients = _integer("num_clients", num_clients, lo=1)
        """N: devices in the fleet (update with :meth:`set_num_clients` as it changes)."""
        self.server_lr = _real("server_lr", server_lr, lo=0.0, lo_open=True)
        """Global step size η_g."""
        self._control_mean: WeightedMean | None = None
        self._control_scratch: Float32Vector | None = None

    def set_num_clients(self, num_clients: int) -> None:
        """Set the fleet size N used in ``c ← c + (|S|/N) mean(Δc_i)``."""
        self.num_clients = _integer("num_clients", num_clients, lo=1)

    @property
    def control_variate(self) -> Float32Vector | None:
        """Read-only view of ``c``; None before the first round."""
        c = self._state.get("c")
        if c is None:
            return None
        view = c.view()
        view.flags.writeable = False
        return view

    def configure_round(self, round_no: int, selected: Sequence[str]) -> RoundConfig:
        """Return the settings plus ``c`` (zeros until the first round has a model size)."""
        params = self.train_params()
        return RoundConfig(
            round_no=round_no,
            train=dict.fromkeys(selected, params),
            send_control_variate=True,
            control_variate=self.control_variate,
        )

    def _init_state(self, size: int) -> None:
        self._state = {"c": np.zeros(size, dtype=np.float32)}

    def _prepare(self, size: int) -> None:
        super()._prepare(size)
        if self._control_mean is None or self._control_mean.size != size:
            self._control_mean = WeightedMean(size)
            self._control_scratch = np.empty(size, dtype=np.float32)
        else:
            self._control_mean.reset()

    def _accept(self, update: AcceptedUpdate) -> Verdict:
        assert self._mean is not None and self._control_mean is not None
        assert self._control_scratch is not None
        if update.control_delta is None:
            return Verdict(False, RejectReason.MISSING_CONTROL_VARIATE)
        weight = self._weight(update)
        if weight <= 0.0:
            return Verdict(False, RejectReason.NO_WEIGHT, detail=f"weight_by={self.weight_by}")
        # Decode Δc_i first so that a bad control variate is refused before Δy_i is added:
        # the two accumulators must always hold the same set of devices.
        control = decode_into(update.control_delta, self._control_scratch)
        if not np.isfinite(control).all():
            raise NonFiniteUpdateError("control variate contains NaN or infinity")
        self._mean.add(update.delta, weight)
        self._control_mean.add(control, 1.0)
        return ACCEPTED

    def _apply(self, global_model: Float32Vector, mean_delta: Float32Vector) -> Float32Vector:
        assert self._control_mean is not None
        mean_control = self._control_mean.result()
        assert mean_control is not None  # at least one update was accepted
        ratio = min(1.0, self._num_accepted / self.num_clients)
        if self._num_accepted > self.num_clients:
            logger.warning(
                "scaffold: %d updates but num_clients=%d; capping |S|/N at 1",
                self._num_accepted,
                self.num_clients,
            )
        c = self._state["c"]
        c += np.float32(ratio) * mean_control
        mean_delta *= np.float32(self.server_lr)
        mean_delta += global_model
        return mean_delta


# ---------------------------------------------------------------------------------------------
# Robust statistics (bounded buffer)


class CoordinateMedian(Strategy):
    """``x ← x + median_i(Δ_i)`` per coordinate (Yin et al. 2018); unweighted.

    Needs every update of the round at once: it keeps a
    :class:`~server_stub.aggregation.BoundedBuffer` of ``capacity`` decoded deltas, allocated
    on the first round (memory ``capacity × model size × 4`` bytes). Updates past ``capacity``
    are rejected with :attr:`RejectReason.BUFFER_FULL`.
    """

    strategy_id = "median"

    def __init__(
        self, *, capacity: int = 64, train: TrainParams | None = None, min_updates: int = 1
    ) -> None:
        super().__init__(train=train, min_updates=min_updates)
        self.capacity = _integer("capacity", capacity, lo=1)
        self._buffer: BoundedBuffer | None = None

    def _prepare(self, size: int) -> None:
        if self._buffer is None or self._buffer.size != size:
            self._buffer = BoundedBuffer(size, self.capacity)
        else:
            self._buffer.reset()

    def _accept(self, update: AcceptedUpdate) -> Verdict:
        assert self._buffer is not None
        self._buffer.add(update.delta)
        return ACCEPTED

    def _robust_delta(self, rows: np.ndarray) -> Float32Vector:
        return coordinate_median(rows, overwrite_input=True)

    def _finish(self, global_model: Float32Vector) -> Float32Vector | None:
        assert self._buffer is not None
        delta = self._robust_delta(self._buffer.rows())
        self._buffer.reset()
        delta += global_model
        return delta


class TrimmedMean(CoordinateMedian):
    """``x ← x + trimmed_mean_β(Δ_i)`` per coordinate (Yin et al. 2018); unweighted.

    Drops the ``floor(β·n)`` largest and smallest values of each coordinate. Same bounded
    buffer (and memory) as :class:`CoordinateMedian`.
    """

    strategy_id = "trimmed_mean"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        capacity: int = 64,
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(capacity=capacity, train=train, min_updates=min_updates)
        self.beta = _real("beta", beta, lo=0.0, hi=0.5, hi_open=True)

    def _robust_delta(self, rows: np.ndarray) -> Float32Vector:
        return trimmed_mean(rows, self.beta, overwrite_input=True)


# ---------------------------------------------------------------------------------------------
# Asynchronous


def staleness_weight(staleness: int) -> float:
    """Return FedBuff's staleness weight ``1 / √(1 + s)``.

    Examples
    --------
    >>> staleness_weight(0), staleness_weight(3)
    (1.0, 0.5)
    """
    if staleness < 0:
        raise StrategyError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuff(Strategy):
    """Buffered asynchronous aggregation (Nguyen et al. 2022).

    Devices train continuously (at most ``concurrency`` at a time; the round machine enforces
    it) and report deltas against the model version they started from. ``staleness`` is
    current version − that version. Each accepted delta is added with weight
    ``s = 1/√(1+staleness)``; when ``buffer_size`` (B) updates are in, ``accept`` returns
    ``ready=True`` and ``finish`` applies ``x ← x + η Σ s_i Δ_i / B``. Note the division by the
    *count*, as in the paper, not by Σ s_i: stale updates shrink the step. Updates older than
    ``max_staleness`` are rejected with :attr:`RejectReason.TOO_STALE`; one device may appear
    more than once in a buffer. A buffer is not checkpointed: after a restart it starts empty.
    """

    strategy_id = "fedbuff"
    reject_duplicate_cids = False

    def __init__(
        self,
        *,
        buffer_size: int = 10,
        max_staleness: int = 10,
        server_lr: float = 1.0,
        concurrency: int = 100,
        train: TrainParams | None = None,
        min_updates: int = 1,
    ) -> None:
        super().__init__(train=train, min_updates=min_updates)
        self.buffer_size = _integer("buffer_size", buffer_size, lo=1)
        """B: updates per aggregation."""
        self.max_staleness = _integer("max_staleness", max_staleness, lo=0)
        self.server_lr = _real("server_lr", server_lr, lo=0.0, lo_open=True)
        self.concurrency = _integer("concurrency", concurrency, lo=1)
        """Most devices training at the same time (enforced by the round machine)."""
        self._mean: WeightedMean | None = None

    def _prepare(self, size: int) -> None:
        self._mean = reset_or_new_mean(self._mean, size)

    def _accept(self, update: AcceptedUpdate) -> Verdict:
        assert self._mean is not None
        if update.staleness > self.max_staleness:
            return Verdict(
                False,
                RejectReason.TOO_STALE,
                detail=f"staleness {update.staleness} > max_staleness {self.max_staleness}",
            )
        if self._mean.count >= self.buffer_size:
            return Verdict(
                False, RejectReason.BUFFER_FULL, detail="buffer full; call finish() first"
            )
        self._mean.add(update.delta, staleness_weight(update.staleness))
        return Verdict(True, ready=self._mean.count >= self.buffer_size)

    def _finish(self, global_model: Float32Vector) -> Float32Vector | None:
        assert self._mean is not None
        count = self._mean.count
        if count < self.buffer_size:
            logger.info("fedbuff: flushing %d of %d buffered updates", count, self.buffer_size)
        new = np.multiply(self._mean.weighted_sum, np.float32(self.server_lr / count))
        new += global_model
        self._mean.reset()
        return new


# ---------------------------------------------------------------------------------------------
# Registry

STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType(
    {
        cls.strategy_id: cls
        for cls in (
            FedAvg,
            FedProx,
            FedAvgM,
            FedAdam,
            FedYogi,
            Scaffold,
            ClippedFedAvg,
            CoordinateMedian,
            TrimmedMean,
            FedBuff,
        )
    }
)
"""Strategy classes by id."""

_TRAIN_KEYS = ("epochs", "batch_size", "lr", "extra")


def make_strategy(name: str, params: Mapping[str, object] | None = None) -> Strategy:
    """Build a strategy from its id and a flat parameter mapping (e.g. a TOML table).

    ``epochs``, ``batch_size``, ``lr`` and ``extra`` go into :class:`TrainParams`; every
    other key must be a keyword of the strategy's constructor.

    Raises
    ------
    UnknownStrategyError
        ``name`` is not one of :data:`STRATEGIES` (the message lists the valid ids).
    StrategyConfigError
        A parameter is unknown, missing or out of range (the message names it).

    Examples
    --------
    >>> make_strategy("fedprox", {"mu": 0.1, "epochs": 2}).train_params().prox_mu
    0.1
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; valid ids: {', '.join(STRATEGIES)}"
        ) from None
    kwargs: dict[str, Any] = dict(params or {})
    train_kwargs = {key: kwargs.pop(key) for key in _TRAIN_KEYS if key in kwargs}
    if "train" in kwargs:
        raise StrategyConfigError(
            f"give training settings as flat keys {_TRAIN_KEYS}, not a 'train' table"
        )
    signature = inspect.signature(cls)
    accepted = [p for p in signature.parameters if p != "train"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise StrategyConfigError(
            f"strategy {name!r} has no parameter(s) {unknown}; "
            f"valid: {sorted([*accepted, *_TRAIN_KEYS])}"
        )
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise StrategyConfigError(f"strategy {name!r} needs parameter(s) {missing}")
    train = TrainParams(**train_kwargs) if train_kwargs else None
    return cls(train=train, **kwargs)


__all__ = [
    "STRATEGIES",
    "WEIGHT_BY_CHOICES",
    "AcceptedUpdate",
    "AggregateResult",
    "ClippedFedAvg",
    "CoordinateMedian",
    "FailedUpdate",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "RejectReason",
    "RoundConfig",
    "Scaffold",
    "Strategy",
    "StrategyConfigError",
    "StrategyError",
    "StrategyStateError",
    "TrainParams",
    "TrimmedMean",
    "UnknownStrategyError",
    "Verdict",
    "WeightBy",
    "make_strategy",
    "staleness_weight",
]
