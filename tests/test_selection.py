"""Tests of server_stub.devices (eligibility) and server_stub.selection (policies)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import numpy as np
import pytest

from server_stub.devices import (
    DeviceCaps,
    DeviceView,
    DeviceViewError,
    EligibilityRules,
    Ineligible,
)
from server_stub.selection import (
    SELECTORS,
    RandomSelector,
    ResourceSelector,
    SelectionError,
    Selector,
    UnknownSelectorError,
    UtilitySelector,
    make_selector,
    over_select,
    select_cohort,
    weighted_sample,
)

NOW = 1000.0
CAPS = DeviceCaps(trainers=frozenset({"numpy_mlp"}), codecs=frozenset({"topk", "block_i8"}))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def device(cid: str = "pi-1", **fields: Any) -> DeviceView:
    """A healthy, eligible device unless ``fields`` say otherwise."""
    base: dict[str, Any] = {
        "online": True,
        "last_seen": NOW - 5.0,
        "battery_percent": 80.0,
        "cpu_temp_c": 55.0,
        "mem_available_mb": 900.0,
        "rtt_ms": 40.0,
        "samples_per_s": 200.0,
        "num_examples": 300,
        "caps": CAPS,
    }
    base.update(fields)
    return DeviceView(cid, **base)


def fleet(n: int, rng: np.random.Generator, **fields: Any) -> list[DeviceView]:
    return [
        device(
            f"pi-{i:03d}",
            battery_percent=float(rng.uniform(25, 100)),
            samples_per_s=float(rng.lognormal(5, 0.7)),
            rtt_ms=float(rng.uniform(5, 300)),
            **fields,
        )
        for i in range(n)
    ]


# ---- eligibility --------------------------------------------------------------------------------

RULES = EligibilityRules(
    min_battery_percent=20.0,
    max_temp_c=80.0,
    min_mem_mb=256.0,
    required_trainer="numpy_mlp",
    required_codecs=frozenset({"topk", "block_i8"}),
    heartbeat_timeout_s=90.0,
)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"online": False}, Ineligible.OFFLINE),
        ({"last_seen": NOW - 91.0}, Ineligible.STALE_HEARTBEAT),
        ({"busy": True}, Ineligible.BUSY),
        ({"battery_percent": 19.9}, Ineligible.LOW_BATTERY),
        ({"metered": True}, Ineligible.METERED),
        ({"cpu_temp_c": 81.0}, Ineligible.TOO_HOT),
        ({"mem_available_mb": 100.0}, Ineligible.LOW_MEMORY),
        ({"mem_available_mb": None}, Ineligible.LOW_MEMORY),
        ({"caps": DeviceCaps(codecs=CAPS.codecs)}, Ineligible.MISSING_TRAINER),
        (
            {"caps": DeviceCaps(trainers=CAPS.trainers, codecs=frozenset({"topk"}))},
            Ineligible.MISSING_CODEC,
        ),
    ],
)
def test_rule_makes_device_ineligible(fields: dict[str, Any], reason: Ineligible) -> None:
    assert RULES.check(device(**fields), NOW) is reason


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"battery_percent": None},  # mains-powered host: no battery, always fine
        {"battery_percent": 3.0, "charging": True},  # charging overrides min battery
        {"battery_percent": 20.0},  # exactly at the minimum
        {"last_seen": NOW - 90.0},  # exactly at the heartbeat timeout
        {"cpu_temp_c": None},  # no temperature sensor
        {"cpu_temp_c": 80.0},
    ],
)
def test_device_is_eligible(fields: dict[str, Any]) -> None:
    assert RULES.check(device(**fields), NOW) is None


def test_allow_metered_admits_metered_devices() -> None:
    rules = dataclasses.replace(RULES, allow_metered=True)
    assert rules.check(device(metered=True), NOW) is None


def test_default_rules_skip_memory_and_capability_checks() -> None:
    view = device(mem_available_mb=None, caps=DeviceCaps())
    assert EligibilityRules().check(view, NOW) is None


def test_reason_is_a_string_code() -> None:
    assert RULES.check(device(metered=True), NOW) == "metered"


def test_partition_splits_and_explains() -> None:
    views = [device("a"), device("b", busy=True), device("c", battery_percent=None)]
    eligible, rejected = RULES.partition(views, NOW)
    assert [v.cid for v in eligible] == ["a", "c"]
    assert rejected == {"b": Ineligible.BUSY}


@pytest.mark.parametrize(
    "fields",
    [
        {"battery_percent": 101.0},
        {"battery_percent": -1.0},
        {"num_examples": -1},
        {"rtt_ms": float("nan")},
        {"samples_per_s": -5.0},
    ],
)
def test_device_view_rejects_impossible_telemetry(fields: dict[str, Any]) -> None:
    with pytest.raises(DeviceViewError):
        device(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"min_battery_percent": 150.0}, {"heartbeat_timeout_s": 0.0}, {"min_mem_mb": -1.0}],
)
def test_rules_reject_impossible_settings(fields: dict[str, Any]) -> None:
    with pytest.raises(DeviceViewError):
        EligibilityRules(**fields)


# ---- over-selection and cohort ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "factor", "expected"),
    [(10, 1.3, 13), (1, 1.3, 2), (100, 1.3, 130), (7, 1.0, 7), (0, 1.3, 0)],
)
def test_over_select(k: int, factor: float, expected: int) -> None:
    assert over_select(k, factor) == expected


@pytest.mark.parametrize("factor", [0.9, float("nan")])
def test_over_select_rejects_factor_below_one(factor: float) -> None:
    with pytest.raises(SelectionError, match="factor"):
        over_select(10, factor)


def test_select_cohort_over_selects(rng: np.random.Generator) -> None:
    cohort = select_cohort(RandomSelector(), fleet(50, rng), 10, rng, round_no=1)
    assert cohort is not None
    assert len(cohort) == 13


def test_select_cohort_waits_when_too_few_eligible(
    rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    with caplog.at_level(logging.DEBUG, logger="server_stub.selection"):
        cohort = select_cohort(RandomSelector(), fleet(4, rng), 10, rng, round_no=7)
    # Assert
    assert cohort is None
    assert "waiting for the next tick" in caplog.text


def test_select_cohort_takes_what_there_is_above_minimum(rng: np.random.Generator) -> None:
    cohort = select_cohort(RandomSelector(), fleet(6, rng), 10, rng, round_no=1, min_devices=5)
    assert cohort is not None
    assert len(cohort) == 6


# ---- properties every policy shares ------------------------------------------------------------


def _policy(name: str) -> Selector:
    return make_selector(name)


@pytest.mark.parametrize("name", list(SELECTORS))
@pytest.mark.parametrize(("n", "k"), [(0, 3), (5, 0), (5, 3), (5, 5), (3, 8), (40, 12)])
def test_selection_is_distinct_subset_of_right_size(
    rng: np.random.Generator, name: str, n: int, k: int
) -> None:
    # Prepare: half the fleet has reported a loss (matters for the utility policy)
    views = [
        dataclasses.replace(v, recent_loss=1.0 + i if i % 2 else None)
        for i, v in enumerate(fleet(n, rng))
    ]
    # Execute
    chosen = _policy(name).select(views, k, rng, round_no=3)
    # Assert
    assert len(chosen) == min(k, n)
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= {v.cid for v in views}


@pytest.mark.parametrize("name", list(SELECTORS))
def test_selection_ignores_candidate_order(name: str) -> None:
    # Prepare
    views = fleet(30, np.random.default_rng(1), recent_loss=0.5)
    # Execute
    forward = _policy(name).select(views, 5, np.random.default_rng(7), round_no=2)
    backward = _policy(name).select(views[::-1], 5, np.random.default_rng(7), round_no=2)
    # Assert
    assert forward == backward


def test_duplicate_candidates_are_refused(rng: np.random.Generator) -> None:
    with pytest.raises(SelectionError, match="duplicate"):
        RandomSelector().select([device("a"), device("a")], 1, rng, round_no=1)


def test_weighted_sample_follows_weights(rng: np.random.Generator) -> None:
    weights = np.array([1.0, 1.0, 8.0])
    counts = Counter(int(weighted_sample(weights, 1, rng)[0]) for _ in range(2000))
    assert counts[2] / 2000 == pytest.approx(0.8, abs=0.04)


# ---- resource policy ----------------------------------------------------------------------------


def test_resource_policy_prefers_charged_fast_well_connected(rng: np.random.Generator) -> None:
    # Prepare
    good = device("good", battery_percent=30.0, charging=True, samples_per_s=800.0, rtt_ms=10.0)
    poor = device("poor", battery_percent=25.0, samples_per_s=50.0, rtt_ms=400.0)
    middling = [device(f"mid-{i}") for i in range(3)]
    selector = ResourceSelector()
    # Execute
    counts = Counter(
        cid for _ in range(500) for cid in selector.select([good, poor, *middling], 1, rng, 1)
    )
    # Assert
    assert counts["good"] > 2 * counts["poor"]


def _simulate(
    selector: Selector, views: list[DeviceView], rng: np.random.Generator
) -> Counter[str]:
    """Run 300 rounds of k=5 from 40 devices, updating participation like the registry does."""
    by_cid = {v.cid: v for v in views}
    counts: Counter[str] = Counter()
    for round_no in range(1, 301):
        for cid in selector.select(list(by_cid.values()), 5, rng, round_no):
            counts[cid] += 1
            by_cid[cid] = dataclasses.replace(
                by_cid[cid], participation_count=counts[cid], last_selected_round=round_no
            )
    return counts


def test_resource_policy_spreads_participation(rng: np.random.Generator) -> None:
    # Prepare: very different devices (speed spans ~10×, RTT 5-300 ms)
    views = fleet(40, rng)
    # Execute
    counts = _simulate(ResourceSelector(), views, rng)
    # Assert: every device took part, and nobody more than 1.5× the median
    per_device = np.array([counts[v.cid] for v in views])
    assert per_device.min() > 0
    assert per_device.max() <= 1.5 * np.median(per_device)


def test_fairness_is_what_spreads_participation(rng: np.random.Generator) -> None:
    # Prepare
    views = fleet(40, rng)
    unfair = ResourceSelector(fairness=0.0, cooldown_factor=1.0)
    # Execute
    fair_counts = _simulate(ResourceSelector(), views, np.random.default_rng(1))
    unfair_counts = _simulate(unfair, views, np.random.default_rng(1))
    # Assert
    spread_fair = np.std([fair_counts[v.cid] for v in views])
    spread_unfair = np.std([unfair_counts[v.cid] for v in views])
    assert spread_fair < 0.6 * spread_unfair


def test_resource_policy_keeps_preference_under_fairness(rng: np.random.Generator) -> None:
    # Prepare
    views = fleet(40, rng)
    selector = ResourceSelector()
    scores = selector.resource_scores(views)
    # Execute
    counts = _simulate(selector, views, rng)
    # Assert: the best-scored quarter still takes part more often than the worst quarter
    order = np.argsort(scores)
    worst = np.mean([counts[views[i].cid] for i in order[:10]])
    best = np.mean([counts[views[i].cid] for i in order[-10:]])
    assert best > worst


def test_cooldown_penalises_last_round_participants() -> None:
    selector = ResourceSelector(cooldown_rounds=1, cooldown_factor=0.5)
    views = [device("a", last_selected_round=9), device("b", last_selected_round=5)]
    factors = selector.fairness_factors(views, round_no=10)
    assert factors[0] == pytest.approx(0.5 * factors[1])


# ---- utility policy -----------------------------------------------------------------------------


def _explored_and_unseen(n_each: int) -> tuple[list[DeviceView], list[DeviceView]]:
    explored = [
        device(f"seen-{i:02d}", recent_loss=0.5 + 0.1 * i, last_selected_round=1)
        for i in range(n_each)
    ]
    unseen = [device(f"new-{i:02d}") for i in range(n_each)]
    return explored, unseen


@pytest.mark.parametrize(("epsilon", "expected_unseen"), [(0.0, 0), (0.2, 2), (0.5, 5), (1.0, 10)])
def test_utility_exploration_picks_unseen_devices(
    rng: np.random.Generator, epsilon: float, expected_unseen: int
) -> None:
    # Prepare
    explored, unseen = _explored_and_unseen(20)
    # Execute
    chosen = UtilitySelector(epsilon=epsilon).select(explored + unseen, 10, rng, round_no=2)
    # Assert
    assert sum(cid.startswith("new-") for cid in chosen) == expected_unseen


def test_utility_fills_from_unseen_when_nothing_explored(rng: np.random.Generator) -> None:
    _, unseen = _explored_and_unseen(8)
    chosen = UtilitySelector(epsilon=0.1).select(unseen, 5, rng, round_no=1)
    assert len(chosen) == 5


def test_utility_exploits_highest_loss(rng: np.random.Generator) -> None:
    # Prepare: one device with a far higher loss
    views = [device(f"d{i}", recent_loss=0.1, last_selected_round=1) for i in range(9)]
    views.append(device("hard", recent_loss=5.0, last_selected_round=1))
    # Execute
    chosen = UtilitySelector(epsilon=0.0, uncertainty_bonus=False).select(views, 1, rng, 2)
    # Assert
    assert chosen == ["hard"]


def test_utility_penalises_slow_devices(rng: np.random.Generator) -> None:
    # Prepare: same loss and data, one device 10× slower than the median
    views = [
        device(f"d{i}", recent_loss=1.0, samples_per_s=100.0, last_selected_round=1)
        for i in range(4)
    ]
    views.append(device("slow", recent_loss=1.0, samples_per_s=10.0, last_selected_round=1))
    # Execute
    util = UtilitySelector(alpha=2.0, uncertainty_bonus=False).utilities(views, round_no=2)
    # Assert
    assert util[-1] == pytest.approx(0.01 * util[0])


def test_uncertainty_bonus_favours_long_unselected_devices() -> None:
    views = [
        device("recent", recent_loss=1.0, last_selected_round=49),
        device("forgotten", recent_loss=1.0, last_selected_round=2),
    ]
    util = UtilitySelector().utilities(views, round_no=50)
    assert util[1] > util[0]


# ---- make_selector ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random", "resource", "utility"])
def test_make_selector_builds_each_policy(name: str) -> None:
    assert type(make_selector(name)) is SELECTORS[name]


def test_make_selector_unknown_name_lists_valid() -> None:
    with pytest.raises(UnknownSelectorError, match="random, resource, utility"):
        make_selector("oort")


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("random", {"epsilon": 0.1}, "epsilon"),
        ("utility", {"epsilon": 1.5}, "epsilon"),
        ("utility", {"cutoff": -0.1}, "cutoff"),
        ("resource", {"fairness": -1.0}, "fairness"),
        ("resource", {"cooldown_factor": 0.0}, "cooldown_factor"),
        ("resource", {"battery_weight": 0, "speed_weight": 0, "link_weight": 0}, "weight"),
        ("resource", {"fairness": "high"}, "fairness"),
    ],
)
def test_make_selector_bad_params_raise_typed_error(
    name: str, params: dict[str, object], match: str
) -> None:
    with pytest.raises(SelectionError, match=match):
        make_selector(name, params)
