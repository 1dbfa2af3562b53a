"""Export trainable one-hidden-layer MLPs as ``.tflite`` models for on-device training.

This script is the only place in fedge that imports TensorFlow. It runs in a throwaway
virtual environment, never on a device and never in CI::

    python3.11 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python scripts/export_tflite.py            # rewrites edge/models/*.tflite
    /tmp/tfvenv/bin/python scripts/export_tflite.py --name my_mlp --input-dim 20 \\
        --hidden 16 --num-classes 3 --out /tmp/my_mlp.tflite

Each model has four signatures, which ``edge.litert_training.LiteRTTrainer`` drives:

``train(x[B, in] f32, y[B] i32, lr[] f32, prox_mu[] f32) -> {loss[] f32}``
    One SGD step ``w -= lr * grad`` on the batch mean softmax cross-entropy, plus the FedProx
    term ``prox_mu * (w - w_anchor)``. ``loss`` is the cross-entropy of the batch *before* the
    step (without the proximal term). The batch size ``B`` is dynamic.
``infer(x[B, in] f32) -> {logits[B, classes] f32}``
``get_weights() -> {w0[in, h], b0[h], w1[h, classes], b1[classes]}``
``set_weights(w0, b0, w1, b1) -> {num_params[] i32}``
    Sets the weights *and* the FedProx anchor ``w_anchor`` to the given values.

Why the gradients are written by hand: the ops TensorFlow's autodiff emits for ReLU and
sparse softmax cross-entropy (``ReluGrad``, ``SparseSoftmaxCrossEntropyWithLogits``) are not
TFLite builtins: they would need the Flex delegate (TensorFlow kernels linked into the
runtime), which a plain ``ai-edge-litert`` or ``tflite-runtime`` install does not have.
Softmax minus one-hot and a ReLU mask are plain builtins (SOFTMAX, LOG_SOFTMAX, ONE_HOT,
GREATER, CAST, MUL, FULLY_CONNECTED, BATCH_MATMUL, ...), and the converter is restricted to
``TFLITE_BUILTINS`` so a Flex op fails the export instead of the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, without installing fedge

from edge.training import ModelSpec, init_weights  # noqa: E402 (needs the sys.path entry)

MODELS_DIR = REPO_ROOT / "edge" / "models"
WEIGHT_NAMES = ("w0", "b0", "w1", "b1")


@dataclass(frozen=True, slots=True)
class MlpShape:
    """Shape of a one-hidden-layer MLP."""

    name: str
    """File stem of the exported model."""
    input_dim: int
    """Number of input features (flattened image pixels scaled to [0, 1])."""
    hidden: int
    """Width of the ReLU hidden layer."""
    num_classes: int
    """Number of output classes."""


BUNDLED = (
    MlpShape("digits_mlp", input_dim=64, hidden=32, num_classes=10),
    MlpShape("mnist_mlp", input_dim=784, hidden=64, num_classes=10),
)


def initial_weights(shape: MlpShape, seed: int) -> dict[str, np.ndarray]:
    """Return the initial weights of ``edge.training.init_weights`` for ``shape`` and ``seed``.

    Using fedge's own initializer keeps a shipped model's starting point identical to a
    NumPy model built from the same seed.
    """
    spec = ModelSpec("mlp", shape.input_dim, shape.num_classes, hidden=(shape.hidden,))
    return init_weights(spec, np.random.default_rng(seed))


class TrainableMlp(tf.Module):
    """A one-hidden-layer ReLU MLP with hand-written SGD/FedProx gradients."""

    def __init__(self, shape: MlpShape, init: dict[str, np.ndarray]) -> None:
        super().__init__(name=shape.name)
        self.shape = shape
        self.w = {k: tf.Variable(init[k], name=k) for k in WEIGHT_NAMES}
        # FedProx anchor: the weights last given to set_weights (the global model).
        self.anchor = {k: tf.Variable(init[k], name=f"{k}_anchor") for k in WEIGHT_NAMES}

        in_dim, classes = shape.input_dim, shape.num_classes
        f32, i32 = tf.float32, tf.int32
        self.train = tf.function(
            self._train,
            input_signature=[
                tf.TensorSpec([None, in_dim], f32, name="x"),
                tf.TensorSpec([None], i32, name="y"),
                tf.TensorSpec([], f32, name="lr"),
                tf.TensorSpec([], f32, name="prox_mu"),
            ],
        )
        self.infer = tf.function(
            self._infer, input_signature=[tf.TensorSpec([None, in_dim], f32, name="x")]
        )
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights,
            input_signature=[
                tf.TensorSpec([in_dim, shape.hidden], f32, name="w0"),
                tf.TensorSpec([shape.hidden], f32, name="b0"),
                tf.TensorSpec([shape.hidden, classes], f32, name="w1"),
                tf.TensorSpec([classes], f32, name="b1"),
            ],
        )

    def _forward(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pre = tf.matmul(x, self.w["w0"]) + self.w["b0"]
        h = tf.nn.relu(pre)
        logits = tf.matmul(h, self.w["w1"]) + self.w["b1"]
        return pre, h, logits

    def _train(
        self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, prox_mu: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        pre, h, logits = self._forward(x)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        onehot = tf.one_hot(y, self.shape.num_classes, dtype=tf.float32)
        log_probs = tf.nn.log_softmax(logits)
        loss = -tf.reduce_sum(onehot * log_probs) / n
        # d(mean CE)/d logits = (softmax - onehot) / n
        d_logits = (tf.nn.softmax(logits) - onehot) / n
        g_w1 = tf.matmul(h, d_logits, transpose_a=True)
        g_b1 = tf.reduce_sum(d_logits, axis=0)
        relu_mask = tf.cast(pre > 0.0, tf.float32)
        d_pre = tf.matmul(d_logits, self.w["w1"], transpose_b=True) * relu_mask
        g_w0 = tf.matmul(x, d_pre, transpose_a=True)
        g_b0 = tf.reduce_sum(d_pre, axis=0)
        grads = {"w0": g_w0, "b0": g_b0, "w1": g_w1, "b1": g_b1}
        # All gradients are computed from the pre-step weights before any assignment.
        new_values = {
            k: self.w[k] - lr * (grads[k] + prox_mu * (self.w[k] - self.anchor[k]))
            for k in WEIGHT_NAMES
        }
        for k in WEIGHT_NAMES:
            self.w[k].assign(new_values[k])
        return {"loss": loss}

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        _, _, logits = self._forward(x)
        return {"logits": logits}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {k: tf.identity(self.w[k]) for k in WEIGHT_NAMES}

    def _set_weights(
        self, w0: tf.Tensor, b0: tf.Tensor, w1: tf.Tensor, b1: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        values = {"w0": w0, "b0": b0, "w1": w1, "b1": b1}
        for k in WEIGHT_NAMES:
            self.w[k].assign(values[k])
            self.anchor[k].assign(values[k])
        num_params = sum(int(np.prod(self.w[k].shape)) for k in WEIGHT_NAMES)
        return {"num_params": tf.constant(num_params, tf.int32)}


def export(shape: MlpShape, out: Path, seed: int) -> int:
    """Convert one MLP to a builtin-ops-only ``.tflite`` file; return its size in bytes."""
    module = TrainableMlp(shape, initial_weights(shape, seed))
    with tempfile.TemporaryDirectory() as tmp:
        saved_dir = Path(tmp) / "saved_model"
        tf.saved_model.save(
            module,
            str(saved_dir),
            signatures={
                "train": module.train.get_concrete_function(),
                "infer": module.infer.get_concrete_function(),
                "get_weights": module.get_weights.get_concrete_function(),
                "set_weights": module.set_weights.get_concrete_function(),
            },
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_dir))
        # Builtins only: no SELECT_TF_OPS, so the model runs on a plain LiteRT wheel.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        flatbuffer = converter.convert()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(flatbuffer)
    return len(flatbuffer)


def main(argv: list[str] | None = None) -> None:
    """Export the bundled models, or one custom MLP when ``--name`` is given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="export one custom MLP instead of the bundled ones")
    parser.add_argument("--input-dim", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--out", type=Path, help="output file (default edge/models/NAME.tflite)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    args = parser.parse_args(argv)

    if args.name is None:
        shapes = list(BUNDLED)
    else:
        if None in (args.input_dim, args.hidden, args.num_classes):
            parser.error("--name needs --input-dim, --hidden and --num-classes")
        shapes = [MlpShape(args.name, args.input_dim, args.hidden, args.num_classes)]
    for shape in shapes:
        out = args.out if args.out is not None else MODELS_DIR / f"{shape.name}.tflite"
        size = export(shape, out, args.seed)
        print(f"{out}: {size} bytes ({shape.input_dim}-{shape.hidden}-{shape.num_classes} MLP)")


if __name__ == "__main__":
    main()
