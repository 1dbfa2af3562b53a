"""``fedge bench fuzz``: malformed messages through a real broker to a real coordinator and agent.

This module owns :class:`FuzzRig`, which ``tests/reliability/test_fuzz.py`` and the benchmark
share: a private mosquitto (or a given one), the real :class:`~server_stub.coordinator.Coordinator`
in a thread, one real device agent (``edge.agent``) in a thread, and fuzzer clients that publish
:class:`edge.fuzz.FuzzCase` messages. It is a composition root (like ``server_stub.sim``), so it
imports the agent side lazily; the coordinator's library code never does.

What is counted, exactly (see :mod:`edge.fuzz`): every garbage message a receiver gets is
either a rejection counted by reason (coordinator: ``CoordinatorMetrics.rejects``; agent:
``AgentStats.rejected``), ``held`` (the first chunk of a transfer that never completes: pending
in the reassembler within its budget, later ``expired``) or ``duplicate`` (a redelivered chunk,
counted by the reassembler). :meth:`FuzzRig.observed` reads those counters in the same terms
as :func:`edge.fuzz.expected_counts`, so a run checks ``observed - before == expected``.

``fedge bench fuzz [--cases 200000] [--seed 0] [--atheris-runs N]`` prints cases/s, the
rejections by reason, RSS before/after and whether the model changed, then (when ``atheris``
imports) runs a coverage-guided in-process fuzzer over the decoders (``edge.fuzz.check_decoders``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.fuzz import Expect, FuzzCase, FuzzGenerator, FuzzTargets, Target, expected_counts
from edge.transport import Transport

if TYPE_CHECKING:
    from edge.agent import AgentHandle
    from edge.mosquitto import MosquittoBroker
    from edge.telemetry import SimulatedTelemetry
    from server_stub.coordinator import Coordinator
    from server_stub.store import Store

log = logging.getLogger(__name__)

FLEET = "fuzz"
AGENT_CID = "pi-fuzz"


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` every 20 ms; raise ``TimeoutError(what)`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not cond():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.02)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What must not change under garbage: the model on both sides."""

    coordinator_version: int
    coordinator_model_sha256: str
    agent_version: int | None
    agent_model_sha256: str | None


class FuzzRig:
    """A real broker, coordinator and agent to throw :class:`~edge.fuzz.FuzzCase` at.

    The agent reports a 5 % battery (not charging) while the garbage flows, so the
    coordinator never selects it and no round runs; :meth:`legit_round` charges it, after
    which one real round must complete with it.

    Parameters
    ----------
    workdir
        Broker files, the coordinator's database and the agent's state directory.
    broker_url
        Use this broker (``mqtt://127.0.0.1:PORT``); None starts a private mosquitto.
    seed
        Seeds the coordinator, the agent's batch order and nothing else.
    publishers
        Fuzzer MQTT connections publishing in parallel (QoS 1, each waiting for its PUBACK).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        broker_url: str | None = None,
        seed: int = 0,
        publishers: int = 4,
    ) -> None:
        self.workdir = Path(workdir)
        self.broker_url = broker_url
        self.seed = seed
        self.publishers = publishers
        self._broker: MosquittoBroker | None = None
        self._store: Store | None = None
        self._stop = threading.Event()
        self._fuzzers: list[Transport] = []
        self.coordinator: Coordinator | None = None
        self.coordinator_thread: threading.Thread | None = None
        self.coordinator_error: BaseException | None = None
        self.agent: AgentHandle | None = None
        self.telemetry: SimulatedTelemetry | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> FuzzRig:
        """Start everything and wait until the agent holds model version 0."""
        from edge.agent import AgentOptions, connect_agent_transport, start_agent_thread
        from edge.data import load_builtin
        from edge.mosquitto import MosquittoBroker
        from edge.mqtt_transport import MqttSettings, MqttTransport
        from edge.state import AgentStore
        from edge.telemetry import DeviceProfile, SimulatedTelemetry
        from edge.training import ModelSpec, NumpyTrainer
        from server_stub.config import config_from_dict
        from server_stub.coordinator import Coordinator, mqtt_transport_for
        from server_stub.store import Store

        self.workdir.mkdir(parents=True, exist_ok=True)
        url = self.broker_url
        if url is None:
            self._broker = MosquittoBroker(self.workdir / "broker", persistence=False).start()
            url = self._broker.url
        config = config_from_dict(
            {
                "fleet": FLEET,
                "seed": self.seed,
                "tick_s": 0.05,
                "startup_grace_s": 0.0,
                "broker": {"url": url, "client_id": "fuzz-coordinator"},
                "model": {"kind": "logreg", "input_dim": 64, "num_classes": 10},
                "strategy": {"name": "fedavg", "epochs": 1, "batch_size": 16, "lr": 0.1},
                "rounds": {
                    "clients_per_round": 1,
                    "min_devices": 1,
                    "deadline_s": 60.0,
                    "over_selection": 1.0,
                },
                "uplink": {"codec": "int8"},
                "eligibility": {"min_battery_percent": 20.0},
                "state": {"db": str(self.workdir / "coordinator.db")},
            }
        )
        layout, weights = config.layout_and_weights()
        self._store = Store(config.state_db)
        self.coordinator = Coordinator(
            config, mqtt_transport_for(config), self._store, layout=layout, initial_weights=weights
        )
        self.coordinator_thread = threading.Thread(
            target=self._run_coordinator, name="fuzz-coordinator", daemon=True
        )
        self.coordinator_thread.start()

        data = load_builtin("digits").subset(np.arange(400))
        transport, relay = connect_agent_transport(
            MqttSettings.from_url(url, client_id=AGENT_CID), FLEET, AGENT_CID
        )
        self.telemetry = SimulatedTelemetry(DeviceProfile(battery_percent=5.0))
        self.agent = start_agent_thread(
            transport,
            AgentOptions(FLEET, AGENT_CID, heartbeat_s=0.5, poll_s=0.05, cache_model=False),
            trainer=NumpyTrainer(ModelSpec("logreg", input_dim=64, num_classes=10)),
            dataset=data,
            telemetry=self.telemetry,
            store=AgentStore(self.workdir / "agent", fsync=False),
            rng=np.random.default_rng(self.seed),
            relay=relay,
        )
        coordinator = self.coordinator
        agent = self.agent
        wait_until(
            lambda: (
                agent.runner.model is not None and coordinator.registry.get(AGENT_CID) is not None
            ),
            timeout,
            "the agent to load model version 0 and report its status",
        )
        for i in range(self.publishers):
            self._fuzzers.append(
                MqttTransport(MqttSettings.from_url(url, client_id=f"fuzzer-{i}", max_inflight=100))
            )
        return self

    def _run_coordinator(self) -> None:
        assert self.coordinator is not None
        try:
            self.coordinator.run(self._stop)
        except BaseException as exc:  # reported by alive() and the caller's assertions
            log.exception("coordinator crashed")
            self.coordinator_error = exc

    def close(self) -> None:
        """Stop the agent, the coordinator, the fuzzers and the private broker (idempotent)."""
        for t in self._fuzzers:
            t.close()
        self._fuzzers = []
        if self.agent is not None:
            self.agent.request_stop()
            self.agent.join(10.0)
        self._stop.set()
        if self.coordinator_thread is not None:
            self.coordinator_thread.join(15.0)
        if self._store is not None and (
            self.coordinator_thread is None or not self.coordinator_thread.is_alive()
        ):
            self._store.close()
            self._store = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> FuzzRig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inputs ------------------------------------------------------------------------------

    def targets(self) -> FuzzTargets:
        """What the generator must know about this rig."""
        assert self.coordinator is not None
        max_env = int(self.coordinator.config.validation.max_envelope_mb * 1024 * 1024)
        return FuzzTargets(FLEET, AGENT_CID, model_version=0, max_envelope_size=max_env)

    def generator(self, seed: int) -> FuzzGenerator:
        """A seeded generator aimed at this rig."""
        return FuzzGenerator(self.targets(), random.Random(seed))

    def send(self, cases: Sequence[FuzzCase]) -> float:
        """Publish every case (QoS 1, not retained); return the seconds it took.

        Cases on one topic go through one connection, in order (a redelivery follows its
        original); topics are spread over the fuzzer connections.
        """
        lanes: list[list[FuzzCase]] = [[] for _ in self._fuzzers]
        for case in cases:
            lanes[zlib.crc32(case.topic.encode()) % len(lanes)].append(case)
        errors: list[BaseException] = []

        def publish(transport: Transport, lane: list[FuzzCase]) -> None:
            try:
                for case in lane:
                    transport.publish(case.topic, case.payload, qos=1)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=publish, args=(t, lane), name=f"fuzzer-{i}")
            for i, (t, lane) in enumerate(zip(self._fuzzers, lanes, strict=True))
        ]
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise RuntimeError(f"a fuzzer could not publish: {errors[0]!r}") from errors[0]
        return elapsed

    # -- observations --------------------------------------------------------------------------

    def observed(self) -> dict[Target, Counter[str]]:
        """The receivers' counters in the terms of :func:`edge.fuzz.expected_counts`."""
        assert self.coordinator is not None and self.agent is not None
        coord = self.coordinator
        rejects = Counter(dict(coord.metrics.rejects))
        r = coord.reassembler
        rejects[Expect.HELD.value] = r.pending + r.stats.expired
        rejects[Expect.DUPLICATE.value] = r.stats.duplicates
        runner = self.agent.runner
        agent = Counter(dict(runner.stats.rejected))
        ar = runner._reassembler
        agent[Expect.HELD.value] = ar.pending + ar.stats.expired
        agent[Expect.DUPLICATE.value] = ar.stats.duplicates
        return {Target.COORDINATOR: +rejects, Target.AGENT: +agent}

    def wait_counted(
        self, before: dict[Target, Counter[str]], cases: Sequence[FuzzCase], timeout: float
    ) -> dict[Target, Counter[str]]:
        """Wait until the receivers accounted for as many messages as were sent; return
        what they counted since ``before`` (compare it with ``expected_counts(cases)``)."""
        want = expected_counts(cases)

        def delta() -> dict[Target, Counter[str]]:
            now = self.observed()
            return {t: now[t] - before[t] for t in now}

        def done() -> bool:
            d = delta()
            return all(d[t].total() >= want[t].total() for t in want) or not self.alive()

        # On a timeout the caller's comparison reports what is missing.
        with contextlib.suppress(TimeoutError):
            wait_until(done, timeout, "the coordinator and the agent to count every case")
        return delta()

    def alive(self) -> bool:
        """Both service threads still run and nothing crashed."""
        return (
            self.coordinator_thread is not None
            and self.coordinator_thread.is_alive()
            and self.coordinator_error is None
            and self.agent is not None
            and self.agent.thread.is_alive()
        )

    def fingerprint(self) -> Fingerprint:
        """The model on both sides (version and SHA-256 of its bytes)."""
        assert self.coordinator is not None and self.agent is not None
        coord = self.coordinator
        model = self.agent.runner.model
        return Fingerprint(
            coord.model_version,
            hashlib.sha256(np.ascontiguousarray(coord.model).tobytes()).hexdigest(),
            None if model is None else model.manifest.model_version,
            None if model is None else model.manifest.sha256,
        )

    def legit_round(self, timeout: float = 60.0) -> dict[str, Any]:
        """Charge the agent's battery; wait for one real round with it; return its record."""
        assert self.coordinator is not None and self.telemetry is not None
        coord = self.coordinator
        done = coord.rounds_finished
        self.telemetry.set_battery(90.0)
        wait_until(
            lambda: coord.rounds_finished > done or not self.alive(),
            timeout,
            "a round with the legitimate agent",
        )
        record = coord.last_record
        assert record is not None
        return dict(record)


# ------------------------------------------------------------------------------- the benchmark


def _format_counts(counts: Counter[str]) -> str:
    return "\n".join(f"    {reason:<16} {n:>9,}" for reason, n in sorted(counts.items()))


def run_bench(cases: int, seed: int, batch: int, workdir: Path) -> int:
    """Send ``cases`` cases in batches of ``batch``; print the report; 0 if all held."""
    logging.getLogger("server_stub").setLevel(logging.ERROR)  # one line per garbage message
    logging.getLogger("edge").setLevel(logging.ERROR)
    with FuzzRig(workdir, seed=seed) as rig:
        gen = rig.generator(seed)
        before_fp = rig.fingerprint()
        before = rig.observed()
        expected: dict[Target, Counter[str]] = {
            Target.COORDINATOR: Counter(),
            Target.AGENT: Counter(),
        }
        rss_before = rss_bytes()
        rss_peak = rss_before
        sent = 0
        send_s = 0.0
        start = time.perf_counter()
        while sent < cases:
            batch_cases = gen.cases(min(batch, cases - sent))
            send_s += rig.send(batch_cases)
            for target, counts in expected_counts(batch_cases).items():
                expected[target].update(counts)
            sent += len(batch_cases)
            rss_peak = max(rss_peak, rss_bytes())
            print(f"  {sent:,} cases sent", file=sys.stderr, flush=True)
        got: dict[Target, Counter[str]] = {}
        total = {t: c.total() for t, c in expected.items()}
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            now = rig.observed()
            got = {t: now[t] - before[t] for t in now}
            if all(got[t].total() >= total[t] for t in total) or not rig.alive():
                break
            threading.Event().wait(0.05)
        elapsed = time.perf_counter() - start
        rss_after = rss_bytes()
        after_fp = rig.fingerprint()
        alive = rig.alive()
        record = rig.legit_round() if alive else {}
    ok = alive and got == {t: +c for t, c in expected.items()} and before_fp == after_fp
    ok = ok and record.get("outcome") == "aggregated"
    mib = 1024 * 1024
    print(f"fedge bench fuzz: {sent:,} malformed messages through mosquitto (seed {seed})")
    print(f"  published in {send_s:.1f} s ({sent / send_s:,.0f} cases/s published)")
    print(f"  all counted after {elapsed:.1f} s ({sent / elapsed:,.0f} cases/s end to end)")
    for target in (Target.COORDINATOR, Target.AGENT):
        match = "matches" if got.get(target) == +expected[target] else "DIFFERS FROM"
        print(f"  {target.value}: {got.get(target, Counter()).total():,} counted, {match} expected")
        print(_format_counts(got.get(target, Counter())))
        if match != "matches":
            print("    expected:\n" + _format_counts(expected[target]))
    print(
        f"  RSS before {rss_before / mib:.1f} MiB, peak {rss_peak / mib:.1f} MiB, "
        f"after {rss_after / mib:.1f} MiB (coordinator + agent + fuzzers, one process)"
    )
    print(f"  model unchanged by the garbage: {before_fp == after_fp} ({after_fp})")
    print(
        f"  processes up: {alive}; legitimate round afterwards: {record.get('outcome')} "
        f"(model version {record.get('model_version')})"
    )
    return 0 if ok else 1


def run_atheris(runs: int, seed: int) -> int:
    """Coverage-guided fuzzing of the decoders in a child process (atheris/libFuzzer)."""
    try:
        importlib.import_module("atheris")
    except ImportError:
        print(
            "atheris is not installed (pip install atheris; it needs a wheel or clang for your "
            "platform): skipping the coverage-guided decoder fuzzing"
        )
        return 0
    print(f"atheris: {runs:,} coverage-guided runs over edge.fuzz.check_decoders (seed {seed})")
    child = [sys.executable, "-m", "server_stub.bench_fuzz", "--atheris-child"]
    result = subprocess.run(
        [*child, f"-runs={runs}", f"-seed={seed + 1}", "-max_len=4096", "-print_final_stats=1"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(("stat::", "Done", "=="))]
    print("\n".join(f"  {ln}" for ln in lines[-12:]))
    if result.returncode != 0:
        print(result.stderr[-4000:])
        print(f"atheris found a failure (exit code {result.returncode})")
        return 1
    print("atheris: no decoder raised anything but WireError")
    return 0


def _atheris_child(argv: list[str]) -> None:  # pragma: no cover - runs under libFuzzer
    atheris: Any = importlib.import_module("atheris")  # no type stubs
    import edge.fuzz

    # The decoders were imported with this module already: instrument what is loaded.
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *argv], edge.fuzz.check_decoders)
    atheris.Fuzz()


def main(argv: Sequence[str] | None = None) -> int:
    """``fedge bench fuzz``."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--atheris-child"]:
        _atheris_child(args_in[1:])
        return 0
    parser = argparse.ArgumentParser(prog="fedge bench fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=200_000, help="malformed messages to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=10_000, help="cases generated per batch")
    parser.add_argument(
        "--atheris-runs", type=int, default=200_000, help="in-process runs (0: skip atheris)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    args = parser.parse_args(args_in)
    if args.cases < 1 or args.batch < 1:
        parser.error("--cases and --batch must be >= 1")
    if args.workdir is not None:
        code = run_bench(args.cases, args.seed, args.batch, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="fedge-fuzz-") as tmp:
            code = run_bench(args.cases, args.seed, args.batch, Path(tmp))
    if args.atheris_runs > 0:
        code = max(code, run_atheris(args.atheris_runs, args.seed))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
