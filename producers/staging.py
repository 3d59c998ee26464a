"""Render ahead, release at detector rate: frames are written into a staging folder, then moved into place.

A simulated detector must make files appear *complete* at its frame rate even
when drawing a frame takes longer than one frame period. So frames are written
under a hidden staging folder next to the destination (same file system, so a
rename is atomic) and each :class:`Release` lists the renames that publish
them. The caller decides *when* to carry them out.

* CBF: one release per frame (``prefix_0001.cbf`` ...).
* EIGER/NeXus: one release per data file, as the DECTRIS file writer makes a
  data file visible once it is full; the master file (geometry and links to
  every data file, NXmx) goes out with the first data file.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.writers import nexus_file_names, write_cbf, write_nexus
from beamstream.producers.scanning import cbf_file_name

_DATA_LINK_PREFIX = "data_"


@dataclass(frozen=True)
class Release:
    """Staged files that together complete frames ``last_index - n_frames + 1 .. last_index`` (0-based)."""

    last_index: int
    n_frames: int
    moves: tuple[tuple[Path, Path], ...]  # (staged, final), carried out in order

    def carry_out(self) -> None:
        """Move the staged files into place (atomic renames)."""
        for staged, final in self.moves:
            os.replace(staged, final)


class CbfStager:
    """Stages one miniCBF file per frame for the template ``out_dir/prefix_####.cbf``."""

    def __init__(self, out_dir: Path, prefix: str, images: int, start: int = 1) -> None:
        width = max(4, len(str(start + images - 1)))
        self.file_template = str(out_dir / f"{prefix}_{'#' * width}.cbf")
        self.final_files = [cbf_file_name(self.file_template, n) for n in range(start, start + images)]
        self.staging_dir = out_dir / f".staging-{prefix}"

    def stage(self, frames: Iterable[DiffractionImage]) -> Iterator[Release]:
        """Write each frame into the staging folder; yield its release."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        for index, (image, final) in enumerate(zip(frames, self.final_files, strict=False)):
            staged = write_cbf(image, self.staging_dir / final.name)
            yield Release(index, 1, ((staged, final),))

    def cleanup(self) -> None:
        """Remove the staging folder and anything left in it."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)


class NexusStager:
    """Stages an EIGER-style series ``prefix_master.h5`` + ``prefix_data_NNNNNN.h5``, one data file per release.

    Each data file is written by :func:`diffraction.writers.write_nexus` (frames
    stream through, one in memory at a time); then its DECTRIS frame numbers
    are set to its place in the series, and for the first one a series master
    linking every data file is derived from the master written alongside it.
    """

    def __init__(self, out_dir: Path, prefix: str, images: int, frames_per_file: int = 10,
                 compression: str | None = "bslz4") -> None:
        if frames_per_file < 1:
            raise ValueError(f"frames_per_file must be at least 1, got {frames_per_file}")
        self.images = images
        self.frames_per_file = frames_per_file
        self.compression = compression
        self.master = out_dir / f"{prefix}_master.h5"
        self.data_files = nexus_file_names(self.master, math.ceil(images / frames_per_file))
        self.file_template = str(self.master)
        self.final_files = [self.master, *self.data_files]
        self.staging_dir = out_dir / f".staging-{prefix}"

    def stage(self, frames: Iterable[DiffractionImage]) -> Iterator[Release]:
        """Write each data file's frames into the staging folder; yield one release per data file."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        frames = iter(frames)
        for number, final in enumerate(self.data_files, start=1):
            first = next(frames, None)
            if first is None:  # the frame source stopped early (simulation aborted)
                return
            low = (number - 1) * self.frames_per_file
            wanted = min(self.frames_per_file, self.images - low)
            chunk_dir = self.staging_dir / f"{number:06d}"
            chunk_dir.mkdir(exist_ok=True)
            counted = _Counted(itertools.chain([first], itertools.islice(frames, wanted - 1)))
            chunk_master = write_nexus(counted, chunk_dir / self.master.name, frames_per_file=wanted,
                                       compression=self.compression)
            staged = nexus_file_names(chunk_master, 1)[0]
            _number_frames(staged, low + 1, low + counted.n)
            moves = []
            if number == 1:
                series_master = self.staging_dir / self.master.name
                _series_master(chunk_master, series_master, self.data_files, self.images)
                moves.append((series_master, self.master))
            moves.append((staged, final))
            yield Release(low + counted.n - 1, counted.n, tuple(moves))

    def cleanup(self) -> None:
        """Remove the staging folder and anything left in it."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)


class _Counted:
    """An iterator that counts what passed through it."""

    def __init__(self, items: Iterator) -> None:
        self._items = items
        self.n = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self):
        item = next(self._items)
        self.n += 1
        return item


def _number_frames(data_file: Path, low: int, high: int) -> None:
    """Set the DECTRIS ``image_nr_low``/``image_nr_high`` of a data file to its place in the series."""
    import h5py

    with h5py.File(data_file, "r+") as handle:
        attrs = handle["/entry/data/data"].attrs
        attrs["image_nr_low"] = np.int32(low)
        attrs["image_nr_high"] = np.int32(high)


def _series_master(chunk_master: Path, target: Path, data_files: list[Path], n_frames: int) -> None:
    """Copy a one-data-file master to ``target``, linking every data file of the series instead."""
    import h5py

    shutil.copyfile(chunk_master, target)
    with h5py.File(target, "r+") as master:
        group = master["/entry/data"]
        for name in [name for name in group if name.startswith(_DATA_LINK_PREFIX)]:
            del group[name]
        for number, data_file in enumerate(data_files, start=1):
            # Bare names, as DECTRIS writes them: the series can be moved as a folder.
            group[f"data_{number:06d}"] = h5py.ExternalLink(data_file.name, "/entry/data/data")
        nimages = master.get("/entry/instrument/detector/detectorSpecific/nimages")
        if nimages is not None:
            nimages[()] = n_frames
