"""One worker process: the analysis stage and the collect stage, each on its own thread with its
own consumer group and transactional producer (:class:`beamstream.engine.stage.Stage`), and the
worker's heartbeats on the main thread.

* analysis (:mod:`beamstream.streams.analysis_stage`): images -> results, each image answered once
  (:mod:`beamstream.streams.answered_images`);
* collect (:mod:`beamstream.streams.collect_stage`): results + collections + samples -> tables,
  progress, summaries, data-reduction requests, 3D centres.

A worker must not run on with half of its work stopped: when a stage dies the worker exits
(code 1), and when a stage's commit hangs in librdkafka the engine ends the process (code 75);
either way the supervisor (systemd, Kubernetes, `beamstream monitor`) starts it again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from beamstream.engine.stage import Stage
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import group_name, topic_name
from beamstream.schemas.serde import make_serde
from beamstream.streams.analysers import Analyser, noop_analysis
from beamstream.streams.analysis_stage import AnalysisProcessor, RetryPolicy
from beamstream.streams.answered_images import DEFAULT_RETENTION_S
from beamstream.streams.collect_stage import CollectProcessor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """Tunables of a worker (defaults suit a beamline)."""

    summary_timeout_s: float = 60.0  # after a collection's end, how long to wait for missing images
    retry_attempts: int = 3  # tries per image before it goes to the dead-letter topic
    retry_backoff_s: float = 0.5  # first retry delay, doubled each time
    commit_interval_s: float = 0.1  # the longest a busy stage gathers a batch before committing it
    threads: int = 1  # images analysed at once
    heartbeat_interval_s: float = 5.0
    exactly_once: bool = True  # off only to measure what the guarantee costs
    stall_limit_s: float = 60.0  # a commit blocked this long makes the worker exit for a restart
    answered_retention_s: float = DEFAULT_RETENTION_S  # how long a collection's answered images are remembered


def worker_identity() -> str:
    """host:pid, the worker id stamped on results and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """The two stages of one worker process, and its heartbeats."""

    def __init__(self, settings: Settings, analyser: Analyser | None = None,
                 options: WorkerOptions | None = None) -> None:
        self.settings = settings
        self.options = options or WorkerOptions()
        analyser = analyser or noop_analysis
        self.analysis_kind = "noop" if getattr(analyser, "backend", None) == "noop" else "real"
        self.worker_id = worker_identity()
        self.serde = make_serde(settings.schema_registry_url)
        self.heartbeats_topic = topic_name(settings, "heartbeats")
        self.started_at = datetime.now(UTC)
        self._heartbeat_producer = None
        self.analysis = AnalysisProcessor(settings, self.serde, analyser, self.worker_id,
                                          RetryPolicy(self.options.retry_attempts, self.options.retry_backoff_s),
                                          self.options.answered_retention_s)
        self.collect = CollectProcessor(settings, self.serde, self.options.summary_timeout_s)
        common = {"exactly_once": self.options.exactly_once, "commit_interval_s": self.options.commit_interval_s,
                  "stall_limit_s": self.options.stall_limit_s, "last_words": self._last_words,
                  "consumer_config": {
                      "session.timeout.ms": 10_000, "heartbeat.interval.ms": 3_000,
                      "max.poll.interval.ms": 600_000,  # one very slow image must not cost the partitions
                  }}
        self.analysis_stage = Stage(settings, group_name(settings, "analysis"), [topic_name(settings, "images")],
                                    self.analysis, name="analysis", threads=self.options.threads, **common)
        self.collect_stage = Stage(settings, group_name(settings, "collect"),
                                   [topic_name(settings, n) for n in ("results", "collections", "samples")],
                                   self.collect, name="collect", **common)
        self.stages = (self.analysis_stage, self.collect_stage)

    @property
    def stats(self) -> dict[str, float]:
        """What the worker has done, as its heartbeats report it."""
        return {"images": float(self.analysis.images_analysed),
                "dead_letters": float(self.analysis.dead_lettered + self.collect.dead_lettered),
                "summaries": float(self.collect.summaries_published),
                "duplicates": float(self.analysis.duplicates_skipped)}

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Worker:
        """Start both stages (each on its own thread)."""
        for stage in self.stages:
            stage.start()
        return self

    def run(self, stop: threading.Event) -> int:
        """Heartbeat until ``stop`` is set or a stage fails; then stop cleanly. Returns the exit code."""
        code = 0
        next_beat = 0.0
        while not stop.wait(0.2):
            if time.monotonic() >= next_beat:
                self._send_heartbeat("running")
                next_beat = time.monotonic() + self.options.heartbeat_interval_s
            failed = [stage for stage in self.stages if not stage.running]
            if failed:
                log.critical("stage stopped unexpectedly, the worker exits",
                             extra={"stage": failed[0].name, "error": str(failed[0].error)})
                code = 1
                break
        self.shutdown()
        return code

    def shutdown(self) -> None:
        """Finish and commit the work in hand, leave the consumer groups, announce the stop."""
        for stage in self.stages:
            stage.stop()
        self.collect.close()
        self._send_heartbeat("stopped")
        if self._heartbeat_producer is not None:
            self._heartbeat_producer.flush(5)

    def _last_words(self, _stage: Stage) -> None:
        self._send_heartbeat("failed")
        if self._heartbeat_producer is not None:
            self._heartbeat_producer.flush(5)

    # -- heartbeats ----------------------------------------------------------------
    def _send_heartbeat(self, status: str) -> None:
        beat = {
            "service_id": f"worker@{self.worker_id}", "service_type": "worker",
            "host": socket.gethostname(), "pid": os.getpid(), "status": status, "version": _version(),
            "started_at": self.started_at, "sent_at": datetime.now(UTC),
            "stats": {**self.stats, "analysis_real": 1.0 if self.analysis_kind == "real" else 0.0},
        }
        try:
            if self._heartbeat_producer is None:
                self._heartbeat_producer = make_producer(self.settings)
            self._heartbeat_producer.produce(
                self.heartbeats_topic, self.serde.encode("ServiceHeartbeat", beat, self.heartbeats_topic),
                beat["service_id"].encode())
            self._heartbeat_producer.poll(0)
        except Exception:  # heartbeats are best effort; the analysis must go on
            log.debug("heartbeat not sent", exc_info=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("beamstream")
    except PackageNotFoundError:
        return "dev"
