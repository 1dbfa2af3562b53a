"""Fault injection for the reliability tests: crash the coordinator at a named stage of a round.

Inert unless the environment variable ``FEDGE_CRASH_AT`` is set when the process starts. Its
value is ``<stage>`` or ``<stage>@<round>``; the coordinator calls :func:`crash_point` at each
stage, and the first call whose stage (and round, if given) match kills the process with
SIGKILL, as ``kill -9`` or a power cut would: no ``finally`` blocks, no DISCONNECT, nothing
flushed. Stages (see :data:`STAGES`):

``after_send_tasks``
    the round's tasks were stored and published; no update counted yet.
``after_fold``
    the first update of the round was folded into the aggregate and stored.
``before_checkpoint``
    the round was aggregated in memory; the new version is not stored.
``after_checkpoint``
    the new version is stored (SQLite committed) but not yet published.
``mid_publish``
    the new version's retained chunks are published, its manifest is not.

Example: ``FEDGE_CRASH_AT=after_checkpoint@2 python -m server_stub --config c.toml``.
Never set this variable in production.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Final

logger = logging.getLogger(__name__)

ENV_VAR: Final = "FEDGE_CRASH_AT"
STAGES: Final = frozenset(
    {"after_send_tasks", "after_fold", "before_checkpoint", "after_checkpoint", "mid_publish"}
)


def _parse(value: str | None) -> tuple[str, int | None] | None:
    if not value:
        return None
    stage, _, round_text = value.partition("@")
    if stage not in STAGES:
        raise ValueError(f"{ENV_VAR}={value!r}: stage must be one of {sorted(STAGES)}")
    try:
        return stage, int(round_text) if round_text else None
    except ValueError:
        raise ValueError(f"{ENV_VAR}={value!r}: expected <stage>@<round number>") from None


_TARGET: Final = _parse(os.environ.get(ENV_VAR))


def crash_point(stage: str, round_no: int) -> None:
    """SIGKILL this process if ``FEDGE_CRASH_AT`` names ``stage`` (and ``round_no``)."""
    if _TARGET is None:
        return
    want_stage, want_round = _TARGET
    if stage == want_stage and (want_round is None or want_round == round_no):
        logger.warning("%s=%s: SIGKILL at %s of round %d", ENV_VAR, stage, stage, round_no)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV_VAR", "STAGES", "crash_point"]
