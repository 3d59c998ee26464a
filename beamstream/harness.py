"""Drive the pipeline from outside: real worker processes and read_committed readers.

Used by the end-to-end tests and the pipeline benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from beamstream.kafka_clients import make_consumer
from beamstream.settings import Settings
from beamstream.topics import topic_name
from schemas.serde import make_serde


def free_port_pair() -> int:
    """A port p such that p and p+1 are both free on loopback."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port >= 65000:
            continue
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports on 127.0.0.1")


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that points a `beamstream` process at the test's broker and topics."""
    env = {**os.environ,
           "BEAMSTREAM_BOOTSTRAP_SERVERS": settings.kafka_bootstrap,
           "BEAMSTREAM_TOPIC_PREFIX": settings.topic_prefix,
           "BEAMSTREAM_IMAGE_PARTITIONS": str(settings.image_partitions),
           "BEAMSTREAM_HOME": str(settings.home),
           "PYTHONUNBUFFERED": "1"}
    if settings.data_roots:
        env["BEAMSTREAM_DATA_ROOTS"] = os.pathsep.join(settings.data_roots)
    env.update(extra)
    return env


class WorkerProcess:
    """One long-running `beamstream` service process (a worker by default) with its log in a file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str, *args: str, command: str = "worker",
                 env: dict[str, str] | None = None) -> None:
        self.settings, self.log_dir, self.name, self.args = settings, log_dir, name, args
        self.command = command
        self.env = env or {}  # added to worker_env's, e.g. BEAMSTREAM_LOG_TOPIC
        self.retired = False  # stopped on purpose: a Supervisor leaves it down
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        self.starts += 1
        log = open(self.log_dir / f"{self.name}-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "beamstream", self.command, *self.args],
            env=worker_env(self.settings, **self.env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final commit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait for the clean shutdown; returns the exit code."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        return self.process.returncode if self.process else None

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"{self.name}-*.log")))


class Supervisor:
    """Restarts worker processes that exit while they should run, as systemd or Kubernetes would."""

    def __init__(self, workers: list[WorkerProcess], delay_s: float = 1.0) -> None:
        self.workers = workers
        self.delay_s = delay_s
        self.restarts: list[tuple[str, int | None]] = []  # (worker, exit code)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for worker in list(self.workers):
                if worker.retired or worker.process is None or worker.process.poll() is None:
                    continue
                self.restarts.append((worker.name, worker.process.returncode))
                time.sleep(self.delay_s)
                if not self._stop.is_set() and not worker.retired:
                    worker.start()

    def stop(self) -> None:
        """Stop supervising (before the workers are terminated)."""
        self._stop.set()
        self._thread.join(10)


class TopicReader:
    """Reads decoded events from topics in a background thread with read_committed."""

    def __init__(self, settings: Settings, logical_topics: list[str], raw_topics: list[str] = ()) -> None:
        self.serde = make_serde(settings.schema_registry_url)
        self.records: dict[str, list[tuple[str, dict]]] = defaultdict(list)  # topic -> [(type, value)]
        self.received_at: dict[str, list[float]] = defaultdict(list)  # topic -> epoch seconds, same order
        self.raw: dict[str, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        self.topics = {topic_name(settings, t): t for t in logical_topics}
        self._raw_topics = list(raw_topics)
        # Under the prefix like every group of a deployment (prefix ACLs in scram mode).
        self._consumer = make_consumer(settings, f"{settings.topic_prefix}test-reader-{uuid.uuid4().hex}")
        self._consumer.subscribe(list(self.topics) + self._raw_topics)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.2)
            if message is None or message.error():
                continue
            with self._lock:
                if message.topic() in self._raw_topics:
                    self.raw[message.topic()].append((message.key(), message.value()))
                else:
                    decoded = self.serde.decode(message.value(), message.topic())
                    self.records[self.topics[message.topic()]].append((decoded.name, decoded.value))
                    self.received_at[self.topics[message.topic()]].append(time.time())
        self._consumer.close()

    def values(self, logical_topic: str, record_type: str | None = None, dcid: int | None = None) -> list[dict]:
        with self._lock:
            return [v for name, v in self.records[logical_topic]
                    if (record_type is None or name == record_type) and (dcid is None or v.get("dcid") == dcid)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def read_decoded(settings: Settings, topics: list[str], serde, count: int, timeout: float = 30.0) -> dict:
    """Read ``count`` events from the start of ``topics`` (full names) with a fresh group:
    {(topic, record type): value}, later events of the same key replacing earlier ones."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}read-{uuid.uuid4().hex}")
    consumer.subscribe(topics)
    received: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(received) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            decoded = serde.decode(message.value(), message.topic())
            received[(message.topic(), decoded.name)] = decoded.value
    finally:
        consumer.close()
    return received
