"""The producers' durable local spool: event batches kept on disk until Kafka has them (no Kafka here).

A spool is a folder, by default ``<home>/spool/<name>/``:

* ``<first seq>.seg``: segment files, append-only. Each record is one batch of
  encoded events, framed as ``magic | payload length | CRC-32 | payload``; the
  payload starts with the batch's sequence number (1, 2, 3 ... for the life of
  the spool) and the time it was spooled. :meth:`Spool.append` returns only once
  the record is fsynced (and the folder too when the segment is new), so a batch
  whose ``publish()`` returned survives a crash of the process or of the machine.
* ``acked``: the sequence number of the last batch committed to Kafka, replaced
  atomically (write, fsync, rename, fsync the folder) after each commit.
  Segments whose batches are all acknowledged are deleted.
* ``lock``: held with ``flock`` by the one process that appends to and drains the
  spool, and holding its pid, so a second one is refused with a line naming it.

A crash in the middle of an append leaves a torn last record: opening the spool
finds it (short, or a checksum that does not match), drops it with a warning and
truncates the segment there; its ``publish()`` never returned, so nothing
promised is lost. A crash between a batch's Kafka commit and its acknowledgement
publishes that batch again on the next start: delivery from the spool is
at-least-once (the workers drop an image event they have already answered for).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from beamstream.errors import BeamstreamError
from beamstream.platform.processes import alive
from beamstream.platform.settings import Settings

log = logging.getLogger(__name__)

_MAGIC = b"BSP1"
_FRAME = struct.Struct(">4sII")  # magic, payload length, CRC-32 of the payload
_BATCH = struct.Struct(">QdI")  # sequence number, spooled at (epoch seconds), number of records
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
#: Largest payload a record may claim: anything bigger is a corrupt length, not a batch.
_MAX_PAYLOAD = 1 << 30
#: A new segment is started once the current one holds this much.
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
ACK_FILE = "acked"
LOCK_FILE = "lock"


class SpoolError(BeamstreamError):
    """The spool cannot be used (the disk refused a write, the folder is not usable)."""


class SpoolBusy(SpoolError):
    """Another process holds the spool (the message names its pid)."""


class SpooledRecord(NamedTuple):
    """One encoded event as spooled: where it goes and what it is."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = []


@dataclass(frozen=True)
class SpooledBatch:
    """One batch read back from the spool: published as one Kafka transaction."""

    seq: int
    created: float  # epoch seconds
    records: list[SpooledRecord]


@dataclass(frozen=True)
class Backlog:
    """What a spool holds that Kafka does not have yet."""

    name: str
    path: str
    batches: int
    events: int
    #: Seconds since the oldest unpublished batch was spooled (None when empty).
    oldest_age_s: float | None
    #: Whether the draining publisher reaches Kafka (None: not known, e.g. no process holds the spool).
    connected: bool | None = None
    #: The process holding the spool, if any.
    holder_pid: int | None = None
    #: The last reason publishing failed, while it fails.
    last_error: str | None = None

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def spool_root(settings: Settings) -> Path:
    """Where a host's spools live: ``<home>/spool``."""
    return settings.home / "spool"


def check_name(name: str) -> str:
    """``name`` if it can name a spool folder (letters, digits, ``.``, ``_``, ``-``), else a SpoolError."""
    if not name or len(name) > 100 or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        raise SpoolError(f"a spool name is 1-100 letters, digits, '.', '_' or '-' (not starting with '.'), "
                         f"got {name!r}")
    return name


# -- the record format ---------------------------------------------------------------------

def _put_bytes(parts: list[bytes], value: bytes | None) -> None:
    parts.append(_I32.pack(-1 if value is None else len(value)))
    if value is not None:
        parts.append(value)


def _put_text(parts: list[bytes], text: str) -> None:
    raw = text.encode()
    parts.append(_U16.pack(len(raw)))
    parts.append(raw)


def encode_batch(seq: int, created: float, records: Sequence[SpooledRecord]) -> bytes:
    """One framed record of the segment format holding ``records``."""
    parts = [_BATCH.pack(seq, created, len(records))]
    for record in records:
        _put_text(parts, record.topic)
        _put_bytes(parts, record.key)
        _put_bytes(parts, record.value)
        parts.append(_U16.pack(len(record.headers)))
        for name, value in record.headers:
            _put_text(parts, name)
            _put_bytes(parts, value)
    payload = b"".join(parts)
    return _FRAME.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


class _Reader:
    """Reads the fields of one payload in order."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.at = payload, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.payload):
            raise ValueError("record shorter than its fields")
        chunk = self.payload[self.at:self.at + n]
        self.at += n
        return chunk

    def bytes_or_none(self) -> bytes | None:
        (length,) = _I32.unpack(self.take(4))
        return None if length == -1 else self.take(length)

    def text(self) -> str:
        (length,) = _U16.unpack(self.take(2))
        return self.take(length).decode()


def decode_payload(payload: bytes) -> SpooledBatch:
    """The batch in a checked payload; ValueError if its fields do not add up."""
    reader = _Reader(payload)
    seq, created, count = _BATCH.unpack(reader.take(_BATCH.size))
    records = []
    for _ in range(count):
        topic = reader.text()
        key, value = reader.bytes_or_none(), reader.bytes_or_none()
        (n_headers,) = _U16.unpack(reader.take(2))
        headers = [(reader.text(), reader.bytes_or_none()) for _ in range(n_headers)]
        records.append(SpooledRecord(topic, key, value, headers))
    if reader.at != len(payload):
        raise ValueError("record longer than its fields")
    return SpooledBatch(seq, created, records)


def read_record(handle, offset: int) -> tuple[SpooledBatch | None, int, str | None]:
    """The batch at ``offset`` of an open segment: (batch, offset after it, None), (None, offset, None)
    at the clean end of the file, or (None, offset, why) for a torn or corrupt record."""
    handle.seek(offset)
    head = handle.read(_FRAME.size)
    if not head:
        return None, offset, None
    if len(head) < _FRAME.size:
        return None, offset, f"a record header cut short ({len(head)} of {_FRAME.size} bytes)"
    magic, length, crc = _FRAME.unpack(head)
    if magic != _MAGIC or length > _MAX_PAYLOAD:
        return None, offset, "no record marker"
    payload = handle.read(length)
    if len(payload) < length:
        return None, offset, f"a record cut short ({len(payload)} of {length} bytes)"
    if zlib.crc32(payload) != crc:
        return None, offset, "a record whose checksum does not match"
    try:
        return decode_payload(payload), offset + _FRAME.size + length, None
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        return None, offset, f"a record that does not decode ({exc})"


# -- files -----------------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or deletion in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_files(directory: Path) -> list[Path]:
    """The spool's segments in order (named by the sequence number they start at)."""
    try:
        found = [p for p in directory.iterdir() if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit()]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: int(p.stem))


def read_acked(directory: Path) -> int:
    """The last acknowledged sequence number (0: none). A garbled file counts as 0: publishing a batch
    again is allowed, losing one is not."""
    try:
        text = (directory / ACK_FILE).read_text().strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        log.warning("spool %s: acknowledgement file unreadable (%r); every batch kept is published again",
                    directory, text[:40])
        return 0
    return int(text)


def write_acked(directory: Path, seq: int) -> None:
    """Replace the acknowledgement file atomically and durably."""
    temporary = directory / f"{ACK_FILE}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{seq}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, directory / ACK_FILE)
    _fsync_dir(directory)


def _scan_segment(path: Path) -> Iterator[tuple[SpooledBatch | None, int, str | None]]:
    """Every record of a segment: (batch, its offset, None), ending with (None, end, why) if a bad one stops it."""
    with path.open("rb") as handle:
        offset = 0
        while True:
            batch, after, why = read_record(handle, offset)
            if batch is None:
                if why is not None:
                    yield None, offset, why
                return
            yield batch, offset, None
            offset = after


class Spool:
    """One spool folder, held exclusively: append batches, read the oldest unacknowledged one, acknowledge it.

    Thread-safe: a producer thread appends while a drain thread reads and acknowledges.
    Raises :class:`SpoolBusy` when another process (or another Spool object) holds the folder.
    """

    def __init__(self, directory: Path, name: str | None = None,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.name = name or self.directory.name
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.directory}: {exc.strerror or exc}") from None
        self._lock_fd = self._take_lock()
        self._write_fd: int | None = None
        self._write_path: Path | None = None
        self._segments: list[Path] = []
        # Batches read ahead and not acknowledged yet, each with the (segment, offset) just past it.
        self._ahead: list[tuple[SpooledBatch, Path, int]] = []
        self._cursor: tuple[Path | None, int] = (None, 0)  # where the next unacknowledged record starts
        self._read_at: tuple[Path | None, int] = (None, 0)  # where the next record to read ahead starts
        try:
            self._recover()
        except BaseException:  # release the folder, deleting nothing
            self._close_writer()
            os.close(self._lock_fd)
            raise

    # -- opening ---------------------------------------------------------------------------
    def _take_lock(self) -> int:
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolBusy(f"spool {self.name} ({self.directory}) is in use by process {holder}; "
                            "one process at a time appends to and drains a spool") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _recover(self) -> None:
        """Check every segment, drop a torn tail, delete what is acknowledged, count what is not."""
        self.acked = read_acked(self.directory)
        self.pending_batches = self.pending_events = 0
        previous = 0  # sequence numbers only grow
        for path in segment_files(self.directory):
            kept_any = False
            for batch, offset, why in _scan_segment(path):
                if batch is not None and batch.seq <= previous:
                    why = f"sequence number {batch.seq} after {previous}"
                if why is not None:
                    log.warning("spool %s: %s at byte %d of %s (a write cut short by a crash?); dropped, "
                                "with anything after it in that segment", self.name, why, offset, path.name)
                    os.truncate(path, offset)
                    break
                previous = batch.seq
                if batch.seq > self.acked:
                    self.pending_batches += 1
                    self.pending_events += len(batch.records)
                    kept_any = True
            if kept_any:
                self._segments.append(path)
            else:
                path.unlink()  # all acknowledged, or nothing left after a torn record
        _fsync_dir(self.directory)
        self._next_seq = max(previous, self.acked) + 1
        if self._segments:
            self._cursor = self._read_at = (self._segments[0], 0)
            last = self._segments[-1]
            if last.stat().st_size < self.segment_bytes:
                self._open_for_append(last)

    # -- writing ---------------------------------------------------------------------------
    def _open_for_append(self, path: Path) -> None:
        self._close_writer()
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._write_path = path

    def _close_writer(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
        self._write_fd, self._write_path = None, None

    def _new_segment(self) -> None:
        path = self.directory / f"{self._next_seq:020d}{SEGMENT_SUFFIX}"
        self._open_for_append(path)
        _fsync_dir(self.directory)  # the new file's name is as durable as its records
        self._segments.append(path)
        if self._cursor[0] is None:
            self._cursor = self._read_at = (path, 0)

    def append(self, records: Sequence[SpooledRecord], created: float | None = None) -> int:
        """Write one batch and fsync it; returns its sequence number. Raises :class:`SpoolError` if the
        disk refuses (the spool is left as it was)."""
        if not records:
            raise ValueError("a spooled batch holds at least one record")
        with self._lock:
            if self._lock_fd < 0:
                raise SpoolError(f"spool {self.name} is closed")
            seq = self._next_seq
            data = encode_batch(seq, time.time() if created is None else created, records)
            try:
                if self._write_fd is None or os.fstat(self._write_fd).st_size >= self.segment_bytes:
                    self._new_segment()
                self._write_all(data)
            except OSError as exc:
                raise SpoolError(f"cannot write to spool {self.directory}: {exc.strerror or exc}") from None
            self._next_seq += 1
            self.pending_batches += 1
            self.pending_events += len(records)
            return seq

    def _write_all(self, data: bytes) -> None:
        assert self._write_fd is not None
        start = os.fstat(self._write_fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._write_fd, view):]
            os.fsync(self._write_fd)
        except OSError:
            os.ftruncate(self._write_fd, start)  # no half record left for the next append to follow
            raise

    # -- reading and acknowledging ------------------------------------------------------------
    def head(self) -> SpooledBatch | None:
        """The oldest batch not acknowledged yet (the same one until :meth:`ack`), or None when empty."""
        batches = self.peek(1)
        return batches[0] if batches else None

    def peek(self, max_events: int = 1) -> list[SpooledBatch]:
        """The oldest batches not acknowledged yet, in order: at least one when any is pending, more while
        they hold ``max_events`` events together (a whole batch is never split)."""
        with self._lock:
            while (not self._ahead or self._ahead_events() < max_events) and len(self._ahead) < self.pending_batches:
                before = len(self._ahead)
                self._read_ahead()
                if len(self._ahead) == before:  # counted but not on disk: never expected, never a busy loop
                    raise SpoolError(f"spool {self.name}: {self.pending_batches} batches counted, fewer found")
            return [batch for batch, _path, _end in self._ahead]

    def _ahead_events(self) -> int:
        return sum(len(batch.records) for batch, _path, _end in self._ahead)

    def _read_ahead(self) -> None:
        """Read the next unacknowledged record after those read ahead, walking on to the next segment."""
        path, offset = self._read_at
        while path is not None:
            with path.open("rb") as handle:
                while True:
                    batch, after, why = read_record(handle, offset)
                    if batch is None:
                        if why is not None:  # written and fsynced by this process: the disk changed under us
                            raise SpoolError(f"spool {self.name}: {why} in {path.name}")
                        break
                    offset = after
                    if batch.seq > self.acked:
                        self._ahead.append((batch, path, after))
                        self._read_at = (path, after)
                        return
            following = self._segments.index(path) + 1
            if following >= len(self._segments):
                self._read_at = (path, offset)
                return
            path, offset = self._segments[following], 0
            self._read_at = (path, offset)

    def ack(self, seq: int) -> None:
        """Record the batches up to ``seq`` (one read by :meth:`peek`) as committed to Kafka; delete segments
        fully acknowledged."""
        with self._lock:
            done = [i for i, (batch, _path, _end) in enumerate(self._ahead) if batch.seq == seq]
            if not done:
                raise ValueError(f"batch {seq} is not one of the oldest unacknowledged ones")
            acked, self._ahead = self._ahead[:done[0] + 1], self._ahead[done[0] + 1:]
            write_acked(self.directory, seq)
            self.acked = seq
            self.pending_batches -= len(acked)
            self.pending_events -= sum(len(batch.records) for batch, _path, _end in acked)
            _batch, path, end = acked[-1]
            self._cursor = (path, end)
            self._delete_acknowledged()

    def _delete_acknowledged(self) -> None:
        """Delete the segments behind the acknowledged position, and its own once it is read to its end and
        no more is written to it (it is full, or another segment follows)."""
        path, offset = self._cursor
        assert path is not None
        done = self._segments[:self._segments.index(path)]
        if offset >= path.stat().st_size and (path != self._write_path or offset >= self.segment_bytes):
            done.append(path)
        if not done:
            return
        for finished in done:
            if finished == self._write_path:
                self._close_writer()
            finished.unlink(missing_ok=True)
            self._segments.remove(finished)
        _fsync_dir(self.directory)
        if path in done:
            self._cursor = (self._segments[0] if self._segments else None, 0)
            if self._read_at[0] not in self._segments:  # it had read to the end of the deleted segment
                self._read_at = self._cursor

    def backlog(self) -> Backlog:
        """Batches and events not acknowledged yet, and the oldest one's age."""
        head = self.head()
        with self._lock:
            return Backlog(self.name, str(self.directory), self.pending_batches, self.pending_events,
                           None if head is None else round(max(time.time() - head.created, 0.0), 1),
                           holder_pid=os.getpid() if self._lock_fd >= 0 else None)

    def close(self) -> None:
        """Release the folder; an empty spool's segments are deleted."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._close_writer()
            if not self.pending_batches:
                for path in self._segments:
                    path.unlink(missing_ok=True)
                self._segments.clear()
            os.ftruncate(self._lock_fd, 0)  # no holder named any more
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- looking at spools from outside (the CLI's list, the dashboard) -------------------------------

def inspect_spool(directory: Path) -> Backlog:
    """A spool's backlog read without taking it (its holder may be appending: a record being written is
    not counted). ``holder_pid`` is the pid in its lock file while that process runs."""
    directory = Path(directory)
    acked = read_acked(directory)
    batches = events = 0
    oldest: float | None = None
    for path in segment_files(directory):
        try:
            for seq, created, count in _batch_headers(path):
                if seq > acked:
                    batches += 1
                    events += count
                    oldest = created if oldest is None else min(oldest, created)
        except FileNotFoundError:  # acknowledged and deleted while we looked
            continue
    return Backlog(directory.name, str(directory), batches, events,
                   None if oldest is None else round(max(time.time() - oldest, 0.0), 1),
                   holder_pid=_holder(directory))


def _batch_headers(path: Path) -> Iterator[tuple[int, float, int]]:
    """(sequence number, spooled at, events) of each whole record of a segment, reading only their headers
    (cheap enough for a dashboard to ask every few seconds of a large spool)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        offset = 0
        while offset + _FRAME.size + _BATCH.size <= size:
            handle.seek(offset)
            magic, length, _crc = _FRAME.unpack(handle.read(_FRAME.size))
            end = offset + _FRAME.size + length
            if magic != _MAGIC or length < _BATCH.size or end > size:
                return  # being written, or torn: not a batch yet
            yield _BATCH.unpack(handle.read(_BATCH.size))
            offset = end


def _holder(directory: Path) -> int | None:
    try:
        text = (directory / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 and alive(int(text)) else None


def list_spools(root: Path) -> list[Backlog]:
    """Every spool under ``root`` (``<home>/spool``), by name."""
    try:
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    return [inspect_spool(folder) for folder in folders]
