"""Observability of the coordinator: one structured log line per round, Prometheus metrics.

Owns :class:`CoordinatorMetrics`. Each coordinator has its own
``prometheus_client.CollectorRegistry`` (several coordinators may live in one process, e.g.
in tests), exported over HTTP only when a port is configured. ``prometheus-client`` is an
optional dependency (``fedge[server]``): without it the metrics are counted in memory only.

``fedge_model_accuracy`` is NaN until a round is evaluated on held-out data (never, without
``[evaluation] data``): a gauge that was never set exports 0, which reads as a model that is
always wrong. NaN is how the exposition format says "no value" (summary quantiles without
observations export it too); comparisons with NaN are false, so an alert such as
``fedge_model_accuracy < 0.8`` does not fire on a coordinator that does not evaluate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("server_stub.rounds")


def round_log_line(record: Mapping[str, Any]) -> str:
    """One line of JSON for a round record: ``round {...}`` (NaN becomes null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        return value

    return "round " + json.dumps(clean(dict(record)), sort_keys=True, separators=(",", ":"))


class CoordinatorMetrics:
    """Prometheus counters and gauges of one coordinator."""

    def __init__(self, *, port: int | None = None, addr: str = "127.0.0.1") -> None:
        self.rejects: dict[str, int] = {}
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - optional dependency
            self._prom: Any = None
            logger.warning("prometheus-client is not installed; metrics are not exported")
            return
        self._prom = prom
        reg = prom.CollectorRegistry()
        self.registry = reg
        self.rounds = prom.Counter("fedge_rounds", "Rounds finished", ["outcome"], registry=reg)
        self.participants = prom.Counter(
            "fedge_participants", "Updates folded into models", registry=reg
        )
        self.declines = prom.Counter("fedge_declines", "Tasks declined by devices", registry=reg)
        self.dropped = prom.Counter("fedge_dropped", "Devices dropped from rounds", registry=reg)
        self.cancelled = prom.Counter(
            "fedge_tasks_cancelled",
            "Tasks withdrawn from devices still training when their round closed",
            registry=reg,
        )
        self.rejected = prom.Counter(
            "fedge_rejected_updates", "Rejected updates", ["reason"], registry=reg
        )
        self.bytes_in = prom.Counter("fedge_bytes_in", "Update bytes received", registry=reg)
        self.bytes_out = prom.Counter("fedge_bytes_out", "Task and model bytes sent", registry=reg)
        self.round_duration = prom.Histogram(
            "fedge_round_duration_seconds",
            "Round duration",
            buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, math.inf),
            registry=reg,
        )
        self.model_version = prom.Gauge(
            "fedge_model_version", "Current model version", registry=reg
        )
        self.online = prom.Gauge("fedge_devices_online", "Devices online", registry=reg)
        self.eligible = prom.Gauge("fedge_devices_eligible", "Devices eligible", registry=reg)
        self.accuracy = prom.Gauge(
            "fedge_model_accuracy",
            "Held-out accuracy of the last evaluated model; NaN before the first evaluation",
            registry=reg,
        )
        self.accuracy.set(math.nan)  # not 0: see the module docstring
        self.http_port: int | None = None
        if port is not None:
            server, _thread = prom.start_http_server(port, addr=addr, registry=reg)
            self._server: Any = server
            self.http_port = int(server.server_port)

    def reject(self, reason: str) -> None:
        self.rejects[reason] = self.rejects.get(reason, 0) + 1
        if self._prom is not None:
            self.rejected.labels(reason=reason).inc()

    def add_bytes(self, *, inbound: int = 0, outbound: int = 0) -> None:
        if self._prom is not None:
            if inbound:
                self.bytes_in.inc(inbound)
            if outbound:
                self.bytes_out.inc(outbound)

    def fleet(self, *, online: int, eligible: int) -> None:
        if self._prom is not None:
            self.online.set(online)
            self.eligible.set(eligible)

    def round_done(self, record: Mapping[str, Any]) -> None:
        """Count a finished round and write its log line."""
        logger.info("%s", round_log_line(record))
        if self._prom is None:
            return
        self.rounds.labels(outcome=str(record.get("outcome", "aggregated"))).inc()
        self.participants.inc(int(record.get("participants", 0)))
        self.declines.inc(int(record.get("declined", 0)))
        self.dropped.inc(int(record.get("dropped", 0)))
        self.cancelled.inc(int(record.get("cancelled", 0)))
        self.round_duration.observe(float(record.get("duration_s", 0.0)))
        self.model_version.set(int(record.get("model_version", 0)))
        acc = record.get("accuracy")
        if isinstance(acc, float) and math.isfinite(acc):
            self.accuracy.set(acc)

    def close(self) -> None:
        """Stop the HTTP server, if any (idempotent)."""
        server = getattr(self, "_server", None)
        if server is not None:
            self._server = None
            server.shutdown()
            server.server_close()


__all__ = ["CoordinatorMetrics", "round_log_line"]
