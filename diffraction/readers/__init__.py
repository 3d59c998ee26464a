"""Detector image readers: PILATUS miniCBF (optionally .bz2/.gz) and EIGER/NeXus NXmx HDF5.

Frames are addressed by 0-based index here (the CLI speaks 1-based image numbers)::

    from beamstream.diffraction.readers import open_image, count_frames, iter_frames

    image = open_image("thau_3_2_0001.cbf.bz2")          # the only frame
    n = count_frames("series_master.h5")
    master = read_master("series_master.h5")            # geometry and mask, no data file opened
    for image in iter_frames("series_master.h5", frames=[0, 5, 9]):
        ...

Every failure is a :class:`~diffraction.errors.DiffractionError` subclass whose
message names the file and what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from beamstream.diffraction.errors import ImageReadError
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.readers._common import ImageSource, check_frame, require_file
from beamstream.diffraction.readers.cbf import BZ2_MAGIC, GZIP_MAGIC, CbfSource
from beamstream.diffraction.readers.nexus import NexusMaster, NexusSource, read_master

__all__ = [
    "ImageSource",
    "NexusMaster",
    "count_frames",
    "detect_format",
    "iter_frames",
    "open_image",
    "open_source",
    "read_master",
]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CBF_SUFFIXES = (".cbf", ".cbf.bz2", ".cbf.gz")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5")


def _looks_like_cbf(head: bytes) -> bool:
    return head.startswith(b"###CBF") or b"_array_data" in head


def detect_format(path: str | Path) -> str:
    """``"cbf"`` or ``"nexus"``, judged by the file's content (the name only breaks ties).

    Raises ImageReadError for missing, empty or unrecognised files.
    """
    path = require_file(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    if not head:
        raise ImageReadError(f"{path}: file is empty")
    # HDF5 files may carry a user block: the signature sits at 0, 512, 1024, ...
    if any(head[offset : offset + 8] == _HDF5_MAGIC for offset in (0, 512, 1024, 2048)):
        return "nexus"
    name = path.name.lower()
    if head.startswith(BZ2_MAGIC) or head.startswith(GZIP_MAGIC):
        # Compressed: peeking inside costs a partial decompression, so trust the name.
        if any(name.endswith(suffix) for suffix in (".cbf.bz2", ".cbf.gz", ".bz2", ".gz")):
            return "cbf"
    elif _looks_like_cbf(head):
        return "cbf"
    if name.endswith(_CBF_SUFFIXES):
        raise ImageReadError(f"{path}: named like a CBF file but its content is not CBF")
    if name.endswith(_HDF5_SUFFIXES):
        raise ImageReadError(f"{path}: named like an HDF5 file but has no HDF5 signature (corrupt?)")
    raise ImageReadError(f"{path}: unrecognised image format (expected miniCBF or NeXus/HDF5)")


def open_source(path: str | Path) -> ImageSource:
    """An open :class:`ImageSource` for the file; close it (or use ``with``) when done."""
    kind = detect_format(path)
    return CbfSource(path) if kind == "cbf" else NexusSource(path)


def count_frames(path: str | Path) -> int:
    """Number of frames in the file (1 for CBF; the total over all data files for NXmx)."""
    with open_source(path) as source:
        return len(source)


def open_image(path: str | Path, frame: int = 0) -> DiffractionImage:
    """Read one frame (0-based index) with its mask and geometry."""
    with open_source(path) as source:
        return source.read(frame)


def iter_frames(path: str | Path, frames: Iterable[int] | None = None) -> Iterator[DiffractionImage]:
    """Yield frames (0-based indices, all when ``frames`` is None) keeping the file open between them.

    Indices are checked before the first frame is read, so a bad index fails fast.
    """
    with open_source(path) as source:
        n_frames = len(source)
        wanted = range(n_frames) if frames is None else [check_frame(f, n_frames, source.path) for f in frames]
        for frame in wanted:
            yield source.read(frame)
