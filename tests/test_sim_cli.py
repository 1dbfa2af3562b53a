"""``fedge sim`` and ``fedge bench`` refuse bad options and inputs with one line, before any work.

In process and without a broker: every case here fails before the simulator prepares data,
starts a broker or a worker (the few that need a broker point at a closed port).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main as fedge_main

SMALL = ["--rounds", "1", "--clients", "2", "--clients-per-round", "1", "--quiet"]


def _sim_tmpdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("fedge-sim-*")}


def _run_sim(flags: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    before = _sim_tmpdirs()
    code = fedge_main(["sim", *SMALL, *flags])
    assert _sim_tmpdirs() <= before, "a failed run left its temporary directory"
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--deadline-s", "0"], "--deadline-s must be a positive number"),
        (["--hidden", "0"], "--hidden must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--strategy", "foo"], "--strategy must be one of fedavg"),
        (["--selection", "foo"], "--selection must be one of random"),
        (["--async", "--strategy", "median"], "--async runs FedBuff"),
        (["--model", "foo"], "--model must be logreg, mlp or a .tflite file"),
        (["--model", "nonexist.tflite", "--trainer", "litert"], "--model: nonexist.tflite"),
        (["--partition", "foo"], "--partition: unknown partition scheme 'foo'"),
        (["--partition", "dirichlet"], "--partition: bad dirichlet alpha"),
        (["--partition", "dirichlet:0"], "--partition: bad dirichlet alpha"),
        (["--partition", "dirichlet:-1"], "--partition: bad dirichlet alpha"),
        (["--partition", "dirichlet:nan"], "--partition: bad dirichlet alpha"),
        (["--partition", "shards:0"], "--partition: bad shard count"),
        (["--partition", "shards:abc"], "--partition: bad shard count"),
        (["--partition", "shards:1000"], "--partition shards:1000: "),
        (["--partition", "iid:3"], "--partition: 'iid' takes no parameter"),
        (["--target-accuracy", "5"], "--target-accuracy must be in (0, 1]"),
        (["--broker", "foo"], "--broker 'foo' is not a broker URL"),
        (["--broker", "http://x"], "--broker 'http://x' is not a broker URL"),
        (["--broker", "mqtt://127.0.0.1:99999"], "--broker 'mqtt://127.0.0.1:99999' is not a"),
        (["--broker", "mqtt://127.0.0.1:abc"], "--broker 'mqtt://127.0.0.1:abc' is not a"),
        (["--dataset", "nope.npz"], "--dataset 'nope.npz' is neither a bundled dataset"),
    ],
)
def test_bad_option_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # Execute
    code, output = _run_sim(flags, capsys)
    # Assert
    assert code == 2, output
    assert output.startswith(f"fedge sim: {message}")
    assert output.count("\n") == 1, output
    assert "Traceback" not in output


def test_a_junk_tflite_model_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"junk\n")
    # Execute
    code, output = _run_sim(["--model", str(junk), "--trainer", "litert"], capsys)
    # Assert
    assert code == 2
    assert f"fedge sim: --model: {junk}" in output


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1", "mqtt://nonexistent.invalid"])
def test_an_unreachable_broker_is_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, output = _run_sim(["--broker", url], capsys)
    # Assert: not a usage error, the run could not start
    assert code == 1
    assert output.startswith(f"fedge sim: cannot connect to {url}")
    assert output.count("\n") == 1, output


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _bad_datasets(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Name -> (file, what the error must say)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    (tmp / "adir.npz").mkdir()
    (tmp / "junk.npz").write_bytes(b"\x80\x04random bytes")
    (tmp / "junk.csv").write_text("a,b,c\nfoo,bar\n")
    return {
        "no y": (_npz(tmp / "noy.npz", x=x), "missing array(s) ['y']"),
        "no x": (_npz(tmp / "nox.npz", y=y), "missing array(s) ['x']"),
        "empty": (_npz(tmp / "empty.npz", x=x[:0], y=y[:0]), "no examples"),
        "random bytes": (tmp / "junk.npz", "not a readable .npz"),
        "a directory": (tmp / "adir.npz", "is a directory"),
        "object arrays": (
            _npz(tmp / "obj.npz", x=np.array([None] * 400, dtype=object), y=y),
            "not a readable .npz",
        ),
        "strings": (_npz(tmp / "strx.npz", x=np.array(["a"] * 400), y=y), "numeric"),
        "NaN features": (_npz(tmp / "nanx.npz", x=np.full_like(x, np.nan), y=y), "NaN"),
        "negative label": (
            _npz(tmp / "neg.npz", x=x, y=np.where(y == 0, -1, y)),
            "label -1 at row",
        ),
        "huge label": (_npz(tmp / "bigy.npz", x=x, y=y * 100_000), "labels must be whole"),
        "fractional labels": (_npz(tmp / "floaty.npz", x=x, y=y + 0.5), "non-integer"),
        "x and y differ": (_npz(tmp / "mismatch.npz", x=x, y=y[:100]), "must match"),
        "too few to split": (_npz(tmp / "tiny.npz", x=x[:3], y=y[:3]), "too few"),
        "csv without label": (tmp / "junk.csv", "no label column"),
    }


def test_every_malformed_dataset_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    cases = _bad_datasets(tmp_path)
    failures = []
    for name, (path, message) in cases.items():
        # Execute
        code, output = _run_sim(["--dataset", str(path), "--partition", "iid"], capsys)
        # Assert (collected: one report of every case that misbehaves)
        if code != 2 or message not in output or output.count("\n") != 1:
            failures.append(f"{name}: exit {code}: {output!r}")
    assert not failures, "\n".join(failures)


def test_csv_classes_come_from_the_labels(tmp_path: Path) -> None:
    # Prepare: 15 classes in a CSV (labels 0..14), as in an .npz
    from server_stub.sim import _load_dataset

    rng = np.random.default_rng(1)
    rows = ["f1,f2,label"] + [f"{rng.random():.4f},{rng.random():.4f},{i % 15}" for i in range(300)]
    csv = tmp_path / "many.csv"
    csv.write_text("\n".join(rows) + "\n")
    npz = _npz(tmp_path / "many.npz", x=rng.random((300, 2)), y=np.arange(300) % 15)
    # Execute
    from_csv, from_npz = _load_dataset(str(csv)), _load_dataset(str(npz))
    # Assert
    assert from_csv.num_classes == from_npz.num_classes == 15


@pytest.mark.parametrize("target", ["file", "under-file", "proc"])
def test_bad_out_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    # Prepare
    afile = tmp_path / "afile"
    afile.write_text("")
    out = {"file": afile, "under-file": afile / "sub", "proc": Path("/proc/nope")}[target]
    # Execute
    code, output = _run_sim(["--out", str(out)], capsys)
    # Assert
    assert code == 2
    assert output.startswith(f"fedge sim: --out {out}: ")
    assert "rounds" not in output  # nothing ran


def test_out_is_not_created_when_the_run_cannot_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code, _ = _run_sim(["--out", str(tmp_path / "new"), "--broker", "mqtt://127.0.0.1:1"], capsys)
    # Assert
    assert code == 1
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- fedge bench


def test_bench_fl_help_lists_the_codecs(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as info:
        fedge_main(["bench", "fl", "--help"])
    # Assert
    assert info.value.code == 0
    assert "topk1%+int8+ef" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["kernels", "--json", "/nonexistent/x"], "--json /nonexistent/x: the directory"),
        (["agent", "--json", "/nonexistent/x"], "--json /nonexistent/x: the directory"),
        (["fl", "--json", "/nonexistent/x"], "--json /nonexistent/x: the directory"),
        (["fl", "--doc", "/nonexistent/x.md"], "--doc /nonexistent/x.md: the directory"),
        (["soak", "--json", "/nonexistent/x"], "--json /nonexistent/x: the directory"),
        (["transport", "--small", "0", "--large", "0"], "argument --small: must be at least 1"),
        (["agent", "--skip-idle", "--repeats", "0"], "argument --repeats: must be at least 1"),
        (["agent", "--idle-s", "-1"], "argument --idle-s: must be a finite number > 0"),
        (["soak", "--warmup", "10", "--rounds", "10"], "--warmup (10) must be below --rounds"),
    ],
)
def test_bench_refuses_bad_arguments_before_running(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # Execute
    with pytest.raises(SystemExit) as info:
        fedge_main(["bench", *argv])
    # Assert
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_transport_names_a_bad_mosquitto_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge import bench_transport

    # Execute / Assert: --mosquitto, then $FEDGE_MOSQUITTO, never silently another binary
    with pytest.raises(SystemExit, match="--mosquitto=/nonexistent/mosquitto"):
        bench_transport._find_mosquitto("/nonexistent/mosquitto")
    monkeypatch.setenv("FEDGE_MOSQUITTO", "/nonexistent/mosquitto")
    with pytest.raises(SystemExit, match="FEDGE_MOSQUITTO=/nonexistent/mosquitto"):
        bench_transport._find_mosquitto(None)


def test_a_bad_fedge_mosquitto_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge.mosquitto import MosquittoPathError, find_mosquitto

    # Prepare
    monkeypatch.setenv("FEDGE_MOSQUITTO", "/nonexistent/mosquitto")
    # Execute / Assert
    with pytest.raises(MosquittoPathError, match="FEDGE_MOSQUITTO=/nonexistent/mosquitto"):
        find_mosquitto()
