"""Shared checks for codecs (our version of numcodecs' ``tests/common.py``).

Golden payloads live in ``tests/fixtures/codecs/``: for each case a
``<name>.bin`` payload, and ``cases.json`` with its config and expected decoded
values; ``input.f32`` holds the float32 vector they were all encoded from. They
must decode forever, and encoding ``input.f32`` again must give the same bits on
every CPU and NumPy version; a missing golden file FAILS (regenerate only
deliberately, with ``python -m tests.regen_codec_fixtures``, and say why in the
commit).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.codec import Pipeline, UpdateCodec, get_codec
from kernels.errors import CorruptPayloadError

FIXTURES = Path(__file__).parent / "fixtures" / "codecs"

F32 = npt.NDArray[np.float32]


class Float16Codec:
    """A lossy stand-in for kernels.codec: float16 payloads, same decode/decode_accumulate API."""

    def encode(self, x: F32) -> bytes:
        return x.astype("<f2").tobytes()

    def _parse(self, payload: bytes, size: int) -> npt.NDArray[np.float16]:
        if len(payload) != 2 * size:
            raise CorruptPayloadError(f"expected {2 * size} bytes, got {len(payload)}")
        return np.frombuffer(payload, dtype="<f2")

    def decode(self, payload: bytes, out: F32) -> F32:
        out[:] = self._parse(payload, out.size)
        return out

    def decode_accumulate(self, payload: bytes, acc: F32, weight: float) -> F32:
        acc += np.float32(weight) * self._parse(payload, acc.size).astype(np.float32)
        return acc


def check_roundtrip(codec: UpdateCodec, x: np.ndarray, atol: float | np.ndarray) -> np.ndarray:
    """Encode and decode ``x`` via bytes, bytearray and memoryview; return the decoded vector."""
    payload = codec.encode(x)
    assert isinstance(payload, bytes)
    assert len(payload) <= codec.max_nbytes(x.size)
    results = []
    for view in (payload, bytearray(payload), memoryview(payload)):
        out = np.full(x.size, np.nan, dtype=np.float32)
        got = codec.decode(view, out)
        assert got is out
        results.append(out)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    assert np.isfinite(results[0]).all()
    np.testing.assert_array_less(np.abs(results[0] - x), np.asarray(atol) + 1e-30)
    return results[0]


def check_config_json(codec: UpdateCodec) -> None:
    """The config survives JSON and rebuilds an equal codec."""
    config = codec.get_config()
    again = get_codec(json.loads(json.dumps(config)))
    assert again == codec
    assert again.get_config() == config
    assert type(again) is type(codec)


def check_no_input_mutation(fn: Callable[..., Any], *args: np.ndarray) -> None:
    """Calling ``fn(*args)`` leaves every array argument unchanged."""
    before = [a.copy() for a in args]
    fn(*args)
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(a, b)


def load_golden_input() -> F32:
    """The vector every golden payload was encoded from (203 float32, little-endian)."""
    path = FIXTURES / "input.f32"
    assert path.exists(), f"golden input {path} is missing"
    return np.fromfile(path, dtype="<f4").astype(np.float32)


def check_golden_encode(name: str, case: dict[str, Any], x: F32) -> None:
    """Encoding ``x`` again gives the committed payload's bits.

    Byte stages (zstd, zlib) are undone first and what they were given is
    compared instead: their output may change with the compression library's
    version, which the format allows, while the kernels' may not change at all.
    """
    config = case["config"]
    stages = config["stages"] if config["id"] == "pipeline" else [config]
    inner = [s for s in stages if get_codec(s).kind != "bytes"]
    payload = (FIXTURES / f"{name}.bin").read_bytes()
    if len(inner) < len(stages):
        payload = bytes(Pipeline(stages)._decompress(payload, x.size))
    inner = inner or [{"id": "raw"}]  # a byte codec alone compresses the raw floats
    again = Pipeline(inner).encode(x)
    assert again == payload, f"{name}: encoding the golden input gave different bits"


def load_golden_cases() -> dict[str, Any]:
    path = FIXTURES / "cases.json"
    assert path.exists(), (
        f"golden index {path} is missing: run python -m tests.regen_codec_fixtures"
    )
    cases: dict[str, Any] = json.loads(path.read_text())
    return cases


def check_golden(name: str, case: dict[str, Any]) -> None:
    """Decode the committed payload ``name`` and compare with the committed values."""
    path = FIXTURES / f"{name}.bin"
    assert path.exists(), f"golden payload {path} is missing"
    codec = get_codec(case["config"])
    expected = np.asarray(case["decoded"], dtype=np.float32)
    out = codec.decode(path.read_bytes(), np.empty(expected.size, dtype=np.float32))
    np.testing.assert_array_equal(out, expected)
