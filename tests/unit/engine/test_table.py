"""The write buffer of beamstream.engine.table.ChangelogTable, without any broker (restore is never called).

Covers: what get/put see inside a transaction and after it, commit (the buffer becomes the state) and
abort (the buffer is dropped, the committed state unchanged and never handed out: get and select give
private copies), flush (one changelog record per changed entry, encoded once, to the entry's
partition), delivery reports and the checkpoints they allow, select, drop and ownership, and reading
checkpoints back (through the module's private reader: the public way back is restore, which needs
a broker).
"""

from __future__ import annotations

import json

import pytest

from beamstream.engine.table import ChangelogTable
from beamstream.platform.settings import load_settings
from tests.helpers.fake_kafka import FakeMessage, kafka_error


class Codec:
    """JSON with a count of encode and decode calls."""

    def __init__(self) -> None:
        self.encoded = self.decoded = 0

    def encode(self, value: dict) -> bytes:
        self.encoded += 1
        return json.dumps(value, sort_keys=True).encode()

    def decode(self, data: bytes) -> dict:
        self.decoded += 1
        return json.loads(data)


@pytest.fixture
def codec() -> Codec:
    return Codec()


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={}, home=tmp_path)


@pytest.fixture
def table(settings, codec) -> ChangelogTable:
    table = ChangelogTable(settings, "state-changelog", codec.encode, codec.decode, source_topics=("events",))
    own(table, 0, 1)
    return table


def own(table: ChangelogTable, *partitions: int) -> None:
    """What ``restore`` of empty changelog partitions leaves: the table holds them, at no known offset.
    (restore itself reads the changelog from a broker; the stage tests exercise it.)"""
    for partition in partitions:
        table._committed.setdefault(partition, {})
        table._offset.setdefault(partition, None)


def committed(table: ChangelogTable, key: bytes, value: dict, partition: int = 0, offset: int = 0) -> None:
    """Commit ``key = value`` through a whole transaction, with its changelog record delivered at ``offset``."""
    table.put(partition, key, value)
    for topic, record_key, encoded, record_partition in table.flush():
        table.delivered(None, FakeMessage(topic, record_partition, offset, record_key, encoded))
    table.commit()


# -- inside a transaction -------------------------------------------------------------------------------
def test_get_of_an_absent_key_is_none(table):
    assert table.get(0, b"nothing") is None


def test_put_is_seen_by_get_in_the_same_transaction(table):
    table.put(0, b"k", {"n": 1})
    assert table.get(0, b"k") == {"n": 1}
    assert table.get(1, b"k") is None  # another partition's entry


def test_put_is_not_committed_state_before_commit(table):
    table.put(0, b"k", {"n": 1})
    assert len(table) == 0
    assert list(table.select(lambda value: True)) == []


# -- commit -----------------------------------------------------------------------------------------------
def test_commit_makes_the_buffered_writes_the_committed_state(table):
    table.put(0, b"k", {"n": 1})
    table.put(1, b"j", {"n": 2})

    table.commit()

    assert table.get(0, b"k") == {"n": 1} and table.get(1, b"j") == {"n": 2}
    assert len(table) == 2
    assert sorted(table.select(lambda value: True)) == [(0, b"k", {"n": 1}), (1, b"j", {"n": 2})]


def test_commit_starts_an_empty_transaction(table):
    table.put(0, b"k", {"n": 1})
    table.commit()
    assert table.flush() == []


def test_commit_of_a_partition_dropped_meanwhile_keeps_it_gone(table):
    table.put(1, b"k", {"n": 1})
    table.drop([1])
    table.put(1, b"late", {"n": 2})  # a write for a partition no longer held
    table.put(0, b"j", {"n": 3})

    table.commit()

    assert table.partitions == [0]
    assert table.get(1, b"k") is None and table.get(1, b"late") is None and len(table) == 1


# -- abort -------------------------------------------------------------------------------------------------
def test_abort_drops_the_buffered_writes_and_keeps_the_committed_state(table):
    committed(table, b"k", {"n": 1})
    table.put(0, b"k", {"n": 2})
    table.put(0, b"new", {"n": 3})

    table.abort()

    assert table.get(0, b"k") == {"n": 1}
    assert table.get(0, b"new") is None
    assert table.flush() == []
    assert len(table) == 1


def test_abort_reads_nothing_back(table, codec):
    committed(table, b"k", {"n": 1})
    encoded = codec.encoded
    table.put(0, b"k", {"n": 2})

    table.abort()
    table.get(0, b"k")

    assert codec.encoded == encoded and codec.decoded == 0  # the committed object is simply kept


def test_changing_what_get_returned_leaves_the_committed_state_unchanged(table):
    committed(table, b"k", {"n": 1, "items": [1]})

    value = table.get(0, b"k")
    value["n"] = 99
    value["items"].append(2)

    assert table.get(0, b"k") == {"n": 1, "items": [1]}
    assert table.get(0, b"k") is not table.get(0, b"k")


def test_changes_to_a_value_got_in_an_aborted_transaction_never_reach_the_table(table):
    committed(table, b"k", {"items": [1]})
    value = table.get(0, b"k")
    value["items"].append(2)
    table.put(0, b"k", value)

    table.abort()
    value["items"].append(3)  # the caller keeps its object after the abort

    assert table.get(0, b"k") == {"items": [1]}


def test_select_hands_out_private_copies(table):
    committed(table, b"k", {"n": 1})

    ((_, _, value),) = table.select(lambda v: v["n"] == 1)
    value["n"] = 5

    assert table.get(0, b"k") == {"n": 1}
    assert list(table.select(lambda v: v["n"] == 5)) == []


def test_copy_value_makes_the_private_copies(settings):
    copies = []

    def copy_value(value):
        copies.append(value)
        return dict(value)

    table = ChangelogTable(settings, "t", json.dumps, json.loads, copy_value=copy_value)
    own(table, 0)
    table.put(0, b"k", {"n": 1})
    table.commit()

    assert table.get(0, b"k") == {"n": 1}
    assert len(copies) == 1


# -- flush --------------------------------------------------------------------------------------------------
def test_flush_gives_one_record_per_changed_entry_encoded_once(table, codec):
    table.put(0, b"k", {"n": 1})
    table.put(0, b"k", {"n": 2})
    table.put(0, b"k", {"n": 3})
    table.put(1, b"k", {"n": 4})

    records = table.flush()

    assert records == [("state-changelog", b"k", b'{"n": 3}', 0), ("state-changelog", b"k", b'{"n": 4}', 1)]
    assert codec.encoded == 2


def test_flush_of_an_unchanged_table_gives_nothing(table, codec):
    committed(table, b"k", {"n": 1})
    table.get(0, b"k")
    assert table.flush() == []
    assert codec.encoded == 1


# -- delivery reports and checkpoints ---------------------------------------------------------------------------
def test_delivered_records_give_the_checkpoint_its_changelog_offset(table, codec):
    committed(table, b"k", {"n": 1}, offset=4)

    assert table.checkpoint() == 1
    offset, entries = table._read_checkpoint(0, 0, 10)
    assert (offset, entries) == (5, {b"k": b'{"n": 1}'})


def test_commit_without_a_delivery_report_writes_no_checkpoint(table):
    table.put(0, b"k", {"n": 1})
    table.flush()
    table.commit()

    assert table.checkpoint() == 0
    assert not table.checkpoint_dir.exists()


def test_failed_delivery_report_gives_no_offset(table):
    table.put(0, b"k", {"n": 1})
    ((topic, key, value, partition),) = table.flush()
    table.delivered(kafka_error(), FakeMessage(topic, partition, 7, key, value))
    table.commit()

    assert table.checkpoint() == 0


def test_delivery_reports_of_an_aborted_transaction_are_forgotten(table):
    table.put(0, b"k", {"n": 1})
    ((topic, key, value, partition),) = table.flush()
    table.delivered(None, FakeMessage(topic, partition, 9, key, value))
    table.abort()
    table.put(0, b"k", {"n": 2})
    table.flush()
    table.commit()  # its own record's report never came

    assert table.checkpoint() == 0


def test_late_delivery_report_of_an_aborted_transaction_gives_the_next_no_offset(table):
    table.put(0, b"k", {"n": 1})
    ((topic, key, value, partition),) = table.flush()
    table.abort()
    table.delivered(None, FakeMessage(topic, partition, 9, key, value))  # served after the abort
    table.put(0, b"k", {"n": 2})
    table.flush()
    table.commit()

    assert table.checkpoint() == 0


def test_checkpoint_is_written_once_until_the_partition_changes_again(table):
    committed(table, b"k", {"n": 1}, offset=0)
    assert table.checkpoint() == 1
    assert table.checkpoint() == 0

    committed(table, b"k", {"n": 2}, offset=1)

    assert table.checkpoint() == 1
    assert table._read_checkpoint(0, 0, 2) == (2, {b"k": b'{"n": 2}'})


def test_checkpoint_of_named_partitions_only(table):
    committed(table, b"k", {"n": 1}, partition=0, offset=0)
    committed(table, b"j", {"n": 2}, partition=1, offset=3)

    assert table.checkpoint([1]) == 1
    assert sorted(p.name for p in table.checkpoint_dir.iterdir()) == ["1.checkpoint"]
    assert table.checkpoint() == 1  # partition 0 is still owed one


def test_checkpoints_off_write_nothing(settings):
    table = ChangelogTable(settings, "t", json.dumps, json.loads, checkpoints=False)
    own(table, 0)
    committed(table, b"k", {"n": 1})

    assert table.checkpoint() == 0
    assert not (settings.home / "state").exists()


@pytest.mark.parametrize(("start", "end"), [(0, 4), (6, 9)], ids=["past-the-end", "before-the-start"])
def test_checkpoint_that_does_not_fit_the_changelog_is_not_used(table, start, end):
    committed(table, b"k", {"n": 1}, offset=4)
    table.checkpoint()

    assert table._read_checkpoint(0, start, end) == (start, {})


def test_damaged_checkpoint_is_not_used(table):
    committed(table, b"k", {"n": 1}, offset=4)
    table.checkpoint()
    path = table.checkpoint_dir / "0.checkpoint"
    path.write_bytes(path.read_bytes()[:-3])

    assert table._read_checkpoint(0, 0, 10) == (0, {})


def test_missing_checkpoint_reads_from_the_start(table):
    assert table._read_checkpoint(0, 3, 10) == (3, {})


# -- ownership -----------------------------------------------------------------------------------------------------
def test_drop_forgets_committed_entries_buffered_writes_and_owed_checkpoints(table):
    committed(table, b"k", {"n": 1}, partition=1, offset=0)
    table.put(1, b"j", {"n": 2})
    table.put(0, b"i", {"n": 3})

    table.drop([1])

    assert table.partitions == [0]
    assert table.get(1, b"k") is None and table.get(1, b"j") is None
    assert [record[1] for record in table.flush()] == [b"i"]
    assert table.checkpoint() == 0


def test_partitions_and_length_count_committed_entries(table):
    committed(table, b"a", {"n": 1}, partition=0)
    committed(table, b"b", {"n": 1}, partition=1)
    committed(table, b"c", {"n": 1}, partition=1)

    assert table.partitions == [0, 1]
    assert len(table) == 3
    assert table.source_topics == frozenset({"events"})
