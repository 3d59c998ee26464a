"""Which images the analysis stage has answered, so an image event published twice gets one result.

Producers publish at least once (a spooled batch committed just before a crash is published
again after the restart), so the same ImageArrived (dcid, image number, processing job) can
come twice, far apart, and to another worker. Both copies have the same key (``dcid:image``),
so they land on the same images partition, and this table is partitioned like the images topic:
partition p holds, per collection and job, the images answered with a result from partition p.
Its changelog (``workers-answered-changelog``) commits in the same transaction as the results,
and the engine restores it with the partition, so a new owner knows what the last one answered.

**What an entry holds.** Each answered image is stored with the offset of the event it was
answered for. The stage commits the marks of every finished event, and with ``--threads`` an
event can finish before the batch that holds its result; a mark can then be committed before its
result (a crash in between). The offset tells these apart: the event a mark was made for comes
back at the *same* offset (the consumer rewinds to it) and is analysed again; a copy of it has
another offset and is skipped. Images of one collection are hashed over every partition, so a
partition holds a sparse subset of the image numbers and ranges would not shorten it: entries
are chunks of :data:`CHUNK_IMAGES` image numbers (key ``<dcid>:<job|live>:<chunk>``), each a
sorted array of image numbers and one of offsets, so one transaction rewrites only the chunks
it touched (about a kilobyte each) and a large collection costs about 16 bytes per image.

**What is a copy.** An event whose image (same dcid and processing job) was answered with a
result from another offset, or is being analysed on another thread right now. Skipped: no
result, no dead letter, counted (``beamstream_worker_duplicate_images``) and logged.

* ``beamstream replay`` (the ``beamstream-replayed`` header) asks for the analysis again on
  purpose: replayed events are always analysed (a second result, which the ISPyB sink upserts
  and the collect stage does not count twice).
* ``dlq reinject``: a dead letter is not an answer, so a reinjected image is analysed, unless
  a copy of its event got a result meanwhile (then the reinjected one is the copy).
* ``beamstream go`` has a new processing job id: another collection here.

**Expiry.** A collection's entries on a partition are deleted (tombstones) once no image of it
has been answered there for ``retention_s`` (default 3 days); a copy arriving later than that is
analysed again. Deletions commit with the stage's next batch.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from beamstream.engine.table import ChangelogTable
from beamstream.engine.transactions import Output
from beamstream.platform.settings import Settings
from beamstream.streams.collection_state import state_key

log = logging.getLogger(__name__)

#: Image numbers per table entry: about CHUNK_IMAGES / partitions images in each (a kilobyte of JSON).
CHUNK_IMAGES = 1024
#: How long a collection's answers are kept after its last one on a partition.
DEFAULT_RETENTION_S = 3 * 24 * 3600.0


@dataclass(frozen=True)
class AnsweredChunk:
    """The images of one chunk answered from one partition: ``images`` ascending, ``offsets[i]`` the offset
    of the event ``images[i]`` was answered for, ``last_answered`` the (epoch) time of the latest answer.
    Never changed once made (the table hands it out without copying): :meth:`with_answers` makes a new one."""

    images: array
    offsets: array
    last_answered: float

    @classmethod
    def empty(cls) -> AnsweredChunk:
        return cls(array("q"), array("q"), 0.0)

    def offset_of(self, image: int) -> int | None:
        """The offset of the event ``image`` was answered for, or None if it was not."""
        index = bisect.bisect_left(self.images, image)
        return self.offsets[index] if index < len(self.images) and self.images[index] == image else None

    def with_answers(self, answers: dict[int, int], now: float) -> AnsweredChunk:
        """This chunk with each image of ``answers`` answered for the event at its offset, at time ``now``."""
        merged = dict(zip(self.images, self.offsets, strict=True))
        merged.update(answers)
        images = sorted(merged)
        return AnsweredChunk(array("q", images), array("q", [merged[n] for n in images]),
                             max(self.last_answered, now))

    def __len__(self) -> int:
        return len(self.images)

    def to_json(self) -> bytes:
        """Compact JSON (what the changelog carries)."""
        return json.dumps({"i": self.images.tolist(), "o": self.offsets.tolist(), "t": self.last_answered},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AnsweredChunk:
        record = json.loads(data)
        images, offsets = array("q", record["i"]), array("q", record["o"])
        if len(images) != len(offsets):
            raise ValueError("an answered-images entry with unequal image and offset lists")
        return cls(images, offsets, float(record["t"]))


def chunk_key(dcid: int, processing_job_id: int | None, image: int) -> bytes:
    """The table key of ``image``'s chunk: ``<dcid>:<job|live>:<chunk>``."""
    return f"{state_key(dcid, processing_job_id)}:{image // CHUNK_IMAGES}".encode()


def collection_of(key: bytes) -> bytes:
    """The collection part (``<dcid>:<job|live>``) of a chunk key."""
    return key.rsplit(b":", 1)[0]


def expired(entries: Iterable[tuple[int, bytes, AnsweredChunk]], cutoff: float) -> list[tuple[int, bytes]]:
    """(partition, key) of every chunk whose collection has had no answer on its partition since ``cutoff``.

    A collection expires as a whole, by its latest answer: an early chunk of a long collection stays
    while later images are still being answered."""
    latest: dict[tuple[int, bytes], float] = {}
    keys: dict[tuple[int, bytes], list[bytes]] = {}
    for partition, key, chunk in entries:
        collection = (partition, collection_of(key))
        latest[collection] = max(latest.get(collection, 0.0), chunk.last_answered)
        keys.setdefault(collection, []).append(key)
    return [(partition, key) for (partition, collection), when in latest.items() if when < cutoff
            for key in keys[(partition, collection)]]


class ImageEvent:
    """Where an image event came from (``partition``, ``offset``) and what it names (``dcid``, ``processing_job_id``,
    ``image_number``); ``ident`` is what its copies share: (partition, chunk key, image number)."""

    __slots__ = ("partition", "offset", "dcid", "processing_job_id", "image_number", "ident")

    def __init__(self, partition: int, offset: int, dcid: int, processing_job_id: int | None,
                 image_number: int) -> None:
        self.partition, self.offset, self.dcid = partition, offset, dcid
        self.processing_job_id, self.image_number = processing_job_id, image_number
        self.ident = (partition, chunk_key(dcid, processing_job_id, image_number), image_number)


class AnsweredImages(ChangelogTable[AnsweredChunk]):
    """The answered-images table of the analysis stage (partitions follow ``images_topic``).

    :meth:`begin` (before analysing) says whether an event is to be analysed or is a copy; :meth:`answered`
    or :meth:`release` (after) ends it. Both run on the stage's threads; the marks they make wait in a
    pending set until :meth:`flush`, on the stage's own thread, puts them into the open transaction, so
    the table's write buffer is only ever written by that thread."""

    def __init__(self, settings: Settings, changelog_topic: str, images_topic: str,
                 retention_s: float = DEFAULT_RETENTION_S) -> None:
        super().__init__(settings, changelog_topic, AnsweredChunk.to_json, AnsweredChunk.from_json,
                         source_topics=(images_topic,), copy_value=lambda chunk: chunk)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, bytes, int], tuple[int, float]] = {}  # (partition, key, image) -> offset, time
        self._claims: dict[tuple[int, bytes, int], list[int]] = {}  # the same -> offsets being analysed
        self._last_sweep = time.monotonic()

    # -- one event (any thread) ------------------------------------------------------
    def begin(self, event: ImageEvent, deliberate: bool = False) -> bool:
        """True: analyse ``event`` (it is claimed until :meth:`answered` or :meth:`release`). False: it is a
        copy of an event already answered, or being analysed, from another offset. ``deliberate`` (a replay)
        is always analysed."""
        ident = event.ident
        with self._lock:
            if not deliberate:
                answered_at = self._answered_offset(ident)
                if answered_at is not None and answered_at != event.offset:
                    return False
                if any(offset != event.offset for offset in self._claims.get(ident, ())):
                    return False
            self._claims.setdefault(ident, []).append(event.offset)
            return True

    def answered(self, event: ImageEvent) -> None:
        """``event`` got its result: mark its image answered (committed with the next batch), end the claim."""
        now = time.time()
        with self._lock:
            self._pending[event.ident] = (event.offset, now)
            self._end_claim(event.ident, event.offset)

    def release(self, event: ImageEvent) -> None:
        """``event`` got no result (a dead letter): end its claim, mark nothing."""
        with self._lock:
            self._end_claim(event.ident, event.offset)

    def _end_claim(self, ident: tuple[int, bytes, int], offset: int) -> None:
        claims = self._claims.get(ident)
        if claims is not None:
            claims.remove(offset)
            if not claims:
                del self._claims[ident]

    def _answered_offset(self, ident: tuple[int, bytes, int]) -> int | None:
        pending = self._pending.get(ident)
        if pending is not None:
            return pending[0]
        partition, key, image = ident
        chunk = self.get(partition, key)
        return None if chunk is None else chunk.offset_of(image)

    # -- the stage's thread ---------------------------------------------------------------
    def flush(self) -> list[Output]:
        """Put the pending marks of the partitions still held into the open transaction, then its records."""
        with self._lock:  # a reader sees a mark pending or in the table, never in neither
            held = set(self.partitions)
            by_chunk: dict[tuple[int, bytes], tuple[dict[int, int], list[float]]] = {}
            for (partition, key, image), (offset, when) in self._pending.items():
                if partition in held:
                    answers, times = by_chunk.setdefault((partition, key), ({}, []))
                    answers[image] = offset
                    times.append(when)
            for (partition, key), (answers, times) in by_chunk.items():
                chunk = self.get(partition, key) or AnsweredChunk.empty()
                self.put(partition, key, chunk.with_answers(answers, max(times)))
            self._pending.clear()
        return super().flush()

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions were revoked: their pending marks are the next owner's business (it analyses their events)."""
        gone = set(partitions)
        with self._lock:
            self._pending = {ident: mark for ident, mark in self._pending.items() if ident[0] not in gone}

    def discard_pending(self) -> None:
        """The batch was aborted: its events are analysed again, and marked again then."""
        with self._lock:
            self._pending.clear()

    def expire(self, now: float, sweep_interval_s: float = 60.0) -> int:
        """At most every ``sweep_interval_s``: delete the entries of collections answered last before
        ``now - retention_s`` (in the open transaction); returns the entries deleted."""
        if time.monotonic() - self._last_sweep < sweep_interval_s:
            return 0
        self._last_sweep = time.monotonic()
        old = expired(self.select(lambda _chunk: True), now - self.retention_s)
        for partition, key in old:
            self.delete(partition, key)
        if old:
            log.info("answered images expired", extra={
                "collections": len({(p, collection_of(k)) for p, k in old}), "entries": len(old),
                "retention_s": self.retention_s})
        return len(old)
