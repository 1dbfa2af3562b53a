"""Tests of server_stub.strategies: every strategy against a plain NumPy reference of its paper.

References (float64, written from the papers, not from the implementation):
FedAvg (McMahan et al. 2017), FedAvgM (Hsu et al. 2019), FedAdam/FedYogi (Reddi et al. 2021,
Algorithm 2), SCAFFOLD (Karimireddy et al. 2020, Algorithm 1), median/trimmed mean (Yin et al.
2018), FedBuff (Nguyen et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from server_stub.aggregation import UpdateSource
from server_stub.strategies import (
    STRATEGIES,
    AcceptedUpdate,
    ClippedFedAvg,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedProx,
    FedYogi,
    RejectReason,
    Scaffold,
    Strategy,
    StrategyConfigError,
    StrategyStateError,
    TrainParams,
    TrimmedMean,
    UnknownStrategyError,
    make_strategy,
    staleness_weight,
)
from tests.codec_checks import Float16Codec

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
SIZE = 64
ROUNDS = 3
CLIENTS = 5


@dataclass(frozen=True)
class Client:
    delta: F32
    num_examples: int
    capability: float
    control_delta: F32


Rounds = list[list[Client]]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def x0(rng: np.random.Generator) -> F32:
    return rng.normal(size=SIZE).astype(np.float32)


@pytest.fixture
def rounds(rng: np.random.Generator) -> Rounds:
    return [
        [
            Client(
                delta=(0.1 * rng.normal(size=SIZE)).astype(np.float32),
                num_examples=int(rng.integers(1, 500)),
                capability=float(rng.uniform(0.2, 2.0)),
                control_delta=(0.05 * rng.normal(size=SIZE)).astype(np.float32),
            )
            for _ in range(CLIENTS)
        ]
        for _ in range(ROUNDS)
    ]


def _updates(clients: list[Client], encode: bool = False) -> list[AcceptedUpdate]:
    codec = Float16Codec()

    def src(x: F32) -> UpdateSource:
        return (codec, codec.encode(x)) if encode else x

    return [
        AcceptedUpdate(
            cid=f"dev-{i}",
            num_examples=c.num_examples,
            delta=src(c.delta),
            capability=c.capability,
            control_delta=src(c.control_delta),
        )
        for i, c in enumerate(clients)
    ]


def _run(strategy: Strategy, x0: F32, rounds: Rounds, encode: bool = False) -> list[F32]:
    x, models = x0, []
    for round_no, clients in enumerate(rounds, start=1):
        result = strategy.aggregate(round_no, x, _updates(clients, encode))
        assert result is not None
        x = result.model
        models.append(x)
    return models


# ---- plain NumPy references ---------------------------------------------------------------------


def _mean_delta(clients: list[Client], weight_by: str) -> F64:
    if weight_by == "uniform":
        w = np.ones(len(clients))
    elif weight_by == "examples":
        w = np.array([c.num_examples for c in clients], dtype=np.float64)
    else:
        w = np.array([c.num_examples * c.capability for c in clients], dtype=np.float64)
    deltas = np.stack([c.delta.astype(np.float64) for c in clients])
    return np.asarray((w[:, None] * deltas).sum(axis=0) / w.sum())


def ref_fedavg(x0: F32, rounds: Rounds, weight_by: str = "examples") -> list[F64]:
    x, out = x0.astype(np.float64), []
    for clients in rounds:
        x = x + _mean_delta(clients, weight_by)
        out.append(x)
    return out


def ref_fedavgm(x0: F32, rounds: Rounds, server_lr: float, momentum: float) -> list[F64]:
    x, v, out = x0.astype(np.float64), np.zeros(SIZE), []
    for clients in rounds:
        v = momentum * v + _mean_delta(clients, "examples")
        x = x + server_lr * v
        out.append(x)
    return out


def ref_adaptive(
    x0: F32, rounds: Rounds, kind: str, *, eta: float, beta1: float, beta2: float, tau: float
) -> list[F64]:
    # Reddi et al. 2021, Algorithm 2 (FedAdam / FedYogi), with m_{-1} = 0 and v_{-1} = τ².
    x, m, v, out = x0.astype(np.float64), np.zeros(SIZE), np.full(SIZE, tau**2), []
    for clients in rounds:
        d = _mean_delta(clients, "examples")
        m = beta1 * m + (1 - beta1) * d
        if kind == "adam":
            v = beta2 * v + (1 - beta2) * d**2
        else:
            v = v - (1 - beta2) * d**2 * np.sign(v - d**2)
        x = x + eta * m / (np.sqrt(v) + tau)
        out.append(x)
    return out


def ref_scaffold(
    x0: F32, rounds: Rounds, server_lr: float, num_clients: int
) -> tuple[list[F64], F64]:
    # Karimireddy et al. 2020, Algorithm 1, server lines: x += η_g mean Δy; c += |S|/N mean Δc.
    x, c, out = x0.astype(np.float64), np.zeros(SIZE), []
    for clients in rounds:
        dy = np.mean([cl.delta.astype(np.float64) for cl in clients], axis=0)
        dc = np.mean([cl.control_delta.astype(np.float64) for cl in clients], axis=0)
        x = x + server_lr * dy
        c = c + len(clients) / num_clients * dc
        out.append(x)
    return out, c


def ref_clipped(x0: F32, rounds: Rounds, max_norm: float) -> list[F64]:
    x, out = x0.astype(np.float64), []
    for clients in rounds:
        clipped = []
        for c in clients:
            scale = min(1.0, max_norm / float(np.linalg.norm(c.delta.astype(np.float64))))
            delta = (c.delta * scale).astype(np.float32)
            clipped.append(Client(delta, c.num_examples, c.capability, c.control_delta))
        x = x + _mean_delta(clipped, "examples")
        out.append(x)
    return out


def ref_median(x0: F32, rounds: Rounds) -> list[F64]:
    x, out = x0.astype(np.float64), []
    for clients in rounds:
        x = x + np.median(np.stack([c.delta for c in clients]).astype(np.float64), axis=0)
        out.append(x)
    return out


def ref_trimmed(x0: F32, rounds: Rounds, beta: float) -> list[F64]:
    x, out = x0.astype(np.float64), []
    for clients in rounds:
        n = len(clients)
        k = int(np.floor(beta * n))
        ordered = np.sort(np.stack([c.delta for c in clients]).astype(np.float64), axis=0)
        x = x + ordered[k : n - k].mean(axis=0)
        out.append(x)
    return out


CASES: dict[str, tuple[Callable[[], Strategy], Callable[[F32, Rounds], list[F64]]]] = {
    "fedavg": (FedAvg, ref_fedavg),
    "fedavg-capability": (
        lambda: FedAvg(weight_by="examples*capability"),
        lambda x0, r: ref_fedavg(x0, r, "examples*capability"),
    ),
    "fedavg-uniform": (
        lambda: FedAvg(weight_by="uniform"),
        lambda x0, r: ref_fedavg(x0, r, "uniform"),
    ),
    "fedprox": (lambda: FedProx(mu=0.1), ref_fedavg),
    "fedavgm": (
        lambda: FedAvgM(server_lr=0.7, momentum=0.9),
        lambda x0, r: ref_fedavgm(x0, r, 0.7, 0.9),
    ),
    "fedadam": (
        lambda: FedAdam(server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
        lambda x0, r: ref_adaptive(x0, r, "adam", eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
    ),
    "fedyogi": (
        lambda: FedYogi(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2),
        lambda x0, r: ref_adaptive(x0, r, "yogi", eta=0.05, beta1=0.8, beta2=0.95, tau=1e-2),
    ),
    "scaffold": (
        lambda: Scaffold(server_lr=0.5, num_clients=20),
        lambda x0, r: ref_scaffold(x0, r, 0.5, 20)[0],
    ),
    "clipped": (lambda: ClippedFedAvg(max_norm=0.78), lambda x0, r: ref_clipped(x0, r, 0.78)),
    "median": (lambda: CoordinateMedian(capacity=8), ref_median),
    "trimmed_mean": (
        lambda: TrimmedMean(beta=0.2, capacity=8),
        lambda x0, r: ref_trimmed(x0, r, 0.2),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_matches_numpy_reference(case: str, x0: F32, rounds: Rounds) -> None:
    # Prepare
    factory, reference = CASES[case]
    # Execute
    models = _run(factory(), x0, rounds)
    # Assert
    for model, expected in zip(models, reference(x0, rounds), strict=True):
        assert model.dtype == np.float32
        np.testing.assert_allclose(model, expected, rtol=1e-4, atol=1e-5)


def test_clipping_case_actually_clips(rounds: Rounds) -> None:
    norms = [np.linalg.norm(c.delta) for clients in rounds for c in clients]
    assert min(norms) < 0.78 < max(norms)


def test_scaffold_control_variate_matches_reference(x0: F32, rounds: Rounds) -> None:
    # Prepare
    strategy = Scaffold(server_lr=0.5, num_clients=20)
    # Execute
    _run(strategy, x0, rounds)
    # Assert
    _, c_expected = ref_scaffold(x0, rounds, 0.5, 20)
    c = strategy.control_variate
    assert c is not None
    np.testing.assert_allclose(c, c_expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_encoded_equals_decoded_in_memory(case: str, x0: F32, rounds: Rounds) -> None:
    # Prepare: the in-memory path gets the updates already decoded by the same codec
    codec = Float16Codec()
    decoded_rounds = [
        [
            Client(
                codec.decode(codec.encode(c.delta), np.empty(SIZE, np.float32)),
                c.num_examples,
                c.capability,
                codec.decode(codec.encode(c.control_delta), np.empty(SIZE, np.float32)),
            )
            for c in clients
        ]
        for clients in rounds
    ]
    factory, _ = CASES[case]
    # Execute
    streamed = _run(factory(), x0, rounds, encode=True)
    in_memory = _run(factory(), x0, decoded_rounds, encode=False)
    # Assert
    for a, b in zip(streamed, in_memory, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- configure_round -------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "mu"), [(FedAvg(), 0.0), (FedProx(mu=0.25), 0.25)])
def test_configure_round_sends_prox_mu(strategy: Strategy, mu: float) -> None:
    # Execute
    config = strategy.configure_round(4, ["a", "b"])
    # Assert
    assert config.round_no == 4
    assert set(config.train) == {"a", "b"}
    assert all(p.prox_mu == mu for p in config.train.values())


def test_configure_round_uses_train_params() -> None:
    strategy = FedProx(mu=0.1, train=TrainParams(epochs=3, batch_size=16, lr=0.05))
    params = strategy.configure_round(1, ["a"]).train["a"]
    assert (params.epochs, params.batch_size, params.lr, params.prox_mu) == (3, 16, 0.05, 0.1)


def test_scaffold_round_config_carries_control_variate(x0: F32, rounds: Rounds) -> None:
    # Prepare
    strategy = Scaffold(num_clients=10)
    first = strategy.configure_round(1, ["a"])
    _run(strategy, x0, rounds[:1])
    # Execute
    second = strategy.configure_round(2, ["a"])
    # Assert
    assert first.send_control_variate and first.control_variate is None  # devices start at c = 0
    assert second.send_control_variate
    assert second.control_variate is not None
    assert not second.control_variate.flags.writeable
    assert second.control_variate.any()


def test_non_scaffold_round_config_has_no_control_variate() -> None:
    config = FedAdam().configure_round(1, ["a"])
    assert not config.send_control_variate
    assert config.control_variate is None


# ---- rejection is data ---------------------------------------------------------------------------


def _update(cid: str = "a", n: int = 10, delta: UpdateSource | None = None) -> AcceptedUpdate:
    return AcceptedUpdate(cid, n, np.ones(SIZE, np.float32) if delta is None else delta)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (_update(n=0), RejectReason.NO_WEIGHT),
        (_update(delta=np.ones(SIZE + 1, np.float32)), RejectReason.SHAPE_MISMATCH),
        (_update(delta=np.full(SIZE, np.nan, np.float32)), RejectReason.NON_FINITE),
        (_update(delta=(Float16Codec(), b"\x01\x02\x03")), RejectReason.CORRUPT_PAYLOAD),
    ],
)
def test_bad_update_is_rejected_with_reason(
    x0: F32, update: AcceptedUpdate, reason: RejectReason
) -> None:
    # Prepare
    strategy = FedAvg()
    strategy.begin_round(x0)
    # Execute
    verdict = strategy.accept(update)
    # Assert
    assert not verdict.accepted
    assert verdict.reason is reason
    assert strategy.rejected == {reason: 1}


def test_rejected_update_does_not_touch_model(x0: F32) -> None:
    # Prepare
    strategy = FedAvg()
    strategy.begin_round(x0)
    strategy.accept(_update("good", delta=np.full(SIZE, 0.5, np.float32)))
    strategy.accept(_update("bad", delta=np.full(SIZE, np.inf, np.float32)))
    # Execute
    model = strategy.finish()
    # Assert
    assert model is not None
    np.testing.assert_allclose(model, x0 + 0.5, rtol=1e-6)


def test_duplicate_device_is_rejected(x0: F32) -> None:
    strategy = FedAvg()
    strategy.begin_round(x0)
    strategy.accept(_update("a"))
    assert strategy.accept(_update("a")).reason is RejectReason.DUPLICATE


def test_scaffold_rejects_update_without_control_variate(x0: F32) -> None:
    strategy = Scaffold(num_clients=4)
    strategy.begin_round(x0)
    assert strategy.accept(_update()).reason is RejectReason.MISSING_CONTROL_VARIATE


@pytest.mark.parametrize("strategy_cls", [CoordinateMedian, TrimmedMean])
def test_robust_strategy_rejects_past_capacity(x0: F32, strategy_cls: type[Strategy]) -> None:
    # Prepare
    strategy = strategy_cls(capacity=2)  # type: ignore[call-arg]
    strategy.begin_round(x0)
    strategy.accept(_update("a"))
    strategy.accept(_update("b"))
    # Execute
    verdict = strategy.accept(_update("c"))
    # Assert
    assert verdict.reason is RejectReason.BUFFER_FULL
    assert strategy.num_accepted == 2


@pytest.mark.parametrize("strategy", [CoordinateMedian(capacity=16), TrimmedMean(beta=0.2)])
def test_robust_strategy_resists_outliers(
    rng: np.random.Generator, x0: F32, strategy: Strategy
) -> None:
    # Prepare: 8 honest devices move +1, 2 attackers push +1e4 and -1e4
    honest = [np.float32(1.0) + 0.01 * rng.normal(size=SIZE).astype(np.float32) for _ in range(8)]
    attack = [np.full(SIZE, 1e4, np.float32), np.full(SIZE, -1e4, np.float32)]
    updates = [_update(f"d{i}", delta=d) for i, d in enumerate(honest + attack)]
    # Execute
    result = strategy.aggregate(1, x0, updates)
    # Assert
    assert result is not None
    assert np.abs(result.model - (x0 + 1.0)).max() < 0.1


# ---- quorum and lifecycle ----------------------------------------------------------------------


def test_no_updates_keeps_model_and_optimizer_state(x0: F32, rounds: Rounds) -> None:
    # Prepare
    strategy = FedAdam()
    _run(strategy, x0, rounds[:1])
    before = strategy.state_dict()
    # Execute
    result = strategy.aggregate(2, x0, [])
    # Assert
    assert result is None
    for name, vec in strategy.state_dict().items():
        np.testing.assert_array_equal(vec, before[name])


def test_below_min_updates_returns_none(x0: F32) -> None:
    strategy = FedAvg(min_updates=3)
    result = strategy.aggregate(1, x0, [_update("a"), _update("b")])
    assert result is None


def test_aggregate_does_not_modify_global_model(x0: F32, rounds: Rounds) -> None:
    before = x0.copy()
    _run(FedAvgM(), x0, rounds)
    np.testing.assert_array_equal(x0, before)


def test_aggregate_result_counts(x0: F32, rounds: Rounds) -> None:
    result = FedAvg().aggregate(1, x0, [*_updates(rounds[0]), _update("x", n=0)])
    assert result is not None
    assert result.num_updates == CLIENTS
    assert result.num_examples == sum(c.num_examples for c in rounds[0])
    assert result.rejected == {RejectReason.NO_WEIGHT: 1}


@pytest.mark.parametrize("call", ["accept", "finish"])
def test_lifecycle_misuse_raises(call: str) -> None:
    strategy = FedAvg()
    with pytest.raises(StrategyStateError, match="begin_round"):
        if call == "accept":
            strategy.accept(_update())
        else:
            strategy.finish()


def test_begin_round_rejects_float64_model() -> None:
    with pytest.raises(StrategyStateError, match="float32"):
        FedAvg().begin_round(np.zeros(3))  # type: ignore[arg-type]


# ---- state_dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "keys"),
    [
        (FedAvgM, {"momentum"}),
        (FedAdam, {"m", "v"}),
        (FedYogi, {"m", "v"}),
        (lambda: Scaffold(num_clients=8), {"c"}),
        (FedAvg, set()),
    ],
)
def test_state_dict_round_trip_resumes_identically(
    factory: Callable[[], Strategy], keys: set[str], x0: F32, rounds: Rounds
) -> None:
    # Prepare: run two rounds, checkpoint, restore into a fresh strategy
    original = factory()
    x2 = _run(original, x0, rounds[:2])[-1]
    state = original.state_dict()
    restored = factory()
    restored.load_state_dict(state)
    # Execute
    a = _run(original, x2, rounds[2:])[-1]
    b = _run(restored, x2, rounds[2:])[-1]
    # Assert
    assert set(state) == keys
    assert all(v.dtype == np.float32 for v in state.values())
    np.testing.assert_array_equal(a, b)


def test_state_dict_returns_copies(x0: F32, rounds: Rounds) -> None:
    strategy = FedAvgM()
    _run(strategy, x0, rounds[:1])
    strategy.state_dict()["momentum"][:] = 99.0
    assert not (strategy.state_dict()["momentum"] == 99.0).any()


@pytest.mark.parametrize(
    "state",
    [
        {"m": np.zeros(SIZE, np.float32)},
        {"m": np.zeros(SIZE, np.float32), "v": np.zeros(SIZE, np.float64)},
        {"m": np.zeros(SIZE, np.float32), "v": np.zeros(SIZE + 1, np.float32)},
    ],
)
def test_load_state_dict_rejects_bad_state(state: dict[str, np.ndarray]) -> None:
    with pytest.raises(StrategyStateError):
        FedAdam().load_state_dict(state)


def test_loaded_state_of_other_model_size_is_refused(x0: F32) -> None:
    strategy = FedAvgM()
    strategy.load_state_dict({"momentum": np.zeros(SIZE + 1, np.float32)})
    with pytest.raises(StrategyStateError, match="elements"):
        strategy.begin_round(x0)


# ---- FedBuff ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("staleness", "weight"), [(0, 1.0), (1, 2**-0.5), (3, 0.5), (8, 1 / 3)])
def test_staleness_weight(staleness: int, weight: float) -> None:
    assert staleness_weight(staleness) == pytest.approx(weight)


def test_fedbuff_matches_reference(rng: np.random.Generator, x0: F32) -> None:
    # Prepare
    staleness = [0, 2, 5, 1]
    deltas = [(0.1 * rng.normal(size=SIZE)).astype(np.float32) for _ in staleness]
    strategy = FedBuff(buffer_size=4, max_staleness=5, server_lr=0.8)
    strategy.begin_round(x0)
    # Execute
    verdicts = [
        strategy.accept(AcceptedUpdate("same-device", 10, d, staleness=s))
        for d, s in zip(deltas, staleness, strict=True)
    ]
    model = strategy.finish()
    # Assert: Nguyen et al. 2022: x + η Σ Δ_i/√(1+τ_i) / K
    expected = x0.astype(np.float64) + 0.8 * sum(
        d.astype(np.float64) / np.sqrt(1 + s) for d, s in zip(deltas, staleness, strict=True)
    ) / len(deltas)
    assert [v.ready for v in verdicts] == [False, False, False, True]
    assert model is not None
    np.testing.assert_allclose(model, expected, rtol=1e-5, atol=1e-6)


def test_fedbuff_rejects_too_stale_update(x0: F32) -> None:
    # Prepare
    strategy = FedBuff(buffer_size=2, max_staleness=3)
    strategy.begin_round(x0)
    # Execute
    verdict = strategy.accept(AcceptedUpdate("a", 10, np.ones(SIZE, np.float32), staleness=4))
    # Assert
    assert not verdict.accepted
    assert verdict.reason is RejectReason.TOO_STALE
    assert strategy.num_accepted == 0


def test_fedbuff_accepts_at_max_staleness(x0: F32) -> None:
    strategy = FedBuff(buffer_size=2, max_staleness=3)
    strategy.begin_round(x0)
    assert strategy.accept(AcceptedUpdate("a", 10, np.ones(SIZE, np.float32), staleness=3)).accepted


def test_fedbuff_refuses_when_buffer_full(x0: F32) -> None:
    strategy = FedBuff(buffer_size=1)
    strategy.begin_round(x0)
    strategy.accept(_update("a"))
    assert strategy.accept(_update("b")).reason is RejectReason.BUFFER_FULL


# ---- make_strategy ------------------------------------------------------------------------------

REQUIRED: dict[str, dict[str, object]] = {
    "scaffold": {"num_clients": 10},
    "clipped": {"max_norm": 1.0},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_make_strategy_builds_each_id(name: str) -> None:
    strategy = make_strategy(name, REQUIRED.get(name, {}))
    assert type(strategy) is STRATEGIES[name]
    assert strategy.strategy_id == name


def test_make_strategy_routes_train_params() -> None:
    strategy = make_strategy("fedprox", {"mu": 0.5, "epochs": 2, "lr": 0.1})
    params = strategy.configure_round(1, ["a"]).train["a"]
    assert (params.epochs, params.lr, params.prox_mu) == (2, 0.1, 0.5)


def test_make_strategy_unknown_name_lists_valid_ids() -> None:
    with pytest.raises(UnknownStrategyError, match="fedavg, fedprox") as info:
        make_strategy("fedsgd", {})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedavg", {"momentum": 0.9}, "no parameter"),
        ("fedprox", {"mu": -1.0}, "mu"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedadam", {"tau": 0.0}, "tau"),
        ("fedyogi", {"beta2": "high"}, "beta2"),
        ("scaffold", {}, "num_clients"),
        ("clipped", {"max_norm": float("inf")}, "max_norm"),
        ("median", {"capacity": 0}, "capacity"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("fedbuff", {"max_staleness": -1}, "max_staleness"),
        ("fedbuff", {"buffer_size": 2.5}, "buffer_size"),
        ("fedavg", {"weight_by": "speed"}, "weight_by"),
        ("fedavg", {"epochs": 0}, "epochs"),
        ("fedavg", {"lr": True}, "lr"),
        ("fedavg", {"extra": "fast"}, "extra"),
    ],
)
def test_make_strategy_bad_params_raise_typed_error(
    name: str, params: dict[str, object], match: str
) -> None:
    with pytest.raises(StrategyConfigError, match=match):
        make_strategy(name, params)


def test_begin_round_again_abandons_open_round(x0: F32) -> None:
    # Prepare
    strategy = FedAvgM()
    strategy.begin_round(x0, round_no=1)
    strategy.accept(_update("a"))
    # Execute
    strategy.begin_round(x0, round_no=1)
    model = strategy.finish()
    # Assert
    assert model is None
    assert strategy.num_accepted == 0
