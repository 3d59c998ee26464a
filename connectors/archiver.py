"""The archiving consumer: when a collection ends, a manifest of its files, then one ArchiveComplete.

Consumes the collections topic (consumer group ``<prefix>archiver``). The file
template is in the CollectionStarted event, so the archiver keeps a map of
(dcid, processing job) -> CollectionStarted, rebuilt on start (and whenever
partitions are assigned) by reading the collections topic's assigned
partitions from the beginning; a collection's start and end share a key, so
they share a partition.

Guarantees:

* Consume-process-produce is transactional: the ArchiveComplete (or dead
  letter) and the consumer offsets commit together, so a crash between writing
  a manifest and committing just redoes that event.
* At most one ArchiveComplete per (dcid, processing_job_id): the keys already
  completed are read from the archive topic (read_committed) on start and on
  every assignment, so a CollectionEnded seen again (replay, reinjection, a
  fresh consumer group) is skipped. The archive topic must keep its events at
  least as long as the collections topic (90 days against 30).
* A manifest identical to the one on disk is not rewritten (see connectors.manifests).
* Anything that cannot be archived (an event that does not decode, an end
  without a start, a manifest that cannot be written) goes to the dead-letter
  topic with the original message, to be reinjected once fixed.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from datetime import UTC, datetime

from beamstream.connectors.manifests import Interrupted, build_manifest, manifest_path, write_manifest
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import SerdeError, make_serde
from confluent_kafka import KafkaException, TopicPartition

from beamstream.engine.dead_letters import dead_letter
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_consumer, make_producer
from beamstream.platform.retained import offset_bounds, open_reader, partitions_of, read_range
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name

log = logging.getLogger("beamstream.archiver")

CollectionKey = tuple[int, int | None]  # (dcid, processing_job_id)
COLLECTION_EVENTS = ("CollectionStarted", "CollectionEnded", "CollectionCheck")
COMMIT_EVERY = 200  # events without output between offset commits


class Archiver:
    """One archiver process: consume collection events, write manifests, emit ArchiveComplete."""

    def __init__(self, settings: Settings, group_id: str | None = None, transactional_id: str | None = None) -> None:
        self.settings = settings
        self.serde = make_serde(settings.schema_registry_url)
        self.topics = {name: topic_name(settings, name) for name in ("collections", "archive", "deadletter")}
        self.group_id = group_id or f"{settings.topic_prefix}archiver"
        # A stable id per host: a restarted archiver fences its predecessor and aborts its open
        # transaction at once instead of leaving readers waiting for the transaction timeout.
        self.transactional_id = transactional_id or f"{settings.topic_prefix}archiver-{socket.gethostname()}"
        self.stop_event = threading.Event()
        self.started: dict[CollectionKey, dict] = {}
        self.completed: set[CollectionKey] = set()
        self.stats = {"archived": 0, "skipped": 0, "dead_letters": 0}
        #: (collection end's event time, manifest seconds) per collection awaiting its commit, for the metrics.
        self._timings: dict[CollectionKey, tuple[datetime, float]] = {}
        self._assigned: list[int] | None = None  # partitions to (re)load state for, set by on_assign
        self._pending: dict[int, int] = {}  # partition -> next offset to commit
        self._first_uncommitted: dict[int, int] = {}  # partition -> where to rewind after an abort
        self._since_commit = 0

    # -- the loop ------------------------------------------------------------------
    def run(self, idle_timeout_s: float | None = None) -> int:
        """Archive until stopped (or idle for ``idle_timeout_s``); returns ArchiveComplete events emitted."""
        consumer = make_consumer(self.settings, self.group_id, **{"max.poll.interval.ms": 1_800_000})
        producer = make_producer(self.settings, transactional_id=self.transactional_id)
        collections = self.topics["collections"]

        def on_assign(_consumer, partitions) -> None:
            self._assigned = sorted(tp.partition for tp in partitions)

        def on_revoke(_consumer, partitions) -> None:
            # Offsets of revoked partitions can no longer be committed by us; their new owner
            # redoes those events, which is harmless (idempotent).
            for tp in partitions:
                self._pending.pop(tp.partition, None)
                self._first_uncommitted.pop(tp.partition, None)

        consumer.subscribe([collections], on_assign=on_assign, on_revoke=on_revoke)
        log.info("archiver started", extra={"group": self.group_id, "topic": collections})
        idle_since = time.monotonic()
        try:
            while not self.stop_event.is_set():
                message = consumer.poll(0.5)
                if self._assigned is not None:
                    self._load_state(self._assigned)
                    self._assigned = None
                if message is None:
                    self._commit(producer, consumer, [])
                    if idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                        break
                    continue
                if message.error():
                    log.warning("consumer error: %s", message.error().str())
                    continue
                idle_since = time.monotonic()
                try:
                    outputs, completes = self._handle(message)
                except Interrupted:
                    break  # stopping mid-hash: the event is redone on the next start
                self._first_uncommitted.setdefault(message.partition(), message.offset())
                self._pending[message.partition()] = message.offset() + 1
                self._since_commit += 1
                # Events without output (starts, checks) are committed in batches or when idle.
                if outputs or self._since_commit >= COMMIT_EVERY:
                    if self._commit(producer, consumer, outputs) and completes is not None:
                        self.completed.add(completes)
                        self.stats["archived"] += 1
                        ended, manifest_s = self._timings.pop(completes)
                        metrics.collection_archived((datetime.now(UTC) - ended).total_seconds(), manifest_s)
            self._commit(producer, consumer, [])
        finally:
            consumer.close()
            log.info("archiver stopped", extra=dict(self.stats))
        return self.stats["archived"]

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the current event and stop the loop cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    # -- one event -------------------------------------------------------------------
    def _handle(self, message) -> tuple[list[tuple[str, bytes, bytes]], CollectionKey | None]:
        """What one collections-topic message produces: (outputs, collection completed by them)."""
        topic = message.topic()
        try:
            decoded = self.serde.decode(message.value(), topic, COLLECTION_EVENTS)
        except SerdeError as exc:
            metrics.archiver_event("undecodable")
            return [self._dead_letter(message, str(exc), type(exc).__name__)], None
        metrics.archiver_event(decoded.name)
        value = decoded.value
        key: CollectionKey = (value["dcid"], value.get("processing_job_id"))
        if decoded.name == "CollectionStarted":
            self.started[key] = value
            return [], None
        if decoded.name != "CollectionEnded":
            return [], None
        extra = {"dcid": key[0], "processing_job_id": key[1]}
        if key in self.completed:
            self.stats["skipped"] += 1
            metrics.archive_skipped()
            log.info("already archived, skipping", extra=extra)
            return [], None
        started = self.started.get(key)
        if started is None:
            job = f" (processing job {key[1]})" if key[1] is not None else ""
            reason = (f"no CollectionStarted for dcid {key[0]}{job} on {topic}: "
                      "the file template is unknown, nothing archived")
            return [self._dead_letter(message, reason, "MissingCollectionStarted", key[0])], None
        building = time.monotonic()
        try:
            manifest = build_manifest(started, value, self.stop_event)
            path = manifest_path(started, self.settings.archive_root)
            digest, written = write_manifest(path, manifest)
        except (OSError, BeamstreamError) as exc:
            reason = f"archiving dcid {key[0]} ({started['file_template']}) failed: {exc}"
            return [self._dead_letter(message, reason, type(exc).__name__, key[0])], None
        self._timings[key] = (value["event_time"], time.monotonic() - building)
        complete = {
            "dcid": key[0], "processing_job_id": key[1], "beamline": started.get("beamline", ""),
            "file_template": started["file_template"], "collection_status": manifest["collection_status"],
            "manifest_path": str(path), "manifest_sha256": digest, "files": len(manifest["files"]),
            "total_bytes": manifest["total_bytes"], "missing_files": manifest["missing"],
            "complete": manifest["complete"], "event_time": datetime.now(UTC),
        }
        log.info("collection archived", extra={**extra, "manifest": str(path), "rewritten": written,
                                               "files": len(manifest["files"]), "missing": len(manifest["missing"]),
                                               "complete": manifest["complete"]})
        archive = self.topics["archive"]
        return [(archive, dcid_key(key[0]), self.serde.encode("ArchiveComplete", complete, archive))], key

    def _dead_letter(self, message, reason: str, error_type: str, dcid: int | None = None) -> tuple[str, bytes, bytes]:
        self.stats["dead_letters"] += 1
        metrics.archiver_dead_lettered(error_type)
        log.warning("dead letter: %s", reason, extra={"dcid": dcid, "topic": message.topic(),
                                                      "offset": message.offset()})
        value = dead_letter(
            reason=reason, error_type=error_type, service=f"archiver/{message.topic()}",
            source_topic=message.topic(), source_partition=message.partition(), source_offset=message.offset(),
            key=message.key(), payload=message.value(), headers=list(message.headers() or []), dcid=dcid,
        )
        topic = self.topics["deadletter"]
        return (topic, message.key(), self.serde.encode("DeadLetter", value, topic))

    # -- transactions ----------------------------------------------------------------
    def _commit(self, producer, consumer, outputs) -> bool:
        """Produce ``outputs`` and commit the pending offsets in one transaction; True when committed.

        A transaction the broker makes us abort rewinds the consumer to the first event
        not committed, so those events are processed again.
        """
        if not outputs and not self._pending:
            return True
        self._since_commit = 0
        offsets = [TopicPartition(self.topics["collections"], p, o) for p, o in self._pending.items()]
        try:
            producer.begin_transaction()
            for topic, key, value in outputs:
                producer.produce(topic, value, key)
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
        except KafkaException as exc:
            error = exc.args[0]
            if not error.txn_requires_abort():
                # Fatal (e.g. fenced by a newer archiver with the same transactional id): stop;
                # the uncommitted events are redone by whoever holds the partitions next.
                raise BeamstreamError(f"archiver transaction failed: {error.str()}") from None
            log.warning("transaction aborted, redoing its events: %s", error.str())
            producer.abort_transaction(30)
            for partition, offset in self._first_uncommitted.items():
                consumer.seek(TopicPartition(self.topics["collections"], partition, offset))
            self._pending.clear()
            self._first_uncommitted.clear()
            return False
        self._pending.clear()
        self._first_uncommitted.clear()
        return True

    # -- state -----------------------------------------------------------------------
    def _load_state(self, partitions: list[int]) -> None:
        """Rebuild the started map from the assigned collections partitions and the completed set
        from the whole archive topic (both read_committed, up to their current end)."""
        reader = open_reader(self.settings)
        try:
            collections = self.topics["collections"]
            bounds = offset_bounds(reader, collections, partitions)
            for record in read_range(reader, collections, bounds):
                try:
                    decoded = self.serde.decode(record.value, collections, "CollectionStarted")
                except SerdeError:
                    continue  # ends, checks and junk: the consumer deals with them in order
                self.started[(decoded.value["dcid"], decoded.value.get("processing_job_id"))] = decoded.value
            archive = self.topics["archive"]
            bounds = offset_bounds(reader, archive, partitions_of(reader, archive))
            for record in read_range(reader, archive, bounds):
                try:
                    done = self.serde.decode(record.value, archive, "ArchiveComplete").value
                except SerdeError:
                    continue
                self.completed.add((done["dcid"], done.get("processing_job_id")))
        finally:
            reader.close()
        log.info("state loaded", extra={"partitions": partitions, "started": len(self.started),
                                        "completed": len(self.completed)})
