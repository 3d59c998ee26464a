"""The Bluesky bridge: a Bluesky run's documents, as bluesky-kafka publishes them, become Beamstream's
CollectionStarted, one ImageArrived per image and CollectionEnded, exactly once.

**What it reads.** ``bluesky_kafka.Publisher`` (subscribed to a RunEngine) sends each document as one
message: the msgpack of ``(name, doc)``, numpy arrays as msgpack-numpy maps, every message keyed
with the publisher's one ``key`` string, on a topic the beamline names (NSLS-II's convention is
``<beamline>.bluesky.runengine.documents``). A run's documents therefore stay in order on one
partition, so the run in progress of each (topic, key) is the state (:func:`run_key`). A publisher
without a key scatters its documents over the partitions at random; give it a key, or give the
topic one partition. The bridge expects the document topics: they are the beamline's, made with its
retention and partitions (``beamstream topics apply`` does not create them), and a missing one is a
one-line error at start-up (:func:`topic_problem`).

**What it writes.** Each document goes through
:func:`beamstream.producers.bluesky_documents.translate`; the events it means are encoded as every
producer encodes them (:class:`beamstream.producers.events.EventEncoder`) and committed with the
document's offset and the run's new state in one transaction of the engine's
(:mod:`beamstream.engine.stage`, consumer group ``<prefix>bluesky-bridge``). The state is a
:class:`beamstream.engine.table.ChangelogTable` on ``<prefix>bluesky-bridge-changelog``, partition p
holding the runs of partition p of every document topic (so those topics share one partition count,
at most the changelog's); a stopped run's entry is deleted (a tombstone). A bridge killed mid-run and
started again (or another bridge taking its partitions) goes on from the last committed document:
every image is announced once.

**Bad input** goes to the dead-letter topic with its reason and the original message, committed with
its offset; the run's state is as before it, so the valid documents around it are still translated:
a message that is not a msgpack ``(name, doc)`` pair, a numpy object array (msgpack-numpy pickles
those, and unpickling a message would run its code), and whatever the translator refuses
(:class:`~beamstream.producers.bluesky_documents.DocumentError`: an event of a descriptor never seen,
an unknown detector, a file outside ``BEAMSTREAM_DATA_ROOTS`` ...).

**A run without its stop.** A RunEngine that dies mid-run never sends its stop (and a Publisher sends
what it holds only when flushed), so a ``start`` while its key's run is still open ends that run first:
a CollectionEnded ``aborted`` with the images announced so far, and a warning. The same start seen
again (a publisher's retry) changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections import Counter
from collections.abc import Sequence

import msgpack_numpy
import numpy as np
from confluent_kafka import KafkaException, Message

from beamstream.engine.dead_letters import DeadLetters
from beamstream.engine.stage import Processor, Stage
from beamstream.engine.table import ChangelogTable
from beamstream.engine.transactions import Output
from beamstream.errors import BeamstreamError
from beamstream.platform import metrics
from beamstream.platform.kafka_clients import connection_problem, make_admin
from beamstream.platform.settings import Settings
from beamstream.platform.topics import group_name, topic_name
from beamstream.producers.bluesky_documents import DocumentError, RunState, translate
from beamstream.producers.events import Event, EventEncoder
from beamstream.schemas.serde import make_serde

try:
    # Not msgpack.unpackb: msgpack-numpy's patch() (bluesky_kafka runs it on import) replaces that with one
    # that unpickles object arrays before any hook of ours sees them.
    from msgpack._cmsgpack import unpackb as _unpackb
except ImportError:  # msgpack without its C extension
    from msgpack.fallback import unpackb as _unpackb

log = logging.getLogger(__name__)

SERVICE = "bluesky-bridge"


class BridgeError(BeamstreamError):
    """The bridge cannot start: a document topic is missing, or the topics cannot share one table."""


class UndecodableDocument(DocumentError):
    """A message that is not a bluesky-kafka document (a msgpack ``(name, doc)`` pair)."""


# -- messages -----------------------------------------------------------------------------------
def decode_document(value: bytes | None) -> tuple[str, dict]:
    """The ``(name, doc)`` of a bluesky-kafka message, numpy arrays and scalars as plain lists and numbers.

    Raises :class:`UndecodableDocument` naming what is wrong: not msgpack, not a pair of a name and a
    mapping, or a numpy array msgpack-numpy would have to unpickle."""
    if not value:
        raise UndecodableDocument("an empty message, not a bluesky-kafka document")
    try:
        decoded = _unpackb(value, object_hook=_plain_numpy, strict_map_key=False)
    except UndecodableDocument:
        raise
    except Exception as exc:  # msgpack's errors, and numpy's for an array map whose parts do not fit
        raise UndecodableDocument(f"not a bluesky-kafka document (msgpack of (name, doc)): "
                                  f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(decoded, list | tuple) and len(decoded) == 2):
        raise UndecodableDocument(f"not a bluesky-kafka document: expected the msgpack of (name, doc), "
                                  f"got a {type(decoded).__name__}")
    name, doc = decoded
    if not isinstance(name, str) or not isinstance(doc, dict):
        raise UndecodableDocument(f"not a bluesky-kafka document: expected (name, doc) as (str, map), "
                                  f"got ({type(name).__name__}, {type(doc).__name__})")
    return name, doc


def _plain_numpy(obj: dict) -> object:
    """msgpack-numpy's maps as lists and Python numbers (so a run's state is plain JSON); its pickled
    object arrays refused."""
    if obj.get(b"nd") is True and obj.get(b"kind") == b"O":
        raise UndecodableDocument("a numpy object array (msgpack-numpy pickles those, and unpickling a "
                                  "message would run its code): publish plain arrays")
    decoded = msgpack_numpy.decode(obj)
    if isinstance(decoded, np.ndarray | np.generic):
        return decoded.tolist()
    return decoded


def run_key(topic: str, key: bytes | None) -> bytes:
    """The table key of the run in progress of one publisher: its topic and message key. Topic names
    hold no ``/``, so ``topic/key`` is unambiguous, and a publisher without a key is ``topic``."""
    return topic.encode() if key is None else topic.encode() + b"/" + key


def topic_problem(partitions: dict[str, int | None], changelog: str, changelog_partitions: int | None) -> str | None:
    """Why the document topics (name -> partitions, None: missing) cannot be bridged, or None.

    Partition p of every document topic shares table partition p, so each member of the group must get
    the same partition numbers of every topic: the range assignor does that for topics with one
    partition count. There must be a changelog partition for each."""
    missing = [topic for topic, count in partitions.items() if count is None]
    if missing:
        return (f"document topic {missing[0]} does not exist (or this Kafka user may not describe it): the "
                f"bridge reads the topics bluesky-kafka publishes to and does not create them; create it first "
                f"(as the beamline's Publisher expects it), e.g. kafka-topics.sh --create --topic {missing[0]} "
                "--partitions 1, and on a secured cluster let the bridge's user read and describe it")
    if changelog_partitions is None:
        return f"topic {changelog} does not exist: run `beamstream topics apply` first"
    counts = sorted({count for count in partitions.values() if count is not None})
    if len(counts) > 1:
        shown = ", ".join(f"{topic} {count}" for topic, count in partitions.items())
        return (f"the document topics have different partition counts ({shown}): one bridge needs one "
                "count (run a bridge per topic instead)")
    if counts and counts[0] > changelog_partitions:
        return (f"the document topics have {counts[0]} partitions, more than the {changelog_partitions} of "
                f"{changelog}: raise BEAMSTREAM_IMAGE_PARTITIONS and run `beamstream topics apply`")
    return None


# -- the processor ------------------------------------------------------------------------------
class BridgeProcessor(Processor):
    """What the bridge does with each document message: the events it means, the run's new state."""

    def __init__(self, settings: Settings, document_topics: Sequence[str]) -> None:
        self.settings = settings
        self.serde = make_serde(settings.schema_registry_url)
        self.encoder = EventEncoder(settings, self.serde)
        self.runs: ChangelogTable[RunState] = ChangelogTable(
            settings, topic_name(settings, "bluesky-bridge-changelog"), RunState.to_json, RunState.from_json,
            source_topics=document_topics)
        self.tables = (self.runs,)
        self.dead_letters = DeadLetters(self.serde, topic_name(settings, "deadletter"), f"{SERVICE}/{{topic}}")
        #: Since the start, committed: documents, events by record type, dead letters.
        self.stats: Counter[str] = Counter()
        self._batch: dict[str, Counter[str]] = {"documents": Counter(), "events": Counter(), "dead_letters": Counter()}

    def process(self, messages: list[Message]) -> list[Output]:
        """The events (or the dead letter) of each document message; never raises for bad input."""
        outputs: list[Output] = []
        for message in messages:
            outputs.extend(self._document(message))
        return outputs

    def committed(self) -> None:
        """The batch's events are out: count them."""
        batch = self._batch
        self.stats["documents"] += sum(batch["documents"].values())
        self.stats["dead_letters"] += sum(batch["dead_letters"].values())
        self.stats.update(batch["events"])
        metrics.bridge_committed(batch["documents"], batch["events"], batch["dead_letters"])
        self.aborted()

    def aborted(self) -> None:
        """The batch is processed again: its counts go with it."""
        for counts in self._batch.values():
            counts.clear()

    def _document(self, message: Message) -> list[Output]:
        """What one document message produces, and its run's new state put in the table."""
        partition, key = message.partition(), run_key(message.topic(), message.key())
        try:
            name, doc = decode_document(message.value())
        except UndecodableDocument as exc:
            return [self._dead_letter(message, str(exc), type(exc).__name__, None)]
        state = self.runs.get(partition, key)
        ended: list[Event] = []
        if name == "start" and state is not None:
            if doc.get("uid") == state.run_uid:
                self._batch["documents"]["start (again)"] += 1
                return []  # the same start again (a publisher's retry): the run goes on
            ended, state = self._abandon(state, doc.get("uid")), None
        try:
            new_state, events = translate(state, name, doc, data_roots=self.settings.data_roots)
            events = ended + events
            records = self.encoder.encode(events)
        except DocumentError as exc:
            return [self._dead_letter(message, str(exc), type(exc).__name__, state)]
        except Exception as exc:  # noqa: BLE001 - a document the translator trips over must not stop the beamline
            log.exception("translating a %s document failed", name)
            reason = f"a {name} document could not be translated: {type(exc).__name__}: {exc}"
            return [self._dead_letter(message, reason, type(exc).__name__, state)]
        if ended:
            log.warning("run ended without its stop document, as aborted", extra={
                "dcid": ended[0].dcid, "images": ended[0].value["images_collected"], "next_run": doc.get("uid")})
        if new_state is not None:
            self.runs.put(partition, key, new_state)
        elif state is not None:
            self.runs.delete(partition, key)  # the run stopped
        self._batch["documents"][name] += 1
        for event in events:
            self._batch["events"][event.record_type] += 1
            if event.record_type != "ImageArrived":
                _log_collection_event(event, message)
        return [(record.topic, record.key, record.value) for record in records]

    def _abandon(self, state: RunState, new_run: object) -> list[Event]:
        """The events that end ``state``'s run, whose stop never came, as aborted: a RunEngine that died
        mid-run (a publisher flushes only when asked) would otherwise leave its key's every later run refused."""
        stop = {"uid": f"{state.run_uid}/abandoned", "run_start": state.run_uid, "exit_status": "abort",
                "reason": f"no stop before the start of run {new_run}", "time": 0.0, "num_events": {}}
        try:
            return translate(state, "stop", stop)[1]
        except DocumentError:  # cannot happen for a state of its own run; the new run still starts
            return []

    def _dead_letter(self, message: Message, reason: str, error_type: str, state: RunState | None) -> Output:
        self._batch["dead_letters"][error_type] += 1
        dcid = getattr(state, "dcid", None)
        return self.dead_letters.output(message, reason, error_type, dcid=dcid if isinstance(dcid, int) else None)


def _log_collection_event(event: Event, message: Message) -> None:
    value = event.value
    log.info("collection %s", "started" if event.record_type == "CollectionStarted" else "ended", extra={
        "dcid": value["dcid"], "images": value.get("number_of_images", value.get("images_collected")),
        "experiment_type": value.get("experiment_type"), "status": value.get("status"),
        "source_topic": message.topic(), "source_offset": message.offset()})


# -- the service --------------------------------------------------------------------------------
class BlueskyBridge:
    """One bridge process: the document topics in, image and collection events out, exactly once."""

    def __init__(self, settings: Settings, document_topics: Sequence[str], *, group_id: str | None = None,
                 transactional_id: str | None = None) -> None:
        self.settings = settings
        self.document_topics = list(dict.fromkeys(document_topics))
        self.processor = BridgeProcessor(settings, self.document_topics)
        self.stage = Stage(
            settings, group_id or group_name(settings, SERVICE), self.document_topics, self.processor,
            name=SERVICE, transactional_id=transactional_id or self._stable_transactional_id(),
            # A dead bridge holds its partitions, and so the beamline's images, for the session timeout:
            # the workers' 10 s, not librdkafka's 45 s.
            consumer_config={"session.timeout.ms": 10_000, "heartbeat.interval.ms": 3_000})
        self.stop_event = self.stage.stop_requested

    def _stable_transactional_id(self) -> str:
        # Stable per host and topics: a restarted bridge fences its killed predecessor and aborts its open
        # transaction at once, instead of leaving read_committed readers of images waiting for its timeout.
        digest = hashlib.sha256("\n".join(sorted(self.document_topics)).encode()).hexdigest()[:8]
        return f"{self.settings.topic_prefix}{SERVICE}-{socket.gethostname()}-{digest}"

    @property
    def stats(self) -> dict[str, int]:
        """Documents, events by record type and dead letters committed since the start."""
        return dict(self.processor.stats)

    def check_topics(self, timeout_s: float = 10.0) -> None:
        """Raise :class:`BridgeError` unless every document topic exists and they can share the table."""
        admin = make_admin(self.settings)
        try:
            existing = admin.list_topics(timeout=timeout_s).topics
        except KafkaException as exc:
            raise BridgeError(f"cannot list the topics on Kafka at {self.settings.kafka_bootstrap}: "
                              f"{connection_problem(self.settings, exc)}") from None
        changelog = self.processor.runs.changelog_topic

        def partitions(topic: str) -> int | None:
            metadata = existing.get(topic)
            return None if metadata is None or metadata.error is not None else len(metadata.partitions)

        problem = topic_problem({topic: partitions(topic) for topic in self.document_topics}, changelog,
                                partitions(changelog))
        if problem is not None:
            raise BridgeError(problem)

    def run(self, idle_timeout_s: float | None = None) -> dict[str, int]:
        """Bridge until stopped (or idle for ``idle_timeout_s``); returns :attr:`stats`."""
        log.info("bluesky bridge started", extra={"topics": self.document_topics, "group": self.stage.group_id,
                                                  "data_roots": list(self.settings.data_roots)})
        try:
            self.stage.run(idle_timeout_s)
        finally:
            log.info("bluesky bridge stopped", extra=self.stats)
        return self.stats
