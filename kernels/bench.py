"""``fedge bench kernels``: kernel throughput as ratios measured side by side in one run.

Every kernel is timed on the same float32 array as ``np.copyto`` (the memory
bandwidth limit of this machine, measured in the same process, moments apart)
and as a plain NumPy baseline doing the same job (the usual min/max -> uint8
recipe with ``np.round`` for quantizers, ``np.argpartition`` for top-k, NumPy
shifts for packing). Each figure is the median of repeated runs, single thread.
Ratios, not absolute speeds, are what carry over between runs on a shared,
noisy machine: ``vs memcpy = t(copyto) / t(kernel)`` and
``vs numpy = t(numpy baseline) / t(kernel)``; higher is better.

A quality section reports the reconstruction error on Gaussian data and the
compression ratios of the codecs on a real model update (an MLP trained on
scikit-learn's bundled digits data; skipped with a note if scikit-learn is
not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import kernels
from kernels import codec as codecs
from kernels import quantize, sparsify

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Row:
    """One kernel's figures at one size."""

    kernel: str
    n: int
    median_s: float
    gb_per_s: float
    vs_memcpy: float
    vs_numpy: float | None
    baseline: str
    note: str = ""


class _LiveRows(list[Row]):
    """The rows of one size, handed to ``on_row`` as they are measured (a full run
    takes minutes on a slow device; the table then grows line by line)."""

    def __init__(self, on_row: Callable[[Row], None] | None) -> None:
        super().__init__()
        self._on_row = on_row

    def append(self, row: Row) -> None:
        super().append(row)
        if self._on_row is not None:
            self._on_row(row)

    def extend(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.append(row)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: page faults, caches, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paired_times(
    plain: Callable[[], object], other: Callable[[], object], repeats: int
) -> tuple[float, float, float]:
    """Median times of two jobs run alternately, and the median of their per-pair ratios.

    On a shared machine the load drifts between one figure and the next; timing
    the two jobs back to back, pair after pair, and taking the median of the
    ratios keeps that drift out of the comparison.
    """
    plain()
    other()
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        other()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def seed_recipe_quantize(x: F32) -> tuple[npt.NDArray[np.uint8], float, float]:
    """Quantize like the seed article: per-tensor min/max to uint8 with ``np.round``."""
    lo, hi = float(x.min()), float(x.max())
    normalized = (x - lo) / (hi - lo + 1e-8)
    return np.round(normalized * 255).astype(np.uint8), lo, hi


def numpy_block_quantize(x: F32, bits: int, block_size: int) -> tuple[npt.NDArray[np.int8], F32]:
    """Block-symmetric quantization written plainly in NumPy (baseline for the block kernels)."""
    qmax = (1 << (bits - 1)) - 1
    n = x.size
    pad = (-n) % block_size
    blocks = np.pad(x, (0, pad)).reshape(-1, block_size)
    scales = (np.abs(blocks).max(axis=1) / qmax).astype(np.float32)
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[:, None]), -qmax, qmax).astype(np.int8)
    return q.ravel()[:n], scales


def numpy_pack(q: npt.NDArray[np.int8], bits: int) -> npt.NDArray[np.uint8]:
    """Pack signed codes two (int4) or four (int2) per byte with NumPy shifts."""
    per = 8 // bits
    mask = (1 << bits) - 1
    u = (q.astype(np.uint8) & mask).astype(np.uint8)
    u = np.pad(u, (0, (-u.size) % per)).reshape(-1, per)
    out = np.zeros(u.shape[0], dtype=np.uint8)
    for j in range(per):
        out |= u[:, j] << (bits * j)
    return out


def _feedback_floor(x: F32, residual: F32) -> Callable[[], object]:
    """The floor of error feedback: ``residual + x`` streamed into a second buffer,
    the memory traffic every form of feedback needs (read the update and the old
    residual, write the new one), with no coding at all."""
    return partial(quantize.residual_add, residual, x, out=np.empty_like(x))


def _floor_note(floor: Callable[[], object], fused: Callable[[], object], repeats: int) -> str:
    """How a fused feedback kernel compares with its floor, timed pair after pair."""
    _, _, ratio = _paired_times(floor, fused, repeats)
    return f", {ratio:.2f}x the feedback floor"


def _bench_block(x: F32, bits: int, t_copy: float, repeats: int) -> list[Row]:
    """Rows for the block quantizer of ``bits`` bits (block size 64)."""
    n = x.size
    packed = np.empty(quantize.packed_nbytes(n, bits), dtype=np.uint8)
    scales = np.empty(quantize.num_blocks(n, 64), dtype=np.float32)
    out = np.empty_like(x)
    rows: list[Row] = []

    def row(
        kernel: str, t: float, baseline: str = "", t_base: float | None = None, note: str = ""
    ) -> Row:
        vs_np = None if t_base is None else t_base / t
        return Row(kernel, n, t, 4 * n / t / 1e9, t_copy / t, vs_np, baseline, note)

    def np_quant() -> object:
        q, _ = numpy_block_quantize(x, bits, 64)
        return q if bits == 8 else numpy_pack(q, bits)

    quant = partial(quantize.quantize_block, x, bits, 64, packed_out=packed, scales_out=scales)
    t_q = _median_time(quant, repeats)
    label = "quantize" if bits == 8 else "quantize+pack"
    base = "numpy block recipe" + ("" if bits == 8 else " + shifts")
    rows.append(row(f"block_i{bits} {label}", t_q, base, _median_time(np_quant, repeats)))
    if bits == 8:
        stochastic = partial(quant, stochastic=True, seed=1)
        rows.append(row("block_i8 quantize, stochastic", _median_time(stochastic, repeats)))
        residual = np.zeros_like(x)
        targets: tuple[tuple[str, F32 | None], ...] = (
            ("in place", None),
            ("into residual_out", np.empty_like(x)),
        )
        for label, target in targets:
            feedback = partial(
                quantize.quantize_block_feedback,
                x,
                residual,
                8,
                64,
                packed_out=packed,
                scales_out=scales,
                residual_out=target,
            )
            _, t_ef, ratio = _paired_times(quant, feedback, repeats)
            note = f"{ratio:.2f}x quantize"
            if target is not None:
                note += _floor_note(_feedback_floor(x, residual), feedback, repeats)
            rows.append(row(f"block_i8 + error feedback, {label}", t_ef, note=note))
    quant()
    q_np, s_np = numpy_block_quantize(x, bits, 64)
    scale_per_element = np.repeat(s_np, 64)[:n]

    def np_dequant() -> object:
        return np.multiply(q_np.astype(np.float32), scale_per_element, out=out)

    dequant = partial(quantize.dequantize_block, packed, scales, n, bits, 64, out=out)
    rows.append(
        row(
            f"block_i{bits} dequantize",
            _median_time(dequant, repeats),
            "numpy codes * repeat(scales)",
            _median_time(np_dequant, repeats),
        )
    )
    if bits == 8:
        acc = np.zeros_like(x)

        def np_acc() -> object:
            deq = q_np.astype(np.float32) * scale_per_element
            return np.add(acc, np.float32(0.5) * deq, out=acc)

        fused = partial(quantize.dequantize_block_accumulate, packed, scales, n, 8, 64, 0.5, acc)
        rows.append(
            row(
                "block_i8 dequantize+accumulate",
                _median_time(fused, repeats),
                "numpy acc += w * deq",
                _median_time(np_acc, repeats),
            )
        )
    return rows


def _bench_size(
    n: int, repeats: int, rng: np.random.Generator, on_row: Callable[[Row], None] | None = None
) -> list[Row]:
    x = rng.standard_normal(n).astype(np.float32)
    dst = np.empty_like(x)
    t_copy = _median_time(lambda: np.copyto(dst, x), repeats)
    rows = _LiveRows(on_row)

    def add(
        kernel: str,
        fn: Callable[[], object],
        baseline: str = "",
        t_base: float | None = None,
        note: str = "",
    ) -> float:
        t = _median_time(fn, repeats)
        rows.append(
            Row(
                kernel,
                n,
                t,
                4 * n / t / 1e9,
                t_copy / t,
                None if t_base is None else t_base / t,
                baseline,
                note,
            )
        )
        return t

    rows.append(Row("memcpy (np.copyto)", n, t_copy, 4 * n / t_copy / 1e9, 1.0, None, ""))
    t_seed = _median_time(lambda: seed_recipe_quantize(x), repeats)
    rows.append(
        Row(
            "numpy min/max->u8 (seed recipe)",
            n,
            t_seed,
            4 * n / t_seed / 1e9,
            t_copy / t_seed,
            1.0,
            "itself",
        )
    )

    codes_u8 = np.empty(n, dtype=np.uint8)
    add(
        "affine_u8 quantize",
        lambda: quantize.quantize_affine_u8(x, out=codes_u8),
        "seed recipe",
        t_seed,
    )
    _, scale, zp = quantize.quantize_affine_u8(x, out=codes_u8)
    out = np.empty_like(x)
    t_np_affine_deq = _median_time(
        lambda: np.multiply(codes_u8.astype(np.float32) - zp, scale, out=out), repeats
    )
    add(
        "affine_u8 dequantize",
        lambda: quantize.dequantize_affine_u8(codes_u8, scale, zp, out=out),
        "numpy (q - zp) * scale",
        t_np_affine_deq,
    )

    for bits in (8, 4, 2):
        rows.extend(_bench_block(x, bits, t_copy, repeats))

    k = sparsify.topk_count(n, 0.01)
    t_argp = _median_time(lambda: np.argpartition(np.abs(x), n - k)[n - k :], repeats)
    exact_idx, _ = sparsify.topk_exact(x, k)
    add("topk 1% exact", lambda: sparsify.topk_exact(x, k), "np.argpartition", t_argp)
    sampled_idx, _ = sparsify.topk_sampled(x, k, exact=False)
    recall = np.intersect1d(sampled_idx, exact_idx).size / max(k, 1)
    add(
        "topk 1% sampled",
        lambda: sparsify.topk_sampled(x, k, exact=False),
        "np.argpartition",
        t_argp,
        f"recall {recall:.3f}, {sampled_idx.size} kept",
    )
    add(
        "topk 1% sampled+trim",
        lambda: sparsify.topk_sampled(x, k, exact=True),
        "np.argpartition",
        t_argp,
        "recall 1 when the trim succeeds",
    )
    residual = np.zeros_like(x)
    floor = _feedback_floor(x, residual)  # timed after the in-place rows have written residual
    targets: tuple[tuple[str, F32 | None], ...] = (
        ("in place", None),
        ("into residual_out", np.empty_like(x)),
    )
    for label, target in targets:
        fused = partial(sparsify.topk_feedback, x, residual, k, exact=True, residual_out=target)
        _, t_fb, ratio = _paired_times(
            lambda: sparsify.topk_sampled(x, k, exact=True), fused, repeats
        )
        note = f"{ratio:.2f}x sampled+trim"
        if target is not None:
            note += _floor_note(floor, fused, repeats)
        rows.append(
            Row(
                f"topk 1% + error feedback, {label}",
                n,
                t_fb,
                4 * n / t_fb / 1e9,
                t_copy / t_fb,
                None,
                "",
                note,
            )
        )
    enc = sparsify.encode_indices(exact_idx, n)
    t_np_idx = _median_time(
        lambda: np.diff(exact_idx.astype(np.int64)).astype(np.uint32).tobytes(), repeats
    )
    add(
        "index delta+varint encode",
        lambda: sparsify.encode_indices(exact_idx, n),
        "numpy diff (no varint)",
        t_np_idx,
        f"{len(enc) / max(k, 1):.2f} B/index",
    )
    add("index delta+varint decode", lambda: sparsify.decode_indices(enc, k, n))

    add("residual + update (feedback floor)", floor, "", None, "streamed into a second buffer")
    for name, config in FEEDBACK_CODECS.items():
        c = codecs.get_codec(config)
        payload = c.encode(x)
        add(
            f"codec {name} encode",
            partial(c.encode, x),
            "",
            None,
            f"{4 * n / len(payload):.1f}x smaller",
        )
        if name in codecs.PRESETS:
            add(
                f"codec {name} decode+accumulate",
                partial(c.decode_accumulate, payload, out, 0.5),
            )
        for label, in_place in ((", double-buffered", False), (", in place", True)):
            ef = codecs.ErrorFeedback(c, n, in_place=in_place)
            t_plain, t_ef, ratio = _paired_times(
                partial(c.encode, x), partial(ef.encode, x), repeats
            )
            added = (t_ef - t_plain) / t_copy  # what feedback adds, in copies of the model
            note = f"{ratio:.2f}x without feedback, adds {added:.2f} memcpy"
            if not in_place:  # how the floor compares with the codec alone
                _, _, floor_ratio = _paired_times(partial(c.encode, x), floor, repeats)
                note += f", floor {floor_ratio:.2f}x"
            rows.append(
                Row(
                    f"codec {name} encode + error feedback{label}",
                    n,
                    t_ef,
                    4 * n / t_ef / 1e9,
                    t_copy / t_ef,
                    None,
                    "",
                    note,
                )
            )
    return rows


FEEDBACK_CODECS: dict[str, dict[str, Any]] = {
    "int8": codecs.PRESETS["int8"],
    "int4": codecs.PRESETS["int4"],
    "topk": codecs.PRESETS["topk"],
    "block_i8": {"id": "block_i8"},
    "topk(1%)": {"id": "topk", "fraction": 0.01},
}
"""Codecs whose error-feedback cost the benchmark reports: the presets, and the bare
block and top-k codecs (no zstd stage to hide the cost in)."""


def _relative_l2(x: F32, y: F32) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def quality(rng: np.random.Generator) -> dict[str, Any]:
    """Reconstruction error on Gaussian data and compression of a real model update."""
    x = rng.standard_normal(1 << 20).astype(np.float32)
    out: dict[str, Any] = {}
    for cid in ("block_i8", "block_i4", "block_i2", "affine_u8"):
        c = codecs.get_codec({"id": cid})
        out[f"{cid} relative L2 error (Gaussian)"] = _relative_l2(
            x, c.decode(c.encode(x), np.empty_like(x))
        )
    # Stochastic rounding: mean error over many elements, in units of the data's std.
    s = codecs.get_codec({"id": "block_i8", "stochastic": True, "seed": 7})
    err = s.decode(s.encode(x), np.empty_like(x)) - x
    out["block_i8 stochastic mean error / std"] = float(abs(err.mean()) / x.std())
    c4 = codecs.get_codec({"id": "block_i4", "stochastic": True, "seed": 7})
    err4 = c4.decode(c4.encode(x), np.empty_like(x)) - x
    out["block_i4 stochastic mean error / std"] = float(abs(err4.mean()) / x.std())
    out.update(real_update_ratios())
    return out


def real_update_ratios() -> dict[str, Any]:
    """Compression ratios on real updates: one more SGD epoch of MLPs on scikit-learn's digits.

    Plain SGD without weight decay, as fedge's trainers run it, so weights of
    pixels that are always blank get an exactly-zero update, as on a device.
    """
    try:
        import warnings

        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return {"real update": "skipped: pip install 'fedge[data]' for scikit-learn"}
    digits = load_digits()
    xs, ys = digits.data / 16.0, digits.target
    configs = {
        "block_i8+zstd": [{"id": "block_i8"}, {"id": "zstd", "level": 3}],
        "block_i4+zstd": [{"id": "block_i4"}, {"id": "zstd", "level": 3}],
        "topk(1%)+block_i8+zstd": [
            {"id": "topk", "fraction": 0.01},
            {"id": "block_i8"},
            {"id": "zstd", "level": 3},
        ],
        "zstd alone": [{"id": "zstd", "level": 3}],
    }
    out: dict[str, Any] = {}
    for hidden in (64, 128):
        mlp = MLPClassifier(
            hidden_layer_sizes=(hidden,),
            max_iter=3,
            random_state=0,
            solver="sgd",
            alpha=0.0,
            momentum=0.0,
            learning_rate_init=0.1,
            batch_size=32,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlp.fit(xs, ys)
            before = np.concatenate([a.ravel() for a in (*mlp.coefs_, *mlp.intercepts_)])
            mlp.partial_fit(xs, ys)
        after = np.concatenate([a.ravel() for a in (*mlp.coefs_, *mlp.intercepts_)])
        update = (after - before).astype(np.float32)
        name = f"digits MLP 64-{hidden}-10 update ({update.size} params)"
        for codec_name, stages in configs.items():
            payload = codecs.get_codec({"id": "pipeline", "stages": stages}).encode(update)
            out[f"{name}: {codec_name}, x smaller"] = 4 * update.size / len(payload)
    return out


_HEADER = (
    f"{'kernel':38} {'n':>10} {'median ms':>10} {'GB/s':>7} {'vs memcpy':>9} {'vs numpy':>9}  note"
)


def _print_header() -> None:
    print(_HEADER)
    print("-" * len(_HEADER), flush=True)


def _print_row(r: Row) -> None:
    vs_np = "" if r.vs_numpy is None else f"{r.vs_numpy:8.2f}x"
    note = ", ".join(p for p in (f"numpy = {r.baseline}" if r.baseline else "", r.note) if p)
    print(
        f"{r.kernel:38} {r.n:>10} {r.median_s * 1e3:10.2f} {r.gb_per_s:7.2f} "
        f"{r.vs_memcpy:8.2f}x {vs_np:>9}  {note}",
        flush=True,
    )


def _print_quality(qual: dict[str, Any]) -> None:
    print()
    for key, value in qual.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:50} {shown}")


def run(
    sizes: Sequence[int],
    repeats: int,
    seed: int = 0,
    on_row: Callable[[Row], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its figures (what ``--json`` writes).

    ``on_row`` is called with each row as soon as it is measured.
    """
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for n in sizes:
        rows.extend(_bench_size(n, repeats, rng, on_row))
    return {
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "backend": kernels.BACKEND,
        },
        "repeats": repeats,
        "rows": [asdict(r) for r in rows],
        "quality": quality(rng),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedge bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default="1M,16M",
        help="comma-separated element counts, with K/M suffixes (default 1M,16M)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    try:
        sizes = [_parse_size(s) for s in args.sizes.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    check_output_file(parser, "--json", args.json)
    print(
        f"fedge kernels, backend {kernels.BACKEND}, {platform.machine()}, "
        f"median of {args.repeats} runs, single thread",
        flush=True,
    )
    _print_header()
    result = run(sizes, args.repeats, on_row=_print_row)
    _print_quality(result["quality"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: str | Path | None) -> None:
    """Fail with a usage error now, not after the run, if ``path`` (the value of ``flag``)
    cannot be written later. Every ``fedge bench`` command uses it (``edge.benchargs``)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        parser.error(f"{flag} {p}: is a directory; give a file name")
    if not p.parent.is_dir():
        parser.error(f"{flag} {p}: the directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        parser.error(f"{flag} {p}: not writable")


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in ("K", "M") else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"bad size {text!r}: use a positive count like 1M or 65536")
    return int(digits) * mult


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
