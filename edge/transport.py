"""The ``Transport`` contract, its error tree, and an in-memory broker for unit tests.

A transport moves ``(topic, payload)`` pairs; it knows nothing of what the
payloads mean (that is :mod:`edge.wire`). Each side of fedge runs one loop that
drains ``receive()``; core objects never see threads, sockets or paho.

Implementations: :class:`InMemoryTransport` (here, on an :class:`InMemoryBroker`)
and ``edge.mqtt_transport.MqttTransport`` (paho-mqtt, the only module that imports it).
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from edge.chunking import DEFAULT_CHUNK_SIZE, new_transfer_id, split
from edge.wire import BadTopicError, ModelManifest, Topics


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT application message, independent of any client library."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos!r}")
        payload: object = self.payload
        if not isinstance(payload, bytes):  # accept bytearray/memoryview at run time
            object.__setattr__(self, "payload", bytes(self.payload))


# --------------------------------------------------------------------------- errors


class TransportError(Exception):
    """Base of transport failures; ``rc`` keeps the MQTT/paho code when there is one."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


class ConnectError(TransportError):
    """Could not connect (network, TLS, timeout or a refused CONNECT)."""


class NotAuthorizedError(TransportError):
    """The broker refused an operation for lack of rights (credentials or ACL)."""


class BadCredentialsError(ConnectError, NotAuthorizedError):
    """The broker refused the CONNECT: bad or missing username/password, or not authorised."""


class PublishError(TransportError):
    """A publish was not acknowledged, or acknowledged with a failure reason code."""


class PublishNotAuthorizedError(PublishError, NotAuthorizedError):
    """The broker's ACL refused a publish (MQTT 5 PUBACK reason 0x87)."""


class SubscribeError(TransportError):
    """A subscription was refused (SUBACK failure) or not acknowledged."""


class TransportClosed(TransportError):
    """The transport was closed; it cannot be used any more."""


# --------------------------------------------------------------------------- broker URLs

BROKER_URL_QUERY_KEYS = frozenset(
    {"client_id", "protocol", "keepalive", "ca", "cert", "key", "insecure", "clean_start"}
    | {"session_expiry"}
)
"""Query keys ``edge.mqtt_transport.MqttSettings.from_url`` understands."""


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and logs).

    >>> redact_url("mqtt://coordinator:s3cret@broker.lan:1883")
    'mqtt://coordinator:***@broker.lan:1883'
    """
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def check_broker_url(url: object) -> str:
    """Return ``url`` if it is an ``mqtt://`` or ``mqtts://`` broker URL, else raise ValueError.

    The checks are those that would otherwise fail only when connecting: the scheme, a port
    that is an integer in 1..65535, and the query keys. The message says how to write it.
    Nothing is resolved or connected.

    Examples
    --------
    >>> check_broker_url("mqtts://broker.lan:8883")
    'mqtts://broker.lan:8883'
    >>> check_broker_url("mqtt://127.0.0.1:abc")
    Traceback (most recent call last):
    ...
    ValueError: port 'abc' of 'mqtt://127.0.0.1:abc' is not an integer; write mqtt://host:1883
    """
    if not isinstance(url, str):
        raise ValueError(f"must be a string such as 'mqtt://127.0.0.1:1883', got {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
        raise ValueError(f"{url!r} is not a URL ({exc}); write mqtt://host:1883") from None
    if parts.scheme not in ("mqtt", "mqtts") or not url.startswith(f"{parts.scheme}://"):
        raise ValueError(
            f"must start with mqtt:// or mqtts:// (TLS), got {url!r}; "
            "write mqtt://host:1883 or mqtts://host:8883"
        )
    host_port = parts.netloc.rpartition("@")[2]
    port_text = host_port.rpartition("]")[2] if host_port.startswith("[") else host_port
    _, colon, port_text = port_text.partition(":")
    if colon:
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError(
                f"port {port_text!r} of {url!r} is not an integer; write {parts.scheme}://host:"
                f"{8883 if parts.scheme == 'mqtts' else 1883}"
            )
        if not 0 < int(port_text) < 65536:
            raise ValueError(f"port {port_text} of {url!r} is not in 1..65535")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise ValueError(f"has a malformed query in {url!r}: {exc}") from None
    unknown = sorted(set(query) - BROKER_URL_QUERY_KEYS)
    if unknown:
        raise ValueError(
            f"unknown URL query key(s) {unknown}; known: {sorted(BROKER_URL_QUERY_KEYS)}"
        )
    for key in ("keepalive", "session_expiry"):
        if any(not v.isascii() or not v.isdigit() for v in query.get(key, ())):
            raise ValueError(f"URL query {key}= must be a whole number of seconds in {url!r}")
    if any(v not in ("5", "3.1.1") for v in query.get("protocol", ())):
        raise ValueError(f"URL query protocol= must be 5 or 3.1.1 in {url!r}")
    return url


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Transport(Protocol):
    """What the agent and the coordinator need from a pub/sub connection."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send a message; for QoS >= 1 block until the broker acknowledged it.

        Raises :class:`PublishError` (and subclasses) on refusal or timeout.
        """
        ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe; retained messages that match are delivered through :meth:`receive`."""
        ...

    def receive(self, timeout: float) -> Message | None:
        """Next received message, or None after ``timeout`` seconds without one."""
        ...

    def close(self) -> None:
        """Disconnect cleanly (the Last Will is not sent). Idempotent."""
        ...


def publish_chunked(
    transport: Transport,
    topic: str,
    payload: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: bytes | None = None,
    qos: int = 1,
    retain: bool = False,
) -> int:
    """Publish ``payload`` as chunks (``edge.chunking.split``) on one topic; return the count."""
    chunks = split(payload, chunk_size, transfer_id)
    for chunk in chunks:
        transport.publish(topic, chunk, qos=qos, retain=retain)
    return len(chunks)


def publish_model(
    transport: Transport,
    topics: Topics,
    envelope: bytes,
    model_version: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: bytes | None = None,
    previous: ModelManifest | None = None,
) -> ModelManifest:
    """Publish a global model envelope on the downlink (docs/PROTOCOL.md, "Model downlink").

    Chunks go retained to ``model/{model_version}/{index}``, then the retained
    manifest to ``model/manifest``; last, the chunks of ``previous`` (if another
    version) are cleared with empty retained payloads so the broker drops them.
    """
    tid = new_transfer_id() if transfer_id is None else transfer_id
    chunks = split(envelope, chunk_size, tid)
    for index, chunk in enumerate(chunks):
        transport.publish(topics.model_chunk(model_version, index), chunk, qos=1, retain=True)
    manifest = ModelManifest(
        model_version=model_version,
        transfer_id=tid.hex(),
        chunk_count=len(chunks),
        total_len=len(envelope),
        sha256=hashlib.sha256(envelope).hexdigest(),
    )
    transport.publish(topics.model_manifest(), manifest.to_bytes(), qos=1, retain=True)
    if previous is not None and previous.model_version != model_version:
        for index in range(previous.chunk_count):
            transport.publish(
                topics.model_chunk(previous.model_version, index), b"", qos=1, retain=True
            )
    return manifest


# --------------------------------------------------------------------------- topic filters


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT filter, else raise BadTopicError."""
    if not topic_filter or "\0" in topic_filter:
        raise BadTopicError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise BadTopicError(f"'#' must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise BadTopicError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid MQTT topic name (no wildcards), else raise."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise BadTopicError(f"invalid topic name {topic!r}")
    return topic


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: ``+`` one level, ``#`` the rest; wildcards at the root skip ``$`` topics.

    Examples
    --------
    >>> topic_matches("fl/v1/lab/clients/+/status", "fl/v1/lab/clients/pi-1/status")
    True
    >>> topic_matches("#", "$SYS/broker/uptime")
    False
    """
    f = topic_filter.split("/")
    t = topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def _split_shared(topic_filter: str) -> tuple[str | None, str]:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise BadTopicError(f"invalid shared subscription {topic_filter!r}")
        return parts[1], parts[2]
    return None, topic_filter


# --------------------------------------------------------------------------- in-memory broker

Access = Literal["read", "write"]
Acl = Callable[[str, str, Access], bool]
"""``acl(client_id, topic, access) -> allowed``; ``read`` is checked per subscribe filter."""


class InMemoryBroker:
    """A thread-safe, in-process broker for unit tests of pure logic.

    Honours retained messages (an empty retained payload clears), ``+``/``#``
    wildcards, ``$share/{group}/`` shared subscriptions (round-robin), Last Will
    on :meth:`InMemoryTransport.kill`, and an optional ACL. QoS is simplified:
    delivery is immediate and exactly once, so QoS 0/1/2 behave alike.
    """

    def __init__(self, *, acl: Acl | None = None, max_queue: int = 100_000) -> None:
        self._lock = threading.RLock()
        self._retained: dict[str, Message] = {}
        self._clients: dict[str, InMemoryTransport] = {}
        self._acl = acl
        self._max_queue = max_queue
        self._rr = itertools.count()

    def connect(self, client_id: str, *, will: Message | None = None) -> InMemoryTransport:
        """Connect a client; an existing client with the same id is taken over (disconnected)."""
        with self._lock:
            old = self._clients.get(client_id)
            if old is not None:
                old._detach()
            client = InMemoryTransport(self, client_id, will, self._max_queue)
            self._clients[client_id] = client
            return client

    @property
    def retained(self) -> dict[str, Message]:
        """A copy of the retained store, topic → message."""
        with self._lock:
            return dict(self._retained)

    @property
    def client_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._clients)

    def _allowed(self, client_id: str, topic: str, access: Access) -> bool:
        return self._acl is None or self._acl(client_id, topic, access)

    def _route(self, sender: str, msg: Message) -> None:
        with self._lock:
            if msg.retain:
                if msg.payload:
                    self._retained[msg.topic] = msg
                else:
                    self._retained.pop(msg.topic, None)
            shared: dict[tuple[str, str], list[InMemoryTransport]] = {}
            for client in self._clients.values():
                delivered = False
                for group, f in client._subs:
                    if not topic_matches(f, msg.topic):
                        continue
                    if group is None:
                        if not delivered:
                            # Retain flag is cleared on normal forwarding (MQTT 3.3.1.3).
                            client._deliver(Message(msg.topic, msg.payload, False, msg.qos))
                            delivered = True
                    else:
                        shared.setdefault((group, f), []).append(client)
            for members in shared.values():
                members[next(self._rr) % len(members)]._deliver(
                    Message(msg.topic, msg.payload, False, msg.qos)
                )

    def _disconnect(self, client: InMemoryTransport, send_will: bool) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
            if send_will and client._will is not None:
                self._route(client.client_id, client._will)


class InMemoryTransport:
    """A client of an :class:`InMemoryBroker`; implements :class:`Transport`."""

    def __init__(
        self, broker: InMemoryBroker, client_id: str, will: Message | None, max_queue: int
    ) -> None:
        self.client_id = client_id
        self._broker = broker
        self._will = will
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=max_queue)
        self._subs: list[tuple[str | None, str]] = []
        self._closed = False
        self.dropped = 0
        """Messages dropped because the receive queue was full."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self._check_open()
        validate_topic(topic)
        if not self._broker._allowed(self.client_id, topic, "write"):
            if qos == 0:
                return  # as a real broker: a QoS-0 publish has no acknowledgement to refuse
            raise PublishNotAuthorizedError(
                f"broker refused publish to {topic!r}: not authorized", rc=0x87
            )
        self._broker._route(self.client_id, Message(topic, bytes(payload), retain, qos))

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._check_open()
        group, f = _split_shared(topic_filter)
        validate_filter(f)
        if not self._broker._allowed(self.client_id, f, "read"):
            raise SubscribeError(f"broker refused subscription {topic_filter!r}", rc=0x87)
        with self._broker._lock:
            if (group, f) not in self._subs:
                self._subs.append((group, f))
            if group is None:
                for msg in self._broker._retained.values():
                    if topic_matches(f, msg.topic):
                        self._deliver(msg)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._broker._lock:
            self._subs = [s for s in self._subs if s != _split_shared(topic_filter)]

    def receive(self, timeout: float) -> Message | None:
        if self._closed and self._queue.empty():
            raise TransportClosed(f"transport {self.client_id!r} is closed")
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        """Clean disconnect: the Last Will is discarded."""
        if not self._closed:
            self._closed = True
            self._broker._disconnect(self, send_will=False)

    def kill(self) -> None:
        """Simulate a dead client (no DISCONNECT): the broker publishes the Last Will."""
        if not self._closed:
            self._closed = True
            self._broker._disconnect(self, send_will=True)

    def pending(self) -> Iterable[Message]:
        """Drain and return every queued message without waiting."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _deliver(self, msg: Message) -> None:
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.dropped += 1

    def _detach(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport {self.client_id!r} is closed")
