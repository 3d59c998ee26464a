"""The process monitor: watches the analysis group's lag and the dead letters, starts and stops
local worker processes within bounds, and says what it saw and did on the monitor topic.

In observe-only mode (a cluster where Kubernetes/KEDA or Compose owns the workers) it
manages no processes: it counts the analysis group's members and publishes the number
of workers it would want, with the same warnings.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from beamstream.operations.scaling import Alert, Decision, ScalingMemory, ScalingPolicy, decide
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.lag import GroupLag, GroupProgress
from beamstream.platform.processes import ServiceProcess
from beamstream.platform.retained import offset_bounds, open_reader, partitions_of, read_range
from beamstream.platform.settings import Settings
from beamstream.platform.topics import group_name, topic_name
from beamstream.schemas.serde import make_serde

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """One look at the pipeline."""

    at: float  # time.monotonic()
    progress: GroupProgress


class Monitor:
    """Observe every ``interval_s``; in local mode keep between min and max worker processes."""

    def __init__(self, settings: Settings, policy: ScalingPolicy, *, interval_s: float = 5.0,
                 observe_only: bool = False, worker_args: tuple[str, ...] = (), log_dir: Path | None = None,
                 emit: Callable[[dict], None] | None = None) -> None:
        policy.check()
        self.settings = settings
        self.policy = policy
        self.interval_s = interval_s
        self.observe_only = observe_only
        self.worker_args = worker_args
        self.log_dir = log_dir or settings.home / "logs" / "monitor"
        self.emit = emit or (lambda event: None)
        self.monitor_id = f"monitor@{socket.gethostname()}:{os.getpid()}"
        self.serde = make_serde(settings.schema_registry_url)
        self.topic = topic_name(settings, "monitor")
        self.group = group_name(settings, "analysis")
        self.images = topic_name(settings, "images")
        self.deadletter = topic_name(settings, "deadletter")
        self.memory = ScalingMemory()
        self.workers: list[ServiceProcess] = []
        self.stopping: list[ServiceProcess] = []
        self.events_published = 0
        self._names = 0
        self._previous: Observation | None = None

    # -- the loop ------------------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        """Observe and act until ``stop`` is set; then stop the local workers cleanly."""
        lag = GroupLag(self.settings)
        self._dead_reader = open_reader(self.settings)
        self._dead_positions: dict[int, int] | None = None  # taken at the first observation that works
        self.producer = make_producer(self.settings)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.observe_only:
                self._start_workers(self.policy.min_workers, "the minimum")
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.step(lag)
                except Exception as exc:  # a failed measurement is reported, never fatal
                    log.warning("observation failed: %r", exc)
                stop.wait(max(self.interval_s - (time.monotonic() - started), 0.1))
        finally:
            if not self.observe_only:
                self._stop_all()
            self._publish("status", "stopped", "monitor stopped", 0, 0, None, 0)
            self.producer.flush(10)
            self._dead_reader.close()
            lag.close()
        return 0

    def step(self, lag: GroupLag) -> Decision:
        """One observation: measure, decide, act, publish."""
        exited = self._reap() if not self.observe_only else []
        now = time.monotonic()
        observation = Observation(now, lag.progress(self.group, self.images))
        produce_hz, consume_hz = self._rates(observation)
        new_dead = self._count_new(self.deadletter)
        self._previous = observation
        workers = observation.progress.members if self.observe_only else len(self.workers)
        decision = decide(self.policy, self.memory, workers, observation.progress.lag, new_dead, now)
        figures = (observation.progress.lag, produce_hz, consume_hz)
        metrics.monitor_observed(workers, decision.target, observation.progress.lag, produce_hz, consume_hz, new_dead)
        for worker, code in exited:
            self._publish("warning", "worker_exited", f"worker {worker.name} exited with code {code}; restarted",
                          workers, decision.target, figures, new_dead)
        for alert in decision.warnings:
            self._warn(alert, workers, decision.target, figures, new_dead)
        if decision.code is not None:
            if not self.observe_only:
                if decision.target > workers:
                    self._start_workers(decision.target - workers, decision.reason)
                else:
                    self._stop_workers(workers - decision.target)
            message = decision.reason if not self.observe_only else f"recommended: {decision.reason}"
            self._publish("decision", decision.code, message, workers, decision.target, figures, new_dead)
        else:
            self._publish("status", "observed", decision.reason, workers, decision.target, figures, new_dead)
        return decision

    # -- measurements -------------------------------------------------------------------
    def _tail(self, topic: str) -> dict[int, int]:
        """The end of each partition of ``topic`` now: what arrives later is new."""
        return {p: end for p, (_, end) in offset_bounds(self._dead_reader, topic,
                                                         partitions_of(self._dead_reader, topic)).items()}

    def _count_new(self, topic: str) -> int:
        """Records (not offsets: transaction markers and aborted records take offsets too) added to
        ``topic`` since the last call."""
        ends = self._tail(topic)
        if self._dead_positions is None:
            self._dead_positions = ends
        ranges = {p: (self._dead_positions.get(p, end), end) for p, end in ends.items()}
        # Assigned only while it reads: a consumer fetching in the background while this process
        # forks a worker has crashed it (SIGSEGV in librdkafka).
        count = sum(1 for _ in read_range(self._dead_reader, topic, ranges))
        self._dead_positions = ends
        return count

    def _rates(self, observation: Observation) -> tuple[float, float]:
        """Events arriving and committed per second since the previous observation (offsets, so a
        transaction's commit marker counts as one event: close enough for a rate)."""
        previous = self._previous
        if previous is None:
            return 0.0, 0.0
        elapsed = max(observation.at - previous.at, 1e-3)
        produced = observation.progress.end - previous.progress.end
        consumed = observation.progress.committed - previous.progress.committed
        return produced / elapsed, max(consumed, 0) / elapsed

    # -- local workers ---------------------------------------------------------------
    def _start_workers(self, count: int, why: str) -> None:
        for _ in range(count):
            self._names += 1
            # The monitor's own BEAMSTREAM_METRICS_PORT is not theirs: every worker would try to bind it.
            worker = ServiceProcess(self.settings, self.log_dir, f"worker{self._names}", *self.worker_args,
                                   env={metrics.METRICS_PORT_ENV: ""}).start()
            self.workers.append(worker)
            log.info("worker started", extra={"worker": worker.name, "pid": worker.process.pid, "why": why})

    def _stop_workers(self, count: int) -> None:
        # The newest go first: the oldest have the warmest caches and the longest logs to read.
        for worker in self.workers[-count:]:
            worker.retired = True
            worker.process.terminate()  # SIGTERM: it commits its batch and leaves the group
            self.stopping.append(worker)
            log.info("worker stopping", extra={"worker": worker.name, "pid": worker.process.pid})
        self.workers = self.workers[:-count]

    def _reap(self) -> list[tuple[ServiceProcess, int]]:
        """Restart workers that died on their own; forget stopped ones that have exited."""
        self.stopping = [w for w in self.stopping if w.process.poll() is None]
        exited = []
        for worker in self.workers:
            code = worker.process.poll()
            if code is not None:
                log.warning("worker exited, restarting it", extra={"worker": worker.name, "code": code})
                exited.append((worker, code))
                worker.start()
        return exited

    def _stop_all(self) -> None:
        for worker in self.workers:
            worker.retired = True
        for worker in self.workers + self.stopping:
            worker.terminate(timeout=60)
        self.workers, self.stopping = [], []

    # -- output ----------------------------------------------------------------------------
    def _warn(self, alert: Alert, workers: int, target: int, figures, new_dead: int) -> None:
        log.warning(alert.message, extra={"code": alert.code})
        self._publish("warning", alert.code, alert.message, workers, target, figures, new_dead)

    def _publish(self, kind: str, code: str, message: str, workers: int, target: int,
                 figures: tuple[int, float, float] | None, new_dead: int) -> None:
        lag, produce_hz, consume_hz = figures or (0, 0.0, 0.0)
        event = {"monitor_id": self.monitor_id, "kind": kind, "code": code, "message": message,
                 "workers": workers, "target_workers": target, "lag": lag,
                 "produce_rate_hz": round(produce_hz, 2), "consume_rate_hz": round(consume_hz, 2),
                 "new_dead_letters": new_dead, "event_time": datetime.now(UTC)}
        self.producer.produce(self.topic, self.serde.encode("MonitorEvent", event, self.topic),
                              self.monitor_id.encode())
        self.producer.poll(0)
        self.events_published += 1
        metrics.monitor_event(kind, code)
        self.emit(event)


def event_line(event: dict, as_json: bool) -> str:
    """How the command prints an event: JSON for scripts, one aligned line for people."""
    if as_json:
        return json.dumps({**event, "event_time": event["event_time"].isoformat()})
    stamp = event["event_time"].astimezone().strftime("%H:%M:%S")
    return (f"{stamp} {event['kind']:<8} {event['code']:<13} workers {event['workers']}->{event['target_workers']} "
            f"lag {event['lag']:>6} in {event['produce_rate_hz']:7.1f}/s out {event['consume_rate_hz']:7.1f}/s"
            f"  {event['message']}")
