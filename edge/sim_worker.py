"""One worker process of ``fedge sim``: many simulated devices, each a real agent.

Started by ``server_stub.sim`` as ``python -m edge.sim_worker SPEC.json``. Each
device gets its own MQTT connection (with its Last Will), its own data file in
the user data format, its own state directory and a heterogeneity profile that
it plays through its telemetry (battery, charging, metered link, speed) and its
behaviour (flaky link: the connection drops and comes back; offline spells: the
agent stops, publishing an offline status, and starts again later). A profile
with an ``attack`` (``edge.attacks``) makes the device malicious: its agent
poisons every update before encoding it. SIGTERM
stops every agent cleanly (offline status, disconnect) and exits.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.agent import AgentHandle, AgentOptions, connect_agent_transport, start_agent_thread
from edge.attacks import parse_attack
from edge.data import load_local_data
from edge.eligibility import Limits
from edge.mqtt_transport import MqttSettings
from edge.state import AgentStore
from edge.telemetry import DeviceProfile, SimulatedTelemetry
from edge.training import ModelSpec, NumpyTrainer, Trainer
from edge.transport import Message, Transport
from edge.wire import NetKind

log = logging.getLogger("fedge.sim.worker")


def device_profile(p: dict[str, Any], now: float) -> DeviceProfile:
    """Turn the simulator's JSON profile into the agent's :class:`DeviceProfile`."""
    battery = p.get("battery")
    kwargs: dict[str, Any] = {
        "speed_factor": 1.0 / float(p.get("speed_factor", 1.0)),
        "batch_time_s": float(p.get("batch_time_s", 0.0)),
        "metered": bool(p.get("metered", False)),
        "net_kind": NetKind(p.get("net_kind", "ethernet")),
        "epoch": now,
    }
    if battery is None:
        kwargs.update(battery_percent=None, always_charging=False)
    else:
        period = float(battery["charging_period_s"])
        kwargs.update(
            battery_percent=float(battery["percent"]),
            drain_train_pct_per_h=float(battery["train_drain_per_s"]) * 3600,
            drain_idle_pct_per_h=float(battery["idle_drain_per_s"]) * 3600,
            charge_pct_per_h=float(battery["charge_per_s"]) * 3600,
            charge_period_s=period,
            charging_windows=((0.0, period * float(battery["charging_duty"])),),
        )
    return DeviceProfile(**kwargs)


class LatentTransport:
    """A device's link latency: each publish waits half the profile's round-trip time.

    The agent measures its RTT from acknowledged publishes, so the coordinator sees
    the latency in the device's telemetry, as it would in the field.
    """

    def __init__(self, inner: Transport, one_way_s: float) -> None:
        self.inner = inner
        self.one_way_s = one_way_s

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        time.sleep(self.one_way_s)
        self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos)

    def receive(self, timeout: float) -> Message | None:
        return self.inner.receive(timeout)

    def close(self) -> None:
        self.inner.close()


class SimDevice:
    """One simulated device: its agent thread, transport and chaos schedule."""

    def __init__(
        self, spec: dict[str, Any], device: dict[str, Any], rng: np.random.Generator
    ) -> None:
        self.spec = spec
        self.device = device
        self.cid: str = device["cid"]
        self.profile: dict[str, Any] = device["profile"]
        self.rng = rng
        now = time.time()
        self.telemetry = SimulatedTelemetry(device_profile(self.profile, now), now)
        self.dataset = load_local_data(
            Path(device["data"]),
            num_classes=int(spec["model"]["num_classes"]),
            input_dim=int(spec["model"]["input_dim"]),
        )
        self.store = AgentStore(device["state_dir"], fsync=False)
        self.handle: AgentHandle | None = None
        self.transport: Any = None
        self.next_flake = self._after(self.profile.get("flaky_every_s"))
        self.offline_until: float | None = None

    def _after(self, every: float | None) -> float | None:
        return None if not every else time.monotonic() + float(self.rng.exponential(every))

    def _trainer(self) -> Trainer:
        m = self.spec["model"]
        if self.spec["trainer"] == "litert":
            from edge.litert_training import LiteRTTrainer

            return LiteRTTrainer.from_file(m["tflite"])
        spec = ModelSpec(
            kind=m["kind"],
            input_dim=int(m["input_dim"]),
            num_classes=int(m["num_classes"]),
            hidden=tuple(m["hidden"]),
        )
        return NumpyTrainer(spec)

    def start(self) -> None:
        # On a shared broker the MQTT client id has the run's prefix (``dev-0000`` could
        # be a real device or another run's); the cid in the topics stays the same.
        settings = MqttSettings.from_url(self.spec["broker"])
        self.transport, relay = connect_agent_transport(
            settings,
            self.spec["fleet"],
            self.cid,
            client_id_prefix=self.spec.get("client_id_prefix", ""),
        )
        options = AgentOptions(
            fleet=self.spec["fleet"],
            cid=self.cid,
            limits=Limits(),
            heartbeat_s=float(self.spec["heartbeat_s"]),
            trainer_name=self.spec["trainer"],
            poll_s=0.5,
            # A malicious device (fedge sim --attackers): poison the update before encoding.
            update_hook=parse_attack(attack) if (attack := self.profile.get("attack")) else None,
        )
        latency_s = float(self.profile.get("rtt_ms", 0.0)) / 2000.0
        self.handle = start_agent_thread(
            LatentTransport(self.transport, latency_s) if latency_s else self.transport,
            options,
            trainer=self._trainer(),
            dataset=self.dataset,
            telemetry=self.telemetry,
            store=self.store,
            rng=np.random.default_rng(self.rng.integers(2**63)),
            relay=relay,
        )

    def stop(self, timeout: float = 5.0) -> None:
        if self.handle is not None:
            self.handle.request_stop()
            self.handle.join(timeout)
            self.handle = None

    def chaos(self, now: float) -> None:
        """Play the flaky link and the offline spells of the profile."""
        if self.offline_until is not None:
            if now >= self.offline_until:
                self.offline_until = None
                self.start()
            return
        if self.next_flake is not None and now >= self.next_flake and self.transport is not None:
            self.transport.simulate_connection_loss()
            self.next_flake = self._after(self.profile.get("flaky_every_s"))
        rate = float(self.profile.get("offline_per_min", 0.0))
        if rate and self.rng.random() < rate / 60.0:  # checked once a second
            self.stop()
            self.offline_until = now + float(self.rng.uniform(5, 20))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m edge.sim_worker SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = json.loads(Path(argv[0]).read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rng = np.random.default_rng(int(spec["seed"]))
    devices = [
        SimDevice(spec, d, np.random.default_rng(rng.integers(2**63))) for d in spec["devices"]
    ]
    for dev in devices:
        dev.start()
    code = 0
    while not stop.wait(1.0):
        now = time.monotonic()
        for dev in devices:
            dev.chaos(now)
        dead = [d.cid for d in devices if d.handle is not None and not d.handle.thread.is_alive()]
        if dead:
            # An agent ended by itself (it crashed: the traceback is logged above). Exit, so
            # the simulator reports it instead of waiting for devices that are gone.
            log.error("device(s) %s stopped unexpectedly; stopping this worker", ", ".join(dead))
            code = 1
            break
    # Tell every agent first, then wait: stopping them one by one would take N timeouts.
    for dev in devices:
        if dev.handle is not None:
            dev.handle.request_stop()
    for dev in devices:
        if dev.handle is not None:
            dev.handle.join(10.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
