"""``MqttTransport``: the :class:`~edge.transport.Transport` contract on paho-mqtt 2.x.

This is the only module of fedge that imports paho. Rules:

- paho's return codes and reason codes become :mod:`edge.transport` exceptions
  here, at one boundary; paho types never leave this module.
- One background thread per transport runs paho's network loop
  (``loop_forever`` with paho's own reconnect turned off) and reconnects with
  exponential backoff and jitter, so a fleet restarting together does not
  hammer the broker in lockstep.
- After every (re)connect the transport re-subscribes and publishes what
  ``on_connect_publish()`` returns (the device's status), because the broker
  may have lost the session or published the Last Will meanwhile.
- Received messages go into a queue bounded in messages and bytes. The network
  thread never blocks on it (a blocked network thread stops reading PUBACKs, and
  a ``publish`` waiting for its acknowledgement would deadlock). Back-pressure
  instead: messages are acknowledged manually, and while the queue is over its
  bound the PUBACKs of incoming QoS-1 messages are held back until ``receive``
  drains it, so the broker stops sending once its in-flight window is full and
  keeps the rest. The queue can exceed its bound by at most that window. A QoS-0
  message that arrives while the queue is full is dropped, logged and counted
  (``dropped_qos0``); QoS 0 promises nothing more. Held acknowledgements die
  with their connection: the broker redelivers those messages after a reconnect
  (QoS 1 is at-least-once; receivers already drop duplicates).
- A connection the broker keeps closing soon after it was established (the sign of two
  clients with one client id taking the session from each other) gets one WARNING that
  names the likely cause and the fix, instead of only a stream of "Unspecified error"
  disconnects (see ``SHORT_CONNECTION_S``).
- Passwords are never logged and never appear in ``repr``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.transport import (
    BadCredentialsError,
    ConnectError,
    Message,
    PublishError,
    PublishNotAuthorizedError,
    SubscribeError,
    TransportClosed,
    check_broker_url,
    validate_filter,
    validate_topic,
)

log = logging.getLogger(__name__)

RC_NOT_AUTHORIZED = 0x87
_CREDENTIAL_CODES = frozenset({0x86, 0x87, 0x8C})
"""CONNACK reasons: bad user name or password, not authorized, bad authentication method."""
RC_SESSION_TAKEN_OVER = 0x8E

SHORT_CONNECTION_S = 5.0
"""A connection the broker closes within this many seconds (or twice
``reconnect_min_delay_s``, if longer) of its CONNACK is short-lived."""
SHORT_CONNECTIONS_TO_WARN = 3
"""Short-lived connections in a row that make the transport warn of a client-id clash.

When a second client connects with the same client id, the broker takes the session over
and closes the first connection: Mosquitto 2.0 without a DISCONNECT (paho reports
"Unspecified error"), newer brokers with MQTT 5 reason "Session taken over". Both clients
reconnect after about ``reconnect_min_delay_s`` and knock each other off again, so each
connection lasts well under a second. One such drop is an ordinary connection loss; several
in a row are the clash (or a broker that keeps restarting), worth one clear warning."""


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach and talk to the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    """MQTT client id; a device uses its cid. Required for a persistent session."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """Never logged, never in ``repr``."""
    tls: bool = False
    """Connect with TLS (``mqtts://``)."""
    ca_certs: str | None = None
    """CA bundle that signed the broker's certificate; None uses the system store."""
    certfile: str | None = None
    """Client certificate (mutual TLS), optional."""
    keyfile: str | None = None
    tls_insecure: bool = False
    """Skip the host-name check of the broker's certificate (tests only)."""
    keepalive_s: int = 30
    protocol: Literal["5", "3.1.1"] = "5"
    clean_start: bool = True
    """Start a new session on the first connect. False with ``session_expiry_s > 0``
    (MQTT 5) keeps subscriptions and queued QoS-1 messages across disconnects."""
    session_expiry_s: int = 0
    """MQTT 5 session expiry interval; with MQTT 3.1.1 any value > 0 means a persistent session."""
    reconnect_min_delay_s: float = 0.5
    reconnect_max_delay_s: float = 30.0
    max_inflight: int = 20
    """QoS-1 messages in flight before paho queues locally."""
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    """How long ``publish`` waits for the PUBACK (it survives reconnects meanwhile)."""
    max_queue: int = 10_000
    """Received messages buffered before acknowledgements are held back (back-pressure)."""
    max_queue_bytes: int = 64 * 2**20
    """Payload bytes buffered before acknowledgements are held back (back-pressure)."""

    def __post_init__(self) -> None:
        if self.protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if (
            self.reconnect_min_delay_s <= 0
            or self.reconnect_max_delay_s < self.reconnect_min_delay_s
        ):
            raise ValueError("need 0 < reconnect_min_delay_s <= reconnect_max_delay_s")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together (mutual TLS)")
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")
        if self.max_queue < 1 or self.max_queue_bytes < 1:
            raise ValueError("max_queue and max_queue_bytes must be >= 1")

    @property
    def url(self) -> str:
        """``mqtt[s]://user@host:port`` without the password, for logs."""
        user = f"{urllib.parse.quote(self.username, safe='')}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttSettings:
        """Parse ``mqtt://[user[:pass]@]host[:port][?client_id=..&protocol=3.1.1&ca=..]``.

        ``mqtts://`` turns TLS on (default port 8883). Query keys: ``client_id``,
        ``protocol``, ``keepalive``, ``ca``, ``cert``, ``key``, ``insecure``,
        ``clean_start``, ``session_expiry``. Keyword ``overrides`` win over the URL.

        Examples
        --------
        >>> s = MqttSettings.from_url("mqtts://pi-01:s3cret@broker.lan?client_id=pi-01")
        >>> (s.tls, s.port, s.username, s.client_id)
        (True, 8883, 'pi-01', 'pi-01')
        >>> "s3cret" in repr(s)
        False
        """
        check_broker_url(url)  # scheme, port and query keys, with the fix in the message
        parts = urllib.parse.urlsplit(url)
        tls = parts.scheme == "mqtts"
        query = dict(urllib.parse.parse_qsl(parts.query, strict_parsing=False))

        def flag(name: str, default: bool) -> bool:
            return query[name].lower() in ("1", "true", "yes") if name in query else default

        kwargs: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or (8883 if tls else 1883),
            "username": urllib.parse.unquote(parts.username) if parts.username else None,
            "password": urllib.parse.unquote(parts.password) if parts.password else None,
            "tls": tls,
            "client_id": query.get("client_id", ""),
            "protocol": query.get("protocol", "5"),
            "keepalive_s": int(query.get("keepalive", 30)),
            "ca_certs": query.get("ca"),
            "certfile": query.get("cert"),
            "keyfile": query.get("key"),
            "tls_insecure": flag("insecure", False),
            "clean_start": flag("clean_start", True),
            "session_expiry_s": int(query.get("session_expiry", 0)),
        }
        kwargs.update(overrides)
        return cls(**kwargs)


def _network_thread_writes(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's ``on_socket_register_write``: nothing to do, the network loop writes (see above)."""


def _reason_value(rc: ReasonCode | int) -> int:
    return rc.value if isinstance(rc, ReasonCode) else int(rc)


def _is_failure(rc: ReasonCode | int) -> bool:
    return _reason_value(rc) >= 0x80


class MqttTransport:
    """A :class:`~edge.transport.Transport` over MQTT (paho-mqtt 2.x).

    The constructor connects and waits for the CONNACK; it raises
    :class:`~edge.transport.BadCredentialsError` when the broker refuses the
    credentials and :class:`~edge.transport.ConnectError` for anything else.

    Parameters
    ----------
    settings
        Broker address, credentials, TLS and session options.
    will
        Last Will the broker publishes if this client dies without a DISCONNECT.
    on_connect_publish
        Called after every successful (re)connect, on the network thread; the
        messages it returns are published without waiting (e.g. the status).
    rng
        Source of reconnect jitter.
    """

    def __init__(
        self,
        settings: MqttSettings,
        will: Message | None = None,
        on_connect_publish: Callable[[], list[Message]] | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._on_connect_publish = on_connect_publish
        self._rng = rng if rng is not None else random.Random()
        self._v5 = settings.protocol == "5"
        self._cond = threading.Condition()
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._ignored_mids: set[int] = set()
        self._subscriptions: dict[str, int] = {}
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_bytes = 0
        self._inbox_cond = threading.Condition()
        self._held_acks: list[tuple[int, int]] = []
        """(mid, qos) of received messages not yet acknowledged (queue over its bound)."""
        self._generation = 0
        """Bumped on every disconnect: held acknowledgements belong to one connection."""
        self.acks_held = 0
        """QoS-1 acknowledgements held back because the receive queue was full."""
        self.dropped_qos0 = 0
        """QoS-0 messages dropped because the receive queue was full."""
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._first_connack: ReasonCode | None = None
        self._ever_connected = False
        self._attempt = 0
        self.reconnects = 0
        """Successful reconnects after the first connect."""
        self.sessions_lost = 0
        """Reconnects on which the broker held no session for this client. With a
        persistent session that means the broker lost its state (restarted without its
        persistence file, or the session expired): its retained messages may be gone too,
        so a publisher of retained state (the coordinator's model) publishes it again."""
        self.client_id_clash_warnings = 0
        """Times this transport warned that the broker keeps closing its connections soon
        after connecting (probably another client with the same client id); once per run
        of ``SHORT_CONNECTIONS_TO_WARN`` or more short-lived connections in a row."""
        self._connected_at: float | None = None
        """Monotonic time of the current connection's CONNACK; None while disconnected."""
        self._short_in_a_row = 0
        """Connections in a row the broker closed soon after connecting (network thread only)."""

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None
            if self._v5
            else (settings.clean_start or settings.session_expiry_s == 0),
            reconnect_on_failure=False,
            manual_ack=True,  # see _on_message: back-pressure without blocking this thread
        )
        client.connect_timeout = settings.connect_timeout_s
        client.max_inflight_messages_set(settings.max_inflight)
        client.max_queued_messages_set(0)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=settings.ca_certs,
                    certfile=settings.certfile,
                    keyfile=settings.keyfile,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ValueError) as exc:
                raise ConnectError(f"cannot set up TLS: {exc}") from exc
            client.tls_insecure_set(settings.tls_insecure)
        if will is not None:
            validate_topic(will.topic)
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        client.on_socket_open = self._on_socket_open
        # Only the network thread may touch the socket. paho writes a packet from the caller's
        # thread when it sees no loop_start() thread (ours runs loop_forever itself); with TLS
        # that is an SSL_write racing the network thread's SSL_read on one SSL object, which
        # broke connections ("unexpected eof"). A write-registration callback makes paho queue
        # the packet and wake the network thread instead (see _run for the wake-up pipe).
        client.on_socket_register_write = _network_thread_writes
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

        props: Properties | None = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if settings.session_expiry_s > 0:
                props.SessionExpiryInterval = settings.session_expiry_s
        try:
            if self._v5:
                client.connect(
                    settings.host,
                    settings.port,
                    settings.keepalive_s,
                    clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY if settings.clean_start else False,
                    properties=props,
                )
            else:
                client.connect(settings.host, settings.port, settings.keepalive_s)
        except (OSError, ValueError) as exc:
            raise ConnectError(f"cannot connect to {settings.url}: {exc}") from exc

        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{settings.client_id or 'client'}", daemon=True
        )
        self._thread.start()
        with self._cond:
            got = self._cond.wait_for(
                lambda: self._first_connack is not None, timeout=settings.connect_timeout_s
            )
            connack = cast("ReasonCode | None", self._first_connack)
        if not got or connack is None:
            self._shutdown()
            raise ConnectError(
                f"no CONNACK from {settings.url} within {settings.connect_timeout_s} s"
            )
        if _is_failure(connack):
            self._shutdown()
            value = _reason_value(connack)
            exc_type = BadCredentialsError if value in _CREDENTIAL_CODES else ConnectError
            raise exc_type(f"broker {settings.url} refused the connection: {connack}", rc=value)
        log.info("connected to %s as %r", settings.url, settings.client_id)

    # ------------------------------------------------------------------ Transport API

    @property
    def connected(self) -> bool:
        """True while the connection is up (it may drop and come back)."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected; return False after ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish; for QoS >= 1 wait for the broker's acknowledgement.

        While disconnected, paho keeps the message and sends it after the
        reconnect; the wait (``publish_timeout_s``) covers that. Raises
        :class:`~edge.transport.PublishNotAuthorizedError` when an MQTT 5 broker
        answers "not authorized" (MQTT 3.1.1 brokers drop such a publish silently)
        and :class:`~edge.transport.PublishError` for other failures and timeouts.
        """
        self._check_open()
        validate_topic(topic)
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # payload too large, bad qos
            raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise PublishError(
                f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}", rc=int(info.rc)
            )
        mid = info.mid
        if qos == 0:
            with self._cond:
                if self._acks.pop(mid, None) is None:
                    self._ignored_mids.add(mid)
            return
        deadline = time.monotonic() + self.settings.publish_timeout_s
        with self._cond:
            while mid not in self._acks:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise TransportClosed(f"transport closed before {topic!r} was acknowledged")
                if remaining <= 0:
                    self._ignored_mids.add(mid)
                    raise PublishError(
                        f"publish to {topic!r} not acknowledged within "
                        f"{self.settings.publish_timeout_s} s"
                    )
                self._cond.wait(remaining)
            reason = self._acks.pop(mid)
        if _is_failure(reason):
            value = _reason_value(reason)
            if value == RC_NOT_AUTHORIZED:
                raise PublishNotAuthorizedError(
                    f"broker refused publish to {topic!r}: {reason}", rc=value
                )
            raise PublishError(f"broker refused publish to {topic!r}: {reason}", rc=value)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK; the filter is renewed after every reconnect."""
        self._check_open()
        _group, plain = (
            topic_filter.split("/", 2)[1:]
            if topic_filter.startswith("$share/")
            else ("", topic_filter)
        )
        validate_filter(plain)
        deadline = time.monotonic() + self.settings.connect_timeout_s
        if not self._connected.wait(self.settings.connect_timeout_s):
            raise SubscribeError(f"cannot subscribe to {topic_filter!r}: not connected")
        reasons = self._subscribe_wait(topic_filter, qos, deadline)
        bad = [r for r in reasons if _is_failure(r)]
        if bad:
            value = _reason_value(bad[0])
            raise SubscribeError(
                f"broker refused subscription {topic_filter!r}: {bad[0]}", rc=value
            )
        with self._cond:
            self._subscriptions[topic_filter] = qos

    def receive(self, timeout: float) -> Message | None:
        """Next message, or None after ``timeout`` s; TransportClosed once closed and drained.

        Taking a message out may bring the queue back under its bound, which releases the
        acknowledgements held back meanwhile (the broker then sends more).
        """
        with self._inbox_cond:
            if self._closed and not self._inbox:
                raise TransportClosed("transport is closed")
            if not self._inbox:
                self._inbox_cond.wait_for(
                    lambda: bool(self._inbox) or self._closed, max(0.0, timeout)
                )
            if not self._inbox:
                return None
            item = self._inbox.popleft()
            self._inbox_bytes -= len(item.payload)
            release: list[tuple[int, int]] = []
            if self._held_acks and not self._inbox_full():
                release, self._held_acks = self._held_acks, []
            generation = self._generation
        for mid, qos in release:
            if generation != self._generation:
                break  # the connection dropped meanwhile: the broker redelivers these
            self._client.ack(mid, qos)
        return item

    def close(self) -> None:
        """Send DISCONNECT (the broker discards the Last Will) and stop the network thread."""
        if self._closed:
            return
        self._shutdown()
        log.info("disconnected from %s", self.settings.url)

    def simulate_connection_loss(self) -> None:
        """Fault injection: cut the TCP connection without a DISCONNECT.

        The broker publishes the Last Will; this transport reconnects by itself.
        """
        sock: Any = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        """Fault injection: die like a crashed process.

        The TCP connection is cut without a DISCONNECT (the broker publishes the Last
        Will and keeps a persistent session), nothing reconnects, and every later call
        raises :class:`~edge.transport.TransportClosed` once the queue is drained.
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self.simulate_connection_loss()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=5.0)
        with self._inbox_cond:  # a crashed process loses what it held
            self._inbox.clear()
            self._inbox_bytes = 0
            self._held_acks = []
            self._inbox_cond.notify_all()
        with self._cond:
            self._cond.notify_all()
        log.info("aborted the connection to %s (fault injection)", self.settings.url)

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")

    def _shutdown(self) -> None:
        # disconnect() first, then stop the loop: the reverse order hung with many
        # clients (design.md, "Facts found while planning").
        self._closed = True
        self._closing.set()
        with contextlib.suppress(OSError, ValueError):  # the socket may be gone already
            self._client.disconnect()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=5.0)
        with self._cond:
            self._cond.notify_all()
        with self._inbox_cond:
            self._inbox_cond.notify_all()

    def _inbox_full(self) -> bool:
        return (
            len(self._inbox) >= self.settings.max_queue
            or self._inbox_bytes >= self.settings.max_queue_bytes
        )

    def _subscribe_wait(self, topic_filter: str, qos: int, deadline: float) -> list[ReasonCode]:
        result, mid = self._send_subscribe(topic_filter, qos, retain_if_new_only=False)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise SubscribeError(
                f"cannot subscribe to {topic_filter!r}: {mqtt.error_string(result)}", rc=int(result)
            )
        with self._cond:
            while mid not in self._subacks:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise TransportClosed("transport closed while subscribing")
                if remaining <= 0:
                    self._ignored_mids.add(mid)
                    raise SubscribeError(f"no SUBACK for {topic_filter!r}")
                self._cond.wait(remaining)
            return self._subacks.pop(mid)

    def _send_subscribe(
        self, topic_filter: str, qos: int, *, retain_if_new_only: bool
    ) -> tuple[MQTTErrorCode, int | None]:
        if self._v5:
            # On a re-subscribe, Retain Handling 1 asks for retained messages only if the
            # broker had lost the subscription, so a reconnect does not replay them all.
            options = SubscribeOptions(qos=qos, retainHandling=1 if retain_if_new_only else 0)
            return self._client.subscribe(topic_filter, options=options)
        return self._client.subscribe(topic_filter, qos)

    def _backoff_delay(self) -> float:
        base = min(
            self.settings.reconnect_max_delay_s,
            self.settings.reconnect_min_delay_s * (2 ** min(self._attempt, 30)),
        )
        self._attempt += 1
        # "Equal jitter": half fixed, half random, never below half the base delay.
        return float(base / 2 + self._rng.uniform(0, base / 2))

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                # loop() (unlike loop_forever) creates paho's wake-up socket pair, through which
                # a publish on another thread wakes this loop to write it at once; it lives as
                # long as the client. One non-blocking pass, then the loop proper.
                self._client.loop(timeout=0.0)
                self._client.loop_forever()
            except Exception:  # pragma: no cover - paho raised from its loop
                log.exception("MQTT network loop failed")
            if self._closing.is_set():
                break
            if not self._ever_connected and self._first_connack is not None:
                break  # refused on the first connect: the constructor raises
            delay = self._backoff_delay()
            log.info("connection to %s lost; reconnecting in %.2f s", self.settings.url, delay)
            if self._closing.wait(delay):
                break
            try:
                self._client.reconnect()
            except (OSError, ValueError) as exc:
                log.info("reconnect to %s failed: %s", self.settings.url, exc)

    # paho callbacks: they run on the network thread and must not block on it.

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Nagle + delayed ACK turn each QoS-1 round trip into ~40 ms (design.md).
        with contextlib.suppress(OSError, AttributeError):  # not a TCP socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if self._first_connack is None:
                self._first_connack = reason
            self._cond.notify_all()
        if _is_failure(reason):
            log.warning("broker %s refused the connection: %s", self.settings.url, reason)
            return
        reconnect = self._ever_connected
        self._ever_connected = True
        self._attempt = 0
        self._connected_at = time.monotonic()
        self._connected.set()
        if reconnect:
            self.reconnects += 1
            if not flags.session_present:
                self.sessions_lost += 1
            log.info(
                "reconnected to %s (session present: %s)", self.settings.url, flags.session_present
            )
            with self._cond:
                subs = list(self._subscriptions.items())
            for topic_filter, qos in subs:
                _result, mid = self._send_subscribe(topic_filter, qos, retain_if_new_only=True)
                if mid is not None:
                    with self._cond:
                        self._ignored_mids.add(mid)
        if self._on_connect_publish is not None:
            try:
                messages = self._on_connect_publish()
            except Exception:
                log.exception("on_connect_publish failed")
                messages = []
            for msg in messages:
                info = client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                with self._cond:
                    if self._acks.pop(info.mid, None) is None:
                        self._ignored_mids.add(info.mid)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        with self._inbox_cond:
            # Acknowledgements are per connection; the broker redelivers what was not acked.
            self._generation += 1
            self._held_acks = []
        connected_at, self._connected_at = self._connected_at, None
        if self._closing.is_set():
            return
        # Once the clash warning below has explained the drops, each further one is expected:
        # INFO, so the log shows one clear signal instead of a warning every half second.
        warned = self._short_in_a_row >= SHORT_CONNECTIONS_TO_WARN
        log.log(
            logging.INFO if warned else logging.WARNING,
            "disconnected from %s: %s", self.settings.url, reason,
        )  # fmt: skip
        self._count_short_connection(connected_at, flags, reason)

    def _count_short_connection(
        self, connected_at: float | None, flags: mqtt.DisconnectFlags, reason: ReasonCode
    ) -> None:
        """Count connections in a row the broker closed soon after connecting; warn once per run.

        Runs on the network thread, for disconnects we did not ask for. A DISCONNECT from the
        broker with a reason of its own (packet too large, server shutting down, ...) names its
        cause: it neither counts nor ends the run. A connection that lasted ends it.
        """
        if connected_at is None:  # the connect itself failed: no connection ended
            return
        if flags.is_disconnect_packet_from_server and (
            _reason_value(reason) != RC_SESSION_TAKEN_OVER
        ):
            return
        limit = max(SHORT_CONNECTION_S, 2 * self.settings.reconnect_min_delay_s)
        if time.monotonic() - connected_at >= limit:
            self._short_in_a_row = 0
            return
        self._short_in_a_row += 1
        if self._short_in_a_row == SHORT_CONNECTIONS_TO_WARN:
            self.client_id_clash_warnings += 1
            log.warning(
                "the broker %s closed the connection of client id %r %d times in a row within "
                "%.0f s of connecting (last: %s); another client (a second coordinator or agent) "
                "probably uses the same client id and each connection takes over the other's "
                "session: give each process its own client_id (device_id for agents)",
                self.settings.url, self.settings.client_id, self._short_in_a_row, limit, reason,
            )  # fmt: skip

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if mid in self._ignored_mids:
                self._ignored_mids.discard(mid)
                if _is_failure(reason):
                    log.warning("broker refused a publish (mid %d): %s", mid, reason)
                return
            self._acks[mid] = reason
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if mid in self._ignored_mids:
                self._ignored_mids.discard(mid)
                bad = [r for r in reasons if _is_failure(r)]
                if bad:
                    log.warning("broker refused a re-subscription (mid %d): %s", mid, bad)
                return
            self._subacks[mid] = list(reasons)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Never block here: this is the network thread, which also reads the PUBACKs that
        # publish() waits for. Back-pressure is a held-back acknowledgement instead.
        qos = int(msg.qos)
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message with a non-UTF-8 topic")
            client.ack(msg.mid, qos)  # never deliverable: do not make the broker resend it
            return
        item = Message(topic, bytes(msg.payload), bool(msg.retain), qos)
        with self._inbox_cond:
            full = self._inbox_full()
            if full and qos == 0:
                self.dropped_qos0 += 1
                dropped = self.dropped_qos0
            else:
                dropped = 0
                self._inbox.append(item)
                self._inbox_bytes += len(item.payload)
                self._inbox_cond.notify()
                if full:
                    self._held_acks.append((msg.mid, qos))
                    self.acks_held += 1
                    return
        if dropped:
            if dropped == 1 or dropped % 1000 == 0:
                log.warning(
                    "receive queue full (%d messages, %d bytes): dropped %d QoS-0 message(s)",
                    self.settings.max_queue, self.settings.max_queue_bytes, dropped,
                )  # fmt: skip
            return
        client.ack(msg.mid, qos)


def connect_url(
    url: str,
    *,
    will: Message | None = None,
    on_connect_publish: Callable[[], list[Message]] | None = None,
    **overrides: Any,
) -> MqttTransport:
    """Connect with settings from an ``mqtt://``/``mqtts://`` URL (:meth:`MqttSettings.from_url`).

    Examples
    --------
    ``connect_url("mqtt://coordinator:pw@127.0.0.1:1883", client_id="coordinator")``
    """
    return MqttTransport(MqttSettings.from_url(url, **overrides), will, on_connect_publish)
