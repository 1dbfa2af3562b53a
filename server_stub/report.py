"""What a person reads after a federation: the round table, ``metrics.json`` and ``curves.png``.

``metrics.json`` is ``{"config": {...}, "rounds": [...], "totals": {...}}``;
each round carries the fields in :data:`ROUND_FIELDS` (a user-facing contract:
extend, never rename). ``curves.png`` plots accuracy against round and against
the megabytes the devices sent, one line per run when several runs are compared.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

ROUND_FIELDS: Final = (
    "round",
    "model_version",
    "accuracy",
    "loss",
    "participants",
    "declined",
    "dropped",
    "rejected",
    "bytes_up",
    "bytes_down",
    "duration_s",
)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def totals(
    rounds: Sequence[Mapping[str, Any]], target_accuracy: float | None = None
) -> dict[str, Any]:
    """Sum and summarise the per-round records."""
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    out: dict[str, Any] = {
        "rounds": len(rounds),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": next(
            (r["loss"] for r in reversed(rounds) if r.get("loss") is not None), None
        ),
        "bytes_up": sum(int(r.get("bytes_up", 0)) for r in rounds),
        "bytes_down": sum(int(r.get("bytes_down", 0)) for r in rounds),
        "participants": sum(int(r.get("participants", 0)) for r in rounds),
        "declined": sum(int(r.get("declined", 0)) for r in rounds),
        "dropped": sum(int(r.get("dropped", 0)) for r in rounds),
        "rejected": sum(int(r.get("rejected", 0)) for r in rounds),
        "late": sum(late_count(r) for r in rounds),
        "cancelled": sum(int(r.get("cancelled", 0)) for r in rounds),
        "duration_s": sum(float(r.get("duration_s", 0.0)) for r in rounds),
    }
    if target_accuracy is not None:
        reached = next(
            (
                r["round"]
                for r in rounds
                if r.get("accuracy") is not None and r["accuracy"] >= target_accuracy
            ),
            None,
        )
        out["target_accuracy"] = target_accuracy
        out["rounds_to_target"] = reached
    return out


def write_metrics(
    path: Path,
    config: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    total: Mapping[str, Any],
) -> None:
    """Write ``metrics.json`` atomically (a crash never leaves half a file)."""
    doc = {
        "config": dict(config),
        "rounds": [{k: _finite_or_none(v) for k, v in r.items()} for r in rounds],
        "totals": {k: _finite_or_none(v) for k, v in total.items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def plot_curves(path: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Plot accuracy against round and against the megabytes the devices sent (uplink).

    The uplink is what the codecs change (the downlink is the same float32 model in
    every run), so it is the axis that compares codecs; it is logarithmic past 0.1 MB.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_round, ax_mb) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, rounds in runs.items():
        pts = [r for r in rounds if r.get("accuracy") is not None]
        xs = [r["round"] for r in pts]
        ys = [100 * r["accuracy"] for r in pts]
        mb, cum = [], 0.0
        for r in rounds:
            cum += int(r.get("bytes_up", 0)) / 1e6
            if r.get("accuracy") is not None:
                mb.append(cum)
        ax_round.plot(xs, ys, marker=".", label=label)
        ax_mb.plot(mb, ys, marker=".", label=label)
    ax_round.set_xlabel("round")
    ax_mb.set_xlabel("megabytes sent by the devices (uplink, cumulative)")
    ax_mb.set_xscale("symlog", linthresh=0.1)
    for ax in (ax_round, ax_mb):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if len(runs) > 1 or any(runs):
        ax_mb.legend(loc="lower right", fontsize="small")
    fig.suptitle("fedge: accuracy by round and by bytes")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "bytes":
        return human_bytes(int(value))
    if kind == "float":
        return f"{value:.3f}"
    if kind == "s":
        return f"{value:.2f}s"
    return str(value)


def late_count(record: Mapping[str, Any]) -> int:
    """Updates of a round rejected only for arriving after it closed.

    With over-selection these are expected: the stragglers of a round that already
    had its K updates. Shown apart so that invalid updates stand out.
    """
    by_reason = record.get("rejected_by_reason") or {}
    return int(by_reason.get("late", 0))


def rejected_text(record: Mapping[str, Any]) -> str:
    """``'3'``, or ``'3 (2 late)'`` when some of the rejections were only late."""
    total, late = int(record.get("rejected", 0)), late_count(record)
    return f"{total} ({late} late)" if late else str(total)


COLUMNS: Final = (
    ("round", "round", "int"),
    ("v", "model_version", "int"),
    ("acc", "accuracy", "pct"),
    ("loss", "loss", "float"),
    ("part", "participants", "int"),
    ("decl", "declined", "int"),
    ("drop", "dropped", "int"),
    ("rej", "rejected", "int"),
    ("up", "bytes_up", "bytes"),
    ("down", "bytes_down", "bytes"),
    ("time", "duration_s", "s"),
)


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1000, as network traffic is counted)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


def round_table(rounds: Sequence[Mapping[str, Any]], title: str = "rounds") -> Any:
    """A rich Table of the round records."""
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for head, _key, kind in COLUMNS:
        table.add_column(head, justify="left" if kind == "str" else "right")
    for r in rounds:
        table.add_row(
            *(
                rejected_text(r) if key == "rejected" else _fmt(r.get(key), kind)
                for _h, key, kind in COLUMNS
            )
        )
    return table


def summary_table(total: Mapping[str, Any], wall_s: float) -> Any:
    """A rich Table of the run's totals."""
    from rich.table import Table

    table = Table(title="summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("rounds completed", str(total.get("rounds"))),
        ("final test accuracy", _fmt(total.get("final_accuracy"), "pct")),
        ("best test accuracy", _fmt(total.get("best_accuracy"), "pct")),
        ("uplink", _fmt(total.get("bytes_up"), "bytes")),
        ("downlink", _fmt(total.get("bytes_down"), "bytes")),
        ("updates accepted", str(total.get("participants"))),
        (
            "declined / dropped / rejected",
            f"{total.get('declined')} / {total.get('dropped')} / {total.get('rejected')}"
            + (
                f" ({total['late']} late straggler{'' if total['late'] == 1 else 's'})"
                if total.get("late")
                else ""
            ),
        ),
        ("stragglers told to stop", str(total.get("cancelled", 0))),
        ("wall time", f"{wall_s:.1f}s"),
    ]
    if "rounds_to_target" in total:
        rows.append(
            (
                f"rounds to {100 * total['target_accuracy']:.0f}%",
                _fmt(total.get("rounds_to_target"), "int"),
            )
        )
    for what, value in rows:
        table.add_row(what, value)
    return table
