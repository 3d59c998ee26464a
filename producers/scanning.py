"""What images of a collection are readable on disk right now: the file watcher's eyes, no Kafka.

Two kinds of collection:

* a CBF template with ``#`` for the image number (``/data/x/thau_1_####.cbf``):
  one file per image. A file counts as readable once it holds its whole binary
  section (judged from the CBF header, a 64 KiB read), or, when that can't be
  judged (compressed files), once its size is unchanged across two polls;
* an EIGER/NeXus master file (``/data/x/scan_master.h5``): frames live in data
  files ``scan_data_000001.h5`` ... that appear and may grow while written
  (SWMR). A frame counts once its dataset has it and its chunk is written.

A scanner is polled: each :meth:`scan` returns the images that became readable
since the previous call, in image-number order, each exactly once. Files that
are half written or locked by their writer are simply tried again next poll.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from beamstream.errors import BeamstreamError

log = logging.getLogger(__name__)

_CBF_BINARY_START = b"\x0c\x1a\x04\xd5"
_CBF_HEAD_BYTES = 65536  # miniCBF headers are a few KiB; the binary marker sits well inside this
_BINARY_SIZE = re.compile(rb"X-Binary-Size:\s*(\d+)")
_DATA_LINK = re.compile(r"^data_\d{6}$")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx5")


class TemplateError(BeamstreamError, ValueError):
    """A file template that names no images (e.g. a CBF template without ``#``)."""


class FrameRef(NamedTuple):
    """One readable image: its 1-based number, the file holding it and the frame inside that file."""

    image_number: int
    file_path: str
    frame_index: int


class Scanner(Protocol):
    """Polled for images that became readable; see :func:`make_scanner`."""

    def scan(self) -> list[FrameRef]:
        """Images readable now that earlier calls did not return, in image-number order."""
        ...

    @property
    def pending(self) -> list[int]:
        """Image numbers not returned yet."""
        ...


def is_nexus_template(template: str | os.PathLike) -> bool:
    """True when the template names an EIGER/NeXus master file rather than a CBF series."""
    return str(template).lower().endswith(_HDF5_SUFFIXES)


def _check_range(images: int, start: int) -> None:
    if images < 1:
        raise TemplateError(f"the number of images must be at least 1, got {images}")
    if start < 1:
        raise TemplateError(f"image numbers start at 1, got start {start}")


def cbf_file_name(template: str | os.PathLike, image_number: int) -> Path:
    """The file of ``image_number`` in a ``#`` template: ``thau_####.cbf``, 7 -> ``thau_0007.cbf``.

    Numbers wider than the ``#`` run are written in full, as acquisition software does.
    """
    path = Path(template)
    match = _hash_run(path)
    width = match.end() - match.start()
    name = f"{path.name[: match.start()]}{image_number:0{width}d}{path.name[match.end():]}"
    return path.with_name(name)


def _hash_run(path: Path) -> re.Match:
    if "#" in str(path.parent):
        raise TemplateError(f"template {str(path)!r}: '#' may only appear in the file name, not the directory")
    runs = list(re.finditer(r"#+", path.name))
    if not runs:
        raise TemplateError(
            f"template {str(path)!r} has no '#' for the image number (e.g. thau_1_####.cbf), "
            "and is not an EIGER/NeXus master file (.h5/.nxs)"
        )
    if len(runs) > 1:
        raise TemplateError(f"template {str(path)!r} has more than one run of '#'")
    return runs[0]


def cbf_complete(path: Path, size: int) -> bool | None:
    """Whether a CBF file already holds its whole binary section (True/False), or None if unknown.

    Reads only the header: the binary section starts at a fixed marker and its
    length is in the MIME header (``X-Binary-Size``). None for compressed files
    and anything that does not look like an uncompressed CBF.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)  # a PILATUS header fits; read more only when it does not
            if _CBF_BINARY_START not in head and len(head) == 4096:
                head += handle.read(_CBF_HEAD_BYTES - len(head))
    except OSError:
        return False  # vanished or not readable yet: try again next poll
    start = head.find(_CBF_BINARY_START)
    if start < 0:
        # A header this long without the marker is not a plain CBF; a short one is still being written.
        return None if len(head) >= _CBF_HEAD_BYTES or head[:3] in (b"BZh", b"\x1f\x8b") else False
    match = _BINARY_SIZE.search(head, 0, start)
    if match is None:
        return None
    return size >= start + len(_CBF_BINARY_START) + int(match.group(1))


class CbfScanner:
    """Readable images of a ``#`` template, one file per image.

    One directory listing per poll (cheap on network file systems, unlike a
    ``stat`` per expected file), then only new candidate files are inspected.
    """

    def __init__(self, template: str | os.PathLike, images: int, start: int = 1) -> None:
        _check_range(images, start)
        # Absolute: the events are read by workers with other working directories.
        self.template = os.path.abspath(template)
        self.directory = Path(self.template).parent
        self._by_name = {cbf_file_name(self.template, n).name: n for n in range(start, start + images)}
        self._last_size: dict[int, int] = {}  # size seen last poll, for the stability rule

    @property
    def pending(self) -> list[int]:
        """Image numbers not returned yet."""
        return sorted(self._by_name.values())

    def scan(self) -> list[FrameRef]:
        """Images whose files became readable since the last call, in image-number order."""
        if not self._by_name:
            return []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:  # the directory may not exist yet
            return []
        found = []
        for entry in entries:
            number = self._by_name.get(entry.name)
            if number is None:
                continue
            if self._readable(Path(entry.path), number):
                found.append(FrameRef(number, str(Path(entry.path)), 0))
        for ref in found:
            del self._by_name[Path(ref.file_path).name]
            self._last_size.pop(ref.image_number, None)
        return sorted(found)

    def _readable(self, path: Path, number: int) -> bool:
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size == 0:
            return False
        complete = cbf_complete(path, size)
        if complete is not None:
            return complete
        # Can't tell from the header (compressed): wait until the size stops changing.
        previous = self._last_size.get(number)
        self._last_size[number] = size
        return previous == size


@dataclass
class _DataFile:
    """One data file of an EIGER series, as far as the scanner knows it."""

    label: str
    path: Path | None  # None: the dataset lives inside the master file
    dataset: str
    offset: int | None = None  # global index of its first frame, once known
    count: int = 0  # frames seen written so far
    complete: bool = False  # no need to look again


def _h5py():
    import h5py
    import hdf5plugin  # noqa: F401  registers the filters compressed EIGER data needs

    return h5py


def _written_frames(dataset: Any, known: int) -> int:
    """Frames of a growing dataset whose data is really there.

    A writer may extend the dataset before it writes the frame; with one frame
    per chunk the chunk index tells whether frame *i* is written yet.
    """
    n = int(dataset.shape[0])
    chunks = dataset.chunks
    if not chunks or chunks[0] != 1 or not hasattr(dataset.id, "get_chunk_info_by_coord"):
        return n
    zeros = (0,) * (dataset.ndim - 1)
    for frame in range(known, n):
        if dataset.id.get_chunk_info_by_coord((frame, *zeros)).byte_offset is None:
            return frame
    return n


class NexusScanner:
    """Readable frames of an EIGER/NeXus series: the master file and the data files it links.

    Files are opened read-only with SWMR reading, which also works on ordinary
    closed files, and closed again within the poll so writers are not blocked.
    """

    def __init__(self, master: str | os.PathLike, images: int, start: int = 1) -> None:
        _check_range(images, start)
        self.master = Path(os.path.abspath(master))
        self.images = images
        self.start = start
        self._files: list[_DataFile] | None = None
        self._returned: set[int] = set()

    @property
    def pending(self) -> list[int]:
        """Image numbers not returned yet."""
        return [n for n in range(self.start, self.start + self.images) if n not in self._returned]

    def scan(self) -> list[FrameRef]:
        """Frames that became readable since the last call, in image-number order."""
        if len(self._returned) >= self.images:
            return []
        if self._files is None:
            self._files = self._read_links()
            if self._files is None:
                return []
        frames: set[int] = set()
        running: int | None = 0  # where the next file's frames start, if the files before it are known
        for data_file in self._files:
            if not data_file.complete:
                self._probe(data_file, running)
            if data_file.offset is None:
                running = None
            else:
                frames.update(range(data_file.offset, data_file.offset + data_file.count))
                running = data_file.offset + data_file.count
        new = sorted(f for f in frames if f < self.images and self.start + f not in self._returned)
        self._returned.update(self.start + f for f in new)
        return [FrameRef(self.start + f, str(self.master), f) for f in new]

    def _read_links(self) -> list[_DataFile] | None:
        """The data files the master links, or None while the master is missing or unreadable."""
        if not self.master.is_file():
            return None
        h5py = _h5py()
        try:
            with h5py.File(self.master, "r", swmr=True) as master:
                group = master.get("/entry/data")
                if group is None:
                    return None
                names = sorted(name for name in group if _DATA_LINK.match(name))
                if not names and "data" in group:
                    return [_DataFile("data", None, "/entry/data/data")]
                files = []
                for name in names:
                    link = group.get(name, getlink=True)
                    if isinstance(link, h5py.ExternalLink):
                        target = Path(link.filename)
                        # DECTRIS writes bare names, relative to the master's folder.
                        files.append(_DataFile(name, target if target.is_absolute() else self.master.parent / target,
                                               link.path))
                    else:
                        files.append(_DataFile(name, None, f"/entry/data/{name}"))
                return files or None
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            # Still being written, or locked by its writer: look again next poll.
            log.debug("master %s not readable yet: %s", self.master, exc)
            return None

    def _probe(self, data_file: _DataFile, running_offset: int | None) -> None:
        """Update what is known of one data file: where its frames start and how many are written."""
        path = data_file.path or self.master
        if not path.is_file():
            return
        h5py = _h5py()
        try:
            with h5py.File(path, "r", swmr=True) as handle:
                dataset = handle[data_file.dataset]
                if dataset.ndim != 3:
                    return
                low = dataset.attrs.get("image_nr_low")
                high = dataset.attrs.get("image_nr_high")
                # DECTRIS numbers a data file's frames in attributes; else files follow each other.
                data_file.offset = int(low) - 1 if low is not None else running_offset
                if data_file.offset is None:
                    return
                data_file.count = _written_frames(dataset, data_file.count)
                if high is not None and low is not None and data_file.count >= int(high) - int(low) + 1:
                    data_file.complete = True
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            log.debug("data file %s not readable yet: %s", path, exc)


def make_scanner(template: str | os.PathLike, images: int, start: int = 1) -> CbfScanner | NexusScanner:
    """The scanner for a template: NeXus for a ``.h5``/``.nxs`` master file, else a CBF ``#`` template.

    Raises :class:`TemplateError` for a template naming no images.
    """
    if is_nexus_template(template):
        return NexusScanner(template, images, start)
    return CbfScanner(template, images, start)


def format_ranges(numbers: list[int]) -> str:
    """Compact ranges for logs and messages: [1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    parts: list[str] = []
    numbers = sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        parts.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ", ".join(parts)
