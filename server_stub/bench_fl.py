"""``fedge bench fl``: accuracy against bytes, the same seeded federation with each uplink codec.

Every run is a complete ``fedge sim`` (private mosquitto, real coordinator, real
agents in worker processes) with the same seed, data split, partition, model and
schedule; only the uplink codec changes. For each dataset and codec it reports
the final and best test accuracy, the rounds needed to reach the target
accuracy, uplink and downlink bytes and wall time, and compares each codec with
float32 (``none``): accuracy difference in points and uplink reduction factor.
The table goes to stdout and, with ``--doc``, to a Markdown file with the
accuracy-against-megabytes plot next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.benchargs import check_output_file
from server_stub import report
from server_stub.sim import SimConfig, SimError, run_sim

CODECS: dict[str, dict[str, Any]] = {
    "none": {"codec": "none", "error_feedback": False},
    "int8": {"codec": "int8", "error_feedback": False},
    "int4+ef": {"codec": "int4", "error_feedback": True},
    "topk1%+int8+ef": {"codec": "topk", "error_feedback": True},
}
"""Row label -> the sim options that differ between runs."""

DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"dataset": "digits", "hidden": 64, "rounds": 40, "target_accuracy": 0.9},
    "mnist5k": {"dataset": "mnist5k", "hidden": 64, "rounds": 40, "target_accuracy": 0.85},
}
"""Dataset -> its model and schedule (the same for every codec)."""


def run(
    datasets: Sequence[str],
    codecs: Sequence[str],
    *,
    seed: int,
    rounds: int | None,
    clients: int,
    clients_per_round: int,
) -> dict[str, Any]:
    """Run every (dataset, codec) federation; return the figures (what ``--json`` writes)."""
    results: dict[str, Any] = {"seed": seed, "machine": platform.platform(), "runs": []}
    for ds in datasets:
        for label in codecs:
            options = {**DATASETS[ds], **CODECS[label]}
            if rounds is not None:
                options["rounds"] = rounds
            cfg = SimConfig(
                clients=clients,
                clients_per_round=clients_per_round,
                seed=seed,
                partition="dirichlet:0.5",
                **options,
            )
            print(f"  {ds:8} {label:16} ...", end="", flush=True)
            started = time.monotonic()
            sim = run_sim(cfg, show_progress=False)
            wall = time.monotonic() - started
            t = sim.totals
            print(f" {100 * (t['final_accuracy'] or 0):5.1f}%  {wall:5.1f}s", flush=True)
            results["runs"].append({
                "dataset": ds, "codec": label, "config": cfg.to_json(), "totals": t,
                "rounds": sim.rounds, "wall_s": wall,
            })  # fmt: skip
    _compare(results["runs"])
    return results


def _compare(runs: list[dict[str, Any]]) -> None:
    """Add accuracy difference and uplink reduction against the float32 run of each dataset."""
    base = {r["dataset"]: r["totals"] for r in runs if r["codec"] == "none"}
    for r in runs:
        b = base.get(r["dataset"])
        t = r["totals"]
        if b is None or b["final_accuracy"] is None or t["final_accuracy"] is None:
            r["vs_float32"] = None
            continue
        r["vs_float32"] = {
            "accuracy_points": 100 * (t["final_accuracy"] - b["final_accuracy"]),
            "uplink_reduction": b["bytes_up"] / max(1, t["bytes_up"]),
        }


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| dataset | uplink codec | final acc | best acc | rounds to target | uplink | "
        "downlink | vs float32: acc (points) | vs float32: uplink | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        t, cmp_ = r["totals"], r["vs_float32"]
        target = f"{t.get('rounds_to_target') or '-'} (≥{100 * t['target_accuracy']:.0f}%)"
        acc_diff = "-" if cmp_ is None else f"{cmp_['accuracy_points']:+.2f}"
        reduction = "-" if cmp_ is None else f"{cmp_['uplink_reduction']:.1f}×"
        lines.append(
            f"| {r['dataset']} | {r['codec']} | {100 * t['final_accuracy']:.2f}% | "
            f"{100 * t['best_accuracy']:.2f}% | {target} | {report.human_bytes(t['bytes_up'])} | "
            f"{report.human_bytes(t['bytes_down'])} | {acc_diff} | {reduction} | "
            f"{r['wall_s']:.1f}s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedge bench fl", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits,mnist5k")
    parser.add_argument(
        "--codecs",
        default=",".join(CODECS),
        help=f"comma-separated, from {', '.join(CODECS)}".replace("%", "%%"),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="override every run's rounds")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--json", metavar="FILE", help="write every run's records to FILE")
    parser.add_argument(
        "--doc",
        metavar="FILE.md",
        help="write the table (and FILE.png, accuracy against megabytes) here",
    )
    args = parser.parse_args(argv)
    check_output_file(parser, "--json", args.json)
    check_output_file(parser, "--doc", args.doc)
    datasets = [d for d in args.datasets.split(",") if d]
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = [d for d in datasets if d not in DATASETS] + [c for c in codecs if c not in CODECS]
    if unknown:
        parser.error(f"unknown dataset or codec: {', '.join(unknown)}")
    print(f"fedge bench fl: {len(datasets) * len(codecs)} federations, seed {args.seed}")
    try:
        results = run(
            datasets,
            codecs,
            seed=args.seed,
            rounds=args.rounds,
            clients=args.clients,
            clients_per_round=args.clients_per_round,
        )
    except SimError as exc:
        print(f"fedge bench fl: {exc}", file=sys.stderr)
        return 1
    table = markdown(results)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.doc:
        doc = Path(args.doc)
        png = doc.with_suffix(".png")
        report.plot_curves(
            png, {f"{r['dataset']} {r['codec']}": r["rounds"] for r in results["runs"]}
        )
        cfg = SimConfig()
        settings = {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k in ("epochs", "batch_size", "lr", "deadline_s", "min_fraction")
        }
        doc.write_text(
            "# Accuracy against bytes: `fedge bench fl`\n\n"
            f"Same seeded federation ({args.clients} devices, {args.clients_per_round} per "
            f"round, Dirichlet(0.5) label skew, MLP with 64 hidden units, {settings}) with each "
            "uplink codec, through a private mosquitto with real agents. Downlink is the raw "
            "float32 model in every run. Regenerate with "
            f"`fedge bench fl --doc {doc.as_posix()}`.\n\n"
            f"Machine: {results['machine']}, 2-core shared VM.\n\n"
            + table
            + f"\n![accuracy against round and megabytes]({png.name})\n"
        )
        print(f"wrote {doc} and {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
