"""Tests for edge.training: weights contract, gradients, NumPy SGD, FedProx and SCAFFOLD."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from edge.data import Dataset, load_builtin
from edge.training import (
    ModelSpec,
    NumpyTrainer,
    ScaffoldControl,
    Trainer,
    TrainingError,
    Weights,
    epoch_batches,
    flatten,
    gradient,
    init_weights,
    shapes,
    unflatten,
)

LOGREG = ModelSpec("logreg", input_dim=5, num_classes=3)
MLP1 = ModelSpec("mlp", input_dim=5, num_classes=3, hidden=(4,))
MLP2 = ModelSpec("mlp", input_dim=5, num_classes=3, hidden=(6, 4))
SMALL_SPECS = [LOGREG, MLP1, MLP2]
DIGITS_SPECS = [
    ModelSpec("logreg", input_dim=64, num_classes=10),
    ModelSpec("mlp", input_dim=64, num_classes=10, hidden=(64,)),
]


def _spec_id(spec: ModelSpec) -> str:
    return "-".join([spec.kind, *map(str, spec.hidden)])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_builtin("digits").split(0.25, np.random.default_rng(0))


def _toy_data(spec: ModelSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, spec.input_dim)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=n).astype(np.int64)
    return x, y


def _trainer(spec: ModelSpec, seed: int = 0) -> NumpyTrainer:
    trainer = NumpyTrainer(spec)
    trainer.set_weights(init_weights(spec, np.random.default_rng(seed)))
    return trainer


def _sq_distance(a: Weights, b: Weights) -> float:
    return float(np.sum((flatten(a).astype(np.float64) - flatten(b)) ** 2))


# --------------------------------------------------------------------------- weights contract


def test_shapes_of_two_layer_mlp() -> None:
    # Execute
    result = shapes(MLP2)

    # Assert
    assert result == [
        ("w0", (5, 6)),
        ("b0", (6,)),
        ("w1", (6, 4)),
        ("b1", (4,)),
        ("w2", (4, 3)),
        ("b2", (3,)),
    ]


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=_spec_id)
def test_init_weights_match_shapes_and_are_float32(
    spec: ModelSpec, rng: np.random.Generator
) -> None:
    # Execute
    weights = init_weights(spec, rng)

    # Assert
    assert [(n, t.shape) for n, t in weights.items()] == shapes(spec)
    assert all(t.dtype == np.float32 for t in weights.values())


def test_init_weights_use_he_then_glorot_bounds(rng: np.random.Generator) -> None:
    # Execute
    weights = init_weights(MLP1, rng)

    # Assert
    assert np.abs(weights["w0"]).max() <= math.sqrt(6 / 5)
    assert np.abs(weights["w1"]).max() <= math.sqrt(6 / (4 + 3))
    assert not weights["b0"].any()
    assert not weights["b1"].any()


def test_init_weights_are_seeded() -> None:
    # Execute
    a = init_weights(MLP2, np.random.default_rng(7))
    b = init_weights(MLP2, np.random.default_rng(7))

    # Assert
    np.testing.assert_array_equal(flatten(a), flatten(b))


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=_spec_id)
def test_unflatten_inverts_flatten(spec: ModelSpec, rng: np.random.Generator) -> None:
    # Prepare
    weights = init_weights(spec, rng)

    # Execute
    restored = unflatten(flatten(weights), like=weights)

    # Assert
    assert list(restored) == list(weights)
    for name in weights:
        np.testing.assert_array_equal(restored[name], weights[name])


def test_flatten_length_is_num_params(rng: np.random.Generator) -> None:
    # Execute
    vec = flatten(init_weights(MLP2, rng))

    # Assert
    assert vec.dtype == np.float32
    assert vec.shape == (MLP2.num_params,)


def test_unflatten_rejects_wrong_length(rng: np.random.Generator) -> None:
    # Prepare
    weights = init_weights(MLP1, rng)

    # Execute / Assert
    with pytest.raises(TrainingError, match="different ModelSpec"):
        unflatten(np.zeros(MLP1.num_params + 1, np.float32), like=weights)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cnn", "input_dim": 4, "num_classes": 2}, "unknown model kind"),
        ({"kind": "logreg", "input_dim": 0, "num_classes": 2}, "input_dim"),
        ({"kind": "logreg", "input_dim": 4, "num_classes": 1}, "num_classes"),
        ({"kind": "logreg", "input_dim": 4, "num_classes": 2, "hidden": (3,)}, "kind='mlp'"),
        ({"kind": "mlp", "input_dim": 4, "num_classes": 2}, "hidden="),
        ({"kind": "mlp", "input_dim": 4, "num_classes": 2, "hidden": (3, 0)}, "widths"),
    ],
)
def test_model_spec_rejects_bad_fields(kwargs: dict[str, object], match: str) -> None:
    # Execute / Assert
    with pytest.raises(TrainingError, match=match):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- gradient


def _numerical_gradient(weights: Weights, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    flat = flatten(weights).astype(np.float64)
    out = np.zeros_like(flat)
    for i in range(flat.size):
        plus, minus = flat.copy(), flat.copy()
        plus[i] += eps
        minus[i] -= eps
        loss_plus, _ = gradient(unflatten(plus, weights), x, y)
        loss_minus, _ = gradient(unflatten(minus, weights), x, y)
        out[i] = (loss_plus - loss_minus) / (2 * eps)
    return out


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=_spec_id)
def test_gradient_matches_central_differences(spec: ModelSpec, rng: np.random.Generator) -> None:
    # Prepare
    weights = init_weights(spec, rng)
    weights = {n: t + rng.normal(0, 0.1, t.shape).astype(np.float32) for n, t in weights.items()}
    x, y = _toy_data(spec, 8, rng)

    # Execute
    _, grads = gradient(weights, x, y)
    numerical = _numerical_gradient(weights, x, y, eps=1e-3)

    # Assert
    np.testing.assert_allclose(flatten(grads), numerical, rtol=1e-2, atol=1e-3)


def test_gradient_returns_weights_order_and_float32(rng: np.random.Generator) -> None:
    # Prepare
    weights = init_weights(MLP2, rng)
    x, y = _toy_data(MLP2, 8, rng)

    # Execute
    _, grads = gradient(weights, x, y)

    # Assert
    assert [(n, g.shape, g.dtype) for n, g in grads.items()] == [
        (n, s, np.dtype(np.float32)) for n, s in shapes(MLP2)
    ]


def test_gradient_does_not_modify_inputs(rng: np.random.Generator) -> None:
    # Prepare
    weights = init_weights(MLP1, rng)
    x, y = _toy_data(MLP1, 8, rng)
    before = flatten(weights).copy(), x.copy(), y.copy()

    # Execute
    gradient(weights, x, y)

    # Assert
    np.testing.assert_array_equal(flatten(weights), before[0])
    np.testing.assert_array_equal(x, before[1])
    np.testing.assert_array_equal(y, before[2])


def test_loss_is_finite_for_huge_logits(rng: np.random.Generator) -> None:
    # Prepare: logits of order 1e6 overflow exp() without the log-sum-exp shift.
    weights = init_weights(LOGREG, rng)
    x, y = _toy_data(LOGREG, 8, rng)

    # Execute
    loss, grads = gradient(weights, x * 1e6, y)

    # Assert
    assert math.isfinite(loss)
    assert np.isfinite(flatten(grads)).all()


def test_loss_of_uniform_prediction_is_log_num_classes(rng: np.random.Generator) -> None:
    # Prepare
    weights = {n: np.zeros(s, np.float32) for n, s in shapes(LOGREG)}
    x, y = _toy_data(LOGREG, 8, rng)

    # Execute
    loss, _ = gradient(weights, x, y)

    # Assert
    assert loss == pytest.approx(math.log(3), rel=1e-6)


# --------------------------------------------------------------------------- trainer basics


def test_numpy_trainer_satisfies_trainer_protocol() -> None:
    # Execute
    trainer: Trainer = NumpyTrainer(MLP1)

    # Assert
    assert trainer.spec == MLP1


def test_set_weights_copies(rng: np.random.Generator) -> None:
    # Prepare
    weights = init_weights(MLP1, rng)
    trainer = NumpyTrainer(MLP1)
    trainer.set_weights(weights)

    # Execute
    weights["w0"][...] = 99.0

    # Assert
    assert not (trainer.get_weights()["w0"] == 99.0).any()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: {**w, "w0": w["w0"][:, :1]},
        lambda w: {k: w[k] for k in reversed(w)},
        lambda w: {**w, "extra": w["b0"]},
        lambda w: {**w, "b0": np.full_like(w["b0"], np.nan)},
    ],
    ids=["shape", "order", "extra-name", "nan"],
)
def test_set_weights_rejects_mismatched_weights(
    mutate: Callable[[Weights], Weights], rng: np.random.Generator
) -> None:
    # Prepare
    trainer = NumpyTrainer(MLP1)

    # Execute / Assert
    with pytest.raises(TrainingError):
        trainer.set_weights(mutate(init_weights(MLP1, rng)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"lr": math.nan},
        {"prox_mu": -1.0},
        {"max_steps": -1},
        {"batch_order": [[np.arange(4)]], "epochs": 2},
    ],
    ids=["epochs", "batch_size", "lr-zero", "lr-nan", "prox_mu", "max_steps", "batch_order"],
)
def test_fit_rejects_bad_hyperparameters(
    kwargs: dict[str, object], rng: np.random.Generator
) -> None:
    # Prepare
    trainer = _trainer(MLP1)
    x, y = _toy_data(MLP1, 16, rng)
    args: dict[str, object] = {"epochs": 1, "batch_size": 4, "lr": 0.1, "rng": rng, **kwargs}

    # Execute / Assert
    with pytest.raises(TrainingError):
        trainer.fit(x, y, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x_shape", "labels"),
    [((16, 4), [0] * 16), ((16, 5), [0] * 15), ((16, 5), [3] * 16), ((16, 5), [-1] * 16)],
    ids=["features", "length", "label-high", "label-negative"],
)
def test_fit_rejects_bad_data(x_shape: tuple[int, int], labels: list[int]) -> None:
    # Prepare
    trainer = _trainer(MLP1)

    # Execute / Assert
    with pytest.raises(TrainingError):
        trainer.fit(
            np.zeros(x_shape, np.float32),
            np.array(labels, np.int64),
            epochs=1,
            batch_size=4,
            lr=0.1,
            rng=np.random.default_rng(0),
        )


def test_evaluate_counts_correct_predictions() -> None:
    # Prepare: identity weights predict the arg-max feature.
    spec = ModelSpec("logreg", input_dim=3, num_classes=3)
    trainer = NumpyTrainer(spec)
    trainer.set_weights({"w0": np.eye(3, dtype=np.float32), "b0": np.zeros(3, np.float32)})
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]

    # Execute
    result = trainer.evaluate(x, np.array([0, 1, 2, 1]))

    # Assert
    expected_loss = -math.log(math.e / (math.e + 2)) * 3 / 4 - math.log(1 / (math.e + 2)) / 4
    assert result.accuracy == 0.75
    assert result.num_examples == 4
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)


def test_fit_reports_throughput_from_the_clock(rng: np.random.Generator) -> None:
    # Prepare: a fake clock that advances 2 s per reading.
    ticks = iter(np.arange(0.0, 100.0, 2.0))
    trainer = NumpyTrainer(LOGREG, clock=lambda: float(next(ticks)))
    trainer.set_weights(init_weights(LOGREG, rng))
    x, y = _toy_data(LOGREG, 10, rng)

    # Execute
    result = trainer.fit(x, y, epochs=3, batch_size=4, lr=0.1, rng=rng)

    # Assert
    assert result.num_examples == 10
    assert result.num_steps == 9
    assert result.num_samples_seen == 30
    assert result.duration_s == 2.0
    assert result.samples_per_s == 15.0


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("spec", DIGITS_SPECS, ids=_spec_id)
def test_fit_decreases_loss_on_digits(spec: ModelSpec, digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, _ = digits
    trainer = _trainer(spec)
    before = trainer.evaluate(train.x, train.y)

    # Execute
    trainer.fit(train.x, train.y, epochs=2, batch_size=32, lr=0.1, rng=np.random.default_rng(0))

    # Assert
    assert trainer.evaluate(train.x, train.y).loss < 0.75 * before.loss


@pytest.mark.parametrize(
    ("spec", "lr"), list(zip(DIGITS_SPECS, [0.5, 0.2], strict=True)), ids=["logreg", "mlp"]
)
def test_central_training_reaches_90_percent_on_digits(
    spec: ModelSpec, lr: float, digits: tuple[Dataset, Dataset]
) -> None:
    # Prepare
    train, test = digits
    trainer = _trainer(spec)

    # Execute
    trainer.fit(train.x, train.y, epochs=10, batch_size=32, lr=lr, rng=np.random.default_rng(0))
    result = trainer.evaluate(test.x, test.y)

    # Assert: observed 0.949 (logreg) and 0.947 (mlp-64) on this split.
    assert result.accuracy > 0.9, result


def test_fit_loss_is_mean_of_last_epoch_batches(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(MLP1, 12, rng)
    epochs = [epoch_batches(12, 4, rng) for _ in range(2)]
    reference = _trainer(MLP1)
    for idx in epochs[0]:
        reference.step(x[idx], y[idx], lr=0.1)
    expected = np.mean([reference.step(x[idx], y[idx], lr=0.1) for idx in epochs[1]])
    trainer = _trainer(MLP1)

    # Execute
    result = trainer.fit(x, y, epochs=2, batch_size=4, lr=0.1, rng=rng, batch_order=epochs)

    # Assert
    assert result.loss == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- determinism, batches


def test_fit_is_deterministic_for_a_seed(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(MLP2, 64, rng)
    a, b = _trainer(MLP2), _trainer(MLP2)

    # Execute
    a.fit(x, y, epochs=3, batch_size=8, lr=0.1, rng=np.random.default_rng(42))
    b.fit(x, y, epochs=3, batch_size=8, lr=0.1, rng=np.random.default_rng(42))

    # Assert
    np.testing.assert_array_equal(flatten(a.get_weights()), flatten(b.get_weights()))


def test_fit_differs_for_another_seed(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(MLP2, 64, rng)
    a, b = _trainer(MLP2), _trainer(MLP2)

    # Execute
    a.fit(x, y, epochs=1, batch_size=8, lr=0.1, rng=np.random.default_rng(1))
    b.fit(x, y, epochs=1, batch_size=8, lr=0.1, rng=np.random.default_rng(2))

    # Assert
    assert not np.array_equal(flatten(a.get_weights()), flatten(b.get_weights()))


def test_batch_order_reproduces_rng_batches(rng: np.random.Generator) -> None:
    # Prepare: another trainer (LiteRT) gets the same batches from epoch_batches(seed).
    x, y = _toy_data(MLP1, 30, rng)
    order = [epoch_batches(30, 8, np.random.default_rng(5)) for _ in range(1)]
    a, b = _trainer(MLP1), _trainer(MLP1)

    # Execute
    a.fit(x, y, epochs=1, batch_size=8, lr=0.1, rng=np.random.default_rng(5))
    b.fit(x, y, epochs=1, batch_size=8, lr=0.1, rng=np.random.default_rng(99), batch_order=order)

    # Assert
    np.testing.assert_array_equal(flatten(a.get_weights()), flatten(b.get_weights()))


def test_step_by_step_matches_fit(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(MLP1, 30, rng)
    batches = epoch_batches(30, 8, np.random.default_rng(5))
    a, b = _trainer(MLP1), _trainer(MLP1)

    # Execute
    a.fit(x, y, epochs=1, batch_size=8, lr=0.1, rng=np.random.default_rng(5))
    for idx in batches:
        b.step(x[idx], y[idx], lr=0.1)

    # Assert
    np.testing.assert_array_equal(flatten(a.get_weights()), flatten(b.get_weights()))


@pytest.mark.parametrize(
    ("n", "batch_size", "sizes"), [(10, 4, [4, 4, 2]), (8, 8, [8]), (3, 5, [3])]
)
def test_epoch_batches_cover_a_permutation(
    n: int, batch_size: int, sizes: list[int], rng: np.random.Generator
) -> None:
    # Execute
    batches = epoch_batches(n, batch_size, rng)

    # Assert
    assert [len(b) for b in batches] == sizes
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))


# --------------------------------------------------------------------------- stopping


def test_should_stop_ends_training_between_batches(rng: np.random.Generator) -> None:
    # Prepare: the fourth poll says stop (battery low).
    polls = iter([False, False, False, True])
    x, y = _toy_data(LOGREG, 40, rng)
    trainer = _trainer(LOGREG)

    # Execute
    result = trainer.fit(
        x, y, epochs=5, batch_size=4, lr=0.1, rng=rng, should_stop=lambda: next(polls)
    )

    # Assert
    assert result.num_steps == 3
    assert result.stopped_early
    assert result.num_samples_seen == 12


def test_should_stop_before_first_batch_leaves_weights(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(LOGREG, 40, rng)
    trainer = _trainer(LOGREG)
    before = flatten(trainer.get_weights())

    # Execute
    result = trainer.fit(x, y, epochs=1, batch_size=4, lr=0.1, rng=rng, should_stop=lambda: True)

    # Assert
    assert result.num_steps == 0
    assert math.isnan(result.loss)
    assert result.samples_per_s == 0.0
    np.testing.assert_array_equal(flatten(trainer.get_weights()), before)


@pytest.mark.parametrize(("max_steps", "stopped"), [(0, True), (1, True), (7, True), (10, False)])
def test_max_steps_caps_local_work(max_steps: int, stopped: bool, rng: np.random.Generator) -> None:
    # Prepare: 2 epochs x 5 batches = 10 steps at most.
    x, y = _toy_data(LOGREG, 20, rng)
    trainer = _trainer(LOGREG)

    # Execute
    result = trainer.fit(x, y, epochs=2, batch_size=4, lr=0.1, rng=rng, max_steps=max_steps)

    # Assert
    assert result.num_steps == max_steps
    assert result.stopped_early is stopped


# --------------------------------------------------------------------------- FedProx


def test_prox_step_adds_mu_times_distance_to_global(rng: np.random.Generator) -> None:
    # Prepare: one plain step moves away from the global weights, so the term is non-zero.
    x, y = _toy_data(MLP1, 8, rng)
    global_w = init_weights(MLP1, rng)
    trainer = NumpyTrainer(MLP1)
    trainer.set_weights(global_w)
    trainer.step(x, y, lr=0.5)
    local_w = trainer.get_weights()
    _, grads = gradient(local_w, x, y)

    # Execute
    trainer.step(x, y, lr=0.1, prox_mu=0.3)

    # Assert
    expected = {
        n: w - np.float32(0.1) * (grads[n] + np.float32(0.3) * (w - global_w[n]))
        for n, w in local_w.items()
    }
    np.testing.assert_allclose(flatten(trainer.get_weights()), flatten(expected), atol=1e-6)


def test_larger_prox_mu_stays_closer_to_global(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, _ = digits
    spec = DIGITS_SPECS[1]
    global_w = init_weights(spec, np.random.default_rng(0))
    distances = []

    # Execute
    for mu in (0.0, 0.1, 1.0, 10.0):
        trainer = NumpyTrainer(spec)
        trainer.set_weights(global_w)
        trainer.fit(
            train.x, train.y, epochs=1, batch_size=32, lr=0.05, rng=np.random.default_rng(0),
            prox_mu=mu,
        )  # fmt: skip
        distances.append(_sq_distance(trainer.get_weights(), global_w))

    # Assert
    assert distances == sorted(distances, reverse=True)
    assert len(set(distances)) == 4


# --------------------------------------------------------------------------- SCAFFOLD


def _control(spec: ModelSpec, g: float, rng: np.random.Generator) -> ScaffoldControl:
    c_local = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in shapes(spec)}
    c_global = {n: t + np.float32(g) for n, t in c_local.items()}
    return ScaffoldControl(c_global=c_global, c_local=c_local)


def test_scaffold_correction_equals_training_with_linear_term(rng: np.random.Generator) -> None:
    # Prepare: c - c_i = g everywhere, so each step descends loss(w) + <g, w>.
    g = 0.05
    x, y = _toy_data(MLP1, 24, rng)
    control = _control(MLP1, g, rng)
    order = [epoch_batches(24, 8, rng) for _ in range(2)]
    trainer = _trainer(MLP1)
    manual = trainer.get_weights()

    # Execute
    trainer.fit(x, y, epochs=2, batch_size=8, lr=0.1, rng=rng, control=control, batch_order=order)
    for epoch in order:
        for idx in epoch:
            _, grads = gradient(manual, x[idx], y[idx])
            manual = {
                n: w - np.float32(0.1) * (grads[n] + np.float32(g)) for n, w in manual.items()
            }

    # Assert
    np.testing.assert_allclose(flatten(trainer.get_weights()), flatten(manual), atol=1e-5)


def test_scaffold_control_update_is_option_two(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(MLP1, 24, rng)
    control = _control(MLP1, 0.02, rng)
    trainer = _trainer(MLP1)
    anchor = trainer.get_weights()

    # Execute
    result = trainer.fit(x, y, epochs=2, batch_size=8, lr=0.1, rng=rng, control=control)

    # Assert: c_i+ = c_i - c + (x - y_i) / (K lr), and the delta is c_i+ - c_i.
    assert result.new_c_local is not None
    assert result.control_delta is not None
    local = trainer.get_weights()
    for name in anchor:
        expected = (
            control.c_local[name]
            - control.c_global[name]
            + (anchor[name] - local[name]) / (result.num_steps * 0.1)
        )
        np.testing.assert_allclose(result.new_c_local[name], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            result.control_delta[name], expected - control.c_local[name], rtol=1e-5, atol=1e-6
        )


def test_scaffold_without_steps_keeps_control(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(MLP1, 24, rng)
    control = _control(MLP1, 0.02, rng)
    trainer = _trainer(MLP1)

    # Execute
    result = trainer.fit(
        x, y, epochs=1, batch_size=8, lr=0.1, rng=rng, control=control, max_steps=0
    )

    # Assert
    assert result.new_c_local is not None
    assert result.control_delta is not None
    np.testing.assert_array_equal(flatten(result.new_c_local), flatten(control.c_local))
    assert not flatten(result.control_delta).any()


def test_fit_without_control_returns_no_control_fields(rng: np.random.Generator) -> None:
    # Prepare
    x, y = _toy_data(LOGREG, 8, rng)

    # Execute
    result = _trainer(LOGREG).fit(x, y, epochs=1, batch_size=4, lr=0.1, rng=rng)

    # Assert
    assert result.new_c_local is None
    assert result.control_delta is None
