"""Which kernels are in use, and that the choice is reported."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels
from kernels import _reference


def test_backend_is_reported() -> None:
    assert kernels.BACKEND in ("cython", "python")


def test_compiled_backend_when_required() -> None:
    # `make test` sets FEDGE_REQUIRE_COMPILED=1 for its compiled run: a silent
    # fallback to NumPy there would hide a broken build.
    if os.environ.get("FEDGE_REQUIRE_COMPILED") == "1":
        assert kernels.BACKEND == "cython"


def test_purepython_env_forces_the_reference_path() -> None:
    env = {**os.environ, "KERNELS_PUREPYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.BACKEND)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "python"


def test_fedge_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edge", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("fedge ")


def test_output_piped_into_a_closed_reader_ends_quietly() -> None:
    # `fedge bench kernels | head -1`: the reader leaves after the first line, the
    # benchmark's later lines hit a closed pipe. That ends the command, without a
    # traceback.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "bench", "kernels", "--sizes", "4K", "--repeats", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("fedge kernels")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("family", ["quantize", "sparsify"])
def test_type_stubs_match_the_twins(family: str) -> None:
    # The compiled modules are typed through kernels/_<family>.pyi; the NumPy twins share
    # their signatures, so a parameter added to a kernel must show up in its stub too.
    stub = ast.parse((Path(kernels.__file__).parent / f"_{family}.pyi").read_text())
    for node in stub.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        twin = getattr(_reference, node.name)
        stub_params = [a.arg for a in node.args.args]
        assert stub_params == list(inspect.signature(twin).parameters), node.name
