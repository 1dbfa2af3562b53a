"""A private Mosquitto: start it on a free loopback port with a config written to a work dir.

Used by ``fedge sim``, the benchmarks and every test that crosses the network
(transport, agent, coordinator, sim, faults, ACL/TLS). Standard library only.
In tests, typical use goes through the fixtures in ``tests/conftest.py``
(``mosquitto``, ``mosquitto_factory``, ``test_pki``); direct use::

    with MosquittoBroker(tmp_path, users={"pi-01": "pw"}, acl=DEVICE_ACL) as broker:
        broker.url            # "mqtt://127.0.0.1:PORT"
        broker.restart()      # same port, same persistence file
        broker.log_text()     # what mosquitto printed, for failure messages

Rules: a broker that cannot start raises :class:`BrokerError` (tests fail, never
skip); ``stop()`` always ends the process (SIGTERM, then SIGKILL) and is safe to
call twice; nothing listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"

DEVICE_ACL = """\
# fedge ACL (same rules as deploy/mosquitto/acl): %u is the MQTT username = the device cid.
user coordinator
topic readwrite fl/v1/#

pattern write fl/v1/+/clients/%u/status
pattern write fl/v1/+/clients/%u/update
pattern read fl/v1/+/clients/%u/task
pattern read fl/v1/+/model/#
"""


class BrokerError(RuntimeError):
    """Mosquitto is missing, did not start, or did not stop."""


class MosquittoPathError(BrokerError):
    """``$FEDGE_MOSQUITTO`` is set but names no executable file."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary: ``$FEDGE_MOSQUITTO``, then PATH, then /usr/sbin.

    A ``$FEDGE_MOSQUITTO`` that names no executable file is an error, not skipped.
    """
    env = os.environ.get("FEDGE_MOSQUITTO")
    if env:
        # Set on purpose: never fall back to another binary behind the user's back.
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise MosquittoPathError(
            f"FEDGE_MOSQUITTO={env}: no executable mosquitto there; fix the path or unset it"
        )
    candidates: list[str] = []
    found = shutil.which("mosquitto")
    if found:
        candidates.append(found)
    candidates += [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise BrokerError(
        "mosquitto not found: install it (Debian: apt-get install mosquitto, or "
        "sh deploy/install-system-deps.sh) or set FEDGE_MOSQUITTO=/path/to/mosquitto"
    )


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def hash_password(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2.x password hash (``$7$``: PBKDF2-HMAC-SHA512), as mosquitto_passwd writes."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """Write a Mosquitto password file for ``users`` (username → password)."""
    lines = [f"{user}:{hash_password(pw)}" for user, pw in users.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A test CA and a server certificate for 127.0.0.1 / localhost signed by it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def make_test_pki(directory: Path, *, days: int = 2) -> TlsFiles:
    """Create a throw-away CA and server certificate with ``openssl`` (EC P-256, fast)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError("openssl not found (Debian: apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    commands = [
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"],
        ["req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", str(days),
         "-subj", "/CN=fedge test CA", "-out", "ca.crt"],
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key"],
        ["req", "-new", "-key", "server.key", "-subj", "/CN=localhost", "-out", "server.csr"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", "server.ext",
         "-out", "server.crt"],
    ]  # fmt: skip
    for args in commands:
        result = subprocess.run(
            [openssl, *args], cwd=d, capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise BrokerError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")
    return TlsFiles(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")


class MosquittoBroker:
    """One private Mosquitto process on 127.0.0.1.

    Parameters
    ----------
    workdir
        Directory for the config, password/ACL files, persistence and log.
    port
        Listener port; default a free one (kept across :meth:`restart`).
    users
        Username → password. When given, anonymous clients are refused.
    acl
        Text of a Mosquitto ACL file (e.g. :data:`DEVICE_ACL`).
    tls
        Serve TLS (MQTT over TLS) with these files instead of plain TCP.
    persistence
        Save retained messages, sessions and queued QoS-1 messages to disk so
        they survive :meth:`restart`.
    extra_config
        More ``mosquitto.conf`` lines.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        persistence: bool = True,
        extra_config: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or find_mosquitto()
        self.host = LOOPBACK
        self.port = port or free_port()
        self.users = dict(users) if users else None
        self.acl = acl
        self.tls = tls
        self.persistence = persistence
        self.extra_config = list(extra_config)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    # ---------------------------------------------------------------- config

    def config_text(self) -> str:
        """The ``mosquitto.conf`` this broker runs with."""
        lines = [
            "# written by fedge (edge/mosquitto.py)",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would switch to user "mosquitto", who cannot read a tmp dir.
            lines.append("user root")
        if self.users is not None:
            pw = write_password_file(self.workdir / "passwords", self.users)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(self.acl)
            lines.append(f"acl_file {acl_path}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "tls_version tlsv1.2",
            ]
        if self.persistence:
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {data}/", "autosave_interval 1"]
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` (``mqtts://`` with TLS); no credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """How the process ended by itself (negative: killed by that signal); None while it
        runs, and after :meth:`stop`."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Write the config, start mosquitto, and wait until the port accepts connections."""
        if self.running:
            return self
        self.config_path.write_text(self.config_text())
        log = self.log_path.open("ab")
        self._log_file = log
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C in pytest must not race our own SIGTERM
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup()
                raise BrokerError(
                    f"mosquitto exited with {code} on port {self.port}:\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)  # polling a port that is not open yet; no event to wait on
        self.stop()
        raise BrokerError(
            f"mosquitto did not listen on {self.port} within {timeout} s:\n{self.log_text()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5.0)
        self._cleanup()

    def restart(self, timeout: float = 10.0) -> MosquittoBroker:
        """Stop and start again on the same port with the same persistence directory."""
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        """What mosquitto logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _cleanup(self) -> None:
        self._proc = None
        log = self._log_file
        self._log_file = None
        if log is not None:
            log.close()  # type: ignore[attr-defined]

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.url}, pid={self.pid})"
