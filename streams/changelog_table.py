"""A partitioned key-value table kept in memory and backed by a compacted changelog topic.

Each partition of the table belongs to the same-numbered partition of the stage's
input topics (all keyed by dcid, so co-partitioned). A change is returned as an
output record for the changelog's partition of the event that caused it; the
stage commits it in the event's transaction, so the table, the outputs and the
consumed offsets move together or not at all.

When partitions are assigned the stage first fetches their committed offsets
*stably* (librdkafka asks with require_stable, KIP-447, and waits while a
transactional offset commit is pending). Only then are the table's partitions
read back from the changelog: by that time the previous owner's last
transaction is committed or aborted, so the restored state matches the offsets
the stage resumes from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from beamstream.retained import offset_bounds, open_reader, read_range
from beamstream.settings import Settings
from beamstream.transactions import Output


class ChangelogTable:
    """bytes -> bytes per partition, restored from and written to ``changelog_topic``."""

    def __init__(self, settings: Settings, changelog_topic: str) -> None:
        self.settings = settings
        self.changelog_topic = changelog_topic
        self._partitions: dict[int, dict[bytes, bytes]] = {}

    def get(self, partition: int, key: bytes) -> bytes | None:
        """The value of ``key`` in ``partition`` (None if absent)."""
        return self._partitions.get(partition, {}).get(key)

    def put(self, partition: int, key: bytes, value: bytes) -> Output:
        """Set ``key`` and return the changelog record to commit with the event that caused it."""
        self._partitions.setdefault(partition, {})[key] = value
        return (self.changelog_topic, key, value, partition)

    def items(self) -> Iterator[tuple[int, bytes, bytes]]:
        """(partition, key, value) of every entry this worker holds."""
        for partition, entries in list(self._partitions.items()):
            for key, value in list(entries.items()):
                yield partition, key, value

    def restore(self, partitions: Iterable[int]) -> int:
        """Read ``partitions`` back from the changelog (committed records only); returns entries loaded."""
        partitions = sorted(set(partitions))
        for partition in partitions:
            self._partitions[partition] = {}
        if not partitions:
            return 0
        reader = open_reader(self.settings)
        loaded = 0
        try:
            bounds = offset_bounds(reader, self.changelog_topic, partitions)
            for record in read_range(reader, self.changelog_topic, bounds):
                entries = self._partitions[record.partition]
                if record.value is None:
                    entries.pop(record.key, None)
                else:
                    entries[record.key] = record.value
                loaded += 1
        finally:
            reader.close()
        return loaded

    def reload(self) -> int:
        """Read every partition this worker holds back from the changelog (after an aborted transaction)."""
        return self.restore(list(self._partitions))

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this worker no longer owns."""
        for partition in partitions:
            self._partitions.pop(partition, None)
