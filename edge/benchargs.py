"""Argument checks shared by the ``fedge bench`` commands and ``fedge coordinator --rounds``
(argparse types and output paths).

Each command checks its options before it runs, so that a typo fails at once with argparse's
usage error (exit status 2), not after minutes of measuring.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from kernels.bench import check_output_file

__all__ = ["check_output_file", "float_above", "int_at_least"]


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


def float_above(lo: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``> lo`` (``>= lo`` with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or (value < lo if inclusive else value <= lo):
            bound = f">= {lo:g}" if inclusive else f"> {lo:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse
