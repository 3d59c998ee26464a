"""Every topic Beamstream uses, declared in code and applied idempotently.

``apply_topics`` creates what is missing, adds partitions where a topic has too
few (not while a collection is open: see "growing partitions" below), and sets
configs that differ; it never deletes data or shrinks anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from beamstream.errors import BeamstreamError
from beamstream.platform.kafka_clients import connection_problem, make_admin
from beamstream.platform.retained import read_topic
from beamstream.platform.settings import Settings
from beamstream.schemas.serde import SerdeError, make_serde

DAY_MS = 24 * 3600 * 1000


class TopicError(BeamstreamError):
    """Topics could not be listed, created or altered."""


@dataclass(frozen=True)
class TopicSpec:
    """A declared topic: its logical name, record types, partitions and configs."""

    logical_name: str
    record_types: tuple[str, ...]
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def name(self, settings: Settings) -> str:
        """The topic's name on the cluster (with the deployment's prefix)."""
        return f"{settings.topic_prefix}{self.logical_name}"


def declared_topics(settings: Settings) -> list[TopicSpec]:
    """The topics of a deployment. Keyed-by-dcid topics share the image partition count,
    so a collection's events, results and summary land on partitions with the same index."""
    n = settings.image_partitions
    retained = {"cleanup.policy": "delete", "retention.ms": str(14 * DAY_MS)}
    return [
        TopicSpec("images", ("ImageArrived",), n, retained,
                  "One event per image, keyed dcid:image (spread over every partition): the analysis queue."),
        TopicSpec("collections", ("CollectionStarted", "CollectionEnded", "CollectionCheck"), n,
                  {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
                  "Collection started/ended events, keyed by dcid."),
        TopicSpec("results", ("ImageResult",), n, retained,
                  "Per-image analysis results, keyed by dcid: beamline feedback and ISPyB sink input."),
        TopicSpec("announce", ("CollectionProgress",), n,
                  {"cleanup.policy": "delete", "retention.ms": str(2 * DAY_MS)},
                  "Progress announcements while a collection is analysed."),
        TopicSpec("summaries", ("CollectionSummary", "SampleCentre"), n,
                  {"cleanup.policy": "delete", "retention.ms": str(90 * DAY_MS)},
                  "One summary per collection: X-ray centre or data-reduction trigger."),
        TopicSpec("requests", ("ProcessingRequest",), n,
                  {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
                  "Reprocessing, replay and data-reduction requests."),
        TopicSpec("deadletter", ("DeadLetter",), 3,
                  {"cleanup.policy": "delete", "retention.ms": str(90 * DAY_MS)},
                  "Messages no consumer could process, with the reason; inspect and reinject."),
        # `beamstream dlq reinject` writes a marker here in the transaction that reinjects, so a
        # dead letter is reinjected at most once whoever runs the tool, wherever.
        TopicSpec("deadletter-resolved", ("DeadLetterResolved",), 1,
                  {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                  "Which dead letters were reinjected, and as what (compacted, keyed by partition:offset)."),
        TopicSpec("archive", ("ArchiveComplete",), n,
                  {"cleanup.policy": "delete", "retention.ms": str(90 * DAY_MS)},
                  "One archive-complete event per collection (and reprocessing job): manifest written."),
        # The collect stage's collections table (beamstream.streams.collect_stage): declared here
        # so it exists, compacted and co-partitioned, before any worker starts.
        TopicSpec("workers-collections-changelog", (), n,
                  {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                  "Changelog of the per-collection table (JSON state per collection); compacted."),
        TopicSpec("samples", ("CollectionSummary",), n,
                  {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
                  "Grid-scan summaries re-keyed by sample id, for the 3D centre of orthogonal scans."),
        TopicSpec("workers-samples-changelog", (), n,
                  {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                  "Changelog of the per-sample table (orthogonal grid centres); compacted."),
        # The analysis stage's answered-images table (beamstream.streams.answered_images), co-partitioned
        # with images: an image event published twice is answered once.
        TopicSpec("workers-answered-changelog", (), n,
                  {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                  "Changelog of the images answered per images partition and collection (JSON); compacted, "
                  "collections expire after the workers' retention (tombstones)."),
        # The Bluesky bridge's runs in progress (beamstream.connectors.bluesky_bridge). Its inputs are
        # bluesky-kafka's document topics, not ours: a document topic may have at most this many partitions.
        TopicSpec("bluesky-bridge-changelog", (), n,
                  {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                  "Changelog of the Bluesky bridge's run in progress per document topic and publisher key "
                  "(JSON); compacted, a tombstone when the run stops."),
        TopicSpec("monitor", ("MonitorEvent",), 1,
                  {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
                  "The process monitor's observations, scaling decisions and warnings."),
        TopicSpec("heartbeats", ("ServiceHeartbeat",), 1,
                  {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
                  "Latest heartbeat per service (compacted)."),
        # No Avro record type: log lines are for people and log tools (Loki, Elasticsearch, kcat), which
        # read JSON; only services with BEAMSTREAM_LOG_TOPIC set write here.
        TopicSpec("logs", (), 3,
                  {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
                  "Services' log lines when BEAMSTREAM_LOG_TOPIC is set: JSON lines (UTF-8), not Avro, one "
                  "per record, keyed by service; kept 7 days."),
    ]


def topic_name(settings: Settings, logical_name: str) -> str:
    """The cluster name of a declared topic, e.g. ``topic_name(s, "images")``."""
    for spec in declared_topics(settings):
        if spec.logical_name == logical_name:
            return spec.name(settings)
    raise TopicError(f"no declared topic {logical_name!r}")


def group_name(settings: Settings, logical_name: str) -> str:
    """The cluster name of a consumer group, e.g. ``group_name(s, "analysis")``: the workers'
    analysis stage, which consumes images (its lag is the work waiting)."""
    return f"{settings.topic_prefix}{logical_name}"


@dataclass
class TopicChange:
    """One thing ``apply_topics`` did (or would do)."""

    topic: str
    action: str  # created, partitions, replication (wanted, not done), config, unchanged
    detail: str = ""


def apply_topics(settings: Settings, timeout: float = 30.0) -> list[TopicChange]:
    """Make the cluster's topics match the declarations; returns what changed."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        NewPartitions,
        NewTopic,
    )

    admin = make_admin(settings)
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        problem = connection_problem(settings, exc)
        raise TopicError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {problem}") from None
    changes: list[TopicChange] = []
    specs = declared_topics(settings)

    to_create = [s for s in specs if s.name(settings) not in existing]
    if to_create:
        # -1 asks the cluster for its default.replication.factor (Kafka >= 2.4).
        futures = admin.create_topics(
            [NewTopic(s.name(settings), s.partitions, settings.replication_factor or -1,
                      config={**s.configs, **replication_configs(settings, settings.replication_factor)})
             for s in to_create],
            operation_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result()
                changes.append(TopicChange(name, "created"))
            except KafkaException as exc:
                if exc.args[0].code() != exc.args[0].TOPIC_ALREADY_EXISTS:
                    raise TopicError(f"creating topic {name} failed: {exc.args[0].str()}") from None
        # The controller has the new topics once create_topics answers; each broker learns of them on its
        # own time. Wait until the metadata lists them: whoever applied them uses them next. Topics refused
        # as already there were created since the listing (or its broker had not learnt of them yet): they
        # are checked (partitions, configs) like the others.
        existing = wait_until_listed(admin, {s.name(settings) for s in to_create}, timeout)

    created = {change.topic for change in changes}
    existing = {name: topic for name, topic in existing.items() if name not in created}
    growing = {s.name(settings): (len(existing[s.name(settings)].partitions), s.partitions) for s in specs
               if s.name(settings) in existing and len(existing[s.name(settings)].partitions) < s.partitions}
    if growing:
        refusal = partition_change_refusal(settings, growing)
        if refusal is not None:
            raise TopicError(refusal)
    for spec in specs:
        name = spec.name(settings)
        if name not in existing:
            continue
        have = len(existing[name].partitions)
        if have < spec.partitions:
            future = admin.create_partitions([NewPartitions(name, spec.partitions)])[name]
            try:
                future.result()
            except KafkaException as exc:
                raise TopicError(f"adding partitions to {name} failed: {exc.args[0].str()}") from None
            changes.append(TopicChange(name, "partitions", f"{have} -> {spec.partitions}"))
        replicas = min(len(p.replicas) for p in existing[name].partitions.values())
        if settings.replication_factor > replicas:
            changes.append(TopicChange(name, "replication", f"{replicas} replica(s), {settings.replication_factor} "
                                       "wanted: not changed (that takes a partition reassignment)"))
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        current = admin.describe_configs([resource])[resource].result()
        # min.insync.replicas from the replicas the topic has, not the ones wanted: above them, no write succeeds.
        wanted = {**spec.configs,
                  **replication_configs(settings, min(settings.replication_factor, replicas))}
        differing = {k: v for k, v in wanted.items() if k not in current or current[k].value != v}
        if differing:
            resource = ConfigResource(
                ConfigResource.Type.TOPIC, name,
                incremental_configs=[ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                                     for k, v in differing.items()],
            )
            try:
                admin.incremental_alter_configs([resource])[resource].result()
            except KafkaException as exc:
                raise TopicError(f"altering configs of {name} failed: {exc.args[0].str()}") from None
            changes.append(TopicChange(name, "config", ", ".join(f"{k}={v}" for k, v in differing.items())))
        elif have >= spec.partitions and settings.replication_factor <= replicas:
            changes.append(TopicChange(name, "unchanged"))
    return changes


def wait_until_listed(admin, names: set[str], timeout: float) -> dict:
    """The cluster's topics (name -> metadata), asked of ``admin`` again until the answer has ``names``:
    each broker learns of a new topic on its own time. :class:`TopicError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        existing = admin.list_topics(timeout=timeout).topics
        if names <= set(existing):
            return existing
        if time.monotonic() > deadline:
            raise TopicError(f"topics {', '.join(sorted(names - set(existing)))} exist but the cluster's metadata "
                             f"did not list them within {timeout:.0f} s")
        time.sleep(0.2)


def replication_configs(settings: Settings, replicas: int) -> dict[str, str]:
    """Topic configs for ``replicas`` replicas: ``min.insync.replicas`` min(2, replicas), so that with
    ``acks=all`` a write is on two brokers before it counts, yet a single replica can still be written.
    None when ``replication_factor`` is 0: the cluster's own defaults hold."""
    if not settings.replication_factor:
        return {}
    return {"min.insync.replicas": str(min(2, replicas))}


def list_topics(settings: Settings, timeout: float = 30.0) -> list[dict]:
    """Declared topics with their state on the cluster (partitions, present or not)."""
    from confluent_kafka import KafkaException

    try:
        existing = make_admin(settings).list_topics(timeout=timeout).topics
    except KafkaException as exc:
        problem = connection_problem(settings, exc)
        raise TopicError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {problem}") from None
    rows = []
    for spec in declared_topics(settings):
        name = spec.name(settings)
        rows.append({
            "topic": name,
            "declared_partitions": spec.partitions,
            "partitions": len(existing[name].partitions) if name in existing else None,
            "record_types": list(spec.record_types),
            "configs": spec.configs,
            "description": spec.description,
        })
    return rows


def resolve_topic(settings: Settings, name: str) -> str:
    """The cluster name of a declared topic given its logical name (``images``) or full name."""
    specs = declared_topics(settings)
    for spec in specs:
        if name in (spec.logical_name, spec.name(settings)):
            return spec.name(settings)
    known = ", ".join(s.logical_name for s in specs)
    raise TopicError(f"no declared topic {name!r} (known: {known})")


# -- growing partitions ---------------------------------------------------------------------
# Not while a collection is open. A collection's start, end, results and table state sit on
# partitions chosen by its dcid key modulo the partition count. Adding partitions while a
# collection is open sends its later events to another partition than its earlier ones, and its
# table entry (on the old partition) never sees them: the collection would be summarised wrong or
# never. Image events are keyed ``dcid:image`` and carry no per-collection state, so they may move.

CollectionKey = tuple[int, int | None]  # (dcid, processing job)


def open_collections(settings: Settings) -> list[CollectionKey]:
    """Collections started (within the collections topic's retention) that have no summary yet."""
    serde = make_serde(settings.schema_registry_url)
    started: set[CollectionKey] = set()
    for record in read_topic(settings, topic_name(settings, "collections")):
        try:
            decoded = serde.decode(record.value, record.topic, "CollectionStarted")
        except SerdeError:
            continue  # ends, checks, junk
        started.add((decoded.value["dcid"], decoded.value.get("processing_job_id")))
    if not started:
        return []
    for record in read_topic(settings, topic_name(settings, "summaries")):
        try:
            summary = serde.decode(record.value, record.topic, "CollectionSummary").value
        except SerdeError:
            continue  # SampleCentres, junk
        started.discard((summary["dcid"], summary.get("processing_job_id")))
    return sorted(started, key=lambda key: (key[0], key[1] if key[1] is not None else -1))


def partition_change_refusal(settings: Settings, growing: dict[str, tuple[int, int]]) -> str | None:
    """Why the dcid-keyed topics in ``growing`` (name -> (now, wanted) partitions) must not grow now, or None."""
    keyed_by_dcid = {name: change for name, change in growing.items() if name != topic_name(settings, "images")}
    if not keyed_by_dcid:
        return None
    still_open = open_collections(settings)
    if not still_open:
        return None
    now, wanted = next(iter(keyed_by_dcid.values()))
    named = ", ".join(str(dcid) if job is None else f"{dcid} (job {job})" for dcid, job in still_open[:5])
    more = f" and {len(still_open) - 5} more" if len(still_open) > 5 else ""
    return (f"refusing to grow the dcid-keyed topics from {now} to {wanted} partitions: {len(still_open)} "
            f"collection(s) still open (dcid {named}{more}) would have their events split over two partitions; "
            "start no new collections, wait until these are summarised, then run `beamstream topics apply` again")
