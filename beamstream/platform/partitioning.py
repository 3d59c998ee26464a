"""Whether the dcid-keyed topics may get more partitions now: not while a collection is open.

A collection's start, end, results and table state sit on partitions chosen by its dcid key
modulo the partition count. Adding partitions while a collection is open sends its later
events to another partition than its earlier ones, and its table entry (on the old partition)
never sees them: the collection would be summarised wrong or never. Image events are keyed
``dcid:image`` and carry no per-collection state, so they may move at any time.
"""

from __future__ import annotations

from beamstream.platform.retained import read_topic
from beamstream.platform.settings import Settings
from beamstream.platform.topics import topic_name
from beamstream.schemas.serde import SerdeError, make_serde

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
