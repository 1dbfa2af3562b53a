"""Poisoning attacks (``edge.attacks``) and the agent's ``update_hook`` that plays them."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edge.agent import AgentOptions, AgentRunner, UpdateHook
from edge.attacks import Attack, AttackKind, parse_attack
from edge.modelio import F32, ModelLayout, decode_update
from edge.state import AgentStore
from edge.telemetry import DeviceProfile, SimulatedTelemetry
from edge.training import NumpyTrainer, init_weights, shapes
from edge.transport import InMemoryBroker
from edge.wire import ModelUpdate
from server_stub.validation import RejectCode, Rejected, UpdateValidator
from tests.test_agent import CID, FLEET, NOW, SPEC, Coordinator, dataset, task, wait_for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("scale:10", Attack(AttackKind.SCALE, 10.0)),
        ("scale:-2.5", Attack(AttackKind.SCALE, -2.5)),
        ("signflip", Attack(AttackKind.SIGNFLIP)),
        ("nan", Attack(AttackKind.NAN)),
    ],
)
def test_parse_attack_round_trips(text: str, expected: Attack) -> None:
    assert parse_attack(text) == expected
    assert parse_attack(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "scale", "scale:", "scale:x", "scale:inf", "nan:1", "flip"])
def test_parse_attack_refuses_unknown_forms_and_names_the_valid_ones(text: str) -> None:
    with pytest.raises(ValueError, match="scale:FACTOR, signflip, nan"):
        parse_attack(text)


@pytest.mark.parametrize(
    ("attack", "expected"),
    [("scale:10", [10.0, -20.0]), ("signflip", [-1.0, 2.0]), ("nan", [np.nan, np.nan])],
)
def test_attack_transforms_a_copy(attack: str, expected: list[float]) -> None:
    # Prepare
    update = {"w": np.array([1.0, -2.0], np.float32)}
    # Execute
    out = parse_attack(attack)(update)
    # Assert
    np.testing.assert_array_equal(out["w"], np.array(expected, np.float32))
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(update["w"], [1.0, -2.0])


# --------------------------------------------------------------------------- agent hook


def _run_one_task(tmp_path: Path, hook: UpdateHook) -> tuple[ModelUpdate, AgentRunner]:
    """One agent with ``hook`` trains one task on the in-memory broker; return its update."""
    broker = InMemoryBroker()
    coord = Coordinator(broker)
    coord.publish_model(init_weights(SPEC, np.random.default_rng(0)), 1)
    runner = AgentRunner(
        broker.connect(CID), AgentOptions(FLEET, CID, poll_s=0.02, update_hook=hook),
        trainer=NumpyTrainer(SPEC), dataset=dataset(),
        telemetry=SimulatedTelemetry(DeviceProfile(), now=NOW),
        store=AgentStore(tmp_path, fsync=False), stop=threading.Event(), clock=lambda: NOW,
        rng=np.random.default_rng(1),
    )  # fmt: skip
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: runner.stats.statuses_sent >= 1)
        coord.send(task())
        update = coord.next_update()
    finally:
        runner.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    return update, runner


def test_update_hook_poisons_the_encoded_update(tmp_path: Path) -> None:
    # Prepare
    seen: list[dict[str, F32]] = []

    def scale_and_record(update: Mapping[str, F32]) -> Mapping[str, F32]:
        seen.append({k: v.copy() for k, v in update.items()})
        return parse_attack("scale:10")(update)

    # Execute
    update, _ = _run_one_task(tmp_path, scale_and_record)
    # Assert
    layout = ModelLayout(tuple(shapes(SPEC)))
    sent = np.empty(layout.size, np.float32)
    decode_update(update, layout, sent)
    honest = layout.flatten(seen[0])
    assert len(seen) == 1
    np.testing.assert_allclose(sent, 10 * honest, atol=0.02 * float(np.abs(10 * honest).max()))


def test_nan_update_is_sent_raw_and_the_coordinator_rejects_it_as_non_finite(
    tmp_path: Path,
) -> None:
    # Execute
    update, runner = _run_one_task(tmp_path, parse_attack("nan"))
    # Assert
    assert runner.stats.updates_sent == 1
    assert {spec.codec["id"] for spec in update.tensors} == {"raw"}
    verdict = UpdateValidator(ModelLayout(tuple(shapes(SPEC)))).decode(update)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is RejectCode.NON_FINITE


def test_no_hook_by_default() -> None:
    assert AgentOptions(FLEET, CID).update_hook is None
