"""The import rules of the architecture, checked in a fresh interpreter each."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["kernels", "kernels.codec", "kernels.bench"])
def test_kernels_import_none_of_our_other_packages(module: str) -> None:
    loaded = imported_after(f"import {module}")
    assert not {m for m in loaded if m.split(".")[0] in ("edge", "server_stub")}


@pytest.mark.parametrize("module", ["edge", "edge.cli"])
def test_edge_does_not_import_the_coordinator(module: str) -> None:
    assert not {m for m in imported_after(f"import {module}") if m.startswith("server_stub")}


def test_fedge_version_loads_nothing_heavy() -> None:
    loaded = imported_after("import edge.cli")
    assert "paho" not in {m.split(".")[0] for m in loaded}
    assert "numpy" not in loaded
