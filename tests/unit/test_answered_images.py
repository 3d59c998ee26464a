"""The analysis stage's answered-images table (beamstream.streams.answered_images), without a broker.

Covers the entry encoding (sorted images with the offset each was answered for, JSON round trip),
chunk keys, expiry of whole collections by their latest answer, and what :meth:`begin` decides:
a copy from another offset is skipped once its image is answered (pending, buffered or committed)
or while it is being analysed; the event a mark was made for is analysed again (a mark committed
before its result); a dead letter marks nothing; a replay is always analysed; an aborted batch and a
revoked partition forget their marks; expired collections are deleted with tombstones.
"""

from __future__ import annotations

import threading
import time
from array import array

import pytest

from beamstream.platform.settings import load_settings
from beamstream.streams.answered_images import (
    CHUNK_IMAGES,
    AnsweredChunk,
    AnsweredImages,
    ImageEvent,
    chunk_key,
    collection_of,
    expired,
)
from tests.helpers.fake_kafka import FakeMessage

CHANGELOG = "answered-changelog"


def chunk(pairs: dict[int, int], last: float = 0.0) -> AnsweredChunk:
    return AnsweredChunk.empty().with_answers(pairs, last)


@pytest.fixture
def table(tmp_path) -> AnsweredImages:
    table = AnsweredImages(load_settings(environ={}, home=tmp_path), CHANGELOG, "images", retention_s=100.0)
    for partition in (0, 1):  # what restoring empty changelog partitions leaves
        table._committed.setdefault(partition, {})
        table._offset.setdefault(partition, None)
    return table


def commit(table: AnsweredImages) -> list:
    """One whole transaction: flush (records delivered at offsets 0, 1, ...), then commit; returns the records."""
    records = table.flush()
    for offset, (topic, key, value, partition) in enumerate(records):
        table.delivered(None, FakeMessage(topic, partition, offset, key, value))
    table.commit()
    return records


def event(image: int, offset: int, partition: int = 0, dcid: int = 7, job: int | None = None) -> ImageEvent:
    return ImageEvent(partition, offset, dcid, job, image)


def answer(table: AnsweredImages, image_event: ImageEvent) -> None:
    assert table.begin(image_event)
    table.answered(image_event)


# -- entries --------------------------------------------------------------------------------------------
def test_a_chunk_keeps_images_sorted_with_the_offset_each_was_answered_for():
    made = chunk({30: 5, 10: 9, 20: 7}, last=4.0)
    assert list(made.images) == [10, 20, 30] and list(made.offsets) == [9, 7, 5]
    assert [made.offset_of(n) for n in (10, 20, 30, 15, 0, 99)] == [9, 7, 5, None, None, None]
    assert made.last_answered == 4.0 and len(made) == 3


def test_an_answer_makes_a_new_chunk_and_leaves_the_old_one_alone():
    before = chunk({1: 100}, last=5.0)
    after = before.with_answers({2: 101}, now=3.0).with_answers({1: 150}, now=6.0)
    assert list(before.images) == [1] and before.offset_of(1) == 100 and before.last_answered == 5.0
    assert after.offset_of(1) == 150 and after.offset_of(2) == 101
    assert after.last_answered == 6.0  # the latest answer, whatever the order


def test_a_chunk_goes_through_json_unchanged():
    made = chunk({-4: 1, 3: 2**40, 2**40: 3}, last=1712345678.25)
    back = AnsweredChunk.from_json(made.to_json())
    assert (back.images, back.offsets, back.last_answered) == (made.images, made.offsets, made.last_answered)
    assert AnsweredChunk.from_json(AnsweredChunk.empty().to_json()).images == array("q")


def test_an_entry_with_unequal_lists_is_refused():
    with pytest.raises(ValueError, match="unequal"):
        AnsweredChunk.from_json(b'{"i":[1,2],"o":[5],"t":0}')


def test_keys_name_the_collection_the_job_and_the_chunk():
    assert chunk_key(5, None, 0) == b"5:live:0"
    assert chunk_key(5, None, CHUNK_IMAGES - 1) == b"5:live:0"
    assert chunk_key(5, None, CHUNK_IMAGES) == b"5:live:1"
    assert chunk_key(5, 12, 3) == b"5:12:0"  # a reprocessing job: another collection here
    assert collection_of(chunk_key(5, 12, 5000)) == b"5:12"


def test_a_collection_expires_as_a_whole_by_its_latest_answer_on_each_partition():
    entries = [
        (0, b"1:live:0", chunk({1: 1}, last=10.0)), (0, b"1:live:1", chunk({1500: 2}, last=50.0)),  # recent
        (0, b"2:live:0", chunk({1: 3}, last=10.0)), (0, b"2:live:1", chunk({1500: 4}, last=20.0)),  # old
        (1, b"1:live:0", chunk({2: 5}, last=20.0)),  # the same collection's old entry on another partition
        (0, b"2:9:0", chunk({1: 6}, last=40.0)),  # a reprocessing job of dcid 2: its own collection
    ]
    assert sorted(expired(entries, cutoff=30.0)) == [(0, b"2:live:0"), (0, b"2:live:1"), (1, b"1:live:0")]
    assert expired(entries, cutoff=5.0) == []


# -- what begin decides -----------------------------------------------------------------------------------
def test_a_copy_from_another_offset_is_skipped_once_the_image_is_answered(table):
    answer(table, event(3, offset=10))
    assert not table.begin(event(3, offset=11))  # pending
    commit(table)
    assert not table.begin(event(3, offset=40))  # committed
    assert table.begin(event(4, offset=41))  # another image
    assert table.begin(event(3, offset=42, job=5))  # another processing job
    assert table.begin(event(3, offset=43, dcid=8))  # another collection


def test_the_event_a_mark_was_made_for_is_analysed_again(table):
    # With threads a finished event's mark can commit in a batch before its result; after a crash in between
    # the consumer goes back to that very event (same offset), which must be analysed.
    answer(table, event(3, offset=10))
    commit(table)
    assert table.begin(event(3, offset=10))


def test_a_copy_is_skipped_while_the_image_is_being_analysed(table):
    first = event(3, offset=10)
    assert table.begin(first)
    assert not table.begin(event(3, offset=12))
    assert table.begin(event(3, offset=10))  # the same event again (fetched again after an abort)
    table.release(first)
    table.release(first)
    assert table.begin(event(3, offset=12))  # the first got a dead letter: the copy is analysed


def test_a_dead_letter_marks_nothing_so_a_reinjected_image_is_analysed(table):
    failed = event(3, offset=10)
    assert table.begin(failed)
    table.release(failed)
    commit(table)
    assert table.begin(event(3, offset=90))  # the reinjected copy
    assert table.flush() == []  # nothing was marked


def test_a_replay_is_analysed_even_when_answered_and_moves_the_mark(table):
    answer(table, event(3, offset=10))
    commit(table)
    replayed = event(3, offset=50)
    assert table.begin(replayed, deliberate=True)
    table.answered(replayed)
    commit(table)
    assert table.get(0, chunk_key(7, None, 3)).offset_of(3) == 50
    assert not table.begin(event(3, offset=10))  # the original is now a copy of the replayed one


def test_racing_threads_analyse_one_copy_of_an_image(table):
    copies = [event(3, offset=offset) for offset in range(100, 132)]
    chosen: list[ImageEvent] = []
    start = threading.Barrier(len(copies))

    def run(copy: ImageEvent) -> None:
        start.wait()
        if table.begin(copy):
            chosen.append(copy)
            table.answered(copy)

    threads = [threading.Thread(target=run, args=(copy,)) for copy in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(chosen) == 1


# -- transactions, ownership, expiry ------------------------------------------------------------------------
def test_marks_reach_the_changelog_one_record_per_chunk_in_their_partition(table):
    for image_event in (event(1, 10), event(2, 11), event(CHUNK_IMAGES + 1, 12), event(5, 13, partition=1)):
        answer(table, image_event)
    records = commit(table)
    assert sorted((key, partition) for _, key, _, partition in records) == [
        (b"7:live:0", 0), (b"7:live:0", 1), (b"7:live:1", 0)]
    entry = next(AnsweredChunk.from_json(v) for _, k, v, p in records if (k, p) == (b"7:live:0", 0))
    assert dict(zip(entry.images, entry.offsets, strict=True)) == {1: 10, 2: 11}
    assert commit(table) == []  # nothing changed since


def test_an_aborted_batch_forgets_its_marks(table):
    answer(table, event(3, offset=10))  # harvested into the batch
    table.flush()
    answer(table, event(4, offset=11))  # finished after the flush
    table.abort()
    table.discard_pending()
    assert table.begin(event(3, offset=20)) and table.begin(event(4, offset=21))
    assert table.flush() == []


def test_a_revoked_partition_forgets_its_pending_marks_and_gets_no_records(table):
    answer(table, event(3, offset=10, partition=1))
    answer(table, event(4, offset=11, partition=0))
    table.drop([1])
    table.forget([1])
    assert [(key, partition) for _, key, _, partition in table.flush()] == [(b"7:live:0", 0)]
    answer(table, event(5, offset=12, partition=1))  # a thread finishing after the revocation
    assert table.flush() != [] and all(partition == 0 for *_, partition in table.flush())


def test_expired_collections_are_deleted_with_tombstones(table):
    answer(table, event(3, offset=10, dcid=1))
    answer(table, event(CHUNK_IMAGES + 3, offset=11, dcid=1))
    commit(table)
    answered_by = time.time()
    assert table.expire(now=answered_by + 50, sweep_interval_s=0) == 0  # within the retention (100 s)
    assert table.expire(now=answered_by + 150, sweep_interval_s=60) == 0  # not yet time for a sweep
    assert table.expire(now=answered_by + 150, sweep_interval_s=0) == 2  # both chunks of dcid 1
    assert table.begin(event(3, offset=13, dcid=1))  # deleted in the open transaction already
    answer(table, event(3, offset=14, dcid=2))  # a new collection in the same transaction
    records = commit(table)
    assert sorted((key, value is None) for _, key, value, _ in records) == [
        (b"1:live:0", True), (b"1:live:1", True), (b"2:live:0", False)]
    assert table.get(0, chunk_key(1, None, 3)) is None and len(table) == 1
    assert not table.begin(event(3, offset=15, dcid=2))
