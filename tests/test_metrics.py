"""The coordinator's Prometheus metrics: what a scrape shows before and after evaluations."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest

from server_stub.metrics import CoordinatorMetrics


@pytest.fixture
def metrics() -> Iterator[CoordinatorMetrics]:
    m = CoordinatorMetrics()
    yield m
    m.close()


def _record(accuracy: Any) -> dict[str, Any]:
    return {"round": 1, "model_version": 1, "participants": 3, "accuracy": accuracy}


def _scrape(metrics: CoordinatorMetrics) -> list[str]:
    return prometheus_client.generate_latest(metrics.registry).decode().splitlines()


def test_accuracy_is_nan_before_any_round(metrics: CoordinatorMetrics) -> None:
    # Execute / Assert: NaN is "no value", never 0.0, which reads as a model that is always wrong
    assert "fedge_model_accuracy NaN" in _scrape(metrics)


@pytest.mark.parametrize("accuracy", [None, math.nan], ids=["null", "nan"])
def test_rounds_without_evaluation_leave_accuracy_nan(
    metrics: CoordinatorMetrics, accuracy: Any
) -> None:
    # Execute: a coordinator without [evaluation] data finishes rounds
    metrics.round_done(_record(accuracy))
    metrics.round_done(_record(accuracy))
    # Assert
    assert "fedge_model_accuracy NaN" in _scrape(metrics)
    assert metrics.registry.get_sample_value("fedge_model_version") == 1.0


def test_an_evaluated_round_sets_accuracy(metrics: CoordinatorMetrics) -> None:
    # Execute
    metrics.round_done(_record(0.875))
    # Assert
    assert metrics.registry.get_sample_value("fedge_model_accuracy") == 0.875


def test_a_round_without_evaluation_keeps_the_last_accuracy(metrics: CoordinatorMetrics) -> None:
    # Prepare
    metrics.round_done(_record(0.875))
    # Execute
    metrics.round_done(_record(None))
    # Assert
    assert metrics.registry.get_sample_value("fedge_model_accuracy") == 0.875
