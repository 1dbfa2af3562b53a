"""Footprint of the device agent: idle memory and CPU, and the time of one training task.

``fedge bench agent`` (or ``python -m edge.bench_agent``) measures

- idle RSS and idle CPU of a real ``fedge agent`` process (NumPy trainer, local ``.npz``
  data, 30 s heartbeat) connected to a private mosquitto, over ``--idle-s`` seconds;
- the time of one training task (fit + update encoding, int8 codec) on MNIST-5k with the
  784-64-10 MLP, NumPy trainer vs LiteRT trainer.

Targets (design): idle RSS <= 60 MB, idle CPU <= 1 % of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.benchargs import check_output_file, float_above, int_at_least


def _idle(idle_s: float, heartbeat_s: float, work: Path) -> dict[str, float]:
    from edge.data import load_builtin, save_dataset
    from edge.mosquitto import MosquittoBroker
    from edge.telemetry import process_cpu_seconds, process_rss_mb

    data = work / "data.npz"
    save_dataset(data, load_builtin("digits"))
    with MosquittoBroker(work / "broker", persistence=False) as broker:
        config = work / "agent.toml"
        config.write_text(
            f'fleet = "bench"\ndevice_id = "bench-agent"\n[broker]\nurl = "{broker.url}"\n'
            f'[data]\npath = "{data}"\n[agent]\nheartbeat_s = {heartbeat_s}\n'
            f'state_dir = "{work / "state"}"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.agent_main", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(3.0)  # start-up: imports, data, connect (not part of the idle figure)
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {proc.returncode}")
            cpu0, t0 = process_cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle_s)
            cpu1, t1 = process_cpu_seconds(proc.pid), time.monotonic()
            rss = process_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "idle_rss_mb": rss,
        "idle_cpu_percent": 100.0 * (cpu1 - cpu0) / (t1 - t0),
        "idle_window_s": t1 - t0,
        "exit_code": float(proc.returncode),
    }


def _train_time(trainer_kind: str, epochs: int, repeats: int) -> dict[str, float]:
    from edge.data import load_builtin
    from edge.eligibility import seeded_codec_config
    from edge.modelio import encode_update
    from edge.training import ModelSpec, NumpyTrainer, Trainer, init_weights
    from kernels.codec import PRESETS

    data = load_builtin("mnist5k")
    trainer: Trainer
    if trainer_kind == "litert":
        from edge.litert_training import LiteRTTrainer

        trainer = LiteRTTrainer.from_bundled("mnist_mlp")
    else:
        trainer = NumpyTrainer(ModelSpec("mlp", 784, 10, hidden=(64,)))
    weights = init_weights(trainer.spec, np.random.default_rng(0))
    codec = seeded_codec_config(PRESETS["int8"], "bench")
    times, fits = [], []
    for r in range(repeats):
        start = time.perf_counter()
        trainer.set_weights(weights)
        result = trainer.fit(
            data.x, data.y, epochs=epochs, batch_size=32, lr=0.05, rng=np.random.default_rng(r)
        )
        fit_done = time.perf_counter()
        new = trainer.get_weights()
        encode_update({n: new[n] - weights[n] for n in weights}, codec)
        times.append(time.perf_counter() - start)
        fits.append(fit_done - start)
    return {
        "task_s": float(np.median(times)),
        "fit_s": float(np.median(fits)),
        "samples_per_s": data.num_examples * epochs / float(np.median(fits)),
        "loss": float(result.loss),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; return the exit status."""
    parser = argparse.ArgumentParser(prog="fedge bench agent", description=__doc__)
    parser.add_argument("--idle-s", type=float_above(0), default=60.0, help="idle window (seconds)")
    parser.add_argument("--heartbeat-s", type=float_above(0), default=30.0)
    parser.add_argument(
        "--epochs", type=int_at_least(1), default=1, help="epochs of the training task"
    )
    parser.add_argument("--repeats", type=int_at_least(1), default=3)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    args = parser.parse_args(argv)
    check_output_file(parser, "--json", args.json)
    results: dict[str, Any] = {"cpu_count": os.cpu_count()}
    if not args.skip_idle:
        with tempfile.TemporaryDirectory(prefix="fedge-bench-agent-") as tmp:
            results["idle"] = _idle(args.idle_s, args.heartbeat_s, Path(tmp))
        idle = results["idle"]
        print(f"idle agent (NumPy trainer, heartbeat {args.heartbeat_s:g} s, "
              f"{idle['idle_window_s']:.0f} s window)")  # fmt: skip
        print(f"  RSS            {idle['idle_rss_mb']:8.1f} MB   (target <= 60)")
        print(f"  CPU            {idle['idle_cpu_percent']:8.3f} %    (target <= 1 % of a core)")
    print(f"one training task: MNIST-5k, MLP 784-64-10, {args.epochs} epoch(s), batch 32, "
          "+ int8 encoding")  # fmt: skip
    print(f"  {'trainer':<8} {'task s':>8} {'fit s':>8} {'samples/s':>10}")
    for kind in ("numpy", "litert"):
        try:
            row = _train_time(kind, args.epochs, args.repeats)
        except ImportError as exc:
            print(f"  {kind:<8} unavailable: {exc}")
            continue
        results[kind] = row
        print(f"  {kind:<8} {row['task_s']:8.3f} {row['fit_s']:8.3f} {row['samples_per_s']:10.0f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
