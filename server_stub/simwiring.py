"""Build the coordinator of ``fedge sim`` (a composition root: it may import ``edge``).

The coordinator's library code never imports ``edge.training``; the simulator
builds the evaluation hook from it here and passes it in, as ``fedge
coordinator`` does for a real fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.modelio import ModelLayout
from kernels.codec import parse_codec

if TYPE_CHECKING:
    from edge.data import Dataset
    from server_stub.coordinator import Coordinator
    from server_stub.sim import SimConfig


def model_spec_for(cfg: SimConfig, train: Dataset) -> dict[str, Any]:
    """The model every simulated device trains (JSON-safe, sent to the workers)."""
    num_classes = int(train.num_classes)
    from server_stub.sim import SimUsageError

    if cfg.model.endswith(".tflite"):
        from edge.litert_training import LiteRTTrainer

        spec = LiteRTTrainer.from_file(cfg.model).spec
        if spec.input_dim != train.input_dim or spec.num_classes < num_classes:
            raise SimUsageError(
                f"--model {cfg.model} takes {spec.input_dim} features and {spec.num_classes} "
                f"classes; --dataset {cfg.dataset} has {train.input_dim} features and "
                f"{num_classes} classes"
            )
        return {
            "kind": spec.kind,
            "input_dim": spec.input_dim,
            "num_classes": spec.num_classes,
            "hidden": list(spec.hidden),
            "tflite": str(Path(cfg.model).resolve()),
        }
    if cfg.model not in ("logreg", "mlp"):
        raise SimUsageError(f"--model must be logreg, mlp or a .tflite file, got {cfg.model!r}")
    hidden = [cfg.hidden] if cfg.model == "mlp" else []
    spec_json: dict[str, Any] = {
        "kind": cfg.model,
        "input_dim": int(train.input_dim),
        "num_classes": num_classes,
        "hidden": hidden,
    }
    if cfg.trainer == "litert":
        from edge.litert_training import BUNDLED_MODELS, LiteRTTrainer, bundled_model_path

        for name in BUNDLED_MODELS:
            path = bundled_model_path(name)
            spec = LiteRTTrainer.from_file(path).spec
            if spec.input_dim == spec_json["input_dim"] and spec.num_classes == num_classes:
                return {
                    **spec_json,
                    "kind": "mlp",
                    "hidden": list(spec.hidden),
                    "tflite": str(path),
                }
        raise SimUsageError("no bundled .tflite model fits this dataset; pass --model PATH.tflite")
    return spec_json


def _evaluator(
    spec: Mapping[str, Any], test: Dataset
) -> Callable[[Mapping[str, np.ndarray]], dict[str, float]]:
    from edge.training import ModelSpec, NumpyTrainer

    trainer = NumpyTrainer(
        ModelSpec(
            kind=spec["kind"],
            input_dim=int(spec["input_dim"]),
            num_classes=int(spec["num_classes"]),
            hidden=tuple(spec["hidden"]),
        )
    )

    def evaluate(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        trainer.set_weights({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
        result = trainer.evaluate(test.x, test.y)
        return {"accuracy": float(result.accuracy), "loss": float(result.loss)}

    return evaluate


def strategy_for(cfg: SimConfig) -> tuple[str, dict[str, Any]]:
    """The coordinator's strategy id and its parameters for the simulator's options."""
    strategy = "fedbuff" if cfg.async_mode and cfg.strategy == "fedavg" else cfg.strategy
    strategy_params: dict[str, Any] = {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
    }
    if strategy == "fedprox":
        strategy_params["mu"] = 0.01
    if strategy == "scaffold":
        strategy_params["num_clients"] = cfg.clients
    if strategy == "clipped":
        strategy_params["max_norm"] = cfg.clip_norm
    if strategy == "trimmed_mean":
        strategy_params["beta"] = cfg.trim_beta
    return strategy, strategy_params


def build_coordinator(
    cfg: SimConfig,
    broker_url: str,
    workdir: Path,
    train: Dataset,
    test: Dataset,
    spec: Mapping[str, Any],
    on_round: Callable[[dict[str, Any]], None],
    fleet: str = "sim",
) -> Coordinator:
    """The real coordinator, on its own MQTT connection to the simulation's broker."""
    from edge.training import ModelSpec, init_weights
    from server_stub.config import config_from_dict
    from server_stub.coordinator import Coordinator, mqtt_transport_for
    from server_stub.store import Store

    strategy, strategy_params = strategy_for(cfg)
    broker: dict[str, Any] = {"url": broker_url, "client_id": "fedge-coordinator"}
    if fleet != "sim":
        # A shared broker (--broker URL): a client id of this run only, and no session
        # left behind on the broker when the run ends.
        broker = {**broker, "client_id": f"fedge-coordinator-{fleet}", "session_expiry_s": 0}
    config = config_from_dict(
        {
            "fleet": fleet,
            "seed": cfg.seed,
            "rounds_total": cfg.rounds,
            "strategy": {"name": strategy, **strategy_params},
            "selection": {"policy": cfg.selection},
            "rounds": {
                "clients_per_round": cfg.clients_per_round,
                "min_fraction": cfg.min_fraction,
                "deadline_s": cfg.deadline_s,
                "mode": "async" if cfg.async_mode else "sync",
                "concurrency": cfg.clients_per_round,
            },
            "uplink": {
                "codec": parse_codec(cfg.codec),
                "error_feedback": cfg.resolved_error_feedback(),
            },
            "broker": broker,
            "state": {"db": str(workdir / "coordinator.db")},
            "startup_grace_s": 2.0,
        },
        base_dir=workdir,
    )
    model_spec = ModelSpec(
        kind=spec["kind"],
        input_dim=int(spec["input_dim"]),
        num_classes=int(spec["num_classes"]),
        hidden=tuple(spec["hidden"]),
    )
    weights = init_weights(model_spec, np.random.default_rng(cfg.seed))
    if "tflite" in spec:
        from edge.litert_training import LiteRTTrainer

        weights = LiteRTTrainer.from_file(spec["tflite"]).get_weights()
    transport = mqtt_transport_for(config)
    return Coordinator(
        config,
        transport,
        Store(config.state_db),
        layout=ModelLayout.of(weights),
        initial_weights=weights,
        evaluate=_evaluator(spec, test),
        on_round=on_round,
        rng=np.random.default_rng(cfg.seed),
    )
