"""``fedge bench soak``: many devices for many short rounds; do the resources stay flat?

One long ``fedge sim`` (by default 200 simulated devices, 100 short rounds of a
logistic regression on the bundled digits, one local epoch) through a mosquitto
this benchmark starts itself, so it knows the broker's pid. After every round it
samples, from ``/proc``:

- the coordinator's process (this process: the coordinator runs in it, next to
  the simulator's bookkeeping): RSS, open file descriptors, OS threads;
- the broker: RSS and open file descriptors;
- the device worker processes (informational): their total RSS.

It reports each figure at the first round, at the end of the warm-up
(``--warmup``, round 10) and at the end, the largest value after the warm-up,
and whether every coordinator and broker figure stayed within ``--tolerance``
(10 %) of its warm-up value. The table goes to stdout and, with ``--doc``, to a
Markdown page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.benchargs import check_output_file, int_at_least
from server_stub.sim import SimConfig, SimError, run_sim

GATED: tuple[str, ...] = (
    "coordinator_rss_mb",
    "coordinator_fds",
    "coordinator_threads",
    "broker_rss_mb",
    "broker_fds",
)
"""The figures that must stay flat after the warm-up."""
INFORMATIONAL: tuple[str, ...] = ("workers_rss_mb",)


# ---------------------------------------------------------------------------- /proc


def _status_field(pid: int | str, name: str) -> int:
    """A numeric field of ``/proc/PID/status`` (``VmRSS`` in kB, ``Threads``); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process, in MiB (0 if it is gone)."""
    return _status_field(pid, "VmRSS") / 1024


def open_fds(pid: int | str = "self") -> int:
    """Number of open file descriptors of a process (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def os_threads(pid: int | str = "self") -> int:
    """Number of OS threads of a process (0 if it is gone)."""
    return _status_field(pid, "Threads")


def _sim_workers() -> list[int]:
    """Pids of this process's ``edge.sim_worker`` children."""
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and b"edge.sim_worker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def sample(broker_pid: int | None) -> dict[str, float]:
    """One reading of every figure."""
    out: dict[str, float] = {
        "coordinator_rss_mb": rss_mb(),
        "coordinator_fds": float(open_fds()),
        "coordinator_threads": float(os_threads()),
        "workers_rss_mb": sum(rss_mb(pid) for pid in _sim_workers()),
    }
    if broker_pid is not None:
        out["broker_rss_mb"] = rss_mb(broker_pid)
        out["broker_fds"] = float(open_fds(broker_pid))
    return out


# ---------------------------------------------------------------------------- run


@dataclass(slots=True)
class SoakResult:
    """Samples of one soak run (one per finished round) and its summary."""

    config: SimConfig
    warmup: int
    tolerance: float
    samples: list[dict[str, float]] = field(default_factory=list)
    """One per round: ``round``, ``model_version``, ``participants`` and every figure."""
    wall_s: float = 0.0

    def figure(self, name: str) -> dict[str, float]:
        """``start``, ``warm`` (at the warm-up round), ``end``, ``max_after`` and ``growth``.

        ``growth`` is ``max(max_after, end) / warm - 1``: the worst relative increase after
        the warm-up (the figures that matter for a leak only ever go up).
        """
        values = [s[name] for s in self.samples if name in s]
        if not values:
            return {}
        warm_index = min(self.warmup, len(values)) - 1
        warm = values[warm_index]
        after = values[warm_index:]
        worst = max(after)
        return {
            "start": values[0],
            "warm": warm,
            "end": values[-1],
            "max_after": worst,
            "growth": worst / warm - 1 if warm else 0.0,
        }

    def flat(self) -> bool:
        """Every gated figure stayed within ``tolerance`` of its warm-up value."""
        return all(
            self.figure(name).get("growth", 0.0) <= self.tolerance
            for name in GATED
            if any(name in s for s in self.samples)
        )


def soak_config(**overrides: Any) -> SimConfig:
    """The soak federation: many devices, a tiny model, short rounds."""
    options: dict[str, Any] = {
        "clients": 200,
        "clients_per_round": 20,
        "rounds": 100,
        "dataset": "digits",
        "partition": "iid",
        "model": "logreg",
        "codec": "int8",
        "epochs": 1,
        "batch_size": 32,
        "deadline_s": 15.0,
        "heartbeat_s": 5.0,
        "seed": 0,
        **overrides,
    }
    return SimConfig(**options)


def run_soak(
    cfg: SimConfig,
    *,
    warmup: int = 10,
    tolerance: float = 0.10,
    on_sample: Callable[[dict[str, float]], None] | None = None,
) -> SoakResult:
    """Run ``cfg`` through a mosquitto started here, sampling after every round.

    Raises
    ------
    SimError
        The simulation failed, or ``cfg.broker`` is set (the soak needs its own broker).
    """
    from edge.mosquitto import BrokerError, MosquittoBroker

    if cfg.broker is not None:
        raise SimError("the soak starts its own broker (it samples its pid); drop --broker")
    result = SoakResult(cfg, warmup, tolerance)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedge-soak-") as tmp:
        try:
            broker = MosquittoBroker(Path(tmp), persistence=False).start()
        except BrokerError as exc:
            raise SimError(str(exc)) from exc
        try:
            sim_cfg = SimConfig(**{**_fields(cfg), "broker": broker.url})

            def on_round(record: dict[str, Any]) -> None:
                s: dict[str, float] = {
                    "round": float(record["round"]),
                    "model_version": float(record["model_version"]),
                    "participants": float(record["participants"]),
                    **sample(broker.pid),
                }
                result.samples.append(s)
                if on_sample is not None:
                    on_sample(s)

            run_sim(sim_cfg, show_progress=False, on_round=on_round)
        finally:
            broker.stop()
    result.wall_s = time.monotonic() - started
    return result


def _fields(cfg: SimConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


# ---------------------------------------------------------------------------- report

_LABELS = {
    "coordinator_rss_mb": ("coordinator RSS", "MiB"),
    "coordinator_fds": ("coordinator open fds", ""),
    "coordinator_threads": ("coordinator threads", ""),
    "broker_rss_mb": ("broker (mosquitto) RSS", "MiB"),
    "broker_fds": ("broker open fds", ""),
    "workers_rss_mb": ("device workers RSS (all, informational)", "MiB"),
}


def _num(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}" if unit else f"{value:.0f}"


def markdown(result: SoakResult) -> str:
    """The figures as a Markdown table."""
    lines = [
        f"| figure | round 1 | round {result.warmup} (warm) | end | max after warm-up | "
        f"growth | within {100 * result.tolerance:.0f} % |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*GATED, *INFORMATIONAL):
        f = result.figure(name)
        if not f:
            continue
        label, unit = _LABELS[name]
        ok = "—" if name in INFORMATIONAL else ("yes" if f["growth"] <= result.tolerance else "NO")
        lines.append(
            f"| {label} | {_num(f['start'], unit)} | {_num(f['warm'], unit)} | "
            f"{_num(f['end'], unit)} | {_num(f['max_after'], unit)} | "
            f"{100 * f['growth']:+.1f} % | {ok} |"
        )
    return "\n".join(lines) + "\n"


def _doc(result: SoakResult, argv: Sequence[str]) -> str:
    cfg = result.config
    rounds = len(result.samples)
    return f"""# Soak: {cfg.clients} devices, {rounds} rounds

Generated by `fedge bench soak {" ".join(argv)}` on {platform.platform()},
{os.cpu_count()} cores, in {result.wall_s / 60:.1f} minutes.

One `fedge sim` of {cfg.clients} real device agents (each with its own MQTT connection, in
{cfg.workers or "the default number of"} worker processes), {cfg.clients_per_round} updates a
round, {cfg.rounds} rounds, {cfg.model} on {cfg.dataset} ({cfg.partition}), {cfg.epochs} local
epoch, {cfg.codec} updates, status every {cfg.heartbeat_s:g} s, through a private mosquitto.
After every round the benchmark reads `/proc` for the coordinator's process (the coordinator
runs in the benchmark's process), the broker and the device workers. "Growth" is the largest
value after the warm-up (round {result.warmup}) over the value at the warm-up.

{markdown(result)}
**{"Flat" if result.flat() else "NOT flat"}**: every coordinator and broker figure
{"stayed" if result.flat() else "did not stay"} within {100 * result.tolerance:.0f} % of its
warm-up value. The CI-sized version is `tests/reliability/test_soak.py` (30 devices, 30 rounds).
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    d = soak_config()
    parser = argparse.ArgumentParser(
        prog="fedge bench soak", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=d.clients)
    parser.add_argument("--clients-per-round", type=int, default=d.clients_per_round)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--warmup",
        type=int_at_least(1),
        default=10,
        help="round the baseline is taken at (before --rounds)",
    )
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth (0.10)")
    parser.add_argument("--doc", default=None, metavar="PATH", help="write the Markdown page")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every sample")
    args = parser.parse_args(argv)
    if args.warmup >= args.rounds:
        parser.error(
            f"--warmup ({args.warmup}) must be below --rounds ({args.rounds}): the growth "
            "is measured after the warm-up"
        )
    check_output_file(parser, "--json", args.json)
    check_output_file(parser, "--doc", args.doc)
    cfg = soak_config(
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        workers=args.workers,
        seed=args.seed,
    )
    lock = threading.Lock()

    def progress(s: dict[str, float]) -> None:
        with lock:
            line = (
                f"round {s['round']:4.0f}  coordinator {s['coordinator_rss_mb']:6.1f} MiB "
                f"{s['coordinator_fds']:4.0f} fds {s['coordinator_threads']:3.0f} threads  "
                f"broker {s.get('broker_rss_mb', 0):5.1f} MiB {s.get('broker_fds', 0):4.0f} fds"
            )
            print(line, flush=True)

    try:
        result = run_soak(cfg, warmup=args.warmup, tolerance=args.tolerance, on_sample=progress)
    except SimError as exc:
        print(f"fedge bench soak: {exc}", file=sys.stderr)
        return 1
    print()
    print(markdown(result))
    print(f"flat within {100 * args.tolerance:.0f} % after round {args.warmup}: {result.flat()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": _fields(cfg), "samples": result.samples}, indent=1)
        )
    if args.doc:
        Path(args.doc).write_text(_doc(result, argv))
        print(f"wrote {args.doc}")
    return 0 if result.flat() else 1
