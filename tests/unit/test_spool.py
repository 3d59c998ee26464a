"""The producers' spool on a real file system: framing, torn records, acknowledgements, segments, the lock."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from beamstream.producers.spool import (
    ACK_FILE,
    Spool,
    SpoolBusy,
    SpooledRecord,
    SpoolError,
    check_name,
    inspect_spool,
    list_spools,
    segment_files,
)


def batch(n: int, size: int = 1) -> list[SpooledRecord]:
    """``size`` records of batch ``n``, with the odd shapes a record can have (no key, headers, empty value)."""
    return [SpooledRecord("t.images", f"{n}:{i}".encode(), bytes([n % 256]) * (10 + i),
                          [("source", b"test"), ("empty", None)]) for i in range(size - 1)] + \
        [SpooledRecord("t.collections", None, b"", [])]


def drain(spool: Spool) -> list[int]:
    """Acknowledge everything; the sequence numbers in the order they came."""
    seen = []
    while (head := spool.head()) is not None:
        seen.append(head.seq)
        spool.ack(head.seq)
    return seen


def test_batches_come_back_in_order_until_acknowledged(tmp_path):
    with Spool(tmp_path / "s") as spool:
        assert spool.head() is None and spool.backlog().batches == 0
        assert [spool.append(batch(n, 3)) for n in (1, 2, 3)] == [1, 2, 3]
        backlog = spool.backlog()
        assert (backlog.batches, backlog.events, backlog.holder_pid) == (3, 9, os.getpid())
        head = spool.head()
        assert head.seq == 1 and head.records == batch(1, 3)
        assert spool.head() is head  # the same batch until acknowledged
        with pytest.raises(ValueError, match="not one of the oldest"):
            spool.ack(2)
        spool.ack(1)
        assert spool.head().records == batch(2, 3)
        assert drain(spool) == [2, 3]
        assert spool.backlog().events == 0


def test_several_batches_are_read_ahead_and_acknowledged_together(tmp_path):
    with Spool(tmp_path / "s", segment_bytes=200) as spool:  # several segments
        for n in range(1, 8):
            spool.append(batch(n, 3))
        assert [b.seq for b in spool.peek(7)] == [1, 2, 3]  # whole batches up to 7 events (and one more)
        assert [b.seq for b in spool.peek(1)] == [1, 2, 3]  # what is read ahead stays until acknowledged
        spool.ack(2)
        assert spool.backlog().batches == 5 and spool.head().seq == 3
        assert [b.seq for b in spool.peek(100)] == [3, 4, 5, 6, 7]
        spool.append(batch(8))
        assert [b.seq for b in spool.peek(100)] == [3, 4, 5, 6, 7, 8]
        spool.ack(8)
        assert spool.peek(100) == [] and spool.backlog().events == 0
        assert len(segment_files(tmp_path / "s")) <= 1


def test_what_is_not_acknowledged_survives_a_restart_and_numbers_carry_on(tmp_path):
    directory = tmp_path / "s"
    with Spool(directory) as spool:
        for n in range(1, 5):
            spool.append(batch(n, 2))
        spool.head()
        spool.ack(1)
    assert (directory / ACK_FILE).read_text() == "1\n"
    with Spool(directory) as spool:
        assert spool.backlog().batches == 3
        assert spool.head().seq == 2 and spool.head().records == batch(2, 2)
        assert spool.append(batch(9)) == 5
        assert drain(spool) == [2, 3, 4, 5]
    with Spool(directory) as spool:
        assert spool.head() is None and spool.append(batch(1)) == 6  # never a number twice
    assert segment_files(directory) != []  # a batch is pending: its segment stays


@pytest.mark.parametrize("damage", ["cut in the payload", "cut in the header", "checksum", "garbage"])
def test_a_torn_last_record_is_dropped_with_a_warning(tmp_path, caplog, damage):
    directory = tmp_path / "s"
    with Spool(directory) as spool:
        for n in (1, 2, 3):
            spool.append(batch(n, 4))
    segment = segment_files(directory)[-1]
    data = segment.read_bytes()
    with Spool(directory) as spool:  # where the third record starts
        spool.head()
        spool.ack(1)
        spool.head()
        spool.ack(2)
        third = spool._cursor[1]
    # Put batch 1 and 2 back as unacknowledged, and damage batch 3 as a crash mid-write would.
    (directory / ACK_FILE).write_text("0\n")
    damaged = {"cut in the payload": data[:third + 20], "cut in the header": data[:third + 5],
               "checksum": data[:-1] + bytes([data[-1] ^ 0xFF]), "garbage": data[:third] + b"\0" * 7}[damage]
    segment.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="beamstream.producers.spool"):
        spool = Spool(directory)
    try:
        assert "dropped" in caplog.text and segment.name in caplog.text
        assert segment.stat().st_size == third  # truncated where the torn record began
        assert spool.backlog().batches == 2
        assert spool.append(batch(7)) == 3  # the torn batch's number: its publish() never returned
        assert [b.records for b in _all(spool)] == [batch(1, 4), batch(2, 4), batch(7)]
    finally:
        spool.close()


def _all(spool: Spool) -> list:
    batches = []
    while (head := spool.head()) is not None:
        batches.append(head)
        spool.ack(head.seq)
    return batches


def test_a_garbled_acknowledgement_publishes_everything_again_rather_than_lose_it(tmp_path, caplog):
    directory = tmp_path / "s"
    with Spool(directory) as spool:
        for n in (1, 2):
            spool.append(batch(n))
        spool.head()
        spool.ack(1)
    (directory / ACK_FILE).write_text("1x\n")
    with caplog.at_level(logging.WARNING), Spool(directory) as spool:
        assert "published again" in caplog.text
        assert drain(spool) == [1, 2]


def test_acknowledged_segments_are_deleted(tmp_path):
    directory = tmp_path / "s"
    with Spool(directory, segment_bytes=1) as spool:  # every batch starts a segment
        for n in (1, 2, 3):
            spool.append(batch(n))
        assert [int(p.stem) for p in segment_files(directory)] == [1, 2, 3]
        spool.head()
        spool.ack(1)
        assert [int(p.stem) for p in segment_files(directory)] == [2, 3]
        assert drain(spool) == [2, 3]
        assert segment_files(directory) == []
        assert spool.append(batch(4)) == 4  # a new segment for the next batch
        assert [int(p.stem) for p in segment_files(directory)] == [4]
    assert [int(p.stem) for p in segment_files(directory)] == [4]  # pending: kept


def test_a_drained_spool_leaves_no_segment_behind(tmp_path):
    directory = tmp_path / "s"
    with Spool(directory) as spool:  # large segments: one file for everything
        for n in range(1, 6):
            spool.append(batch(n))
        assert len(segment_files(directory)) == 1
        drain(spool)
        assert len(segment_files(directory)) == 1  # still the one appended to
    assert segment_files(directory) == []
    assert sorted(p.name for p in directory.iterdir()) == [ACK_FILE, "lock"]


def test_one_holder_at_a_time(tmp_path):
    directory = tmp_path / "s"
    holder = Spool(directory, name="gda")
    try:
        with pytest.raises(SpoolBusy, match=f"spool gda .* is in use by process {os.getpid()}"):
            Spool(directory, name="gda")
    finally:
        holder.close()
    with pytest.raises(SpoolError, match="closed"):
        holder.append(batch(1))
    Spool(directory).close()  # free again


def test_another_process_is_refused_with_the_holders_pid(tmp_path):
    directory = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys
        from beamstream.producers.spool import Spool, SpooledRecord
        spool = Spool({str(directory)!r})
        spool.append([SpooledRecord("t", b"k", b"v", [])])
        print("holding", flush=True)
        sys.stdin.readline()
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "holding"
        with pytest.raises(SpoolBusy, match=f"in use by process {other.pid}"):
            Spool(directory)
        seen = inspect_spool(directory)  # looking needs no lock
        assert (seen.batches, seen.events, seen.holder_pid) == (1, 1, other.pid)
    finally:
        other.stdin.close()
        other.wait(30)
    with Spool(directory) as spool:  # the holder is gone: its batch is ours to publish
        assert spool.head().records == [SpooledRecord("t", b"k", b"v", [])]
    assert inspect_spool(directory).holder_pid is None


def test_spools_are_listed_by_name_without_being_taken(tmp_path):
    root = tmp_path / "spool"
    assert list_spools(root) == []
    with Spool(root / "watch-7") as first, Spool(root / "simulate") as second:
        first.append(batch(1, 3))
        first.append(batch(2, 2))
        second.append(batch(1))
        second.head()
        second.ack(1)
        listed = {b.name: b for b in list_spools(root)}
        assert sorted(listed) == ["simulate", "watch-7"]
        assert (listed["watch-7"].batches, listed["watch-7"].events) == (2, 5)
        assert listed["watch-7"].oldest_age_s is not None and listed["simulate"].batches == 0


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 101, "sp ace"])
def test_bad_spool_names_are_refused(name):
    with pytest.raises(SpoolError, match="spool name"):
        check_name(name)
    assert check_name("watch-12_a.b") == "watch-12_a.b"
