"""On-device training of ``.tflite`` models with LiteRT: the `LiteRTTrainer`.

This module owns

- the LiteRT interpreter: it is the only module in fedge that imports ``ai_edge_litert`` (or,
  as a fallback, ``tflite_runtime``). `BACKEND` says which one loaded. Importing this module
  with neither installed raises `ImportError` naming the fix, ``pip install 'fedge[litert]'``;
- the signature contract of a trainable model (`SIGNATURES`): ``train``, ``infer``,
  ``get_weights`` and ``set_weights``, as exported by ``scripts/export_tflite.py``;
- `bundled_model_path`, the ``.tflite`` files shipped in ``edge/models``.

`LiteRTTrainer` implements the `edge.training.Trainer` protocol with the same semantics as
`edge.training.NumpyTrainer`: the same batches for the same ``rng`` (`epoch_batches`, last
batch partial, since the exported batch dimension is dynamic), the same SGD and FedProx
update, and the same `FitResult`/`EvalResult`. The model does the arithmetic in float32 on
its own kernels, so the weights agree with NumPy to rounding, not bit for bit (see
``docs/LITERT.md`` for the measured tolerance).

Limits: SCAFFOLD needs a per-step correction the ``train`` signature has no input for, so
``fit(control=...)`` raises `LiteRTUnsupportedError` (use ``NumpyTrainer`` for SCAFFOLD).
"""

from __future__ import annotations

import importlib.resources
import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edge.training import (
    F32,
    I64,
    EvalResult,
    FitResult,
    ModelSpec,
    ScaffoldControl,
    TrainingError,
    Weights,
    check_fit_args,
    check_weights,
    check_xy,
    run_sgd,
)

__all__ = [
    "BACKEND",
    "BUNDLED_MODELS",
    "SIGNATURES",
    "LiteRTError",
    "LiteRTModelError",
    "LiteRTTrainer",
    "LiteRTUnsupportedError",
    "bundled_model_path",
]

logger = logging.getLogger(__name__)

NO_LITERT_BUILD: Final = platform.machine() in ("armv7l", "armv6l")
"""32-bit ARM (Raspberry Pi OS 32-bit): neither ai-edge-litert nor tflite-runtime
publishes a build for it, so the ``litert`` extra installs nothing there."""

_INSTALL_HINT: Final = (
    f"LiteRT publishes no build for 32-bit ARM ({platform.machine()}): train with "
    "--trainer numpy, or install a 64-bit OS (Raspberry Pi OS 64-bit) for .tflite models"
    if NO_LITERT_BUILD
    else "LiteRT training needs ai-edge-litert (or tflite-runtime); install it with "
    "pip install 'fedge[litert]'"
)


def _import_interpreter() -> tuple[str, Any]:
    """Return ``(backend name, Interpreter class)``, preferring ``ai_edge_litert``."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pass
    else:
        return "ai_edge_litert", Interpreter
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError:
        pass
    else:
        # tflite-runtime is frozen at 2.14 and needs numpy < 2; say so where it shows.
        logger.warning("ai_edge_litert is not installed; falling back to tflite_runtime")
        return "tflite_runtime", Interpreter
    raise ImportError(_INSTALL_HINT)


_BACKEND_NAME, _Interpreter = _import_interpreter()
BACKEND: Final[str] = _BACKEND_NAME
"""Which interpreter package loaded: ``"ai_edge_litert"`` or ``"tflite_runtime"``."""

SIGNATURES: Final[Mapping[str, tuple[frozenset[str], frozenset[str]]]] = {
    "train": (frozenset({"x", "y", "lr", "prox_mu"}), frozenset({"loss"})),
    "infer": (frozenset({"x"}), frozenset({"logits"})),
    "get_weights": (frozenset(), frozenset()),  # outputs are the weight names, checked apart
    "set_weights": (frozenset(), frozenset()),  # inputs are the weight names, checked apart
}
"""The signatures a trainable model must have: name -> (input names, output names)."""

BUNDLED_MODELS: Final = ("digits_mlp", "mnist_mlp")
"""Models shipped in ``edge/models``: 8×8 digits (64-32-10) and MNIST (784-64-10)."""

_EVAL_BATCH = 1024  # bounds infer()'s activation memory on a Pi, like NumpyTrainer


class LiteRTError(TrainingError):
    """Base of the LiteRT trainer's errors (a `TrainingError`, so a ``ValueError``)."""


class LiteRTModelError(LiteRTError):
    """A ``.tflite`` file that is missing, unreadable or not a trainable fedge model."""


class LiteRTUnsupportedError(LiteRTError, NotImplementedError):
    """A training feature the LiteRT trainer does not implement (e.g. SCAFFOLD)."""


def bundled_model_path(name: str) -> Path:
    """Return the path of a ``.tflite`` model shipped with fedge.

    Parameters
    ----------
    name
        One of `BUNDLED_MODELS`, with or without the ``.tflite`` suffix.

    Examples
    --------
    >>> bundled_model_path("digits_mlp").name
    'digits_mlp.tflite'
    """
    stem = name.removesuffix(".tflite")
    if stem not in BUNDLED_MODELS:
        raise LiteRTModelError(
            f"no bundled model {name!r}; choose one of {list(BUNDLED_MODELS)} or pass your own "
            "file to LiteRTTrainer.from_file()"
        )
    resource = importlib.resources.files("edge").joinpath("models", f"{stem}.tflite")
    # The interpreter reads from a file path; a zipped install has none.
    if not isinstance(resource, Path) or not resource.is_file():
        raise LiteRTModelError(
            f"bundled model {stem!r} is not on the file system ({resource}); reinstall fedge "
            "from a wheel or source tree, not a zip"
        )
    return resource


def _spec_from_weights(weights: Mapping[str, npt.NDArray[Any]], origin: str) -> ModelSpec:
    """Infer the `ModelSpec` from weight shapes named ``w0, b0, w1, b1, ...``."""
    num_layers = len(weights) // 2
    expected = [f"{p}{layer}" for layer in range(num_layers) for p in ("w", "b")]
    if num_layers == 0 or sorted(weights) != sorted(expected):
        raise LiteRTModelError(
            f"{origin}: get_weights returns {sorted(weights)}; a fedge model returns "
            "w0, b0, w1, b1, ... (re-export it with scripts/export_tflite.py)"
        )
    dims = [np.shape(weights[f"w{layer}"]) for layer in range(num_layers)]
    if any(len(d) != 2 for d in dims):
        raise LiteRTModelError(f"{origin}: weight matrices must be 2-D, got shapes {dims}")
    hidden = tuple(int(d[1]) for d in dims[:-1])
    try:
        return ModelSpec(
            "mlp" if hidden else "logreg",
            input_dim=int(dims[0][0]),
            num_classes=int(dims[-1][1]),
            hidden=hidden,
        )
    except TrainingError as exc:
        raise LiteRTModelError(f"{origin}: {exc}") from exc


@dataclass(slots=True, eq=False)
class LiteRTTrainer:
    """Train a ``.tflite`` model through its ``train``/``infer``/``*_weights`` signatures.

    Build it with `from_file` (or `from_bundled`); the constructor takes an interpreter that
    is already checked. The model keeps its weights in resource variables inside the
    interpreter, so `get_weights`/`set_weights` copy across that boundary.

    Examples
    --------
    >>> trainer = LiteRTTrainer.from_bundled("digits_mlp")
    >>> trainer.spec
    ModelSpec(kind='mlp', input_dim=64, num_classes=10, hidden=(32,))
    >>> x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    >>> y = np.arange(64) % 10
    >>> result = trainer.fit(x, y, epochs=1, batch_size=32, lr=0.1, rng=np.random.default_rng(0))
    >>> result.num_steps
    2
    """

    spec: ModelSpec
    """The architecture, inferred from the shapes ``get_weights`` returns."""
    interpreter: Any = field(repr=False)
    """The backend's ``Interpreter`` holding the model and its variables."""
    source: str = ""
    """Where the model came from (a file path), for error messages."""
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    """Measures throughput only (as in ``NumpyTrainer``)."""
    _runners: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._runners = {name: self.interpreter.get_signature_runner(name) for name in SIGNATURES}

    @classmethod
    def from_file(cls, path: str | Path, *, num_threads: int | None = None) -> LiteRTTrainer:
        """Load a trainable ``.tflite`` model and check its signatures.

        Parameters
        ----------
        path
            A model exported by ``scripts/export_tflite.py`` (or following its contract).
        num_threads
            Interpreter threads; None lets LiteRT choose.

        Raises
        ------
        LiteRTModelError
            The file is missing or not a model, or a signature or weight name is missing.
        """
        origin = str(path)
        if not Path(path).is_file():
            raise LiteRTModelError(f"{origin}: no such model file")
        try:
            interpreter = _Interpreter(model_path=origin, num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise LiteRTModelError(f"{origin}: not a loadable .tflite model ({exc})") from exc
        spec = cls._check_signatures(interpreter, origin)
        return cls(spec=spec, interpreter=interpreter, source=origin)

    @classmethod
    def from_bundled(cls, name: str, *, num_threads: int | None = None) -> LiteRTTrainer:
        """Load one of the `BUNDLED_MODELS` (see `bundled_model_path`)."""
        return cls.from_file(bundled_model_path(name), num_threads=num_threads)

    @staticmethod
    def _check_signatures(interpreter: Any, origin: str) -> ModelSpec:
        found: dict[str, dict[str, list[str]]] = interpreter.get_signature_list()
        missing = [name for name in SIGNATURES if name not in found]
        if missing:
            raise LiteRTModelError(
                f"{origin}: missing signature(s) {missing} (has {sorted(found)}); a trainable "
                f"model needs {list(SIGNATURES)}, see scripts/export_tflite.py"
            )
        for name, (inputs, outputs) in SIGNATURES.items():
            have_in, have_out = set(found[name]["inputs"]), set(found[name]["outputs"])
            if not inputs <= have_in or not outputs <= have_out:
                raise LiteRTModelError(
                    f"{origin}: signature {name!r} has inputs {sorted(have_in)} and outputs "
                    f"{sorted(have_out)}; it needs inputs {sorted(inputs)} and outputs "
                    f"{sorted(outputs)}"
                )
        try:
            weights = interpreter.get_signature_runner("get_weights")()
        except (ValueError, RuntimeError) as exc:
            raise LiteRTModelError(f"{origin}: get_weights failed ({exc})") from exc
        spec = _spec_from_weights(weights, origin)
        if set(found["set_weights"]["inputs"]) != set(weights):
            raise LiteRTModelError(
                f"{origin}: set_weights takes {sorted(found['set_weights']['inputs'])} but "
                f"get_weights returns {sorted(weights)}; they must match"
            )
        return spec

    # ------------------------------------------------------------------ weights

    def set_weights(self, weights: Weights) -> None:
        """Install ``weights``; they are also the FedProx anchor (as in ``NumpyTrainer``)."""
        checked = check_weights(self.spec, weights)
        self._runners["set_weights"](**checked)

    def get_weights(self) -> Weights:
        """Return a copy of the model's current weights, in ``w0, b0, w1, b1, ...`` order."""
        raw = self._runners["get_weights"]()
        return {name: np.array(raw[name], dtype=np.float32) for name in self._weight_names()}

    def _weight_names(self) -> list[str]:
        return [f"{p}{layer}" for layer in range(self.spec.num_layers) for p in ("w", "b")]

    # ------------------------------------------------------------------ training

    def step(self, x: F32, y: I64, *, lr: float, prox_mu: float = 0.0) -> float:
        """Take one SGD step on the batch ``(x, y)`` and return its loss before the step.

        Inputs are not re-validated here (the caller drives the batches, as with
        ``NumpyTrainer.step``).
        """
        out = self._runners["train"](
            x=np.ascontiguousarray(x, dtype=np.float32),
            y=np.ascontiguousarray(y, dtype=np.int32),
            lr=np.array(lr, dtype=np.float32),
            prox_mu=np.array(prox_mu, dtype=np.float32),
        )
        return float(out["loss"])

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

        The arguments mean what they mean for ``NumpyTrainer.fit``: batches come from
        ``epoch_batches(len(x), batch_size, rng)`` per epoch (the last one partial) or from
        ``batch_order``; ``prox_mu`` adds ``prox_mu * (w - w_global)`` to every gradient, with
        ``w_global`` the weights of the last `set_weights`.

        Raises
        ------
        LiteRTUnsupportedError
            ``control`` is given: SCAFFOLD runs only on ``NumpyTrainer``.
        TrainingError
            Bad shapes, labels or hyperparameters.
        """
        if control is not None:
            raise LiteRTUnsupportedError(
                "SCAFFOLD control variates are not supported by the LiteRT trainer (its train "
                "signature has no correction input); use edge.training.NumpyTrainer for "
                "SCAFFOLD tasks, or a FedAvg/FedProx strategy for .tflite devices"
            )
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

        return run_sgd(
            lambda idx: self.step(xa[idx], ya[idx], lr=lr, prox_mu=prox_mu),
            n=n,
            epochs=epochs,
            batch_size=batch_size,
            rng=rng,
            max_steps=max_steps,
            should_stop=should_stop,
            batch_order=batch_order,
            clock=self.clock,
        )

    # ------------------------------------------------------------------ inference

    def predict_logits(self, x: F32) -> F32:
        """Return the model's logits for the rows of ``x`` (``infer`` signature)."""
        xa = np.ascontiguousarray(x, dtype=np.float32)
        parts = [
            np.array(self._runners["infer"](x=xa[i : i + _EVAL_BATCH])["logits"], np.float32)
            for i in range(0, xa.shape[0], _EVAL_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.spec.num_classes), np.float32)

    def predict(self, x: F32) -> I64:
        """Return the arg-max class of each row of ``x``."""
        labels: I64 = self.predict_logits(x).argmax(axis=1).astype(np.int64)
        return labels

    def evaluate(self, x: F32, y: I64) -> EvalResult:
        """Return the mean softmax cross-entropy and the accuracy on ``(x, y)``."""
        xa, ya = check_xy(self.spec, x, y)
        logits = self.predict_logits(xa).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        n = xa.shape[0]
        loss = float(-log_probs[np.arange(n), ya].mean())
        accuracy = float((logits.argmax(axis=1) == ya).mean())
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=n)
