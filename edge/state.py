"""The agent's on-disk state: the cached global model and per-tensor vectors that outlive a round.

Files in the agent's state directory (``/var/lib/fedge`` under systemd)::

    model.bin             the last verified global model envelope
    model.json            its manifest (version, SHA-256), written after model.bin
    residual.npz          error-feedback residuals, one array per tensor
    scaffold_c.npz        SCAFFOLD's local control variate c_i, one array per tensor

Rules: every write is atomic (temporary file in the same directory, ``fsync``, ``os.replace``,
then ``fsync`` of the directory), so a power cut leaves the old file or the new one, never a
torn one. ``.npz`` files are read with ``allow_pickle=False`` and carry the model layout they
were written for; a file whose layout no longer matches (the model changed) or that cannot be
read is discarded with a log line, never trusted.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np

from edge.modelio import F32, ModelLayout
from edge.wire import ModelManifest, WireError

__all__ = ["AgentStore", "atomic_write"]

log = logging.getLogger(__name__)

RESIDUAL_FILE: Final = "residual.npz"
SCAFFOLD_FILE: Final = "scaffold_c.npz"
MODEL_FILE: Final = "model.bin"
MANIFEST_FILE: Final = "model.json"
_LAYOUT_KEY: Final = "__layout__"


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; with ``fsync`` also durably."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not fsync:
        return
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AgentStore:
    """Reads and writes the files of one agent's state directory (created if missing).

    ``fsync=False`` keeps writes atomic but not durable across a power cut; the simulator
    uses it so that a thousand simulated devices do not each wait for the disk.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    # ------------------------------------------------------------------ per-tensor vectors

    def _save_tensors(self, name: str, layout: ModelLayout, tensors: Mapping[str, F32]) -> None:
        layout.check_weights(tensors)
        arrays: dict[str, Any] = {
            f"t{i}": np.asarray(tensors[n], dtype="<f4") for i, n in enumerate(layout.names)
        }
        arrays[_LAYOUT_KEY] = np.frombuffer(json.dumps(layout.to_json()).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(self.directory / name, buf.getvalue(), fsync=self.fsync)

    def _load_tensors(self, name: str, layout: ModelLayout) -> dict[str, F32] | None:
        path = self.directory / name
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = ModelLayout.from_json(json.loads(npz[_LAYOUT_KEY].tobytes().decode()))
                if stored != layout:
                    log.warning(
                        "discarding %s: it was written for layout %s, the model is now %s",
                        path,
                        stored.entries,
                        layout.entries,
                    )
                    self._remove(name)
                    return None
                out = {
                    n: np.asarray(npz[f"t{i}"], dtype=np.float32).reshape(shape).copy()
                    for i, (n, shape) in enumerate(layout.entries)
                }
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, WireError) as exc:
            log.warning("discarding unreadable %s: %s", path, exc)
            self._remove(name)
            return None
        if not all(np.isfinite(t).all() for t in out.values()):
            log.warning("discarding %s: it holds NaN or infinity", path)
            self._remove(name)
            return None
        return out

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / name).unlink()

    def save_residuals(self, layout: ModelLayout, residuals: Mapping[str, F32]) -> None:
        """Persist the error-feedback residuals (one per tensor of ``layout``)."""
        self._save_tensors(RESIDUAL_FILE, layout, residuals)

    def load_residuals(self, layout: ModelLayout) -> dict[str, F32] | None:
        """The residuals saved for ``layout``, or None (missing, stale layout or unreadable)."""
        return self._load_tensors(RESIDUAL_FILE, layout)

    def clear_residuals(self) -> None:
        self._remove(RESIDUAL_FILE)

    def save_scaffold_control(self, layout: ModelLayout, c_local: Mapping[str, F32]) -> None:
        """Persist SCAFFOLD's local control variate ``c_i``."""
        self._save_tensors(SCAFFOLD_FILE, layout, c_local)

    def load_scaffold_control(self, layout: ModelLayout) -> dict[str, F32] | None:
        """The saved ``c_i`` for ``layout``, or None (start from zeros)."""
        return self._load_tensors(SCAFFOLD_FILE, layout)

    # ------------------------------------------------------------------ model cache

    def save_model(self, manifest: ModelManifest, envelope: bytes) -> None:
        """Cache a verified model envelope and its manifest (the manifest is written last)."""
        manifest.verify(envelope)
        atomic_write(self.directory / MODEL_FILE, envelope, fsync=self.fsync)
        atomic_write(self.directory / MANIFEST_FILE, manifest.to_bytes(), fsync=self.fsync)

    def load_model(self) -> tuple[ModelManifest, bytes] | None:
        """The cached model if both files are present and the envelope matches its SHA-256."""
        try:
            manifest = ModelManifest.from_bytes((self.directory / MANIFEST_FILE).read_bytes())
            envelope = (self.directory / MODEL_FILE).read_bytes()
            manifest.verify(envelope)
        except FileNotFoundError:
            return None
        except (OSError, WireError) as exc:
            log.warning("discarding the cached model in %s: %s", self.directory, exc)
            self._remove(MANIFEST_FILE)
            self._remove(MODEL_FILE)
            return None
        return manifest, envelope
