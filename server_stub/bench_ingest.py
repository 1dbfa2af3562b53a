"""Benchmark: how fast the coordinator ingests updates through a real broker, and its peak RSS.

``fedge bench ingest [--updates 1000] [--params 100000] [--codec block_i8]`` starts a private
``mosquitto`` on a free loopback port, a publisher subprocess that plays ``--updates`` devices
(retained statuses; on each task it encodes a random update with the codec and publishes the
envelope), and a :class:`~server_stub.coordinator.Coordinator` in this process with one round
of K = ``--updates``. Reported: updates per second validated, decoded and accumulated (from
the first update handled to the aggregate), and this process's peak RSS against the model size.
The publisher runs in another process so its buffers do not count against the coordinator.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FLEET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_queued_messages 0",
        "max_inflight_messages 100",
        "persistence false",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def _layout(params: int) -> Any:
    from edge.modelio import ModelLayout

    rows = max(1, params // 128)
    return ModelLayout((("w0", (rows, 128)), ("b0", (params - rows * 128,))))


def publisher(url_port: int, updates: int, params: int, codec: str) -> int:
    """The device side: statuses, then one update per task received."""
    from edge.modelio import encode_update
    from edge.mqtt_transport import MqttSettings, MqttTransport
    from edge.transport import publish_chunked
    from edge.wire import (
        Caps,
        CpuInfo,
        MemInfo,
        ModelUpdate,
        NetInfo,
        NetKind,
        Status,
        Topics,
        TrainInfo,
        TrainTask,
    )

    topics = Topics(FLEET)
    layout = _layout(params)
    t = MqttTransport(MqttSettings(port=url_port, client_id="bench-devices", max_inflight=100))
    t.subscribe(f"{topics.prefix}/clients/+/task")
    st = Status(
        online=True,
        ts=0.0,
        battery=None,
        cpu=CpuInfo(0.1, 4),
        mem=MemInfo(1000.0),
        net=NetInfo(NetKind.ETHERNET, False, 1.0),
        train=TrainInfo(100, 1000.0),
        caps=Caps(("numpy",), (codec,), 0),
        agent="bench/0",
    )
    for i in range(updates):
        t.publish(topics.status(f"d{i:05d}"), st.to_bytes(), retain=True)
    rng = np.random.default_rng(0)
    base = {n: (rng.standard_normal(s) * 0.01).astype(np.float32) for n, s in layout.entries}
    # Collect every task first: the coordinator sends them in one burst, and a transport
    # whose receive queue is full cannot take the PUBACKs of that burst (see the report).
    tasks: list[tuple[str, TrainTask]] = []
    while len(tasks) < updates:
        msg = t.receive(60.0)
        if msg is None:
            break
        tasks.append((msg.topic.split("/")[-2], TrainTask.from_bytes(msg.payload)))
    for done, (cid, task) in enumerate(tasks):
        delta = {n: v * np.float32(1 + (done % 7) / 10) for n, v in base.items()}
        specs, payloads = encode_update(delta, task.uplink_codec)
        up = ModelUpdate(
            task.task_id,
            task.round_no,
            task.model_version,
            cid,
            100,
            specs,
            payloads,
            nonce=task.nonce,
        )
        publish_chunked(t, topics.update(cid), up.to_bytes())
    t.close()
    return 0


def run(updates: int, params: int, codec: str) -> dict[str, float]:
    """One round of ``updates`` updates; returns the figures."""
    from edge.mqtt_transport import MqttSettings, MqttTransport
    from server_stub.config import config_from_dict
    from server_stub.coordinator import Coordinator
    from server_stub.store import Store

    base_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tmp = Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    broker, port = _mosquitto(tmp)
    pub: subprocess.Popen[bytes] | None = None
    try:
        layout = _layout(params)
        config = config_from_dict(
            {
                "fleet": FLEET,
                "seed": 0,
                "tick_s": 0.05,
                "startup_grace_s": 0.0,
                "rounds": {
                    "clients_per_round": updates,
                    "over_selection": 1.0,
                    "deadline_s": 600.0,
                    "min_fraction": 1.0,
                },
                "uplink": {"codec": {"id": codec}},
                "eligibility": {"max_temp_c": None},
                "state": {"db": str(tmp / "state.db")},
            }
        )
        transport = MqttTransport(
            MqttSettings(port=port, client_id="bench-coordinator", max_queue=64, max_inflight=100)
        )
        pub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server_stub.bench_ingest",
                "--publisher",
                str(port),
                "--updates",
                str(updates),
                "--params",
                str(params),
                "--codec",
                codec,
            ],
            stdout=subprocess.DEVNULL,
        )
        first: list[float] = []
        end: list[float] = []
        weights = layout.unflatten(np.zeros(layout.size, np.float32))
        with Store(tmp / "state.db") as store:
            coord = Coordinator(
                config,
                transport,
                store,
                layout=layout,
                initial_weights=weights,
                on_round=lambda r: end.append(time.perf_counter()),
            )
            inner = coord.handle_message

            def timed(msg: Any, now: float) -> None:
                if not first and msg.topic.endswith("/update"):
                    first.append(time.perf_counter())
                inner(msg, now)

            coord.handle_message = timed  # type: ignore[method-assign]
            coord.run(threading.Event(), max_rounds=1)
            record = coord.last_record or {}
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pub.wait(60)
        n = int(record.get("participants", 0))
        seconds = (end[0] - first[0]) if first and end else float("nan")
        model_mb = layout.size * 4 / 2**20
        return {
            "updates": n,
            "seconds": seconds,
            "updates_per_s": n / seconds if seconds else float("nan"),
            "peak_rss_mb": peak_mb,
            "rss_before_mb": base_rss_mb,
            "model_mb": model_mb,
            "rss_budget_mb": 4 * model_mb + 150,
        }
    finally:
        if pub is not None and pub.poll() is None:
            pub.kill()
            pub.wait()
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedge bench ingest``: print the ingest rate and peak RSS."""
    parser = argparse.ArgumentParser(prog="fedge bench ingest", description=__doc__)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--codec", default="block_i8")
    parser.add_argument("--publisher", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publisher is not None:
        return publisher(args.publisher, args.updates, args.params, args.codec)
    r = run(args.updates, args.params, args.codec)
    print(
        f"ingest: {r['updates']:.0f} {args.codec} updates of {args.params:,} parameters "
        f"in {r['seconds']:.2f} s = {r['updates_per_s']:.0f} updates/s (target >= 200/s)"
    )
    print(
        f"peak RSS {r['peak_rss_mb']:.1f} MB (before start {r['rss_before_mb']:.1f} MB); "
        f"budget 4 x {r['model_mb']:.2f} MB model + 150 MB = {r['rss_budget_mb']:.1f} MB"
    )
    ok = r["updates"] == args.updates and r["updates_per_s"] >= 200
    ok = ok and r["peak_rss_mb"] <= r["rss_budget_mb"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
