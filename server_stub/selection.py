"""Client selection: which eligible devices get a task this round.

This module owns the :class:`Selector` policies and the over-selection rule. Rules:

- Selection is pure and never blocks: a selector gets the eligible
  :class:`~server_stub.devices.DeviceView` snapshots, a target ``k``, a seeded
  ``np.random.Generator`` and the round number, and returns at most ``k`` device ids at once.
  With fewer candidates than ``k`` it returns them all; whether that is enough to start a
  round is :func:`select_cohort`'s (or the round machine's) call, and "not enough" means
  "try again at the next tick", never a wait.
- Eligibility (battery, link, temperature, busy, …) is decided before selection, by
  :class:`~server_stub.devices.EligibilityRules`.
- Candidates are ordered by ``cid`` before any random draw, so a selection depends only on
  the set of candidates and the generator's state, not on registry iteration order.

Policies:

- ``random``: uniform without replacement.
- ``resource``: weighted sampling by a resource score (battery or charging, training speed,
  link RTT), times a fairness factor ``exp(−fairness · (n_i − n̄)/(n̄ + 1))`` over the
  participation counts ``n_i`` and a cool-down for devices picked in the last rounds, so the
  same fast devices are not picked every time.
- ``utility`` (Oort, Lai et al. 2021): for devices that reported a loss, utility =
  ``loss × √num_examples × min(1, speed/median_speed)^α`` plus Oort's temporal-uncertainty
  bonus; the top devices (within ``cutoff`` of the k-th best) are sampled by utility. A
  fraction ``epsilon`` of the slots explores devices that never reported a loss, faster first.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from server_stub.devices import DeviceView

logger = logging.getLogger(__name__)

DEFAULT_OVER_SELECTION = 1.3
"""Over-selection factor: Google's production FL system asks 130 % of the target."""


class SelectionError(ValueError):
    """A selector was configured or called with impossible values."""


class UnknownSelectorError(SelectionError):
    """``make_selector`` got a name that is not a registered policy."""


class Selector(Protocol):
    """A selection policy."""

    def select(
        self,
        candidates: Sequence[DeviceView],
        k: int,
        rng: np.random.Generator,
        round_no: int,
    ) -> list[str]:
        """Return up to ``k`` distinct cids from ``candidates`` without blocking."""
        ...


def over_select(k: int, factor: float = DEFAULT_OVER_SELECTION) -> int:
    """Return how many devices to ask so that about ``k`` report: ``ceil(k × factor)``.

    Examples
    --------
    >>> over_select(10), over_select(1), over_select(10, 1.0)
    (13, 2, 10)
    """
    if k < 0:
        raise SelectionError(f"k must be >= 0, got {k}")
    if not (math.isfinite(factor) and factor >= 1.0):
        raise SelectionError(f"over-selection factor must be >= 1.0, got {factor!r}")
    # round() first so that 10 × 1.3 = 13.000000000000002 does not become 14.
    return math.ceil(round(k * factor, 9))


def select_cohort(
    selector: Selector,
    candidates: Sequence[DeviceView],
    target_k: int,
    rng: np.random.Generator,
    round_no: int,
    *,
    over_selection: float = DEFAULT_OVER_SELECTION,
    min_devices: int | None = None,
) -> list[str] | None:
    """Pick a round's cohort, or return None (logged) when too few devices are eligible.

    Parameters
    ----------
    selector
        The policy.
    candidates
        Eligible devices.
    target_k
        Updates the round wants (K); ``over_select(K, over_selection)`` devices are asked.
    rng, round_no
        Passed to the selector.
    over_selection
        Over-selection factor (≥ 1).
    min_devices
        Fewest eligible devices to start a round with; default ``target_k``.

    Returns
    -------
    list[str] | None
        The selected cids, or None: wait for the next tick.
    """
    need = target_k if min_devices is None else min_devices
    if need < 1:
        raise SelectionError(f"min_devices/target_k must be >= 1, got {need}")
    if len(candidates) < need:
        # DEBUG: asked on every tick while too few devices are eligible; the coordinator
        # logs the wait once per round at INFO.
        logger.debug(
            "round %d: %d eligible device(s), %d needed; waiting for the next tick",
            round_no,
            len(candidates),
            need,
        )
        return None
    return selector.select(candidates, over_select(target_k, over_selection), rng, round_no)


def _ordered(candidates: Sequence[DeviceView]) -> list[DeviceView]:
    ordered = sorted(candidates, key=lambda v: v.cid)
    for prev, cur in itertools.pairwise(ordered):
        if prev.cid == cur.cid:
            raise SelectionError(f"duplicate candidate cid {cur.cid!r}")
    return ordered


def weighted_sample(
    weights: npt.NDArray[np.float64], k: int, rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    """Return ``min(k, n)`` distinct indices drawn without replacement, P ∝ ``weights``.

    Efraimidis–Spirakis: each item gets the key ``E_i / w_i`` with ``E_i ~ Exp(1)`` and the
    ``k`` smallest keys win. Zero or negative weights are raised to a tiny positive floor so
    that they are picked only when nothing else is left.
    """
    n = int(weights.shape[0])
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    w = np.where(np.isfinite(weights), weights, 0.0)
    top = float(w.max(initial=0.0))
    floor = top * 1e-12 if top > 0.0 else 1.0
    w = np.maximum(w, floor)
    keys = rng.exponential(size=n) / w
    return np.argsort(keys, kind="stable")[:k]


def _median_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and v > 0.0]
    return float(np.median(known)) if known else None


def _check_k(k: int) -> None:
    if k < 0:
        raise SelectionError(f"k must be >= 0, got {k}")


def _param(name: str, value: object, *, lo: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SelectionError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < lo or (lo_open and out == lo):
        raise SelectionError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    return out


class RandomSelector:
    """Uniform sampling without replacement."""

    selector_id = "random"

    def select(
        self,
        candidates: Sequence[DeviceView],
        k: int,
        rng: np.random.Generator,
        round_no: int,
    ) -> list[str]:
        """Return ``min(k, len(candidates))`` cids drawn uniformly."""
        _check_k(k)
        ordered = _ordered(candidates)
        idx = rng.choice(len(ordered), size=min(k, len(ordered)), replace=False)
        return [ordered[i].cid for i in idx]


class ResourceSelector:
    """Prefers charged, fast, well-connected devices, with fairness.

    Each candidate's resource score is the weighted mean of three terms in (0, 1]:
    power (1 when charging or mains-powered, else ``battery/100``), speed
    (``s/(s + median s)``, 0.5 when unknown) and link (``median rtt/(median rtt + rtt)``, 0.5
    when unknown). The sampling weight multiplies it by ``exp(−fairness · (n_i − n̄)/(n̄ + 1))``
    (``n_i`` the device's participation count, ``n̄`` the candidates' mean) and by
    ``cooldown_factor`` when the device was selected within the last ``cooldown_rounds``
    rounds. In the long run a device's share of rounds then differs from the mean by at most
    about ``ln(score ratio)/fairness``, relative.
    """

    selector_id = "resource"

    def __init__(
        self,
        *,
        battery_weight: float = 1.0,
        speed_weight: float = 1.0,
        link_weight: float = 1.0,
        fairness: float = 2.0,
        cooldown_rounds: int = 1,
        cooldown_factor: float = 0.5,
    ) -> None:
        self.battery_weight = _param("battery_weight", battery_weight, lo=0.0)
        self.speed_weight = _param("speed_weight", speed_weight, lo=0.0)
        self.link_weight = _param("link_weight", link_weight, lo=0.0)
        if self.battery_weight + self.speed_weight + self.link_weight <= 0.0:
            raise SelectionError("at least one of battery/speed/link_weight must be > 0")
        self.fairness = _param("fairness", fairness, lo=0.0)
        self.cooldown_rounds = int(_param("cooldown_rounds", cooldown_rounds, lo=0.0))
        self.cooldown_factor = _param("cooldown_factor", cooldown_factor, lo=0.0, lo_open=True)
        if self.cooldown_factor > 1.0:
            raise SelectionError(f"cooldown_factor must be in (0, 1], got {cooldown_factor!r}")

    def resource_scores(self, candidates: Sequence[DeviceView]) -> npt.NDArray[np.float64]:
        """Return each candidate's resource score in (0, 1], in the order given."""
        median_speed = _median_known([v.samples_per_s for v in candidates])
        median_rtt = _median_known([v.rtt_ms for v in candidates])
        scores = np.empty(len(candidates), dtype=np.float64)
        total = self.battery_weight + self.speed_weight + self.link_weight
        for i, view in enumerate(candidates):
            if view.battery_percent is None or view.charging:
                power = 1.0
            else:
                power = max(view.battery_percent / 100.0, 0.01)
            if view.samples_per_s is None or median_speed is None:
                speed = 0.5
            else:
                speed = max(view.samples_per_s / (view.samples_per_s + median_speed), 0.01)
            if view.rtt_ms is None or median_rtt is None:
                link = 0.5
            else:
                link = median_rtt / (median_rtt + view.rtt_ms)
            scores[i] = (
                self.battery_weight * power + self.speed_weight * speed + self.link_weight * link
            ) / total
        return scores

    def fairness_factors(
        self, candidates: Sequence[DeviceView], round_no: int
    ) -> npt.NDArray[np.float64]:
        """Return each candidate's fairness multiplier, in the order given."""
        counts = np.array([v.participation_count for v in candidates], dtype=np.float64)
        mean = float(counts.mean()) if counts.size else 0.0
        factors = np.exp(-self.fairness * (counts - mean) / (mean + 1.0))
        for i, view in enumerate(candidates):
            last = view.last_selected_round
            if last is not None and 0 <= round_no - last <= self.cooldown_rounds:
                factors[i] *= self.cooldown_factor
        return factors

    def select(
        self,
        candidates: Sequence[DeviceView],
        k: int,
        rng: np.random.Generator,
        round_no: int,
    ) -> list[str]:
        """Return ``min(k, len(candidates))`` cids sampled by resource score × fairness."""
        _check_k(k)
        ordered = _ordered(candidates)
        if not ordered:
            return []
        weights = self.resource_scores(ordered) * self.fairness_factors(ordered, round_no)
        return [ordered[i].cid for i in weighted_sample(weights, k, rng)]


class UtilitySelector:
    """Oort-style guided selection (Lai et al. 2021) with ε-exploration of unseen devices.

    A device is *explored* once it has reported a training loss (``recent_loss``). Each round
    ``epsilon × k`` slots (randomly rounded so the expectation is exact) go to unexplored
    devices, sampled with weight ∝ their speed; the rest go to explored devices by utility

        U_i = loss_i × √num_examples_i × min(1, s_i / median s)^alpha,

    normalised to a maximum of 1, plus the temporal-uncertainty bonus
    ``√(0.1 ln R / L_i)`` (R the round, L_i the device's last selected round). Explored devices
    whose utility is at least ``cutoff`` × the k-th best form the pool, sampled ∝ utility.
    Slots one group cannot fill go to the other.
    """

    selector_id = "utility"

    def __init__(
        self,
        *,
        epsilon: float = 0.2,
        alpha: float = 2.0,
        cutoff: float = 0.95,
        uncertainty_bonus: bool = True,
    ) -> None:
        self.epsilon = _param("epsilon", epsilon, lo=0.0)
        if self.epsilon > 1.0:
            raise SelectionError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.alpha = _param("alpha", alpha, lo=0.0)
        self.cutoff = _param("cutoff", cutoff, lo=0.0)
        if self.cutoff > 1.0:
            raise SelectionError(f"cutoff must be in [0, 1], got {cutoff!r}")
        self.uncertainty_bonus = bool(uncertainty_bonus)

    def utilities(self, explored: Sequence[DeviceView], round_no: int) -> npt.NDArray[np.float64]:
        """Return the (normalised, bonus-added) utility of each explored device."""
        median_speed = _median_known([v.samples_per_s for v in explored])
        util = np.empty(len(explored), dtype=np.float64)
        for i, view in enumerate(explored):
            loss = view.recent_loss if view.recent_loss is not None else 0.0
            speed = 1.0
            if view.samples_per_s is not None and median_speed is not None:
                speed = min(1.0, view.samples_per_s / median_speed) ** self.alpha
            util[i] = loss * math.sqrt(view.num_examples) * speed
        top = float(util.max(initial=0.0))
        if top > 0.0:
            util /= top
        if self.uncertainty_bonus and round_no > 1:
            for i, view in enumerate(explored):
                last = max(view.last_selected_round or 1, 1)
                util[i] += math.sqrt(0.1 * math.log(round_no) / last)
        return util

    def select(
        self,
        candidates: Sequence[DeviceView],
        k: int,
        rng: np.random.Generator,
        round_no: int,
    ) -> list[str]:
        """Return ``min(k, len(candidates))`` cids: exploitation by utility plus exploration."""
        _check_k(k)
        ordered = _ordered(candidates)
        k = min(k, len(ordered))
        explored = [v for v in ordered if v.recent_loss is not None]
        unexplored = [v for v in ordered if v.recent_loss is None]
        wanted = self.epsilon * k
        n_explore = math.floor(wanted) + int(rng.random() < wanted - math.floor(wanted))
        n_explore = min(n_explore, len(unexplored))
        n_exploit = min(k - n_explore, len(explored))
        n_explore = min(k - n_exploit, len(unexplored))  # give unused exploit slots back

        chosen: list[str] = []
        if n_exploit > 0:
            util = self.utilities(explored, round_no)
            kth = float(np.sort(util)[::-1][n_exploit - 1])
            pool = np.flatnonzero(util >= self.cutoff * kth)
            picked = weighted_sample(util[pool], n_exploit, rng)
            chosen.extend(explored[pool[i]].cid for i in picked)
        if n_explore > 0:
            median_speed = _median_known([v.samples_per_s for v in unexplored]) or 1.0
            speeds = np.array(
                [v.samples_per_s or median_speed for v in unexplored], dtype=np.float64
            )
            picked = weighted_sample(speeds, n_explore, rng)
            chosen.extend(unexplored[i].cid for i in picked)
        return chosen


SELECTORS: Mapping[str, type[RandomSelector | ResourceSelector | UtilitySelector]] = (
    MappingProxyType(
        {
            "random": RandomSelector,
            "resource": ResourceSelector,
            "utility": UtilitySelector,
        }
    )
)
"""Selector classes by policy name."""


def make_selector(name: str, params: Mapping[str, object] | None = None) -> Selector:
    """Build a selection policy from its name and keyword parameters.

    Raises
    ------
    UnknownSelectorError
        ``name`` is not ``random``, ``resource`` or ``utility``.
    SelectionError
        A parameter is unknown or out of range (the message names it).

    Examples
    --------
    >>> make_selector("utility", {"epsilon": 0.1}).epsilon
    0.1
    """
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise UnknownSelectorError(
            f"unknown selection policy {name!r}; valid: {', '.join(SELECTORS)}"
        ) from None
    kwargs: dict[str, Any] = dict(params or {})
    valid = sorted(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise SelectionError(
            f"selection policy {name!r} has no parameter(s) {unknown}; valid: {valid}"
        )
    return cls(**kwargs)


__all__ = [
    "DEFAULT_OVER_SELECTION",
    "SELECTORS",
    "RandomSelector",
    "ResourceSelector",
    "SelectionError",
    "Selector",
    "UnknownSelectorError",
    "UtilitySelector",
    "make_selector",
    "over_select",
    "select_cohort",
    "weighted_sample",
]
