"""Shared pytest fixtures.

Broker fixtures (for every test that crosses the network; mark such tests
``@pytest.mark.broker``):

- ``mosquitto``: a started anonymous :class:`tests.broker.MosquittoBroker`
  with persistence, on a free 127.0.0.1 port; ``mosquitto.url``,
  ``.host``, ``.port``, ``.restart()``, ``.stop()``, ``.log_text()``.
- ``mosquitto_factory(**kwargs)``: start more brokers with options
  (``users={...}``, ``acl=DEVICE_ACL``, ``tls=test_pki``, ``persistence=False``,
  ``extra_config=[...]``); each gets its own tmp dir.
- ``test_pki``: a session-wide test CA + server certificate (:class:`tests.broker.TlsFiles`).

With ``CI`` set, hypothesis runs derandomized (profile ``ci``).

A missing or failing mosquitto is a test **failure**, never a skip. Every
broker started through these fixtures is stopped at teardown, and its log is
attached to the failure report of the test that used it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.broker import BrokerError, MosquittoBroker, TlsFiles, make_test_pki

# CI (CI=true, as .ci/run is started) runs hypothesis derandomized and without per-example
# deadlines, so a slow shared machine neither flakes nor finds a different example each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _start(workdir: Path, **kwargs: Any) -> MosquittoBroker:
    try:
        return MosquittoBroker(workdir, **kwargs).start()
    except BrokerError as exc:
        pytest.fail(f"cannot start mosquitto: {exc}", pytrace=False)


@pytest.fixture
def mosquitto_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start brokers with ``MosquittoBroker`` keyword arguments; all are stopped afterwards."""
    brokers: list[MosquittoBroker] = []

    def factory(**kwargs: Any) -> MosquittoBroker:
        broker = _start(tmp_path / f"broker{len(brokers)}", **kwargs)
        brokers.append(broker)
        return broker

    request.node._fedge_brokers = brokers
    try:
        yield factory
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A started anonymous broker with persistence on a free loopback port."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost."""
    try:
        return make_test_pki(tmp_path_factory.mktemp("pki"))
    except BrokerError as exc:
        pytest.fail(f"cannot make the test PKI: {exc}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Attach the log of every broker a failed test started to its report.
    report = yield
    if report.when == "call" and report.failed:
        for broker in getattr(item, "_fedge_brokers", []):
            report.sections.append((f"mosquitto :{broker.port} log", broker.log_text()))
    return report
