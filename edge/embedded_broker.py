"""An embedded MQTT broker (amqtt) for when no ``mosquitto`` binary is installed.

``fedge sim`` prefers a private Mosquitto (:mod:`edge.mosquitto`); this module
is its fallback so that ``pip install 'fedge[sim]'`` alone is enough to run a
simulated federation. It has the small surface of
:class:`edge.mosquitto.MosquittoBroker` that the simulator uses::

    with EmbeddedBroker(workdir) as broker:
        broker.url          # "mqtt://127.0.0.1:PORT?protocol=3.1.1"
        broker.log_text()   # amqtt's warnings and errors, for failure messages

Rules:

- amqtt speaks MQTT 3.1.1 only, so :attr:`EmbeddedBroker.url` carries
  ``?protocol=3.1.1`` and every client built with
  :meth:`edge.mqtt_transport.MqttSettings.from_url` connects with 3.1.1.
- amqtt is imported lazily, only in :meth:`EmbeddedBroker.start`; this module is
  the only one of fedge that imports it. Missing, it raises
  :class:`EmbeddedBrokerError` naming the fix.
- The broker runs in one background thread with its own asyncio event loop;
  nothing listens on anything but 127.0.0.1, and there are no credentials.
- :meth:`EmbeddedBroker.stop` shuts the broker down, closes the loop, joins the
  thread and releases the port; it is safe to call twice.
- Nothing persists: a stopped broker forgets its retained messages and sessions
  (the simulator never restarts its broker). For restarts, ACLs and TLS use Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from edge.mosquitto import LOOPBACK, free_port

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install the embedded broker with pip install 'fedge[sim]' (or pip install amqtt), "
    "or install mosquitto (Debian: apt-get install mosquitto)"
)

_AMQTT_LOGGER = "amqtt"
_PORT_ATTEMPTS = 5
"""Fresh ports to try when another process took the free port before amqtt bound it."""


class EmbeddedBrokerError(RuntimeError):
    """amqtt is missing, or the embedded broker did not start or stop."""


def amqtt_available() -> bool:
    """True when amqtt can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker:
    """An amqtt broker on 127.0.0.1, served by a background thread.

    Parameters
    ----------
    workdir
        Directory for the log file (``amqtt.log``: amqtt's warnings and errors).
    port
        Listener port; default a free one.
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = LOOPBACK
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.log_path = self.workdir / "amqtt.log"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()
        self._start_error: BaseException | None = None
        self._log_handler: logging.Handler | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT?protocol=3.1.1``: amqtt does not speak MQTT 5."""
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start amqtt in a background thread and wait until it listens."""
        if self.running:
            return self
        broker_cls = _broker_class()
        self._attach_log()
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._start_once(broker_cls, timeout)
                log.info("embedded amqtt broker on %s", self.url)
                return self
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self._fixed_port:
                    self._detach_log()
                    raise EmbeddedBrokerError(
                        f"amqtt could not listen on {self.host}:{self.port}: {exc}"
                    ) from exc
                log.info("port %d taken (attempt %d); trying another", self.port, attempt + 1)
                self.port = free_port()
            except BaseException:
                self._detach_log()
                raise
        self._detach_log()
        raise EmbeddedBrokerError(f"amqtt found no free port after {_PORT_ATTEMPTS} attempts")

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (clients are disconnected), close the loop, join the thread."""
        if self._thread is None:
            return
        # Flag first, then read the loop: either this sees the loop's stop event, or
        # _main sees the flag once the broker has started (a start that timed out).
        self._stop_requested.set()
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if loop is not None and stop_event is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        self._thread = self._loop = self._stop_event = None
        self._ready.clear()
        self._detach_log()
        if thread.is_alive():
            raise EmbeddedBrokerError(f"the embedded broker did not stop within {timeout} s")

    def log_text(self) -> str:
        """What amqtt logged so far (warnings and errors)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.url}, running={self.running})"

    # ---------------------------------------------------------------- internals

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}
            },
            # Only anonymous auth: amqtt's default set adds a $SYS publisher and
            # per-packet loggers, which cost time and say nothing the sim needs.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def _start_once(self, broker_cls: Any, timeout: float) -> None:
        self._ready.clear()
        self._stop_requested.clear()
        thread = threading.Thread(
            target=self._serve, args=(broker_cls,), name=f"amqtt-{self.port}", daemon=True
        )
        self._thread = thread
        thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise EmbeddedBrokerError(
                f"amqtt did not listen on {self.port} within {timeout} s:\n{self.log_text()}"
            )
        error = self._start_error
        if error is not None:
            thread.join(timeout)
            self._thread = self._loop = self._stop_event = None
            self._ready.clear()
            cause = error.__cause__ if isinstance(error.__cause__, OSError) else None
            if cause is not None:
                raise cause  # EADDRINUSE: start() retries on another port
            raise EmbeddedBrokerError(f"amqtt did not start: {error}") from error

    def _serve(self, broker_cls: Any) -> None:
        self._start_error = None
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(broker_cls))
        finally:
            with contextlib.suppress(Exception):
                _cancel_remaining(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()  # a failed start must not leave start() waiting

    async def _main(self, broker_cls: Any) -> None:
        stop_event = asyncio.Event()
        self._stop_event = stop_event
        try:
            broker = broker_cls(self._config(), loop=asyncio.get_running_loop())
            await broker.start()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        if self._stop_requested.is_set():
            stop_event.set()
        await stop_event.wait()
        try:
            await broker.shutdown()
        except Exception:
            logging.getLogger(_AMQTT_LOGGER).exception("amqtt shutdown failed")

    def _attach_log(self) -> None:
        if self._log_handler is not None:
            return
        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger(_AMQTT_LOGGER).addHandler(handler)
        self._log_handler = handler

    def _detach_log(self) -> None:
        handler, self._log_handler = self._log_handler, None
        if handler is not None:
            logging.getLogger(_AMQTT_LOGGER).removeHandler(handler)
            handler.close()


def _broker_class() -> type[Any]:
    """amqtt's ``Broker`` with its retained-message fan-out fixed (imports amqtt)."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise EmbeddedBrokerError(f"amqtt is not installed: {INSTALL_HINT}") from exc
    if not hasattr(Broker, "_publish_retained_messages_for_subscription"):
        # The override below targets a private method of amqtt 0.12; a renamed one
        # leaves it unused (tests/test_embedded_broker.py then shows whether it matters).
        log.warning("this amqtt has no _publish_retained_messages_for_subscription to patch")

    class _Broker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
        """amqtt 0.12 sends retained messages to clients that never subscribed to them.

        On every CONNECT it calls ``_publish_retained_messages_for_subscription``
        for *every* filter any client subscribed to, at QoS 0, so each device
        would receive every other device's retained status (and N devices
        connecting cost N² messages). Here a retained message goes only to a
        session that holds the filter itself, at the QoS it subscribed with.
        """

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            topic_filter, _qos = subscription
            subscribers = self._subscriptions.get(topic_filter, ())
            own = [qos for s, qos in subscribers if s.client_id == session.client_id]
            if own:
                await super()._publish_retained_messages_for_subscription(
                    (topic_filter, own[0]), session
                )

    return _Broker


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks amqtt left behind (client handlers) and let them finish."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


__all__ = ["INSTALL_HINT", "EmbeddedBroker", "EmbeddedBrokerError", "amqtt_available"]
