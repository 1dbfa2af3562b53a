"""A short ``fedge sim`` end to end through a real mosquitto: it trains, reports, and cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server_stub.report import ROUND_FIELDS

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
    assert result.returncode == 1
    assert "--clients-per-round" in result.stdout + result.stderr
