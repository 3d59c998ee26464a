"""ChangelogTable.delete without a broker: a buffered delete hides the entry in its transaction, is
flushed as a tombstone (a record without a value), removes the entry on commit and nothing on abort,
and a checkpoint written after it no longer holds the entry."""

from __future__ import annotations

import json

import pytest

from beamstream.engine.table import ChangelogTable, _parse_checkpoint
from beamstream.platform.settings import load_settings
from tests.helpers.fake_kafka import FakeMessage


@pytest.fixture
def table(tmp_path) -> ChangelogTable:
    table = ChangelogTable(load_settings(environ={}, home=tmp_path), "state-changelog",
                           lambda v: json.dumps(v).encode(), json.loads, source_topics=("events",))
    table._committed.setdefault(0, {})  # what restoring an empty changelog partition leaves
    table._offset.setdefault(0, None)
    return table


def commit(table: ChangelogTable, first_offset: int = 0) -> list:
    records = table.flush()
    for offset, (topic, key, value, partition) in enumerate(records, start=first_offset):
        table.delivered(None, FakeMessage(topic, partition, offset, key, value))
    table.commit()
    return records


def test_a_delete_is_a_tombstone_and_removes_the_entry_on_commit(table):
    table.put(0, b"a", {"n": 1})
    table.put(0, b"b", {"n": 2})
    commit(table)
    table.delete(0, b"a")
    assert table.get(0, b"a") is None  # in this transaction already
    assert [(key, value) for _, key, value, _ in commit(table, first_offset=2)] == [(b"a", None)]
    assert table.get(0, b"a") is None and table.get(0, b"b") == {"n": 2} and len(table) == 1
    assert [key for _, key, _ in table.select(lambda _v: True)] == [b"b"]


def test_an_aborted_delete_leaves_the_entry(table):
    table.put(0, b"a", {"n": 1})
    commit(table)
    table.delete(0, b"a")
    table.abort()
    assert table.get(0, b"a") == {"n": 1}


def test_a_put_after_a_delete_in_one_transaction_wins(table):
    table.delete(0, b"a")
    table.put(0, b"a", {"n": 3})
    assert [(key, value) for _, key, value, _ in commit(table)] == [(b"a", b'{"n": 3}')]
    assert table.get(0, b"a") == {"n": 3}


def test_a_checkpoint_after_a_delete_no_longer_holds_the_entry(table, tmp_path):
    table.put(0, b"a", {"n": 1})
    table.put(0, b"b", {"n": 2})
    commit(table)
    table.delete(0, b"a")
    commit(table, first_offset=2)
    assert table.checkpoint() == 1
    offset, entries = _parse_checkpoint((tmp_path / "state" / "state-changelog" / "0.checkpoint").read_bytes())
    assert offset == 3 and entries == {b"b": b'{"n": 2}'}
