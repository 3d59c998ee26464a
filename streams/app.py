"""The Faust application: per-image analysis and per-collection group processing.

Topology (all topics keyed by dcid, co-partitioned):

* ``analyse`` agent: images -> results. The CPU work runs in a thread, so the
  event loop keeps heartbeating and committing during a slow image. Bad events
  go to the dead-letter topic after bounded retries.
* ``collect`` agent: results + collections -> the ``collections`` table, progress
  announcements, and exactly one summary per collection (X-ray centre for grid
  scans, a data-reduction request for rotation scans).
* a timer that asks for a re-check of collections that ended with images missing,
  so their summary comes after the timeout even when no other event arrives.

Every output joins the transaction of the event that caused it (see streams.eos).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import faust

from beamstream import metrics  # Prometheus counters (beamstream/metrics.py); served only when a port is set
from beamstream.deadletters import dead_letter
from beamstream.kafka_clients import make_producer
from beamstream.settings import Settings
from beamstream.topics import topic_name
from diffraction.errors import DiffractionError, SpotFindingError
from schemas.keys import dcid_key
from schemas.serde import SerdeError, make_serde
from streams import collection_state as cs
from streams import eos
from streams import sample_centring as samples
from streams.image_analysis import Analysis, noop_analysis, path_within_roots

log = logging.getLogger("beamstream.worker")


@dataclass(frozen=True)
class PipelineOptions:
    """Tunables of the pipeline (defaults suit a beamline)."""

    summary_timeout_s: float = 60.0  # after a collection's end, how long to wait for missing images
    retry_attempts: int = 3  # tries per image before it goes to the dead-letter topic
    retry_backoff_s: float = 0.5  # first retry delay, doubled each time
    commit_interval_s: float = 0.1  # how often offsets and outputs are committed
    heartbeat_interval_s: float = 5.0
    exactly_once: bool = True  # off only to measure what the guarantee costs


def faust_broker_options(settings: Settings) -> dict:
    """Faust's broker URL and credentials from settings."""
    options: dict = {"broker": [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")]}
    protocol = settings.security_protocol
    if protocol.startswith("SASL"):
        import ssl

        context = ssl.create_default_context(cafile=settings.ssl_cafile or None) if protocol == "SASL_SSL" else None
        options["broker_credentials"] = faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism, ssl_context=context,
        )
    elif protocol == "SSL":
        import ssl

        context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
        if settings.ssl_certfile:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None)
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def worker_identity() -> str:
    """host:pid, the worker id stamped on results and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Pipeline:
    """Builds the Faust app for one worker process."""

    def __init__(self, settings: Settings, analysis: Analysis | None = None,
                 options: PipelineOptions | None = None) -> None:
        eos.install()
        self.settings = settings
        self.options = options or PipelineOptions()
        self.analysis = analysis or noop_analysis
        self.analysis_name = "noop" if self.analysis is noop_analysis else "real"
        self.worker_id = worker_identity()
        self.serde = make_serde(settings.schema_registry_url)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis")
        self.topics = {name: topic_name(settings, name) for name in
                       ("images", "collections", "results", "announce", "summaries", "requests",
                        "samples", "deadletter", "heartbeats")}
        self.started_at = datetime.now(UTC)
        self.stats = {"images": 0.0, "dead_letters": 0.0, "summaries": 0.0, "partition_lost": 0.0}
        self._side_producer = None  # non-transactional: heartbeats and checks
        self._last_check: dict[bytes, float] = {}
        self.app = self._build_app()

    # -- app -----------------------------------------------------------------
    def _build_app(self) -> faust.App:
        settings, options = self.settings, self.options
        app = faust.App(
            f"{settings.topic_prefix}workers",
            **faust_broker_options(settings),
            processing_guarantee="exactly_once" if options.exactly_once else "at_least_once",
            store="memory://",
            web_enabled=False,
            topic_partitions=settings.image_partitions,
            topic_replication_factor=settings.replication_factor,
            broker_commit_interval=options.commit_interval_s,
            broker_commit_every=1000,
            consumer_auto_offset_reset="earliest",
            table_standby_replicas=0,
            broker_session_timeout=10.0,  # a killed worker's partitions move on within 10 s
            broker_heartbeat_interval=3.0,
        )
        if options.exactly_once:
            eos.use_stable_offsets(app.conf.id, settings.kafka_client_config())
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        images = app.topic(self.topics["images"], **raw)
        grouped = app.topic(self.topics["results"], self.topics["collections"], **raw)
        self.table = eos.TransactionalTable(
            # bytes key and value types make faust use the raw codec, also when it
            # recovers the table from the changelog.
            app, name="collections", default=None, key_type=bytes, value_type=bytes,
            partitions=settings.image_partitions, beacon=app.tables.beacon,
        )
        app.tables.add(self.table)
        self.sample_table = eos.TransactionalTable(
            app, name="samples", default=None, key_type=bytes, value_type=bytes,
            partitions=settings.image_partitions, beacon=app.tables.beacon,
        )
        app.tables.add(self.sample_table)
        by_sample = app.topic(self.topics["samples"], **raw)

        @app.agent(images, name="analyse")
        async def analyse(stream):
            async for event in stream.noack().events():
                await self._handle_image(event)

        @app.agent(grouped, name="collect")
        async def collect(stream):
            async for event in stream.noack().events():
                await self._handle_collection_event(event)

        @app.agent(by_sample, name="centre3d")
        async def centre3d(stream):
            async for event in stream.noack().events():
                await self._handle_sample_summary(event)

        @app.timer(interval=1.0)
        async def check_deadlines():
            self._request_deadline_checks()

        @app.timer(interval=options.heartbeat_interval_s)
        async def heartbeat():
            self._send_heartbeat("running")

        return app

    # -- helpers -------------------------------------------------------------
    @property
    def side_producer(self):
        if self._side_producer is None:
            self._side_producer = make_producer(self.settings)
        return self._side_producer

    def _dead_letter_output(self, event, reason: str, error_type: str, attempts: int,
                            dcid: int | None = None, image_number: int | None = None):
        message = event.message
        self.stats["dead_letters"] += 1
        metrics.dead_lettered(error_type)
        log.warning("dead letter: %s", reason, extra={"dcid": dcid, "image": image_number,
                                                      "topic": message.topic, "offset": message.offset})
        value = dead_letter(
            reason=reason, error_type=error_type, service=f"worker/{message.topic}",
            source_topic=message.topic, source_partition=message.partition, source_offset=message.offset,
            key=message.key, payload=message.value, headers=list(message.headers or []),
            attempts=attempts, dcid=dcid, image_number=image_number,
        )
        topic = self.topics["deadletter"]
        return (topic, message.key, self.serde.encode("DeadLetter", value, topic))

    async def _commit_outputs(self, event, outputs, tables=()) -> None:
        try:
            await eos.send_in_transaction(self.app, event, outputs, tables)
        except eos.PartitionLost as exc:
            self.stats["partition_lost"] += 1
            log.info("partition moved to another worker, event left to it: %s", exc,
                     extra={"offset": event.message.offset, "partition": event.message.partition})

    # -- per-image analysis ----------------------------------------------------
    async def _handle_image(self, event) -> None:
        if eos.already_processed(self.app, event):
            return
        try:
            image = self.serde.decode(event.message.value, self.topics["images"], "ImageArrived").value
        except SerdeError as exc:
            await self._commit_outputs(event, [self._dead_letter_output(event, str(exc), type(exc).__name__, 1)])
            return
        dcid, number, path = image["dcid"], image["image_number"], image["file_path"]
        if not path_within_roots(path, self.settings.data_roots):
            reason = f"{path} is outside the configured data roots ({', '.join(self.settings.data_roots)})"
            await self._commit_outputs(event, [self._dead_letter_output(event, reason, "OutsideDataRoots", 1,
                                                                        dcid, number)])
            return

        loop = asyncio.get_running_loop()
        fields, error, attempts = None, None, 0
        for attempts in range(1, self.options.retry_attempts + 1):
            try:
                fields = await loop.run_in_executor(self.executor, self.analysis, path, image["frame_index"])
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
                await asyncio.sleep(self.options.retry_backoff_s * 2 ** (attempts - 1))
        if fields is None:
            reason = f"image {number} of dcid {dcid} ({path}, frame {image['frame_index']}): {error}"
            await self._commit_outputs(event, [self._dead_letter_output(
                event, reason, type(error).__name__, attempts, dcid, number)])
            return

        result = {
            "dcid": dcid, "image_number": number, "file_path": path, "frame_index": image["frame_index"],
            "processing_job_id": image["processing_job_id"], **fields,
            "event_time": image["arrival_time"], "result_time": datetime.now(UTC), "worker_id": self.worker_id,
        }
        topic = self.topics["results"]
        await self._commit_outputs(event, [(topic, dcid_key(dcid), self.serde.encode("ImageResult", result, topic))])
        self.stats["images"] += 1
        metrics.image_analysed((result["result_time"] - image["arrival_time"]).total_seconds(),
                               result["analysis_time_s"])
        log.info("image analysed", extra={
            "dcid": dcid, "image": number, "spots": result["n_spots_no_ice"],
            "d_min": result["estimated_d_min"],
            "latency_ms": round((result["result_time"] - image["arrival_time"]).total_seconds() * 1000, 1)})

    # -- group processing ------------------------------------------------------
    async def _handle_collection_event(self, event) -> None:
        if eos.already_processed(self.app, event):
            return
        topic = event.message.topic
        try:
            decoded = self.serde.decode(event.message.value, topic)
        except SerdeError as exc:
            await self._commit_outputs(event, [self._dead_letter_output(event, str(exc), type(exc).__name__, 1)])
            return
        value = decoded.value
        key = cs.state_key(value["dcid"], value.get("processing_job_id")).encode()
        stored = self.table.get(key)
        state = cs.CollectionState.from_json(stored) if stored else cs.CollectionState(
            value["dcid"], value.get("processing_job_id"))
        changed = True
        if decoded.name == "ImageResult":
            changed = cs.apply_result(state, value, now=time.time())
        elif decoded.name == "CollectionStarted":
            cs.apply_start(state, value)
        elif decoded.name == "CollectionEnded":
            cs.apply_end(state, value)
        elif decoded.name == "CollectionCheck":
            changed = False
        else:
            reason = f"unexpected {decoded.name} on {topic}"
            await self._commit_outputs(event, [self._dead_letter_output(event, reason, "SchemaMismatchError", 1,
                                                                        value.get("dcid"))])
            return

        now = datetime.now(UTC)
        outputs = []
        dcid_bytes = dcid_key(state.dcid)
        if decoded.name == "ImageResult" and changed and state.started and cs.progress_due(state):
            state.announced = state.n_seen
            outputs.append(self._encoded("announce", "CollectionProgress", dcid_bytes, cs.build_progress(state, now)))
        status = cs.completion(state, time.time(), self.options.summary_timeout_s)
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
            self.stats["summaries"] += 1
            metrics.summary_published()
            log.info("collection summarised", extra={
                "dcid": state.dcid, "status": status, "images": state.n_seen, "expected": state.expected,
                "best_image": state.best_image})
        if changed or outputs:
            self.table[key] = state.to_json()
        await self._commit_outputs(event, outputs, tables=[self.table])

    async def _handle_sample_summary(self, event) -> None:
        if eos.already_processed(self.app, event):
            return
        topic = event.message.topic
        try:
            summary = self.serde.decode(event.message.value, topic, "CollectionSummary").value
        except SerdeError as exc:
            await self._commit_outputs(event, [self._dead_letter_output(event, str(exc), type(exc).__name__, 1)])
            return
        key = event.message.key
        state = samples.load(self.sample_table.get(key))
        centre = samples.record_grid_summary(state, summary, datetime.now(UTC))
        self.sample_table[key] = samples.dump(state)
        outputs = []
        if centre is not None:
            outputs.append(self._encoded("summaries", "SampleCentre", key, centre))
            log.info("3D centre", extra={"sample_id": centre["sample_id"], "dcid": summary["dcid"],
                                         "x_mm": centre["x_mm"], "y_mm": centre["y_mm"], "z_mm": centre["z_mm"]})
        await self._commit_outputs(event, outputs, tables=[self.sample_table])

    def _encoded(self, logical_topic: str, record_type: str, key: bytes, value: dict):
        topic = self.topics[logical_topic]
        return (topic, key, self.serde.encode(record_type, value, topic))

    def _request_deadline_checks(self) -> None:
        now = time.time()
        for key, stored in list(self.table.data.items()):
            state = cs.CollectionState.from_json(stored)
            if state.summarized or not state.ended:
                continue
            if cs.completion(state, now, self.options.summary_timeout_s) is None:
                continue
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

    def shutdown(self) -> None:
        """Announce the stop and release resources (called on SIGTERM via the worker)."""
        self._send_heartbeat("stopped")
        if self._side_producer is not None:
            self._side_producer.flush(5)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("beamstream")
    except PackageNotFoundError:
        return "dev"
