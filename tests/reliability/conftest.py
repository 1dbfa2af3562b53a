"""Fixtures of the reliability tests; the helpers behind them live in ``harness.py``.

- ``fleet``: an :class:`~tests.reliability.harness.AgentFleet` on the ``mosquitto`` broker,
  state directories under ``tmp_path/agents``; every agent is stopped at teardown.
- ``coordinators``: a :class:`~tests.reliability.harness.Coordinators` factory
  (``.thread(cfg)``, ``.process(cfg, env=...)``); every coordinator is stopped/killed at
  teardown.

The broker fixtures (``mosquitto``, ``mosquitto_factory``) come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import MosquittoBroker
from tests.reliability.harness import AgentFleet, Coordinators


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[AgentFleet]:
    """Real agents on the test's broker; all stopped at teardown."""
    agents = AgentFleet(mosquitto.url, tmp_path / "agents")
    try:
        yield agents
    finally:
        agents.close()


@pytest.fixture
def coordinators(tmp_path: Path) -> Iterator[Coordinators]:
    """Start coordinators (thread or subprocess); all stopped at teardown."""
    factory = Coordinators(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
