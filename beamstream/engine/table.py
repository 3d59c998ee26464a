"""A partitioned key-value table kept in memory, backed by a compacted changelog topic.

Each partition of the table belongs to the same-numbered partition of the stage's
input topics (all keyed by dcid, so co-partitioned).

Writes go into a buffer of the open transaction, as quix-streams' state
transactions do: :meth:`~ChangelogTable.get` returns the buffered value or a
private copy of the committed one, :meth:`~ChangelogTable.put` buffers it, and
:meth:`~ChangelogTable.flush` encodes each changed entry once into a record for
the changelog's partition of the events that changed it. The stage commits
those records in the same Kafka transaction as the events; then
:meth:`~ChangelogTable.commit` makes the buffer the table's state, and
:meth:`~ChangelogTable.abort` drops it. Nothing is read back after an abort,
and no caller ever holds the committed state itself.

Restore: when partitions are assigned the stage first fetches their committed
offsets *stably* (librdkafka asks with require_stable, KIP-447, and waits while
a transactional offset commit is pending), so the previous owner's last
transaction is committed or aborted before the changelog is read. A partition
starts from its newest local checkpoint where one exists (a file under
``<home>/state/``: the committed entries and the changelog offset they are the
state at), and reads only the changelog records past that offset; otherwise it
reads the changelog from its start. A checkpoint's offset is where this worker's
own last committed changelog record of the partition lies (from its delivery
report), so it is exact whoever writes the partition later; any worker on the host
may use any checkpoint, since its content depends only on that offset.
"""

from __future__ import annotations

import copy
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from beamstream.engine.transactions import Output
from beamstream.platform.retained import offset_bounds, open_reader, read_range
from beamstream.platform.settings import Settings

log = logging.getLogger(__name__)

V = TypeVar("V")

_LENGTH = struct.Struct(">I")
_CHECKPOINT_MAGIC = b"BSCKPT1\n"
_DELETED = object()  # a buffered delete: flushed as a tombstone


class ChangelogTable(Generic[V]):
    """bytes -> V per partition, restored from and written to ``changelog_topic`` with ``encode``/``decode``.

    ``source_topics`` are the input topics whose partitions carry this table's partitions (the stage
    restores and drops table partitions as those are assigned and revoked). ``copy_value`` makes the
    private copy a reader gets (a deep copy unless the values are immutable)."""

    def __init__(self, settings: Settings, changelog_topic: str, encode: Callable[[V], bytes],
                 decode: Callable[[bytes], V], *, source_topics: Iterable[str] = (),
                 copy_value: Callable[[V], V] = copy.deepcopy, checkpoints: bool = True) -> None:
        self.settings = settings
        self.changelog_topic = changelog_topic
        self.source_topics = frozenset(source_topics)
        self.encode, self.decode, self.copy_value = encode, decode, copy_value
        self.checkpoint_dir: Path | None = (settings.home / "state" / changelog_topic) if checkpoints else None
        self._committed: dict[int, dict[bytes, V]] = {}
        #: Per partition: the changelog offset the committed state is the state at (None: not known).
        self._offset: dict[int, int | None] = {}
        self._buffer: dict[tuple[int, bytes], V] = {}  # the open transaction's writes, in order
        self._delivered: dict[int, int] = {}  # partition -> past the open transaction's last record there
        self._changed_since_checkpoint: set[int] = set()

    # -- the transaction ------------------------------------------------------------
    def get(self, partition: int, key: bytes) -> V | None:
        """The value of ``key`` (None if absent), as this transaction sees it: the value this transaction
        put, or else a private copy of the committed one, so the committed state never changes but by
        :meth:`commit`. Changes to it are this transaction's once it is :meth:`put` (again)."""
        buffered = self._buffer.get((partition, key))
        if buffered is _DELETED:
            return None
        if buffered is not None:
            return buffered
        committed = self._committed.get(partition, {}).get(key)
        return None if committed is None else self.copy_value(committed)

    def put(self, partition: int, key: bytes, value: V) -> None:
        """Set ``key`` in the open transaction (``value`` is the table's from now on: do not change it
        after the transaction ends). Visible to :meth:`get` at once, to everything else after :meth:`commit`."""
        self._buffer[(partition, key)] = value

    def delete(self, partition: int, key: bytes) -> None:
        """Remove ``key`` in the open transaction: :meth:`flush` writes a tombstone (a record without a
        value) for it, and :meth:`commit` drops it from the state."""
        self._buffer[(partition, key)] = _DELETED

    def flush(self) -> list[Output]:
        """The changelog records of the open transaction, one per changed entry (each encoded once).
        Produce them with :meth:`delivered` as their delivery callback."""
        self._delivered.clear()
        return [(self.changelog_topic, key, None if value is _DELETED else self.encode(value), partition)
                for (partition, key), value in self._buffer.items()]

    def delivered(self, error, message) -> None:
        """Delivery callback of a changelog record: where the partition's state will be once committed."""
        if error is None:
            partition = message.partition()
            self._delivered[partition] = max(self._delivered.get(partition, 0), message.offset() + 1)

    def commit(self) -> None:
        """The transaction committed: its writes become the table's state."""
        for (partition, key), value in self._buffer.items():
            if partition in self._committed:  # a partition revoked meanwhile stays gone
                if value is _DELETED:
                    self._committed[partition].pop(key, None)
                else:
                    self._committed[partition][key] = value
                self._changed_since_checkpoint.add(partition)
                # Without its delivery report the offset is unknown: no checkpoint until the next restore.
                self._offset[partition] = self._delivered.get(partition)
        self._buffer.clear()
        self._delivered.clear()

    def abort(self) -> None:
        """The transaction was aborted: forget its writes."""
        self._buffer.clear()
        self._delivered.clear()

    # -- reading the committed state -----------------------------------------------------
    def select(self, wanted: Callable[[V], bool]) -> Iterator[tuple[int, bytes, V]]:
        """(partition, key, private copy) of each committed entry for which ``wanted(value)`` is true.

        ``wanted`` sees the committed value itself and must only read it."""
        for partition, entries in list(self._committed.items()):
            for key, value in list(entries.items()):
                if wanted(value):
                    yield partition, key, self.copy_value(value)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._committed.values())

    @property
    def partitions(self) -> list[int]:
        """The partitions this worker holds."""
        return sorted(self._committed)

    # -- ownership ----------------------------------------------------------------------
    def restore(self, partitions: Iterable[int]) -> int:
        """Load ``partitions`` (from a checkpoint where there is one, then the changelog's committed records
        past it); returns the changelog records read."""
        partitions = sorted(set(partitions))
        self.abort()
        if not partitions:
            return 0
        reader = open_reader(self.settings)
        loaded = 0
        try:
            bounds = offset_bounds(reader, self.changelog_topic, partitions)
            ranges = {}
            latest: dict[int, dict[bytes, bytes | None]] = {}
            for partition in partitions:
                start, end = bounds[partition]
                offset, entries = self._read_checkpoint(partition, start, end)
                latest[partition] = entries
                ranges[partition] = (offset, end)
            for record in read_range(reader, self.changelog_topic, ranges):
                latest[record.partition][record.key] = record.value  # only the last version is decoded
                loaded += 1
        finally:
            reader.close()
        for partition, entries in latest.items():
            self._committed[partition] = {key: self.decode(value) for key, value in entries.items()
                                          if value is not None}
            self._offset[partition] = bounds[partition][1]
            if ranges[partition][0] != bounds[partition][1]:
                self._changed_since_checkpoint.add(partition)
        return loaded

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this worker no longer owns (their buffered writes too)."""
        gone = set(partitions)
        for partition in gone:
            self._committed.pop(partition, None)
            self._offset.pop(partition, None)
            self._changed_since_checkpoint.discard(partition)
        self._buffer = {entry: value for entry, value in self._buffer.items() if entry[0] not in gone}

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, partitions: Iterable[int] | None = None) -> int:
        """Write a checkpoint of each committed partition (of ``partitions``, default all) changed since its
        last one and at a known changelog offset; returns how many were written. Call between transactions."""
        if self.checkpoint_dir is None:
            return 0
        wanted = self._changed_since_checkpoint if partitions is None else set(partitions)
        todo = sorted(p for p in wanted & self._changed_since_checkpoint if self._offset.get(p) is not None)
        if not todo:
            return 0
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for partition in todo:
            self._write_checkpoint(partition, self._offset[partition])
            self._changed_since_checkpoint.discard(partition)
        return len(todo)

    def _checkpoint_path(self, partition: int) -> Path:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / f"{partition}.checkpoint"

    def _write_checkpoint(self, partition: int, offset: int) -> None:
        path = self._checkpoint_path(partition)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with temporary.open("wb") as handle:
            handle.write(_CHECKPOINT_MAGIC + struct.pack(">q", offset))
            for key, value in self._committed.get(partition, {}).items():
                encoded = self.encode(value)
                handle.write(_LENGTH.pack(len(key)) + key + _LENGTH.pack(len(encoded)) + encoded)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # atomic: a reader sees the old checkpoint or the new one

    def _read_checkpoint(self, partition: int, start: int, end: int) -> tuple[int, dict[bytes, bytes | None]]:
        """(changelog offset to read from, encoded entries up to it): a usable checkpoint's, else (start, {})."""
        if self.checkpoint_dir is None:
            return start, {}
        path = self._checkpoint_path(partition)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return start, {}
        except OSError as exc:
            log.warning("checkpoint unreadable, restoring from the changelog: %s", exc, extra={"path": str(path)})
            return start, {}
        try:
            offset, entries = _parse_checkpoint(data)
        except ValueError as exc:
            log.warning("checkpoint damaged, restoring from the changelog: %s", exc, extra={"path": str(path)})
            return start, {}
        if not start <= offset <= end:
            # Past the end: the topic was recreated. Before the start: records it lacks were deleted.
            log.info("checkpoint does not fit the changelog, restoring from its start",
                     extra={"path": str(path), "offset": offset, "start": start, "end": end})
            return start, {}
        return offset, entries


def _parse_checkpoint(data: bytes) -> tuple[int, dict[bytes, bytes | None]]:
    """(offset, entries) of a checkpoint file's bytes; ValueError when they are not one."""
    if not data.startswith(_CHECKPOINT_MAGIC) or len(data) < len(_CHECKPOINT_MAGIC) + 8:
        raise ValueError("not a checkpoint")
    position = len(_CHECKPOINT_MAGIC)
    (offset,) = struct.unpack_from(">q", data, position)
    position += 8
    entries: dict[bytes, bytes | None] = {}
    try:
        while position < len(data):
            (size,) = _LENGTH.unpack_from(data, position)
            key = data[position + 4:position + 4 + size]
            position += 4 + size
            (size,) = _LENGTH.unpack_from(data, position)
            entries[key] = data[position + 4:position + 4 + size]
            position += 4 + size
    except struct.error:
        raise ValueError("truncated") from None
    if position != len(data):
        raise ValueError("truncated")
    return offset, entries

