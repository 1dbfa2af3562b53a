"""Local training on the device: the model weights contract, the `Trainer` protocol, NumPy trainers.

This module owns

- the weights representation every other piece uses: `Weights`, an insertion-ordered
  ``dict[str, float32 array]`` named ``w0, b0, w1, b1, ...`` (layer ``l`` maps with
  ``h @ w{l} + b{l}``), with `flatten` / `unflatten` to and from one float32 vector;
- `ModelSpec`, `shapes` and `init_weights` (He uniform before a ReLU, Glorot uniform before
  the softmax, zero biases);
- the `Trainer` protocol that the agent drives. `NumpyTrainer` implements it here with
  hand-written backprop; ``edge.litert_training`` implements it for ``.tflite`` models;
- what every trainer's ``fit`` shares, so all trainers accept, batch and stop alike:
  `check_xy`, `check_fit_args`, `fit_batches` and the loop `run_sgd`;
- `gradient`, a pure function returning the mean softmax cross-entropy and its gradients.

Rules: everything is float32; nothing here reads a global RNG (batches come from the ``rng``
passed to `NumpyTrainer.fit`, or from an explicit ``batch_order``); the only clock is the one
handed to `NumpyTrainer` (``time.perf_counter`` by default) and it only measures throughput.

Local objective. With ``x`` the weights at `Trainer.set_weights` time (the global model), a
step on a batch uses ``grad f(w) + prox_mu * (w - x) + (c - c_i)``: FedProx (Li et al. 2020)
when ``prox_mu > 0`` and the SCAFFOLD correction (Karimireddy et al. 2020) when a
`ScaffoldControl` is given. After ``K`` steps with learning rate ``lr`` the new local control
variate is option II of the SCAFFOLD paper, ``c_i+ = c_i - c + (x - w) / (K * lr)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "F32",
    "I64",
    "EvalResult",
    "FitResult",
    "ModelSpec",
    "NumpyTrainer",
    "ScaffoldControl",
    "Trainer",
    "TrainingError",
    "Weights",
    "check_fit_args",
    "check_weights",
    "check_xy",
    "epoch_batches",
    "fit_batches",
    "flatten",
    "gradient",
    "init_weights",
    "run_sgd",
    "shapes",
    "unflatten",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Weights = dict[str, F32]
"""Model weights: ``w0, b0, w1, b1, ...`` in that order, each a float32 array."""

ModelKind = Literal["logreg", "mlp"]

_EVAL_BATCH = 1024  # bounds evaluate()'s activation memory on a Pi


class TrainingError(ValueError):
    """A bad argument to the training API: wrong shapes, labels, weights or hyperparameters."""


# --------------------------------------------------------------------------- model spec


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The architecture of a model; the weights follow from it (see `shapes`).

    Examples
    --------
    >>> ModelSpec("mlp", input_dim=64, num_classes=10, hidden=(32,))
    ModelSpec(kind='mlp', input_dim=64, num_classes=10, hidden=(32,))
    """

    kind: ModelKind
    """``"logreg"`` (multinomial logistic regression) or ``"mlp"`` (ReLU hidden layers)."""
    input_dim: int
    """Number of input features (a flattened image counts each pixel)."""
    num_classes: int
    """Number of classes; labels are integers in ``[0, num_classes)``."""
    hidden: tuple[int, ...] = ()
    """Hidden layer widths; empty for ``"logreg"``, at least one for ``"mlp"``."""

    def __post_init__(self) -> None:
        if self.kind not in ("logreg", "mlp"):
            raise TrainingError(f"unknown model kind {self.kind!r}; use 'logreg' or 'mlp'")
        if self.input_dim < 1:
            raise TrainingError(f"input_dim must be >= 1, got {self.input_dim}")
        if self.num_classes < 2:
            raise TrainingError(f"num_classes must be >= 2, got {self.num_classes}")
        if not isinstance(self.hidden, tuple):
            raise TrainingError(f"hidden must be a tuple of ints, got {self.hidden!r}")
        if self.kind == "logreg" and self.hidden:
            raise TrainingError("a 'logreg' model has no hidden layers; use kind='mlp'")
        if self.kind == "mlp" and not self.hidden:
            raise TrainingError("an 'mlp' needs hidden=(h1, ...); use kind='logreg' for none")
        if any(h < 1 for h in self.hidden):
            raise TrainingError(f"hidden layer widths must be >= 1, got {self.hidden}")

    @property
    def num_layers(self) -> int:
        """Number of affine layers (hidden layers + the output layer)."""
        return len(self.hidden) + 1

    @property
    def num_params(self) -> int:
        """Total number of scalar parameters."""
        return sum(math.prod(shape) for _, shape in shapes(self))


def shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Return the names and shapes of the weights of ``spec``, in `Weights` order.

    Examples
    --------
    >>> shapes(ModelSpec("mlp", 4, 3, hidden=(5,)))
    [('w0', (4, 5)), ('b0', (5,)), ('w1', (5, 3)), ('b1', (3,))]
    """
    dims = [spec.input_dim, *spec.hidden, spec.num_classes]
    out: list[tuple[str, tuple[int, ...]]] = []
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        out.append((f"w{layer}", (fan_in, fan_out)))
        out.append((f"b{layer}", (fan_out,)))
    return out


def init_weights(spec: ModelSpec, rng: np.random.Generator) -> Weights:
    """Draw initial weights: He uniform before a ReLU, Glorot uniform before the softmax.

    Biases start at zero. The same ``rng`` state gives the same weights.
    """
    weights: Weights = {}
    last = spec.num_layers - 1
    for name, shape in shapes(spec):
        if name.startswith("b"):
            weights[name] = np.zeros(shape, dtype=np.float32)
            continue
        fan_in, fan_out = shape
        if int(name[1:]) < last:
            limit = math.sqrt(6.0 / fan_in)  # He uniform: the next op is a ReLU
        else:
            limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform: softmax output
        weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return weights


def flatten(weights: Mapping[str, npt.NDArray[np.floating]]) -> F32:
    """Concatenate the tensors of ``weights``, in insertion order, into one float32 vector.

    Examples
    --------
    >>> flatten({"w0": np.ones((2, 2), np.float32), "b0": np.zeros(2, np.float32)})
    array([1., 1., 1., 1., 0., 0.], dtype=float32)
    """
    if not weights:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(t, dtype=np.float32).ravel() for t in weights.values()])


def unflatten(
    vec: npt.NDArray[np.floating], like: Mapping[str, npt.NDArray[np.generic]]
) -> Weights:
    """Split the 1-D ``vec`` into tensors named and shaped like ``like`` (the inverse of `flatten`).

    The result owns its memory (float32 copies), so ``vec`` may be reused afterwards.
    """
    flat = np.asarray(vec)
    if flat.ndim != 1:
        raise TrainingError(f"unflatten needs a 1-D vector, got shape {flat.shape}")
    expected = sum(int(np.asarray(t).size) for t in like.values())
    if flat.size != expected:
        raise TrainingError(
            f"vector has {flat.size} values but the weights need {expected}; "
            "was it flattened from a model with a different ModelSpec?"
        )
    out: Weights = {}
    offset = 0
    for name, tensor in like.items():
        shape = np.shape(tensor)
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].astype(np.float32).reshape(shape)
        offset += size
    return out


def check_weights(spec: ModelSpec, weights: Mapping[str, npt.NDArray[np.generic]]) -> Weights:
    """Return float32 copies of ``weights`` after checking names, order, shapes and finiteness."""
    expected = shapes(spec)
    names = list(weights)
    if names != [name for name, _ in expected]:
        raise TrainingError(
            f"weights are named {names}, but {spec} needs {[name for name, _ in expected]}"
        )
    out: Weights = {}
    for name, shape in expected:
        tensor = np.asarray(weights[name])
        if tensor.shape != shape:
            raise TrainingError(f"weight {name!r} has shape {tensor.shape}, {spec} needs {shape}")
        copy = tensor.astype(np.float32, copy=True)
        if not np.isfinite(copy).all():
            raise TrainingError(f"weight {name!r} contains NaN or Inf")
        out[name] = copy
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ScaffoldControl:
    """SCAFFOLD control variates sent with a task: the server's ``c`` and this device's ``c_i``.

    Both have the names and shapes of the model weights. A device that has none yet uses zeros.
    """

    c_global: Weights
    """The server control variate ``c``."""
    c_local: Weights
    """This device's control variate ``c_i`` (kept on the device between rounds)."""


@dataclass(frozen=True, slots=True)
class FitResult:
    """What one local training run did."""

    loss: float
    """Mean training loss over the batches of the last (possibly partial) epoch, without the
    proximal or SCAFFOLD terms. NaN when no step was taken (``num_steps == 0``)."""
    num_examples: int
    """Number of local training examples (the FedAvg weight)."""
    num_steps: int
    """Number of SGD steps taken (``K`` in SCAFFOLD, ``tau`` in FedNova)."""
    samples_per_s: float
    """Training throughput measured over this run (0.0 when no step was taken)."""
    stopped_early: bool
    """True when ``should_stop`` or ``max_steps`` ended the run before the last epoch did."""
    num_samples_seen: int = 0
    """Examples processed, counting repeats across epochs."""
    duration_s: float = 0.0
    """Wall time of the training loop, measured with the trainer's clock."""
    control_delta: Weights | None = None
    """SCAFFOLD: ``c_i+ - c_i`` to send to the server; None without a `ScaffoldControl`."""
    new_c_local: Weights | None = None
    """SCAFFOLD: ``c_i+``, the control variate the device keeps for its next round."""


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Loss and accuracy of a model on a data set."""

    loss: float
    """Mean softmax cross-entropy."""
    accuracy: float
    """Fraction of examples whose arg-max prediction equals the label."""
    num_examples: int
    """Number of examples evaluated."""


# --------------------------------------------------------------------------- protocol


class Trainer(Protocol):
    """What the device agent needs from a local trainer (NumPy here, LiteRT elsewhere).

    ``set_weights`` installs the global model, which is also the anchor ``x`` of the FedProx
    term and of the SCAFFOLD control update. ``fit`` polls ``should_stop`` before each batch
    and stops after ``max_steps`` steps.
    """

    spec: ModelSpec

    def set_weights(self, weights: Weights) -> None: ...

    def get_weights(self) -> Weights: ...

    def fit(
        self,
        x: F32,
        y: I64,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
        prox_mu: float = 0.0,
        control: ScaffoldControl | None = None,
        max_steps: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> FitResult: ...

    def evaluate(self, x: F32, y: I64) -> EvalResult: ...


# --------------------------------------------------------------------------- math


def _forward_backward(weights: Weights, x: F32, y: I64, *, grads: bool) -> tuple[float, Weights]:
    """Mean softmax cross-entropy of ``weights`` on ``(x, y)`` and, if asked, its gradients."""
    num_layers = len(weights) // 2
    n = x.shape[0]
    activations: list[F32] = [x]
    h = x
    logits = x
    for layer in range(num_layers):
        logits = h @ weights[f"w{layer}"] + weights[f"b{layer}"]
        if layer < num_layers - 1:
            h = np.maximum(logits, np.float32(0.0))
            activations.append(h)
    # log-softmax via log-sum-exp: subtracting the row max keeps exp() from overflowing.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = float(-log_probs[rows, y].mean(dtype=np.float64))
    if not grads:
        return loss, {}
    delta = np.exp(log_probs)
    delta[rows, y] -= np.float32(1.0)
    delta /= np.float32(n)
    out: Weights = {}
    for layer in range(num_layers - 1, -1, -1):
        a = activations[layer]
        out[f"w{layer}"] = (a.T @ delta).astype(np.float32, copy=False)
        out[f"b{layer}"] = delta.sum(axis=0, dtype=np.float32)
        if layer > 0:
            delta = (delta @ weights[f"w{layer}"].T) * (a > 0)
    return loss, {name: out[name] for name in weights}  # keep Weights order


def check_xy(spec: ModelSpec, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[F32, I64]:
    """Return ``(x, y)`` as float32 / int64 after checking them against ``spec``.

    Every trainer checks its examples here, so each one rejects the same inputs with the
    same `TrainingError`.
    """
    xa = np.asarray(x)
    ya = np.asarray(y)
    if xa.ndim != 2 or xa.shape[1] != spec.input_dim:
        raise TrainingError(f"x must have shape (N, {spec.input_dim}), got {xa.shape}")
    if ya.shape != (xa.shape[0],):
        raise TrainingError(f"y must have shape ({xa.shape[0]},) to match x, got {ya.shape}")
    if xa.shape[0] == 0:
        raise TrainingError("no examples: x and y are empty")
    if ya.dtype.kind not in "iu":
        raise TrainingError(f"labels must be integers, got dtype {ya.dtype}")
    if ya.min() < 0 or ya.max() >= spec.num_classes:
        raise TrainingError(
            f"labels must be in [0, {spec.num_classes}), got [{ya.min()}, {ya.max()}]"
        )
    return xa.astype(np.float32, copy=False), ya.astype(np.int64, copy=False)


def _infer_spec(weights: Mapping[str, npt.NDArray[np.generic]]) -> ModelSpec:
    num_layers = len(weights) // 2
    if num_layers == 0 or len(weights) % 2:
        raise TrainingError(f"weights must be w0, b0, w1, b1, ...; got {list(weights)}")
    try:
        dims = [np.shape(weights[f"w{layer}"]) for layer in range(num_layers)]
    except KeyError as exc:
        raise TrainingError(f"weights must be w0, b0, w1, b1, ...; got {list(weights)}") from exc
    if any(len(d) != 2 for d in dims):
        raise TrainingError(f"weight matrices must be 2-D, got shapes {dims}")
    hidden = tuple(int(d[1]) for d in dims[:-1])
    return ModelSpec(
        "mlp" if hidden else "logreg",
        input_dim=int(dims[0][0]),
        num_classes=int(dims[-1][1]),
        hidden=hidden,
    )


def gradient(
    weights: Mapping[str, npt.NDArray[np.generic]], x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[float, Weights]:
    """Return the mean softmax cross-entropy of ``weights`` on ``(x, y)`` and its gradients.

    A pure function: the architecture is read from the weight shapes, nothing is modified.
    The gradients have the names, order and shapes of ``weights``.

    Examples
    --------
    >>> w = init_weights(ModelSpec("logreg", 2, 3), np.random.default_rng(0))
    >>> loss, g = gradient(w, np.ones((4, 2), np.float32), np.array([0, 1, 2, 0]))
    >>> [(name, t.shape) for name, t in g.items()]
    [('w0', (2, 3)), ('b0', (3,))]
    """
    spec = _infer_spec(weights)
    checked = check_weights(spec, weights)
    xa, ya = check_xy(spec, x, y)
    return _forward_backward(checked, xa, ya, grads=True)


def epoch_batches(num_examples: int, batch_size: int, rng: np.random.Generator) -> list[I64]:
    """Return one epoch's mini-batches: ``rng.permutation(num_examples)`` cut into ``batch_size``.

    The last batch is smaller when ``batch_size`` does not divide ``num_examples``. Trainers
    that call this with the same ``rng`` state see the same batches (`NumpyTrainer.fit` does,
    once per epoch).
    """
    if num_examples < 1 or batch_size < 1:
        raise TrainingError(
            f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}"
        )
    order = rng.permutation(num_examples).astype(np.int64)
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def fit_batches(
    epoch: int,
    n: int,
    batch_size: int,
    rng: np.random.Generator,
    batch_order: Sequence[Sequence[npt.NDArray[np.integer]]] | None,
) -> Iterator[I64]:
    """Yield the batches of epoch ``epoch`` of a ``fit``: from ``rng``, or ``batch_order[epoch]``.

    Without ``batch_order`` the batches are ``epoch_batches(n, batch_size, rng)``. With it, each
    given batch is checked to be a non-empty 1-D index array into ``[0, n)``. Every trainer's
    ``fit`` takes its batches from here, so the same arguments give every trainer the same batches.
    """
    if batch_order is None:
        yield from epoch_batches(n, batch_size, rng)
        return
    for idx in batch_order[epoch]:
        arr = np.asarray(idx, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0 or arr.min() < 0 or arr.max() >= n:
            raise TrainingError(
                f"batch_order[{epoch}] holds a batch that is empty or indexes outside [0, {n})"
            )
        yield arr


def run_sgd(
    step: Callable[[I64], float],
    *,
    n: int,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    max_steps: int | None,
    should_stop: Callable[[], bool] | None,
    batch_order: Sequence[Sequence[npt.NDArray[np.integer]]] | None,
    clock: Callable[[], float],
) -> FitResult:
    """Run the epochs of a `Trainer.fit` on checked arguments: ``step(idx)`` once per batch.

    ``step`` takes one SGD step on the examples ``idx`` and returns the batch loss. Batches come
    from `fit_batches`; before each one, ``max_steps`` and ``should_stop`` may end the run. The
    result has no SCAFFOLD fields; ``clock`` times the loop. Every trainer's ``fit`` runs here,
    so they all stop, count and report alike.
    """
    num_steps = 0
    num_seen = 0
    stopped = False
    epoch_losses: list[float] = []
    start = clock()
    for epoch in range(epochs):
        epoch_losses = []
        for idx in fit_batches(epoch, n, batch_size, rng, batch_order):
            if (max_steps is not None and num_steps >= max_steps) or (
                should_stop is not None and should_stop()
            ):
                stopped = True
                break
            epoch_losses.append(step(idx))
            num_steps += 1
            num_seen += len(idx)
        if stopped:
            break
    duration = clock() - start
    return FitResult(
        loss=float(np.mean(epoch_losses)) if epoch_losses else math.nan,
        num_examples=n,
        num_steps=num_steps,
        samples_per_s=num_seen / duration if num_seen and duration > 0 else 0.0,
        stopped_early=stopped,
        num_samples_seen=num_seen,
        duration_s=duration,
    )


def check_fit_args(
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    prox_mu: float,
    max_steps: int | None,
    batch_order: Sequence[Sequence[npt.NDArray[np.integer]]] | None,
) -> None:
    """Raise `TrainingError` unless the hyperparameters of a `Trainer.fit` call are valid.

    The one definition of a valid SGD schedule, shared by every trainer's ``fit``.
    """
    if epochs < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise TrainingError(f"lr must be a positive finite number, got {lr}")
    if not (math.isfinite(prox_mu) and prox_mu >= 0):
        raise TrainingError(f"prox_mu must be >= 0, got {prox_mu}")
    if max_steps is not None and max_steps < 0:
        raise TrainingError(f"max_steps must be >= 0 or None, got {max_steps}")
    if batch_order is not None and len(batch_order) != epochs:
        raise TrainingError(
            f"batch_order has {len(batch_order)} epochs but epochs={epochs}; pass one "
            "sequence of index arrays per epoch"
        )


# --------------------------------------------------------------------------- trainer


@dataclass(slots=True)
class NumpyTrainer:
    """Mini-batch SGD for logistic regression and MLPs, with hand-written backprop.

    Deterministic: the same weights, data, hyperparameters and ``rng`` state give bit-identical
    weights on the same machine. ``clock`` measures throughput only.

    Examples
    --------
    >>> spec = ModelSpec("logreg", input_dim=2, num_classes=2)
    >>> trainer = NumpyTrainer(spec)
    >>> trainer.set_weights(init_weights(spec, np.random.default_rng(0)))
    >>> x = np.array([[0, 1], [1, 0]] * 8, dtype=np.float32)
    >>> y = np.array([0, 1] * 8)
    >>> result = trainer.fit(x, y, epochs=2, batch_size=4, lr=0.5, rng=np.random.default_rng(0))
    >>> result.num_steps, result.stopped_early
    (8, False)
    """

    spec: ModelSpec
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    _weights: Weights = field(init=False, repr=False)
    _anchor: Weights = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Zero weights until set_weights(); the agent always installs the global model first.
        self._weights = {n: np.zeros(s, dtype=np.float32) for n, s in shapes(self.spec)}
        self._anchor = {n: t.copy() for n, t in self._weights.items()}

    def set_weights(self, weights: Weights) -> None:
        """Install ``weights`` (copied); they are also the FedProx/SCAFFOLD anchor ``x``."""
        self._weights = check_weights(self.spec, weights)
        self._anchor = {n: t.copy() for n, t in self._weights.items()}

    def get_weights(self) -> Weights:
        """Return a copy of the current weights."""
        return {n: t.copy() for n, t in self._weights.items()}

    def step(
        self,
        x: F32,
        y: I64,
        *,
        lr: float,
        prox_mu: float = 0.0,
        control: ScaffoldControl | None = None,
    ) -> float:
        """Take one SGD step on the batch ``(x, y)`` and return its loss before the step.

        For callers that drive the batches themselves; inputs are not re-validated here.
        """
        loss, grads = _forward_backward(self._weights, x, y, grads=True)
        lr32 = np.float32(lr)
        mu32 = np.float32(prox_mu)
        for name, w in self._weights.items():
            g = grads[name]
            if prox_mu:
                g += mu32 * (w - self._anchor[name])
            if control is not None:
                g += control.c_global[name] - control.c_local[name]
            w[...] -= lr32 * g  # in place: self._weights holds w
        return loss

    def fit(
        self,
        x: F32,
        y: I64,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
        prox_mu: float = 0.0,
        control: ScaffoldControl | None = None,
        max_steps: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        batch_order: Sequence[Sequence[npt.NDArray[np.integer]]] | None = None,
    ) -> FitResult:
        """Train for ``epochs`` epochs of mini-batch SGD from the current weights.

        Parameters
        ----------
        x, y
            Local examples ``(N, input_dim)`` and integer labels ``(N,)``.
        epochs, batch_size, lr
            SGD schedule; each epoch's batches come from `epoch_batches` with ``rng``.
        rng
            The only source of randomness (batch order).
        prox_mu
            FedProx coefficient; adds ``prox_mu * (w - x_global)`` to every gradient.
        control
            SCAFFOLD control variates; adds ``c - c_i`` to every gradient and makes the result
            carry ``new_c_local`` and ``control_delta``.
        max_steps
            Stop after this many steps (the coordinator sizes work to the deadline).
        should_stop
            Polled before every batch; returning True ends training (battery, temperature).
        batch_order
            Explicit batches instead of ``rng``: one entry per epoch (so ``len(batch_order)``
            must equal ``epochs``), each a sequence of index arrays into ``x``. Lets another
            trainer be compared with this one on identical batches.
        """
        xa, ya = check_xy(self.spec, x, y)
        n = xa.shape[0]
        check_fit_args(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            prox_mu=prox_mu,
            max_steps=max_steps,
            batch_order=batch_order,
        )
        if control is not None:
            control = ScaffoldControl(
                c_global=check_weights(self.spec, control.c_global),
                c_local=check_weights(self.spec, control.c_local),
            )

        result = run_sgd(
            lambda idx: self.step(xa[idx], ya[idx], lr=lr, prox_mu=prox_mu, control=control),
            n=n,
            epochs=epochs,
            batch_size=batch_size,
            rng=rng,
            max_steps=max_steps,
            should_stop=should_stop,
            batch_order=batch_order,
            clock=self.clock,
        )
        if control is None:
            return result
        new_c_local, control_delta = self._scaffold_update(control, result.num_steps, lr)
        return dataclasses.replace(result, control_delta=control_delta, new_c_local=new_c_local)

    def evaluate(self, x: F32, y: I64) -> EvalResult:
        """Return the mean loss and the accuracy of the current weights on ``(x, y)``."""
        xa, ya = check_xy(self.spec, x, y)
        n = xa.shape[0]
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, _EVAL_BATCH):
            xb, yb = xa[start : start + _EVAL_BATCH], ya[start : start + _EVAL_BATCH]
            loss, _ = _forward_backward(self._weights, xb, yb, grads=False)
            loss_sum += loss * len(yb)
            correct += int((self.predict(xb) == yb).sum())
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)

    def predict(self, x: F32) -> I64:
        """Return the arg-max class of each row of ``x``."""
        h: F32 = np.asarray(x, dtype=np.float32)
        last = self.spec.num_layers - 1
        for layer in range(self.spec.num_layers):
            h = h @ self._weights[f"w{layer}"] + self._weights[f"b{layer}"]
            if layer < last:
                h = np.maximum(h, np.float32(0.0))
        labels: I64 = h.argmax(axis=1).astype(np.int64)
        return labels

    def _scaffold_update(
        self, control: ScaffoldControl, num_steps: int, lr: float
    ) -> tuple[Weights, Weights]:
        """Option II: ``c_i+ = c_i - c + (x - w) / (K * lr)``; unchanged when ``K == 0``."""
        if num_steps == 0:
            keep = {n: t.copy() for n, t in control.c_local.items()}
            return keep, {n: np.zeros_like(t) for n, t in keep.items()}
        scale = np.float32(1.0 / (num_steps * lr))
        new_c: Weights = {}
        delta: Weights = {}
        for name, w in self._weights.items():
            c_i = control.c_local[name]
            new_c[name] = c_i - control.c_global[name] + (self._anchor[name] - w) * scale
            delta[name] = new_c[name] - c_i
        return new_c, delta
