"""Which kernels are in use, and that the choice is reported."""

from __future__ import annotations

import os
import subprocess
import sys

import kernels


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
