"""``fedge status``: print the fleet as a table from the retained status topics.

Connects, collects retained ``clients/+/status`` messages for ``--wait`` seconds (1 s by
default), prints one row per device (rich table; plain text when rich is missing) and exits.
Offline devices (Last Will) keep the telemetry of their last online status when one was seen.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

from edge.transport import Transport, TransportError, check_broker_url, redact_url
from edge.wire import BadTopicError, Status, TopicKind, Topics, WireError, validate_id


def collect(transport: Transport, fleet: str, wait_s: float) -> dict[str, Status]:
    """Subscribe to every status of ``fleet`` and return the latest per cid after ``wait_s``."""
    topics = Topics(fleet)
    transport.subscribe(topics.all_status())
    out: dict[str, Status] = {}
    end = time.monotonic() + wait_s
    while (left := end - time.monotonic()) > 0:
        msg = transport.receive(left)
        if msg is None or not msg.payload:
            continue
        try:
            kind, cid = topics.parse(msg.topic)
            status = Status.from_bytes(msg.payload)
        except WireError:
            continue
        if kind is TopicKind.STATUS and cid is not None:
            out[cid] = status
    return out


def rows(statuses: dict[str, Status]) -> list[list[str]]:
    """Table rows: cid, online, battery, net, examples, samples/s, state, agent."""
    table = []
    for cid in sorted(statuses):
        s = statuses[cid]
        battery = (
            "-"
            if s.battery is None
            else (f"{s.battery.percent:.0f}%{' +' if s.battery.charging else ''}")
        )
        net = "-" if s.net is None else (f"{s.net.kind.value}{' metered' if s.net.metered else ''}")
        examples = "-" if s.train is None else str(s.train.num_examples)
        speed = (
            "-"
            if s.train is None or s.train.samples_per_s is None
            else (f"{s.train.samples_per_s:.0f}")
        )
        table.append(
            [
                cid,
                "yes" if s.online else "no",
                battery,
                net,
                examples,
                speed,
                s.state or "-",
                s.agent or "-",
            ]
        )
    return table


HEADERS = ["device", "online", "battery", "network", "examples", "samples/s", "state", "agent"]


def render(table: list[list[str]], where: str = "") -> None:
    """Print the rows: a table on a terminal; tab-separated lines, header first, when the
    output is piped or redirected (no column is cut to a terminal width, and ``cut``/``awk``
    read it). ``where`` names the fleet and broker in the table's title."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in fedge[server]
        tty = False
    else:
        tty = sys.stdout.isatty()
    if not tty:
        print("\t".join(HEADERS))
        for row in table:
            print("\t".join(row))
        if not table:
            print(f"fedge status: no device {where}".rstrip(), file=sys.stderr)
        return
    t = Table(title=f"{len(table)} device{'' if len(table) == 1 else 's'} {where}".rstrip())
    for h in HEADERS:
        t.add_column(h)
    for row in table:
        t.add_row(*row)
    Console().print(t)


MAX_WAIT_S = 3600.0


def _broker_url(text: str) -> str:
    try:
        return check_broker_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fleet(text: str) -> str:
    try:
        return validate_id(text, "fleet")
    except BadTopicError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (the fleet name of the config)") from None


def _wait_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_WAIT_S):
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_WAIT_S:g}] seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge status",
        description="Print the devices of a fleet from their retained status messages.",
    )
    parser.add_argument(
        "--broker", type=_broker_url, default="mqtt://127.0.0.1:1883", help="mqtt[s]:// URL"
    )
    parser.add_argument("--fleet", type=_fleet, default="default", help="fleet name")
    parser.add_argument(
        "--wait", type=_wait_s, default=1.0, help="seconds to collect statuses (default 1)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedge status``: 0 printed, 1 the broker cannot be reached, 2 bad arguments."""
    args = build_parser().parse_args(argv)
    from edge.mqtt_transport import connect_url

    try:
        transport = connect_url(args.broker, client_id="")
    except (TransportError, ValueError) as exc:
        print(f"fedge status: {exc}", file=sys.stderr)
        return 1
    try:
        statuses = collect(transport, args.fleet, args.wait)
    finally:
        transport.close()
    render(rows(statuses), f"in fleet {args.fleet} at {redact_url(args.broker)}")
    return 0
