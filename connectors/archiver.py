"""The archiving consumer: when a collection ends, a manifest of its files, then one ArchiveComplete.

Consumes the collections topic (consumer group ``<prefix>archiver``). The file
template is in the CollectionStarted event, so the archiver keeps a map of
(dcid, processing job) -> CollectionStarted, rebuilt on start (and whenever
partitions are assigned) by reading the collections topic's assigned
partitions from the beginning; a collection's start and end share a key, so
they share a partition.

Guarantees:

* It runs on the engine (:mod:`beamstream.engine`): the ArchiveComplete (or dead
  letter) and the consumer offsets commit in one transaction, so a crash between
  writing a manifest and committing just redoes that event.
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
import socket
import time
from datetime import UTC, datetime

from confluent_kafka import Message, TopicPartition

from beamstream.connectors.manifests import Interrupted, build_manifest, manifest_path, write_manifest
from beamstream.engine.dead_letters import DeadLetters
from beamstream.engine.stage import Backoff, Processor, Stage
from beamstream.engine.transactions import Output
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.retained import offset_bounds, open_reader, partitions_of, read_range
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import SerdeError, make_serde

log = logging.getLogger(__name__)

CollectionKey = tuple[int, int | None]  # (dcid, processing_job_id)
#: The largest ArchiveComplete sent (Kafka's record limit is librdkafka's message.max.bytes, 1,000,000).
MAX_EVENT_BYTES = 900_000
COLLECTION_EVENTS = ("CollectionStarted", "CollectionEnded", "CollectionCheck")


class Archiver:
    """One archiver process: consume collection events, write manifests, emit ArchiveComplete."""

    def __init__(self, settings: Settings, group_id: str | None = None, transactional_id: str | None = None) -> None:
        self.processor = ArchiveProcessor(settings)
        self.stage = Stage(
            settings, group_id or f"{settings.topic_prefix}archiver", [self.processor.topics["collections"]],
            self.processor, name="archiver",
            # A stable id per host: a restarted archiver fences its predecessor and aborts its open
            # transaction at once instead of leaving readers waiting for the transaction timeout.
            transactional_id=transactional_id or f"{settings.topic_prefix}archiver-{socket.gethostname()}",
            consumer_config={"max.poll.interval.ms": 1_800_000})  # hashing a large collection takes a while
        self.stop_event = self.stage.stop_requested

    @property
    def stats(self) -> dict[str, int]:
        """Collections archived, ends skipped (already archived) and dead letters, since the start."""
        return self.processor.stats

    def run(self, idle_timeout_s: float | None = None) -> int:
        """Archive until stopped (or idle for ``idle_timeout_s``); returns ArchiveComplete events emitted."""
        self.processor.stop_event = self.stop_event
        log.info("archiver started", extra={"group": self.stage.group_id, "topic": self.stage.topics[0]})
        try:
            self.stage.run(idle_timeout_s)
        finally:
            log.info("archiver stopped", extra=dict(self.stats))
        return self.stats["archived"]


class ArchiveProcessor(Processor):
    """What the archiver does with each collection event."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.serde = make_serde(settings.schema_registry_url)
        self.topics = {name: topic_name(settings, name) for name in ("collections", "archive", "deadletter")}
        self.dead_letters = DeadLetters(self.serde, self.topics["deadletter"], "archiver/{topic}")
        self.stop_event = None  # set by Archiver.run: a manifest being hashed stops with the service
        self.started: dict[CollectionKey, dict] = {}
        self.completed: set[CollectionKey] = set()
        self.stats = {"archived": 0, "skipped": 0, "dead_letters": 0}
        #: Per collection archived in the open transaction: (its end's event time, manifest seconds).
        self._archiving: dict[CollectionKey, tuple[datetime, float]] = {}

    def process(self, messages: list[Message]) -> list[Output]:
        """The ArchiveComplete or dead letter of each event (starts and checks give nothing)."""
        outputs: list[Output] = []
        for message in messages:
            try:
                outputs.extend(self._handle(message))
            except Interrupted:
                # Stopping mid-hash: nothing of this batch is committed; the event is redone on the next start.
                raise Backoff(0.0, "stopping while a manifest was being written") from None
        return outputs

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Rebuild what is known from the topics (starts of the assigned partitions, every completed key)."""
        self._load_state(sorted(tp.partition for tp in partitions))

    def committed(self) -> None:
        """The batch's ArchiveCompletes are out: remember them, count them."""
        for key, (ended, manifest_s) in self._archiving.items():
            self.completed.add(key)
            self.stats["archived"] += 1
            metrics.collection_archived((datetime.now(UTC) - ended).total_seconds(), manifest_s)
        self._archiving.clear()

    def aborted(self) -> None:
        """The batch's ArchiveCompletes were thrown away; their ends are processed again."""
        self._archiving.clear()

    def _handle(self, message: Message) -> list[Output]:
        """What one collections-topic message produces."""
        topic = message.topic()
        try:
            decoded = self.serde.decode(message.value(), topic, COLLECTION_EVENTS)
        except SerdeError as exc:
            metrics.archiver_event("undecodable")
            return [self._dead_letter(message, str(exc), type(exc).__name__)]
        metrics.archiver_event(decoded.name)
        value = decoded.value
        key: CollectionKey = (value["dcid"], value.get("processing_job_id"))
        if decoded.name == "CollectionStarted":
            self.started[key] = value
            return []
        if decoded.name != "CollectionEnded":
            return []
        extra = {"dcid": key[0], "processing_job_id": key[1]}
        if key in self.completed or key in self._archiving:
            self.stats["skipped"] += 1
            metrics.archive_skipped()
            log.info("already archived, skipping", extra=extra)
            return []
        started = self.started.get(key)
        if started is None:
            job = f" (processing job {key[1]})" if key[1] is not None else ""
            reason = (f"no CollectionStarted for dcid {key[0]}{job} on {topic}: "
                      "the file template is unknown, nothing archived")
            return [self._dead_letter(message, reason, "MissingCollectionStarted", key[0])]
        building = time.monotonic()
        try:
            manifest = build_manifest(started, value, self.stop_event)
            path = manifest_path(started, self.settings.archive_root)
            digest, written = write_manifest(path, manifest)
        except (OSError, ValueError, BeamstreamError) as exc:  # ValueError: a NUL byte in the template
            reason = f"archiving dcid {key[0]} ({started['file_template']}) failed: {exc}"
            return [self._dead_letter(message, reason, type(exc).__name__, key[0])]
        self._archiving[key] = (value["event_time"], time.monotonic() - building)
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
        event = self.serde.encode("ArchiveComplete", complete, archive)
        if len(event) > MAX_EVENT_BYTES:  # Kafka would refuse it, and the batch with it, after every retry
            self._archiving.pop(key)
            reason = (f"the ArchiveComplete of dcid {key[0]} would be {len(event)} bytes, more than a Kafka record "
                      f"holds ({len(complete['missing_files'])} missing files, a beamline name of "
                      f"{len(complete['beamline'])} characters); its manifest is {path}")
            return [self._dead_letter(message, reason, "EventTooLarge", key[0])]
        return [(archive, dcid_key(key[0]), event)]

    def _dead_letter(self, message: Message, reason: str, error_type: str, dcid: int | None = None) -> Output:
        self.stats["dead_letters"] += 1
        metrics.archiver_dead_lettered(error_type)
        return self.dead_letters.output(message, reason, error_type, dcid=dcid)

    # -- state ---------------------------------------------------------------------------
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
