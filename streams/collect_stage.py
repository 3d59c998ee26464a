"""The collect stage: results and collection events folded into per-collection state, and what
that state asks for (progress, one summary per collection, data-reduction requests, 3D centres).

Consumer group ``<prefix>collect`` on results + collections + samples (co-partitioned by dcid,
assigned by range). Two tables (:class:`beamstream.engine.table.ChangelogTable`) hold the state:
collections (:mod:`beamstream.streams.collection_state`) and samples
(:mod:`beamstream.streams.sample_centring`); their changes commit with the outputs.

Once a second (the stage's tick) it asks for a re-check of collections that ended with images
missing, so their summary comes after the timeout even when no other event arrives; before an
incomplete summary it waits for images still in flight (:mod:`beamstream.streams.outstanding`).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from confluent_kafka import Message, TopicPartition

from beamstream.engine.dead_letters import DeadLetters
from beamstream.engine.stage import Processor
from beamstream.engine.table import ChangelogTable
from beamstream.engine.transactions import Output
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import make_producer
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.keys import dcid_key
from beamstream.schemas.serde import Serde, SerdeError
from beamstream.streams import collection_state as cs
from beamstream.streams import sample_centring
from beamstream.streams.outstanding import OutstandingImages

log = logging.getLogger(__name__)

#: What the results and collections topics may carry (anything else there is dead-lettered).
COLLECTION_INPUTS = ("ImageResult", "CollectionStarted", "CollectionEnded", "CollectionCheck")


class CollectProcessor(Processor):
    """The collection state machine of one worker: what each result or collection event changes and emits."""

    def __init__(self, settings: Settings, serde: Serde, summary_timeout_s: float = 60.0) -> None:
        self.settings, self.serde, self.summary_timeout_s = settings, serde, summary_timeout_s
        self.topics = {name: topic_name(settings, name) for name in
                       ("results", "collections", "samples", "announce", "summaries", "requests")}
        self.collections: ChangelogTable[cs.CollectionState] = ChangelogTable(
            settings, topic_name(settings, "workers-collections-changelog"), cs.CollectionState.to_json,
            cs.CollectionState.from_json, source_topics=(self.topics["results"], self.topics["collections"]),
            copy_value=cs.CollectionState.copy)
        self.samples: ChangelogTable[dict] = ChangelogTable(
            settings, topic_name(settings, "workers-samples-changelog"), sample_centring.dump, sample_centring.load,
            source_topics=(self.topics["samples"],))
        self.tables = (self.collections, self.samples)
        self.dead_letters = DeadLetters(serde, topic_name(settings, "deadletter"), "worker/{topic}")
        self.outstanding = OutstandingImages(settings)
        self.summaries_published = 0
        self.dead_lettered = 0
        self._owned_since: dict[int, float] = {}  # collections partition -> when this worker took it
        self._last_check: dict[bytes, float] = {}
        self._check_producer = None  # non-transactional: the deadline checks

    # -- the stage's hooks ------------------------------------------------------------
    def process(self, messages: list[Message]) -> list[Output]:
        """The outputs of each event for the collection and sample tables (never raises for bad input)."""
        outputs: list[Output] = []
        for message in messages:
            if message.topic() == self.topics["samples"]:
                outputs.extend(self._sample_summary(message))
            else:
                outputs.extend(self._collection_event(message))
        return outputs

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Note when each collections partition became ours (the summary timeout counts from it)."""
        for tp in partitions:
            if tp.topic == self.topics["collections"]:
                self._owned_since[tp.partition] = time.time()

    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Forget the waits of collections that are no longer ours."""
        self.outstanding.forget_partitions({tp.partition for tp in partitions
                                            if tp.topic == self.topics["collections"]})

    def tick(self) -> None:
        """Ask for a re-check of each ended collection whose timeout passed with nothing left in flight."""
        now = time.time()
        waiting = self.collections.select(lambda state: state.ended and not state.summarized)
        for partition, key, state in waiting:
            owned_since = self._owned_since.get(partition, 0.0)
            if not cs.timed_out(state, now, self.summary_timeout_s, owned_since):
                continue
            if not self.outstanding.settle(key, partition, cs.quiet_since(state, owned_since), state.dcid):
                continue  # images or results still in flight: asked again next tick
            if now - self._last_check.get(key, 0.0) < max(1.0, self.summary_timeout_s / 4):
                continue
            self._last_check[key] = now
            self._send_check(state)
        if self._check_producer is not None:
            self._check_producer.poll(0)

    def close(self) -> None:
        """Close the clients of the in-flight checks."""
        self.outstanding.close()
        if self._check_producer is not None:
            self._check_producer.flush(5)

    # -- collections ---------------------------------------------------------------------
    def _collection_event(self, message: Message) -> list[Output]:
        topic, partition = message.topic(), message.partition()
        try:
            decoded = self.serde.decode(message.value(), topic)
        except SerdeError as exc:
            return [self._dead_letter(message, str(exc), type(exc).__name__)]
        value = decoded.value
        if decoded.name not in COLLECTION_INPUTS:  # before its fields are read: other records have no dcid
            reason = f"unexpected {decoded.name} on {topic}"
            return [self._dead_letter(message, reason, "SchemaMismatchError", dcid=value.get("dcid"))]
        problem = cs.event_problem(decoded.name, value)
        if problem is not None:
            return [self._dead_letter(message, problem, "InvalidEvent", dcid=value["dcid"])]
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
        else:  # a CollectionCheck: only asks for the completion test below
            changed = False
        outputs = self._announcements(state, key, partition)
        if changed or outputs:
            self.collections.put(partition, key, state)
        return outputs

    def _announcements(self, state: cs.CollectionState, key: bytes, partition: int) -> list[Output]:
        """Progress, and once the collection is over its summary and what the summary asks for."""
        now = datetime.now(UTC)
        outputs: list[Output] = []
        dcid = dcid_key(state.dcid)
        owned_since = self._owned_since.get(partition, 0.0)
        status = cs.completion(state, time.time(), self.summary_timeout_s, owned_since,
                               settled=self.outstanding.settled(key, cs.quiet_since(state, owned_since)))
        if cs.progress_due(state, finishing=status is not None):
            state.announced = state.n_seen
            outputs.append(self._encoded("announce", "CollectionProgress", dcid, cs.build_progress(state, now)))
        if status is None:
            return outputs
        state.summarized = True
        summary = cs.build_summary(state, status, now)
        outputs.append(self._encoded("summaries", "CollectionSummary", dcid, summary))
        if summary["xray_centre"] is not None and summary["sample_id"] is not None:
            # Re-keyed by sample, so orthogonal scans of one sample meet in one table.
            outputs.append(self._encoded("samples", "CollectionSummary", str(summary["sample_id"]).encode(), summary))
        if summary["data_reduction_requested"]:
            outputs.append(self._encoded("requests", "ProcessingRequest", dcid,
                                         cs.build_data_reduction_request(state, now)))
        self.outstanding.forget(key)
        self.summaries_published += 1
        metrics.summary_published()
        log.info("collection summarised", extra={
            "dcid": state.dcid, "status": status, "images": state.n_seen, "expected": state.expected,
            "best_image": state.best_image})
        return outputs

    def _send_check(self, state: cs.CollectionState) -> None:
        topic = self.topics["collections"]
        check = {"dcid": state.dcid, "processing_job_id": state.processing_job_id,
                 "reason": "timeout", "event_time": datetime.now(UTC)}
        if self._check_producer is None:
            self._check_producer = make_producer(self.settings)
        self._check_producer.produce(topic, self.serde.encode("CollectionCheck", check, topic), dcid_key(state.dcid))

    # -- samples -------------------------------------------------------------------------
    def _sample_summary(self, message: Message) -> list[Output]:
        topic, partition = message.topic(), message.partition()
        try:
            summary = self.serde.decode(message.value(), topic, "CollectionSummary").value
        except SerdeError as exc:
            return [self._dead_letter(message, str(exc), type(exc).__name__)]
        key = message.key()
        if summary["sample_id"] is None or key != str(summary["sample_id"]).encode():
            # The samples table is keyed by sample (a compacted changelog refuses a record without a key).
            reason = (f"a summary on {topic} keyed {(key or b'')[:40]!r} is not keyed by its sample id "
                      f"({summary['sample_id']})")
            return [self._dead_letter(message, reason, "InvalidKey", dcid=summary["dcid"])]
        state = self.samples.get(partition, key) or sample_centring.empty_state()
        centre = sample_centring.record_grid_summary(state, summary, datetime.now(UTC))
        self.samples.put(partition, key, state)
        if centre is None:
            return []
        log.info("3D centre", extra={"sample_id": centre["sample_id"], "dcid": summary["dcid"],
                                     "x_mm": centre["x_mm"], "y_mm": centre["y_mm"], "z_mm": centre["z_mm"]})
        return [self._encoded("summaries", "SampleCentre", key, centre)]

    # -- outputs ---------------------------------------------------------------------------
    def _encoded(self, logical_topic: str, record_type: str, key: bytes, value: dict) -> Output:
        topic = self.topics[logical_topic]
        return (topic, key, self.serde.encode(record_type, value, topic))

    def _dead_letter(self, message: Message, reason: str, error_type: str, **context) -> Output:
        self.dead_lettered += 1
        metrics.dead_lettered(error_type)
        return self.dead_letters.output(message, reason, error_type, **context)
