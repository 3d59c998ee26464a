"""Test and benchmark helpers: free ports, supervised worker processes, and a reader of a topic's start.

Nothing in the product imports this module."""

from __future__ import annotations

import socket
import threading
import time
import uuid

from beamstream.platform.kafka_clients import make_consumer
from beamstream.platform.processes import ServiceProcess, service_env
from beamstream.platform.settings import Settings
from beamstream.platform.topic_reader import TopicReader

__all__ = ["ServiceProcess", "Supervisor", "TopicReader", "free_port_pair", "read_decoded", "service_env"]


def wait_until(predicate, timeout: float, what: str, every: float = 0.2) -> None:
    """Ask ``predicate()`` every ``every`` seconds until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


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


class Supervisor:
    """Restarts worker processes that exit while they should run, as systemd or Kubernetes would."""

    def __init__(self, workers: list[ServiceProcess], delay_s: float = 1.0) -> None:
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
