"""A short ``fedge sim`` end to end through a real mosquitto: it trains, reports, and cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from server_stub.report import ROUND_FIELDS
from tests.broker import MosquittoBroker

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _fedge_processes() -> set[int]:
    """Pids of mosquitto and sim workers started by fedge (their command lines say so)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "edge.sim_worker" in cmd or "fedge-sim-" in cmd:
            pids.add(int(entry.name))
    return pids


def _sim_tmpdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("fedge-sim-*")}


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], set[int]]:
    # Prepare
    out = tmp_path_factory.mktemp("sim")
    before_dirs = _sim_tmpdirs()
    before_procs = _fedge_processes()
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "edge", "sim", "--clients", "6", "--clients-per-round", "3",
         "--rounds", "6", "--seed", "1", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out, before_dirs, before_procs


def test_metrics_json_has_every_field(sim_run: tuple[Path, set[str], set[int]]) -> None:
    doc = json.loads((sim_run[0] / "metrics.json").read_text())
    assert set(doc) == {"config", "rounds", "totals"}
    assert len(doc["rounds"]) == 6
    for record in doc["rounds"]:
        assert set(ROUND_FIELDS) <= set(record)
    assert doc["config"]["clients"] == 6


def test_accuracy_improves(sim_run: tuple[Path, set[str], set[int]]) -> None:
    rounds = json.loads((sim_run[0] / "metrics.json").read_text())["rounds"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[-1]["model_version"] > rounds[0]["model_version"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)


def test_curves_png_is_a_png(sim_run: tuple[Path, set[str], set[int]]) -> None:
    data = (sim_run[0] / "curves.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000


def test_nothing_is_left_behind(sim_run: tuple[Path, set[str], set[int]]) -> None:
    _out, before_dirs, before_procs = sim_run
    assert _sim_tmpdirs() <= before_dirs
    assert _fedge_processes() <= before_procs


def test_bad_option_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge", "sim", "--clients", "2", "--clients-per-round", "5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("fedge sim: --clients-per-round")


SMALL = ["--clients", "4", "--clients-per-round", "2", "--seed", "1"]


def _start_sim(*flags: str) -> subprocess.Popen[str]:
    """``fedge sim`` in its own session (so a signal to it reaches nothing else)."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "sim", *SMALL, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def _wait_for_round(proc: subprocess.Popen[str]) -> list[str]:
    """Read the sim's lines until the first round line; return them."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("round"):
            return lines
    raise AssertionError("the sim ended before its first round:\n" + "".join(lines))


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the sim did not stop within {timeout} s:\n{out}") from None
    return proc.returncode, out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_stops_everything_like_ctrl_c(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    # Prepare
    before_dirs = _sim_tmpdirs()
    proc = _start_sim("--rounds", "200", "--out", str(tmp_path / "out"))
    _wait_for_round(proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert {"mosquitto", "python"} & {c.name() for c in children}
    # Execute
    os.kill(proc.pid, sig)
    returncode, out = _finish(proc)
    # Assert
    assert returncode == code, out
    assert f"stopped by {sig.name}; everything it started is stopped" in out
    psutil.wait_procs(children, timeout=5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert _sim_tmpdirs() <= before_dirs
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["rounds"] and doc["totals"]["interrupted"] is True


def test_a_worker_that_exits_fails_the_run() -> None:
    # Prepare
    proc = _start_sim("--rounds", "200", "--workers", "2")
    _wait_for_round(proc)
    workers = [c for c in psutil.Process(proc.pid).children() if "edge.sim_worker" in c.cmdline()]
    # Execute: SIGTERM makes a worker stop its agents and exit 0, as if asked to
    workers[0].send_signal(signal.SIGTERM)
    returncode, out = _finish(proc)
    # Assert
    assert returncode == 1, out
    assert f"device worker 0 (pid {workers[0].pid}) exited with code 0" in out


def test_a_private_broker_that_dies_fails_the_run(tmp_path: Path) -> None:
    # Prepare
    before_dirs = _sim_tmpdirs()
    proc = _start_sim("--rounds", "200", "--out", str(tmp_path / "out"))
    _wait_for_round(proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    broker = next(c for c in children if c.name() == "mosquitto")
    # Execute: a crash, as far as the simulator can tell
    broker.kill()
    started = time.monotonic()
    returncode, out = _finish(proc)
    # Assert: it stops soon, says why, stops everything else and keeps the rounds it ran
    assert returncode == 1, out
    assert time.monotonic() - started < 30, out
    assert f"the private broker (mosquitto, pid {broker.pid}) was killed by SIGKILL" in out
    assert "its log ends:" in out and "mosquitto version" in out
    psutil.wait_procs(children, timeout=5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert _sim_tmpdirs() <= before_dirs
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["rounds"] and doc["totals"]["interrupted"] is True
    assert doc["totals"]["error"].startswith("the private broker (mosquitto")


def _retained(url: str) -> list[str]:
    """Topics of every retained message on the broker (what it sends on subscribing)."""
    from edge.mqtt_transport import connect_url

    transport = connect_url(url, client_id="retained-check")
    try:
        transport.subscribe("#")
        topics = []
        give_up = time.monotonic() + 3.0  # a running sim publishes all the time
        while time.monotonic() < give_up and (msg := transport.receive(0.5)) is not None:
            if msg.retain:
                topics.append(msg.topic)
        return topics
    finally:
        transport.close()


def test_two_runs_on_one_external_broker(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    # Prepare
    fleets, versions = [], []
    for run in range(2):
        # Execute
        result = subprocess.run(
            [sys.executable, "-m", "edge", "sim", *SMALL, "--rounds", "3",
             "--broker", mosquitto.url, "--out", str(tmp_path / str(run)), "--quiet"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        doc = json.loads((tmp_path / str(run) / "metrics.json").read_text())
        fleets.append(doc["config"]["fleet"])
        versions.append([r["model_version"] for r in doc["rounds"]])
    # Assert: each run its own fleet, both train, nothing of either left on the broker
    assert fleets[0] != fleets[1]
    assert all(fleet.startswith("sim-") for fleet in fleets)
    assert versions[1][-1] > 0, versions
    assert versions[0][-1] > 0, versions
    assert _retained(mosquitto.url) == []


def test_an_interrupted_run_clears_its_retained_messages(mosquitto: MosquittoBroker) -> None:
    # Prepare
    proc = _start_sim("--rounds", "200", "--broker", mosquitto.url)
    _wait_for_round(proc)
    assert _retained(mosquitto.url)  # statuses and the model, while it runs
    # Execute
    os.kill(proc.pid, signal.SIGTERM)
    returncode, out = _finish(proc)
    # Assert
    assert returncode == 143, out
    assert _retained(mosquitto.url) == []


def test_worker_whose_agent_crashes_exits_instead_of_waiting(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: an agent thread that died of an unexpected exception left its worker
    # process running, so the simulator waited for ever for a device that was gone.
    import numpy as np

    from edge import agent, sim_worker
    from edge.data import load_builtin

    # Prepare: one device whose agent raises as soon as it runs.
    digits = load_builtin("digits")
    data = tmp_path / "dev-0000.npz"
    np.savez(data, x=digits.x[:50], y=digits.y[:50])
    spec = {
        "broker": mosquitto.url,
        "fleet": "crash",
        "model": {"kind": "logreg", "input_dim": 64, "num_classes": 10, "hidden": []},
        "trainer": "numpy",
        "heartbeat_s": 2.0,
        "seed": 0,
        "devices": [
            {"cid": "dev-0000", "data": str(data), "profile": {}, "state_dir": str(tmp_path / "s")}
        ],
    }
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(spec))

    def crash(self: agent.AgentRunner) -> agent.AgentStats:
        raise RuntimeError("injected crash")

    monkeypatch.setattr(agent.AgentRunner, "run", crash)
    monkeypatch.setattr(sim_worker.signal, "signal", lambda *args: None)  # keep pytest's
    # Execute
    code = sim_worker.main([str(path)])
    # Assert
    assert code == 1
