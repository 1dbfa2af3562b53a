"""Tests of edge.transport: the in-memory broker (retain, wildcards, will, ACL, shared subs)."""

from __future__ import annotations

import pytest

from edge.chunking import Reassembler
from edge.transport import (
    InMemoryBroker,
    Message,
    PublishNotAuthorizedError,
    SubscribeError,
    Transport,
    TransportClosed,
    publish_chunked,
    topic_matches,
    validate_filter,
)
from edge.wire import BadTopicError, Status, Topics

T = Topics("lab")


def test_in_memory_transport_is_a_transport() -> None:
    assert isinstance(InMemoryBroker().connect("a"), Transport)


@pytest.mark.parametrize(
    ("f", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "a/b", True),
        ("#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/c", False),
    ],
)
def test_topic_matches(f: str, topic: str, expected: bool) -> None:
    assert topic_matches(f, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b"])
def test_validate_filter(bad: str) -> None:
    with pytest.raises(BadTopicError):
        validate_filter(bad)


def test_publish_receive_with_wildcard() -> None:
    broker = InMemoryBroker()
    coord, dev = broker.connect("coordinator"), broker.connect("pi-01")
    coord.subscribe(T.all_updates())
    dev.publish(T.update("pi-01"), b"data")
    msg = coord.receive(timeout=0.1)
    assert msg == Message(T.update("pi-01"), b"data", retain=False, qos=1)
    assert coord.receive(timeout=0.01) is None


def test_retained_seen_by_late_subscriber_and_cleared_by_empty() -> None:
    broker = InMemoryBroker()
    dev = broker.connect("pi-01")
    dev.publish(T.status("pi-01"), b"s1", retain=True)
    late = broker.connect("coordinator")
    late.subscribe(T.all_status())
    got = late.receive(0.1)
    assert got is not None and got.retain and got.payload == b"s1"
    dev.publish(T.status("pi-01"), b"", retain=True)
    assert T.status("pi-01") not in broker.retained


def test_last_will_on_kill_not_on_close() -> None:
    broker = InMemoryBroker()
    will = Message(T.status("pi-01"), Status.offline_will().to_bytes(), retain=True)
    coord = broker.connect("coordinator")
    coord.subscribe(T.all_status())
    broker.connect("pi-02", will=Message(T.status("pi-02"), b"x", retain=True)).close()
    broker.connect("pi-01", will=will).kill()
    msg = coord.receive(0.1)
    assert msg is not None and msg.topic == T.status("pi-01")
    assert Status.from_bytes(msg.payload).online is False
    assert coord.receive(0.01) is None


def test_closed_transport_raises() -> None:
    t = InMemoryBroker().connect("a")
    t.close()
    with pytest.raises(TransportClosed):
        t.publish("x", b"")
    with pytest.raises(TransportClosed):
        t.receive(0.0)


def test_acl_refuses_publish_and_subscribe() -> None:
    def acl(cid: str, topic: str, access: str) -> bool:
        return cid == "coordinator" or f"/clients/{cid}/" in topic

    broker = InMemoryBroker(acl=acl)
    dev = broker.connect("pi-01")
    with pytest.raises(PublishNotAuthorizedError) as info:
        dev.publish(T.update("pi-02"), b"evil")
    assert info.value.rc == 0x87
    with pytest.raises(SubscribeError):
        dev.subscribe(T.task("pi-02"))


def test_shared_subscription_round_robin() -> None:
    broker = InMemoryBroker()
    workers = [broker.connect(f"w{i}") for i in range(2)]
    for w in workers:
        w.subscribe(T.shared_updates())
    dev = broker.connect("pi-01")
    for i in range(4):
        dev.publish(T.update("pi-01"), bytes([i]))
    counts = [len(list(w.pending())) for w in workers]
    assert counts == [2, 2]


def test_publish_chunked_reassembles() -> None:
    broker = InMemoryBroker()
    coord, dev = broker.connect("c"), broker.connect("pi-01")
    coord.subscribe(T.all_updates())
    payload = bytes(range(256)) * 40
    n = publish_chunked(dev, T.update("pi-01"), payload, chunk_size=1000)
    assert n == 11
    r = Reassembler(1 << 20, 5.0)
    out = [r.feed("pi-01", m.payload, 0.0) for m in coord.pending()]
    assert out[-1] == payload
