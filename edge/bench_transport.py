"""``fedge bench transport``: QoS-1 round trips per second through a real Mosquitto.

One round trip: a device client publishes a QoS-1 message (and waits for the
PUBACK), and a coordinator client subscribed to the topic receives it; only then
is the next message sent. Two payload sizes: a status (~500 B) and an update
(100 KB). The benchmark starts its own ``mosquitto`` on a free 127.0.0.1 port
with the development settings (``set_tcp_nodelay true``) unless ``--url`` names
a broker, and always stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge.benchargs import check_output_file, int_at_least
from edge.mqtt_transport import MqttSettings, MqttTransport
from edge.transport import Transport

SIZES = {"status": 512, "update": 100 * 1024}


def _find_mosquitto(explicit: str | None) -> str:
    """``--mosquitto``, else ``$FEDGE_MOSQUITTO``, else PATH; a given path must be usable."""
    for flag, given in (("--mosquitto", explicit), ("FEDGE_MOSQUITTO", _env_mosquitto())):
        if given:
            if not (os.path.isfile(given) and os.access(given, os.X_OK)):
                raise SystemExit(
                    f"fedge bench transport: {flag}={given}: no executable mosquitto there"
                )
            return given
    for path in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("fedge bench transport: mosquitto not found (apt-get install mosquitto)")


def _env_mosquitto() -> str | None:
    return os.environ.get("FEDGE_MOSQUITTO") or None


@contextmanager
def private_broker(binary: str, nodelay: bool = True) -> Iterator[int]:
    """Run mosquitto on a free loopback port for the duration of the block; yield the port."""
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        conf = Path(tmp) / "mosquitto.conf"
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            f"set_tcp_nodelay {'true' if nodelay else 'false'}",
            "log_dest none",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise SystemExit(f"mosquitto exited: {err}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("mosquitto did not start") from None
                    time.sleep(0.01)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


def round_trips(
    sender: Transport, receiver: Transport, topic: str, size: int, count: int
) -> dict[str, float]:
    """Run ``count`` sequential QoS-1 round trips of ``size`` bytes; return the figures."""
    payload = bytes(size)
    latencies = []
    for _ in range(max(1, count // 20)):  # warm-up
        sender.publish(topic, payload)
        receiver.receive(5.0)
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        sender.publish(topic, payload, qos=1)
        msg = receiver.receive(10.0)
        if msg is None:
            raise RuntimeError("benchmark message lost")
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "payload_bytes": size,
        "messages": count,
        "seconds": elapsed,
        "msgs_per_s": count / elapsed,
        "mb_per_s": count * size / elapsed / 1e6,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
    }


def run(
    port: int, protocol: str, counts: dict[str, int], host: str = "127.0.0.1"
) -> dict[str, dict[str, float]]:
    common = {"host": host, "port": port, "protocol": protocol}
    sender = MqttTransport(MqttSettings(client_id="bench-device", **common))  # type: ignore[arg-type]
    receiver = MqttTransport(MqttSettings(client_id="bench-coordinator", **common))  # type: ignore[arg-type]
    try:
        topic = "fl/v1/bench/clients/bench-device/update"
        receiver.subscribe(topic)
        return {
            name: round_trips(sender, receiver, topic, SIZES[name], counts[name]) for name in SIZES
        }
    finally:
        sender.close()
        receiver.close()


def format_table(results: dict[str, dict[str, float]], title: str) -> str:
    cols = ("bytes", 8), ("msgs", 6), ("msg/s", 9), ("MB/s", 8), ("p50 ms", 8), ("p99 ms", 8)
    head = f"{'payload':<8} " + " ".join(f"{name:>{width}}" for name, width in cols)
    rows = [title, head, "-" * len(head)]
    for name, r in results.items():
        rows.append(
            f"{name:<8} {int(r['payload_bytes']):>8} {int(r['messages']):>6} "
            f"{r['msgs_per_s']:>9.0f} {r['mb_per_s']:>8.1f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedge bench transport", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--small",
        type=int_at_least(1),
        default=2000,
        help="status-sized round trips (default 2000)",
    )
    parser.add_argument(
        "--large", type=int_at_least(1), default=300, help="100 KB round trips (default 300)"
    )
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    parser.add_argument(
        "--no-nodelay", action="store_true", help="start the broker without set_tcp_nodelay"
    )
    parser.add_argument("--port", type=int, help="use a broker already listening on 127.0.0.1:PORT")
    parser.add_argument("--mosquitto", help="path of the mosquitto binary")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    check_output_file(parser, "--json", args.json)
    counts = {"status": args.small, "update": args.large}
    if args.port:
        results = run(args.port, args.protocol, counts)
        where = f"broker 127.0.0.1:{args.port}"
    else:
        with private_broker(_find_mosquitto(args.mosquitto), nodelay=not args.no_nodelay) as port:
            results = run(port, args.protocol, counts)
        where = f"private mosquitto, set_tcp_nodelay {'false' if args.no_nodelay else 'true'}"
    title = f"QoS-1 round trips (publish + PUBACK + delivery), MQTT {args.protocol}, {where}"
    print(format_table(results, title))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"protocol": args.protocol, "broker": where, "results": results}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
