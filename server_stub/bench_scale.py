"""``fedge bench scale``: a thousand devices on one broker, and what it costs the coordinator.

Runs ``fedge sim`` (real mosquitto, real coordinator, real agents: every device
has its own MQTT connection and state, several share a worker process) and
samples, after every round: the coordinator process's CPU seconds spent in the
round (its per-round overhead: selection, tasks, validation, aggregation,
checkpoint, model publication, evaluation), its RSS and threads, and the
broker's RSS and connected sockets. Prints a table and, with ``--doc``, writes
it to a Markdown file.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.mosquitto import BrokerError, MosquittoBroker
from server_stub.bench_soak import sample
from server_stub.sim import SimConfig, SimError, run_sim


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedge bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    parser.add_argument("--doc", metavar="FILE.md", help="write the table to FILE.md")
    args = parser.parse_args(argv)
    cfg = SimConfig(
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        dataset=args.dataset,
        codec=args.codec,
        deadline_s=args.deadline_s,
        heartbeat_s=30.0,
        epochs=1,
    )
    samples: list[dict[str, Any]] = []
    last = {"cpu": time.process_time(), "t": time.monotonic()}
    broker_pid: list[int | None] = [None]

    def on_round(record: dict[str, Any]) -> None:
        now_cpu, now_t = time.process_time(), time.monotonic()
        figures = sample(broker_pid[0])
        samples.append({
            "round": record["round"],
            "participants": record["participants"],
            "online": record.get("online"),
            "accuracy": record.get("accuracy"),
            "round_s": now_t - last["t"],
            "coordinator_cpu_s": now_cpu - last["cpu"],
            **figures,
        })  # fmt: skip
        last.update(cpu=now_cpu, t=now_t)
        print(
            f"round {record['round']:3d}: {record['participants']} updates, "
            f"{record.get('online')} online, {samples[-1]['round_s']:.1f}s",
            flush=True,
        )

    print(
        f"fedge bench scale: {args.clients} devices, {args.clients_per_round} per round, "
        f"{args.rounds} rounds",
        flush=True,
    )
    started = time.monotonic()
    try:
        # The benchmark starts the broker itself so that it can sample its pid.
        with (
            tempfile.TemporaryDirectory(prefix="fedge-scale-") as tmp,
            MosquittoBroker(Path(tmp), persistence=False) as broker,
        ):
            broker_pid[0] = broker.pid
            cfg = dataclasses.replace(cfg, broker=broker.url)
            result = run_sim(cfg, show_progress=False, on_round=on_round)
    except (SimError, BrokerError) as exc:
        print(f"fedge bench scale: {exc}", file=sys.stderr)
        return 1
    wall = time.monotonic() - started
    table = _markdown(samples)
    steady = samples[1:] or samples
    summary = (
        f"{args.clients} devices connected to one mosquitto, {args.clients_per_round} updates "
        f"per round, {len(samples)} rounds in {wall:.0f} s wall time (including start-up: "
        f"connecting every device and the first model download); final accuracy "
        f"{100 * (result.totals.get('final_accuracy') or 0):.1f} %. Median per round after "
        f"the first: {statistics.median(s['round_s'] for s in steady):.2f} s, coordinator CPU "
        f"{statistics.median(s['coordinator_cpu_s'] for s in steady):.2f} s; peak "
        f"coordinator RSS {max(s['coordinator_rss_mb'] for s in samples):.0f} MB, peak broker "
        f"RSS {max(s['broker_rss_mb'] for s in samples):.0f} MB; the {args.clients} agents "
        f"in their worker processes {max(s['workers_rss_mb'] for s in samples):.0f} MB "
        "together."
    )
    print()
    print(table)
    print(summary)
    if args.doc:
        Path(args.doc).write_text(
            "# Scale: `fedge bench scale`\n\n"
            f"`fedge bench scale --clients {args.clients} --clients-per-round "
            f"{args.clients_per_round} --rounds {args.rounds}` on {platform.platform()} "
            "(2-core shared VM). Every device is a real agent with its own MQTT connection, "
            "data partition and state; the devices share worker processes. 'coordinator CPU' "
            "is the CPU time of the coordinator's process during the round (selection, tasks, "
            "validation, aggregation, checkpoint, model publication, evaluation).\n\n"
            + summary
            + "\n\n"
            + table
        )
        print(f"wrote {args.doc}")
    return 0


def _markdown(samples: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| round | updates | online | round (s) | coordinator CPU (s) | coordinator RSS (MB) | "
        "coordinator threads | broker RSS (MB) | broker fds | device workers RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in samples:
        lines.append(
            f"| {s['round']} | {s['participants']} | {s['online']} | {s['round_s']:.2f} | "
            f"{s['coordinator_cpu_s']:.2f} | {s['coordinator_rss_mb']:.0f} | "
            f"{s['coordinator_threads']:.0f} | {s['broker_rss_mb']:.0f} | "
            f"{s['broker_fds']:.0f} | {s['workers_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
