"""One worker process: per-image analysis and per-collection group processing.

Two consume-transform-produce stages (:mod:`streams.transactional_stage`), each on
its own thread with its own consumer group and transactional producer:

* analysis (group ``<prefix>analysis``): images -> results. Each result commits
  with its image's offset in one KIP-447 transaction. Bad events go to the
  dead-letter topic after bounded retries. Any worker may take any image
  partition, so the analysis scales with the number of workers.
* collect (group ``<prefix>collect``): results + collections -> the per-collection
  table, progress announcements and exactly one summary per collection (X-ray
  centre for grid scans, a data-reduction request for rotation scans); grid
  summaries re-keyed by sample -> a 3D centre. Its tables
  (:mod:`streams.changelog_table`) commit their changes with the outputs.

The collect stage also asks, once a second, for a re-check of collections that
ended with images missing, so their summary comes after the timeout even when no
other event arrives. The main thread sends heartbeats and handles shutdown.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from beamstream.diffraction.errors import DiffractionError, SpotFindingError
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import SerdeError, make_serde
from beamstream.streams import collection_state as cs
from beamstream.streams import sample_centring as samples
from beamstream.streams.image_analysis import Analysis, noop_analysis, path_within_roots
from beamstream.streams.outstanding import OutstandingImages
from confluent_kafka import Message

from beamstream.engine.dead_letters import dead_letter
from beamstream.engine.stage import TransactionalStage
from beamstream.engine.table import ChangelogTable
from beamstream.engine.transactions import Output
from beamstream.platform import metrics  # Prometheus counters (beamstream/metrics.py); served only when a port is set
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import group_name, topic_name

log = logging.getLogger("beamstream.worker")

#: Exit code of a worker that left a stalled Kafka client behind (EX_TEMPFAIL: try again).
STALLED_EXIT_CODE = 75


@dataclass(frozen=True)
class PipelineOptions:
    """Tunables of the pipeline (defaults suit a beamline)."""

    summary_timeout_s: float = 60.0  # after a collection's end, how long to wait for missing images
    retry_attempts: int = 3  # tries per image before it goes to the dead-letter topic
    retry_backoff_s: float = 0.5  # first retry delay, doubled each time
    commit_interval_s: float = 0.1  # how often outputs and offsets are committed
    heartbeat_interval_s: float = 5.0
    exactly_once: bool = True  # off only to measure what the guarantee costs
    stall_limit_s: float = 60.0  # a commit blocked this long makes the worker exit for a restart


noop_analysis.backend = "noop"  # type: ignore[attr-defined]


def worker_identity() -> str:
    """host:pid, the worker id stamped on results and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Pipeline:
    """The two stages of one worker process, and its heartbeats."""

    def __init__(self, settings: Settings, analysis: Analysis | None = None,
                 options: PipelineOptions | None = None) -> None:
        self.settings = settings
        self.options = options or PipelineOptions()
        self.analysis = analysis or noop_analysis
        self.analysis_name = "noop" if getattr(self.analysis, "backend", None) == "noop" else "real"
        self.worker_id = worker_identity()
        self.serde = make_serde(settings.schema_registry_url)
        self.topics = {name: topic_name(settings, name) for name in
                       ("images", "collections", "results", "announce", "summaries", "requests",
                        "samples", "deadletter", "heartbeats")}
        self.started_at = datetime.now(UTC)
        self.stats = {"images": 0.0, "dead_letters": 0.0, "summaries": 0.0}
        self._side_producer = None  # non-transactional: heartbeats and checks
        self._last_check: dict[bytes, float] = {}
        self._owned_since: dict[int, float] = {}  # collections-table partition -> when this worker took it
        self.collections: ChangelogTable[cs.CollectionState] = ChangelogTable(
            settings, topic_name(settings, "workers-collections-changelog"), cs.CollectionState.to_json,
            cs.CollectionState.from_json)
        self.outstanding = OutstandingImages(settings)  # used on the collect stage's thread
        self.samples: ChangelogTable[dict] = ChangelogTable(
            settings, topic_name(settings, "workers-samples-changelog"), samples.dump, samples.load)
        common = {"exactly_once": self.options.exactly_once, "commit_interval_s": self.options.commit_interval_s}
        self.analysis_stage = TransactionalStage(
            settings, group_name(settings, "analysis"), [self.topics["images"]], self.analyse_image_event,
            name="analysis", **common)
        self.collect_stage = TransactionalStage(
            settings, group_name(settings, "collect"),
            [self.topics["results"], self.topics["collections"], self.topics["samples"]], self.collect_event,
            name="collect", on_assigned=self._restore_tables, on_revoked=self._drop_tables,
            flush=self._flush_tables,
            on_aborted=self._reload_tables, tick=self._request_deadline_checks, **common)
        self.stages = (self.analysis_stage, self.collect_stage)

    # -- tables ------------------------------------------------------------------
    def _table_for(self, topic: str) -> ChangelogTable:
        return self.samples if topic == self.topics["samples"] else self.collections

    def _restore_tables(self, partitions) -> None:
        started = time.monotonic()
        for tp in partitions:
            if tp.topic == self.topics["collections"]:
                self._owned_since[tp.partition] = time.time()
        for table in (self.collections, self.samples):
            numbers = {tp.partition for tp in partitions if self._table_for(tp.topic) is table}
            loaded = table.restore(numbers)
            log.info("table partitions restored", extra={"table": table.changelog_topic, "partitions": sorted(numbers),
                                                         "records": loaded,
                                                         "seconds": round(time.monotonic() - started, 3)})

    def _drop_tables(self, partitions) -> None:
        collections = self.topics["collections"]
        self.outstanding.forget_partitions({tp.partition for tp in partitions if tp.topic == collections})
        for table in (self.collections, self.samples):
            table.drop({tp.partition for tp in partitions if self._table_for(tp.topic) is table})

    def _flush_tables(self) -> list[Output]:
        # Once per transaction: the tables' changed entries, each encoded once.
        return self.collections.flush() + self.samples.flush()

    def _reload_tables(self) -> None:
        # An aborted transaction took its table changes with it; the in-memory tables
        # must forget them too before the rewound events are processed again.
        for table in (self.collections, self.samples):
            table.reload()

    # -- helpers -------------------------------------------------------------
    @property
    def side_producer(self):
        if self._side_producer is None:
            self._side_producer = make_producer(self.settings)
        return self._side_producer

    def _dead_letter_output(self, message: Message, reason: str, error_type: str, attempts: int,
                            dcid: int | None = None, image_number: int | None = None) -> Output:
        self.stats["dead_letters"] += 1
        metrics.dead_lettered(error_type)
        log.warning("dead letter: %s", reason, extra={"dcid": dcid, "image": image_number,
                                                      "topic": message.topic(), "offset": message.offset()})
        value = dead_letter(
            reason=reason, error_type=error_type, service=f"worker/{message.topic()}",
            source_topic=message.topic(), source_partition=message.partition(), source_offset=message.offset(),
            key=message.key(), payload=message.value(), headers=list(message.headers() or []),
            attempts=attempts, dcid=dcid, image_number=image_number,
        )
        topic = self.topics["deadletter"]
        return (topic, message.key(), self.serde.encode("DeadLetter", value, topic))

    # -- per-image analysis ----------------------------------------------------
    def analyse_image_event(self, message) -> list[Output]:
        """The outputs for one image event (a result, or a dead letter); never raises for bad input.

        Runs on the analysis stage's thread; a failing image is retried with backoff first.
        """
        try:
            image = self.serde.decode(message.value(), self.topics["images"], "ImageArrived").value
        except SerdeError as exc:
            return [self._dead_letter_output(message, str(exc), type(exc).__name__, 1)]
        dcid, number, path = image["dcid"], image["image_number"], image["file_path"]
        if not path_within_roots(path, self.settings.data_roots):
            reason = f"{path} is outside the configured data roots ({', '.join(self.settings.data_roots)})"
            return [self._dead_letter_output(message, reason, "OutsideDataRoots", 1, dcid, number)]

        fields, error, attempts = None, None, 0
        for attempts in range(1, self.options.retry_attempts + 1):
            try:
                fields = self.analysis(path, image["frame_index"])
                break
            except SpotFindingError as exc:
                # DIALS refuses frames that are mostly "strong" (saturated, blank with
                # noise); the beamline still needs a result for that grid position.
                log.warning("no usable spots: %s", exc, extra={"dcid": dcid, "image": number})
                fields = noop_analysis(path, image["frame_index"])
                fields["analysis_backend"] = "refused"
                break
            except (DiffractionError, OSError) as exc:
                error = exc
            except Exception as exc:  # a bug in analysis must not stop the collection
                error = exc
                log.exception("analysis failed", extra={"dcid": dcid, "image": number})
            if attempts < self.options.retry_attempts:
                time.sleep(self.options.retry_backoff_s * 2 ** (attempts - 1))
        if fields is None:
            reason = f"image {number} of dcid {dcid} ({path}, frame {image['frame_index']}): {error}"
            return [self._dead_letter_output(message, reason, type(error).__name__, attempts, dcid, number)]

        result = {
            "dcid": dcid, "image_number": number, "file_path": path, "frame_index": image["frame_index"],
            "processing_job_id": image["processing_job_id"], **fields,
            "event_time": image["arrival_time"], "result_time": datetime.now(UTC), "worker_id": self.worker_id,
        }
        topic = self.topics["results"]
        self.stats["images"] += 1
        latency_s = (result["result_time"] - image["arrival_time"]).total_seconds()
        metrics.image_analysed(latency_s, result["analysis_time_s"])
        log.info("image analysed", extra={
            "dcid": dcid, "image": number, "spots": result["n_spots_no_ice"],
            "d_min": result["estimated_d_min"], "latency_ms": round(latency_s * 1000, 1)})
        return [(topic, dcid_key(dcid), self.serde.encode("ImageResult", result, topic))]

    # -- group processing ------------------------------------------------------
    def collect_event(self, message) -> list[Output]:
        """The outputs of one event for the collection and sample tables (never raises for bad input)."""
        if message.topic() == self.topics["samples"]:
            return self._handle_sample_summary(message)
        return self._handle_collection_event(message)

    def _handle_collection_event(self, message) -> list[Output]:
        topic, partition = message.topic(), message.partition()
        try:
            decoded = self.serde.decode(message.value(), topic)
        except SerdeError as exc:
            return [self._dead_letter_output(message, str(exc), type(exc).__name__, 1)]
        value = decoded.value
        key = cs.state_key(value["dcid"], value.get("processing_job_id")).encode()
        state = self.collections.get(partition, key) or cs.CollectionState(
            value["dcid"], value.get("processing_job_id"))
        changed = True
        if decoded.name == "ImageResult":
            changed = cs.apply_result(state, value, now=time.time())
        elif decoded.name == "CollectionStarted":
            cs.apply_start(state, value)
            log.info("collection started", extra={"dcid": state.dcid, "expected": state.expected,
                                                  "experiment_type": state.experiment_type})
        elif decoded.name == "CollectionEnded":
            cs.apply_end(state, value)
            log.info("collection ended", extra={"dcid": state.dcid, "images_seen": state.n_seen,
                                                "expected": state.expected})
        elif decoded.name == "CollectionCheck":
            changed = False
        else:
            reason = f"unexpected {decoded.name} on {topic}"
            return [self._dead_letter_output(message, reason, "SchemaMismatchError", 1, value.get("dcid"))]

        now = datetime.now(UTC)
        outputs: list[Output] = []
        dcid_bytes = dcid_key(state.dcid)
        owned_since = self._owned_since.get(partition, 0.0)
        status = cs.completion(state, time.time(), self.options.summary_timeout_s, owned_since,
                               settled=self.outstanding.settled(key, cs.quiet_since(state, owned_since)))
        if cs.progress_due(state, finishing=status is not None):
            state.announced = state.n_seen
            outputs.append(self._encoded("announce", "CollectionProgress", dcid_bytes, cs.build_progress(state, now)))
        if status is not None:
            state.summarized = True
            summary = cs.build_summary(state, status, now)
            outputs.append(self._encoded("summaries", "CollectionSummary", dcid_bytes, summary))
            if summary["xray_centre"] is not None and summary["sample_id"] is not None:
                # Re-keyed by sample, so orthogonal scans of one sample meet in one table.
                outputs.append(self._encoded("samples", "CollectionSummary", str(summary["sample_id"]).encode(),
                                             summary))
            if summary["data_reduction_requested"]:
                outputs.append(self._encoded("requests", "ProcessingRequest", dcid_bytes, {
                    "request_id": f"data-reduction-{key.decode()}", "kind": "data_reduction",
                    "dcid": state.dcid, "processing_job_id": state.processing_job_id,
                    "recipe": "data-reduction", "parameters": {"spotfinding": "front-loaded"},
                    "image_ranges": [{"start": state.start_image_number,
                                      "end": state.start_image_number + state.expected - 1}],
                    "requested_by": "beamstream", "event_time": now}))
            self.outstanding.forget(key)
            self.stats["summaries"] += 1
            metrics.summary_published()
            log.info("collection summarised", extra={
                "dcid": state.dcid, "status": status, "images": state.n_seen, "expected": state.expected,
                "best_image": state.best_image})
        if changed or outputs:
            self.collections.put(partition, key, state)
        return outputs

    def _handle_sample_summary(self, message) -> list[Output]:
        topic, partition = message.topic(), message.partition()
        try:
            summary = self.serde.decode(message.value(), topic, "CollectionSummary").value
        except SerdeError as exc:
            return [self._dead_letter_output(message, str(exc), type(exc).__name__, 1)]
        key = message.key()
        state = self.samples.get(partition, key) or samples.empty_state()
        centre = samples.record_grid_summary(state, summary, datetime.now(UTC))
        self.samples.put(partition, key, state)
        outputs: list[Output] = []
        if centre is not None:
            outputs.append(self._encoded("summaries", "SampleCentre", key, centre))
            log.info("3D centre", extra={"sample_id": centre["sample_id"], "dcid": summary["dcid"],
                                         "x_mm": centre["x_mm"], "y_mm": centre["y_mm"], "z_mm": centre["z_mm"]})
        return outputs

    def _encoded(self, logical_topic: str, record_type: str, key: bytes, value: dict):
        topic = self.topics[logical_topic]
        return (topic, key, self.serde.encode(record_type, value, topic))

    def _request_deadline_checks(self) -> None:
        # Runs on the collect stage's thread, which owns the table.
        now = time.time()
        for partition, key, state in self.collections.items():
            if state.summarized or not state.ended:
                continue
            owned_since = self._owned_since.get(partition, 0.0)
            if not cs.timed_out(state, now, self.options.summary_timeout_s, owned_since):
                continue
            if not self.outstanding.settle(key, partition, cs.quiet_since(state, owned_since), state.dcid):
                continue  # images or results still in flight: asked again next tick
            if now - self._last_check.get(key, 0.0) < max(1.0, self.options.summary_timeout_s / 4):
                continue
            self._last_check[key] = now
            topic = self.topics["collections"]
            check = {"dcid": state.dcid, "processing_job_id": state.processing_job_id,
                     "reason": "timeout", "event_time": datetime.now(UTC)}
            self.side_producer.produce(topic, self.serde.encode("CollectionCheck", check, topic),
                                       dcid_key(state.dcid))
        if self._side_producer is not None:
            self._side_producer.poll(0)

    def _send_heartbeat(self, status: str) -> None:
        topic = self.topics["heartbeats"]
        beat = {
            "service_id": f"worker@{self.worker_id}", "service_type": "worker",
            "host": socket.gethostname(), "pid": os.getpid(), "status": status, "version": _version(),
            "started_at": self.started_at, "sent_at": datetime.now(UTC),
            "stats": {**self.stats, "analysis_real": 1.0 if self.analysis_name == "real" else 0.0},
        }
        try:
            self.side_producer.produce(topic, self.serde.encode("ServiceHeartbeat", beat, topic),
                                       beat["service_id"].encode())
            self.side_producer.poll(0)
        except Exception:  # heartbeats are best effort; the analysis must go on
            log.debug("heartbeat not sent", exc_info=True)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Pipeline:
        """Start both stages (each on its own thread)."""
        self.analysis_stage.start()
        self.collect_stage.start()
        return self

    def run(self, stop: threading.Event) -> int:
        """Heartbeat until ``stop`` is set or a stage fails; then stop cleanly. Returns the exit code."""
        code = 0
        next_beat = 0.0
        while not stop.wait(0.2):
            if time.monotonic() >= next_beat:
                self._send_heartbeat("running")
                next_beat = time.monotonic() + self.options.heartbeat_interval_s
            stalled = [stage for stage in self.stages if stage.stalled_for > self.options.stall_limit_s]
            if stalled:
                self._abandon(stalled[0])
            failed = [stage for stage in self.stages if not stage.running]
            if failed:
                # A worker must not run on with half of its work stopped: exit, and let the
                # supervisor (systemd, Kubernetes, `beamstream monitor`) start it again.
                log.critical("stage stopped unexpectedly, the worker exits",
                             extra={"stage": failed[0].name, "error": str(failed[0].error)})
                code = 1
                break
        self.shutdown()
        return code

    def _abandon(self, stage: TransactionalStage) -> None:
        # librdkafka can block inside a transactional call past its timeout after a
        # broker restart (confluentinc/librdkafka#5456, #5511). A blocked C call cannot be
        # interrupted, and the open transaction is aborted by the broker when this process
        # is gone; so exit at once and let the supervisor start a fresh worker.
        log.critical("stage stalled in a Kafka transaction, the worker exits for a restart",
                     extra={"stage": stage.name, "stalled_s": round(stage.stalled_for, 1)})
        self._send_heartbeat("failed")
        if self._side_producer is not None:
            self._side_producer.flush(5)
        logging.shutdown()
        os._exit(STALLED_EXIT_CODE)

    def shutdown(self) -> None:
        """Finish and commit the work in hand, leave the consumer groups, announce the stop."""
        for stage in self.stages:
            stage.stop()
        self.outstanding.close()
        self._send_heartbeat("stopped")
        if self._side_producer is not None:
            self._side_producer.flush(5)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("beamstream")
    except PackageNotFoundError:
        return "dev"
