"""pytest-benchmark suite of the kernels (``pytest tests/bench --benchmark-enable``).

In the normal test run benchmarks are disabled and each body runs once, so the
suite stays a smoke test; the figures that matter are ratios from
``fedge bench kernels`` (see docs/KERNELS.md).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from kernels import codec as codecs
from kernels import quantize, sparsify
from kernels.bench import Row, seed_recipe_quantize
from kernels.bench import main as bench_main
from kernels.bench import run as bench_run

N = 1 << 20


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(N).astype(np.float32)


def test_memcpy(benchmark, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    dst = np.empty_like(x)
    benchmark(np.copyto, dst, x)


def test_seed_recipe_quantize(benchmark, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    benchmark(seed_recipe_quantize, x)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_block_quantize(benchmark, x: np.ndarray, bits: int) -> None:  # type: ignore[no-untyped-def]
    benchmark(quantize.quantize_block, x, bits, 64)


def test_block_dequantize_accumulate(benchmark, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    packed, scales = quantize.quantize_block(x, 8, 64)
    acc = np.zeros_like(x)
    benchmark(quantize.dequantize_block_accumulate, packed, scales, N, 8, 64, 0.5, acc)


def test_topk_sampled(benchmark, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    benchmark(sparsify.topk_sampled, x, N // 100)


def test_argpartition_baseline(benchmark, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    benchmark(np.argpartition, np.abs(x), N - N // 100)


@pytest.mark.parametrize("preset", sorted(codecs.PRESETS))
def test_codec_encode(benchmark, x: np.ndarray, preset: str) -> None:  # type: ignore[no-untyped-def]
    benchmark(codecs.get_codec(codecs.PRESETS[preset]).encode, x)


def test_feedback_floor(benchmark, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    # residual + update into a second buffer: the traffic every form of feedback needs
    residual = np.zeros_like(x)
    out = np.empty_like(x)
    benchmark(quantize.residual_add, residual, x, out)


@pytest.mark.parametrize("in_place", [False, True], ids=["double-buffered", "in-place"])
@pytest.mark.parametrize("preset", ["int8", "topk"])
def test_codec_encode_with_error_feedback(
    benchmark, x: np.ndarray, preset: str, in_place: bool
) -> None:  # type: ignore[no-untyped-def]
    ef = codecs.ErrorFeedback(codecs.get_codec(codecs.PRESETS[preset]), N, in_place=in_place)
    benchmark(ef.encode, x)


def test_bench_command_writes_json(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    assert bench_main(["--sizes", "4K", "--repeats", "1", "--json", str(out)]) == 0
    assert out.exists()
    assert "block_i8 quantize" in capsys.readouterr().out


def test_bench_hands_out_every_row_as_measured() -> None:
    seen: list[Row] = []
    result = bench_run([4096], 1, on_row=seen.append)
    assert [asdict(r) for r in seen] == result["rows"]  # each row once, in table order
    assert {r.kernel for r in seen} >= {"memcpy (np.copyto)", "block_i8 quantize"}


def test_bench_table_prints_each_row_once(capsys) -> None:  # type: ignore[no-untyped-def]
    assert bench_main(["--sizes", "4K", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("memcpy (np.copyto)") for line in lines) == 1
    assert sum(line.startswith("kernel ") for line in lines) == 1
