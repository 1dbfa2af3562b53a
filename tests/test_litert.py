"""LiteRT on-device training: the shipped models, the trainer API, and agreement with NumPy.

The ``litert`` extra is installed in CI, so nothing here skips when ``ai_edge_litert`` is
missing: a missing backend is a failure. Only the ``tflite_runtime`` fallback test skips
(that package needs numpy < 2), and the whole module on 32-bit ARM, where LiteRT
publishes no build.
"""

from __future__ import annotations

import math
import platform
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if platform.machine() in ("armv7l", "armv6l"):
    # The one platform where a missing backend is expected: LiteRT publishes no build
    # for 32-bit ARM, and the litert extra installs nothing there (pyproject.toml).
    pytest.skip("LiteRT has no build for 32-bit ARM", allow_module_level=True)

from edge.data import load_builtin
from edge.litert_training import (
    BACKEND,
    BUNDLED_MODELS,
    LiteRTModelError,
    LiteRTTrainer,
    LiteRTUnsupportedError,
    bundled_model_path,
)
from edge.training import (
    ModelSpec,
    NumpyTrainer,
    ScaffoldControl,
    TrainingError,
    init_weights,
)

# LiteRT and NumPy both compute in float32 but with different kernels and summation orders,
# so weights drift apart by rounding. Observed after 3 digits epochs (168 steps): ~4e-7 of
# the tensor's largest magnitude. The bound leaves 25x headroom.
REL_TOL = 1e-5

EXPECTED_SPECS = {
    "digits_mlp": ModelSpec("mlp", input_dim=64, num_classes=10, hidden=(32,)),
    "mnist_mlp": ModelSpec("mlp", input_dim=784, num_classes=10, hidden=(64,)),
}
DATASET_OF = {"digits_mlp": "digits", "mnist_mlp": "mnist5k"}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def digits() -> tuple[np.ndarray, np.ndarray]:
    ds = load_builtin("digits")
    return ds.x, ds.y


def full_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled batches, the last partial batch dropped."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest ``max|a - b| / max|b|`` over the tensors."""
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b)


def patched_model(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """Copy the digits model with the flatbuffer string ``old`` renamed to ``new``."""
    assert len(old) == len(new)  # same length keeps every flatbuffer offset valid

    def pack(s: bytes) -> bytes:
        return struct.pack("<I", len(s)) + s + b"\x00"

    data = bundled_model_path("digits_mlp").read_bytes()
    assert pack(old) in data
    out = tmp_path / "patched.tflite"
    out.write_bytes(data.replace(pack(old), pack(new)))
    return out


# ----------------------------------------------------------------------------- loading


def test_backend_is_ai_edge_litert() -> None:
    # Execute / Assert: CI installs the litert extra, so the preferred backend must load.
    assert BACKEND == "ai_edge_litert"


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_model_loads_with_expected_spec(name: str) -> None:
    # Execute
    trainer = LiteRTTrainer.from_bundled(name)

    # Assert
    assert trainer.spec == EXPECTED_SPECS[name]
    assert list(trainer.get_weights()) == ["w0", "b0", "w1", "b1"]


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_model_starts_from_init_weights_seed_0(name: str) -> None:
    # Prepare: scripts/export_tflite.py uses edge.training.init_weights with seed 0.
    trainer = LiteRTTrainer.from_bundled(name)
    expected = init_weights(trainer.spec, np.random.default_rng(0))

    # Execute
    weights = trainer.get_weights()

    # Assert
    for k, v in expected.items():
        np.testing.assert_array_equal(weights[k], v)


def test_bundled_model_path_accepts_suffix() -> None:
    assert bundled_model_path("digits_mlp.tflite") == bundled_model_path("digits_mlp")


def test_unknown_bundled_model_names_the_choices() -> None:
    with pytest.raises(LiteRTModelError, match="digits_mlp"):
        bundled_model_path("resnet50")


# ----------------------------------------------------------------------------- bad models


def test_missing_model_file_raises(tmp_path: Path) -> None:
    with pytest.raises(LiteRTModelError, match="no such model file"):
        LiteRTTrainer.from_file(tmp_path / "absent.tflite")


def test_garbage_model_file_raises(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "garbage.tflite"
    path.write_bytes(b"this is not a flatbuffer" * 8)

    # Execute / Assert
    with pytest.raises(LiteRTModelError, match="not a loadable"):
        LiteRTTrainer.from_file(path)


def test_model_without_train_signature_raises(tmp_path: Path) -> None:
    # Prepare: rename the signature key "train" to "trair".
    path = patched_model(tmp_path, b"train", b"trair")

    # Execute / Assert
    with pytest.raises(LiteRTModelError, match=r"missing signature\(s\) \['train'\]"):
        LiteRTTrainer.from_file(path)


def test_model_without_prox_mu_input_raises(tmp_path: Path) -> None:
    # Prepare: rename the train signature's input "prox_mu".
    path = patched_model(tmp_path, b"prox_mu", b"prox_xx")

    # Execute / Assert
    with pytest.raises(LiteRTModelError, match="signature 'train' has inputs"):
        LiteRTTrainer.from_file(path)


def test_model_error_is_a_training_error() -> None:
    assert issubclass(LiteRTModelError, TrainingError)
    assert issubclass(LiteRTModelError, ValueError)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_set_get_weights_round_trip_exactly(name: str, rng: np.random.Generator) -> None:
    # Prepare
    trainer = LiteRTTrainer.from_bundled(name)
    weights = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in trainer.get_weights().items()
    }

    # Execute
    trainer.set_weights(weights)
    got = trainer.get_weights()

    # Assert
    assert list(got) == list(weights)
    for k, v in weights.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v)


def test_get_weights_returns_a_copy() -> None:
    # Prepare
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    before = trainer.get_weights()

    # Execute
    before["w0"][:] = 123.0

    # Assert
    assert not np.any(trainer.get_weights()["w0"] == 123.0)


def test_set_weights_rejects_wrong_shape() -> None:
    # Prepare
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    weights = trainer.get_weights()
    weights["w0"] = np.zeros((63, 32), np.float32)

    # Execute / Assert
    with pytest.raises(TrainingError, match="w0"):
        trainer.set_weights(weights)


# ----------------------------------------------------------------------------- training


def test_training_on_digits_lowers_the_loss(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare
    x, y = digits
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    before = trainer.evaluate(x, y)

    # Execute
    result = trainer.fit(x, y, epochs=2, batch_size=32, lr=0.1, rng=np.random.default_rng(0))
    after = trainer.evaluate(x, y)

    # Assert
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.8
    assert result.num_steps == 2 * math.ceil(len(x) / 32)
    assert result.num_examples == len(x)


@pytest.mark.parametrize("name", BUNDLED_MODELS)
@pytest.mark.parametrize("prox_mu", [0.0, 0.1])
def test_matches_numpy_trainer_on_full_batches(name: str, prox_mu: float) -> None:
    # Prepare: same initial weights and the same full batches (partial batch dropped).
    ds = load_builtin(DATASET_OF[name])
    x, y = ds.x[:1792], ds.y[:1792]
    litert = LiteRTTrainer.from_bundled(name)
    numpy_trainer = NumpyTrainer(litert.spec)
    start = init_weights(litert.spec, np.random.default_rng(1))
    litert.set_weights(start)
    numpy_trainer.set_weights(start)
    order_rng = np.random.default_rng(2)
    batch_order = [full_batches(len(x), 32, order_rng) for _ in range(3)]
    kwargs = dict(epochs=3, batch_size=32, lr=0.1, prox_mu=prox_mu, batch_order=batch_order)

    # Execute
    got = litert.fit(x, y, rng=np.random.default_rng(0), **kwargs)  # type: ignore[arg-type]
    want = numpy_trainer.fit(x, y, rng=np.random.default_rng(0), **kwargs)  # type: ignore[arg-type]

    # Assert
    assert got.num_steps == want.num_steps == 3 * (1792 // 32)
    assert max_rel_diff(litert.get_weights(), numpy_trainer.get_weights()) < REL_TOL
    assert got.loss == pytest.approx(want.loss, rel=REL_TOL)


def test_partial_last_batch_matches_numpy(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare: 1,797 examples in batches of 32 leave a last batch of 5; the exported batch
    # dimension is dynamic, so the LiteRT trainer takes it like NumpyTrainer does.
    x, y = digits
    litert = LiteRTTrainer.from_bundled("digits_mlp")
    numpy_trainer = NumpyTrainer(litert.spec)
    numpy_trainer.set_weights(litert.get_weights())

    # Execute
    got = litert.fit(x, y, epochs=1, batch_size=32, lr=0.1, rng=np.random.default_rng(3))
    want = numpy_trainer.fit(x, y, epochs=1, batch_size=32, lr=0.1, rng=np.random.default_rng(3))

    # Assert
    assert got.num_steps == want.num_steps == 57
    assert got.num_samples_seen == want.num_samples_seen == 1797
    assert max_rel_diff(litert.get_weights(), numpy_trainer.get_weights()) < REL_TOL


def test_evaluate_matches_numpy_trainer(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare
    x, y = digits
    litert = LiteRTTrainer.from_bundled("digits_mlp")
    numpy_trainer = NumpyTrainer(litert.spec)
    numpy_trainer.set_weights(litert.get_weights())

    # Execute
    got = litert.evaluate(x, y)
    want = numpy_trainer.evaluate(x, y)

    # Assert
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    assert got.accuracy == want.accuracy
    assert got.num_examples == want.num_examples


def test_prox_anchor_is_the_last_set_weights(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare: two fits in a row; the second (FedProx) must pull towards the weights of the
    # last set_weights, not towards the weights at the start of the second fit.
    x, y = digits
    litert = LiteRTTrainer.from_bundled("digits_mlp")
    numpy_trainer = NumpyTrainer(litert.spec)
    numpy_trainer.set_weights(litert.get_weights())
    for trainer in (litert, numpy_trainer):
        trainer.fit(x, y, epochs=1, batch_size=64, lr=0.1, rng=np.random.default_rng(0))

    # Execute
    for trainer in (litert, numpy_trainer):
        trainer.fit(
            x, y, epochs=1, batch_size=64, lr=0.1, prox_mu=1.0, rng=np.random.default_rng(1)
        )

    # Assert
    assert max_rel_diff(litert.get_weights(), numpy_trainer.get_weights()) < REL_TOL


def test_scaffold_control_raises_unsupported(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare
    x, y = digits
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    zeros = {k: np.zeros_like(v) for k, v in trainer.get_weights().items()}
    control = ScaffoldControl(c_global=zeros, c_local=zeros)

    # Execute / Assert
    with pytest.raises(LiteRTUnsupportedError, match="NumpyTrainer") as info:
        trainer.fit(
            x, y, epochs=1, batch_size=32, lr=0.1, rng=np.random.default_rng(0), control=control
        )
    assert isinstance(info.value, NotImplementedError)


def test_max_steps_stops_early(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare
    x, y = digits
    trainer = LiteRTTrainer.from_bundled("digits_mlp")

    # Execute
    result = trainer.fit(
        x, y, epochs=5, batch_size=32, lr=0.1, rng=np.random.default_rng(0), max_steps=3
    )

    # Assert
    assert result.num_steps == 3
    assert result.stopped_early


def test_should_stop_before_first_batch_takes_no_step(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare
    x, y = digits
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    before = trainer.get_weights()

    # Execute
    result = trainer.fit(
        x,
        y,
        epochs=1,
        batch_size=32,
        lr=0.1,
        rng=np.random.default_rng(0),
        should_stop=lambda: True,
    )

    # Assert
    assert result.num_steps == 0
    assert math.isnan(result.loss)
    np.testing.assert_array_equal(trainer.get_weights()["w0"], before["w0"])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"prox_mu": -0.1}, "prox_mu"),
    ],
)
def test_fit_rejects_bad_hyperparameters(
    digits: tuple[np.ndarray, np.ndarray], bad: dict[str, float], match: str
) -> None:
    # Prepare
    x, y = digits
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    kwargs: dict[str, float] = {"epochs": 1, "batch_size": 32, "lr": 0.1, **bad}

    # Execute / Assert
    with pytest.raises(TrainingError, match=match):
        trainer.fit(x, y, rng=np.random.default_rng(0), **kwargs)  # type: ignore[arg-type]


def test_fit_rejects_wrong_input_dim() -> None:
    trainer = LiteRTTrainer.from_bundled("digits_mlp")
    with pytest.raises(TrainingError, match=r"\(N, 64\)"):
        trainer.fit(
            np.zeros((4, 65), np.float32),
            np.zeros(4, np.int64),
            epochs=1,
            batch_size=2,
            lr=0.1,
            rng=np.random.default_rng(0),
        )


# ----------------------------------------------------------------------------- backends

_BLOCK_AND_IMPORT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # makes `import name` raise ImportError
try:
    import edge.litert_training as m
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("BACKEND:", m.BACKEND)
"""


def _import_with_blocked(*blocked: str) -> str:
    code = _BLOCK_AND_IMPORT.format(blocked=list(blocked))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout.strip()


def test_import_without_any_backend_names_the_extra() -> None:
    # Execute
    out = _import_with_blocked("ai_edge_litert", "tflite_runtime")

    # Assert
    assert out.startswith("ImportError:")
    assert "pip install 'fedge[litert]'" in out


def test_falls_back_to_tflite_runtime() -> None:
    # Prepare: tflite-runtime 2.14 needs numpy < 2, so it is usually absent.
    pytest.importorskip("tflite_runtime.interpreter")

    # Execute
    out = _import_with_blocked("ai_edge_litert")

    # Assert
    assert out == "BACKEND: tflite_runtime"
