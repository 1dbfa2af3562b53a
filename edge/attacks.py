"""Model-poisoning attacks for simulated devices (simulation and testing only).

This module owns the attacks a malicious simulated device can play on its update
(``fedge sim --attackers N --attack KIND``). An attack is a pure function of the
honest update ``new - global`` (a mapping of tensor name to float32 array); the
agent applies it through :attr:`edge.agent.AgentOptions.update_hook` just before
encoding. Nothing in a real deployment builds an attack: ``fedge agent`` never sets
the hook.

Kinds (the text form is what ``--attack`` and the simulator's device profile carry):

- ``scale:FACTOR``: multiply the update by ``FACTOR`` (a model-replacement or
  boosting attack; ``scale:-1`` is the plain sign flip).
- ``signflip``: negate the update (gradient ascent on the honest objective).
- ``nan``: replace every value with NaN. The agent sends such an update raw, so it
  crosses the wire and the coordinator must reject it as ``non_finite``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

ATTACK_KINDS: tuple[str, ...] = ("scale:FACTOR", "signflip", "nan")
"""The text forms :func:`parse_attack` accepts (for help and error messages)."""


class AttackKind(StrEnum):
    """What a malicious device does to its update."""

    SCALE = "scale"
    """Multiply by ``factor``."""
    SIGNFLIP = "signflip"
    """Negate."""
    NAN = "nan"
    """Every value NaN (sent raw, rejected by the coordinator as ``non_finite``)."""


@dataclass(frozen=True, slots=True)
class Attack:
    """One poisoning attack; call it on an update to get the poisoned update (a copy).

    Examples
    --------
    >>> attack = parse_attack("scale:10")
    >>> attack({"w": np.ones(2, np.float32)})["w"].tolist()
    [10.0, 10.0]
    >>> str(attack)
    'scale:10'
    """

    kind: AttackKind
    factor: float = 1.0
    """The multiplier of ``scale`` (ignored by the other kinds)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.factor):
            raise ValueError(f"attack factor must be finite, got {self.factor!r}")

    def __call__(self, update: Mapping[str, F32]) -> dict[str, F32]:
        """Return the poisoned copy of ``update`` (the input is not modified)."""
        if self.kind is AttackKind.NAN:
            return {name: np.full_like(arr, np.nan) for name, arr in update.items()}
        factor = -1.0 if self.kind is AttackKind.SIGNFLIP else self.factor
        return {name: (arr * np.float32(factor)).astype(np.float32) for name, arr in update.items()}

    def __str__(self) -> str:
        if self.kind is AttackKind.SCALE:
            return f"scale:{self.factor:g}"
        return self.kind.value


def parse_attack(text: str) -> Attack:
    """Parse ``scale:FACTOR``, ``signflip`` or ``nan``.

    Raises
    ------
    ValueError
        Anything else; the message lists the valid forms.

    Examples
    --------
    >>> parse_attack("signflip")
    Attack(kind=<AttackKind.SIGNFLIP: 'signflip'>, factor=1.0)
    """
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == AttackKind.SCALE and arg:
            return Attack(AttackKind.SCALE, float(arg))
        if kind in (AttackKind.SIGNFLIP, AttackKind.NAN) and not arg:
            return Attack(AttackKind(kind))
    except ValueError:
        pass
    raise ValueError(f"unknown attack {text!r}; use one of {', '.join(ATTACK_KINDS)}")


__all__ = ["ATTACK_KINDS", "Attack", "AttackKind", "parse_attack"]
