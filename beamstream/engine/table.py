"""A partitioned key-value table kept in memory and backed by a compacted changelog topic.

Each partition of the table belongs to the same-numbered partition of the stage's
input topics (all keyed by dcid, so co-partitioned). Values are kept decoded;
a changed entry is encoded once per transaction, by :meth:`ChangelogTable.flush`,
into a record for the changelog's partition of the events that changed it. The
stage commits those records in the same transaction as the events, so the table,
the outputs and the consumed offsets move together or not at all. (Encoding on
every event made a 5,600-image grid scan cost 30 ms of JSON per result by its end.)

When partitions are assigned the stage first fetches their committed offsets
*stably* (librdkafka asks with require_stable, KIP-447, and waits while a
transactional offset commit is pending). Only then are the table's partitions
read back from the changelog: by that time the previous owner's last
transaction is committed or aborted, so the restored state matches the offsets
the stage resumes from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from beamstream.engine.transactions import Output
from beamstream.platform.retained import offset_bounds, open_reader, read_range
from beamstream.platform.settings import Settings

V = TypeVar("V")


class ChangelogTable(Generic[V]):
    """bytes -> V per partition, restored from and written to ``changelog_topic`` with ``encode``/``decode``."""

    def __init__(self, settings: Settings, changelog_topic: str, encode: Callable[[V], bytes],
                 decode: Callable[[bytes], V]) -> None:
        self.settings = settings
        self.changelog_topic = changelog_topic
        self.encode, self.decode = encode, decode
        self._partitions: dict[int, dict[bytes, V]] = {}
        self._dirty: dict[tuple[int, bytes], None] = {}  # an ordered set: changed since the last flush

    def get(self, partition: int, key: bytes) -> V | None:
        """The value of ``key`` in ``partition`` (None if absent). Change it only through :meth:`put`."""
        return self._partitions.get(partition, {}).get(key)

    def put(self, partition: int, key: bytes, value: V) -> None:
        """Set ``key``; its changelog record comes out of the next :meth:`flush`."""
        self._partitions.setdefault(partition, {})[key] = value
        self._dirty[(partition, key)] = None

    def flush(self) -> list[Output]:
        """The changelog records of every entry changed since the last flush, one per entry."""
        outputs: list[Output] = []
        for partition, key in self._dirty:
            value = self._partitions.get(partition, {}).get(key)
            if value is not None:
                outputs.append((self.changelog_topic, key, self.encode(value), partition))
        self._dirty.clear()
        return outputs

    def items(self) -> Iterator[tuple[int, bytes, V]]:
        """(partition, key, value) of every entry this worker holds."""
        for partition, entries in list(self._partitions.items()):
            for key, value in list(entries.items()):
                yield partition, key, value

    def restore(self, partitions: Iterable[int]) -> int:
        """Read ``partitions`` back from the changelog (committed records only); returns records read."""
        partitions = sorted(set(partitions))
        for partition in partitions:
            self._partitions[partition] = {}
        self._dirty = {entry: None for entry in self._dirty if entry[0] not in partitions}
        if not partitions:
            return 0
        latest: dict[int, dict[bytes, bytes | None]] = {p: {} for p in partitions}
        reader = open_reader(self.settings)
        loaded = 0
        try:
            bounds = offset_bounds(reader, self.changelog_topic, partitions)
            for record in read_range(reader, self.changelog_topic, bounds):
                latest[record.partition][record.key] = record.value  # only the last version is decoded
                loaded += 1
        finally:
            reader.close()
        for partition, entries in latest.items():
            self._partitions[partition] = {key: self.decode(value) for key, value in entries.items()
                                           if value is not None}
        return loaded

    def reload(self) -> int:
        """Read every partition this worker holds back from the changelog (after an aborted transaction:
        changes not flushed, or flushed into the aborted transaction, are forgotten)."""
        self._dirty.clear()
        return self.restore(list(self._partitions))

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this worker no longer owns."""
        gone = set(partitions)
        for partition in gone:
            self._partitions.pop(partition, None)
        self._dirty = {entry: None for entry in self._dirty if entry[0] not in gone}
