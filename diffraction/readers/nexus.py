"""EIGER / NeXus NXmx reader: a master file whose ``/entry/data/data_NNNNNN`` entries link to data files.

Frames are numbered globally across the data files in link order. Each frame
is one HDF5 chunk, so reading frame *i* decompresses only that chunk
(bitshuffle-LZ4 through hdf5plugin). Geometry comes from the NXmx tree; the
mask is ``pixel_mask == 0`` and the inclusive trusted range [underload, saturation].

Masters from real writers read the same way: a DECTRIS detector's firmware (``detector_distance``,
the mask in ``detectorSpecific``, float32 values) and Diamond's nexgen (``distance``, the mask and the
DECTRIS record linked into the ``_meta.h5`` file beside the master). :func:`read_master` gives the
geometry and mask from the master alone, before (or without) any data file.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from beamstream.diffraction.detectors import sensor_mu_per_mm
from beamstream.diffraction.errors import DiffractionError, FrameIndexError, GeometryError, ImageReadError
from beamstream.diffraction.image import DetectorGeometry, DiffractionImage
from beamstream.diffraction.readers._chunks import CorruptChunk, chunk_checker, frame_reader
from beamstream.diffraction.readers._common import (
    ImageSource,
    check_frame,
    make_geometry,
    require_file,
    scaled,
    trusted_mask,
)

_DATA_LINK = re.compile(r"^data_\d{6}$")
# mm per unit, for lengths; Å per unit, for wavelengths.
_MM_PER_UNIT = {"m": 1e3, "metre": 1e3, "meter": 1e3, "metres": 1e3, "meters": 1e3, "cm": 10.0, "mm": 1.0,
                "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "microns": 1e-3, "nm": 1e-6}
_A_PER_UNIT = {"angstrom": 1.0, "angstroms": 1.0, "a": 1.0, "å": 1.0, "nm": 10.0, "m": 1e10, "pm": 1e-2}
# NeXus uses McStas coordinates; dxtbx/imgCIF flips x and z.
_MCSTAS_TO_IMGCIF = np.array([-1.0, 1.0, -1.0])
_NO_CUTOFF = float(2**31 - 1)


def _h5():
    """Import h5py with the compression filters registered (bitshuffle, LZ4, ...)."""
    import h5py
    import hdf5plugin  # noqa: F401  registers the filters HDF5 needs for EIGER data

    return h5py


# What h5py raises when metadata is damaged (bad heap, truncated attribute, ...).
_H5_FAILURES = (OSError, KeyError, RuntimeError, ValueError, TypeError)


@contextmanager
def _damaged_metadata_is_read_error(path: Path) -> Iterator[None]:
    """Turn h5py's low-level failures while walking the tree into an ImageReadError naming the file."""
    try:
        yield
    except DiffractionError:
        raise
    except _H5_FAILURES as exc:
        raise ImageReadError(f"{path}: corrupt NXmx metadata ({type(exc).__name__}: {exc})") from None


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _Tree:
    """Typed look-ups in the master file that name the file and item when something is wrong."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self.handle = handle

    def first(self, *names: str) -> Any | None:
        for name in names:
            try:
                item = self.handle.get(name)
            except (KeyError, OSError, RuntimeError, ValueError):
                item = None
            if item is not None:
                return item
        return None

    def number(self, *names: str) -> tuple[float, str] | None:
        """(value, lower-case units) of the first scalar dataset found, or None."""
        item = self.first(*names)
        if item is None:
            return None
        try:
            value = np.asarray(item[()], dtype=float).ravel()
        except (TypeError, ValueError, OSError) as exc:
            raise GeometryError(f"{self.path}: {item.name} is not numeric ({exc})") from None
        if value.size != 1:
            raise GeometryError(f"{self.path}: {item.name} should be a scalar, has {value.size} values")
        number = float(value[0])
        if getattr(item, "dtype", None) == np.float32:
            # DECTRIS firmware stores float32: 7.5e-05 m is meant, not 7.50000035623e-05.
            number = float(str(np.float32(number)))
        return number, _text(item.attrs.get("units", "")).strip().lower()

    def length_mm(self, *names: str, default_units: str = "m") -> float | None:
        found = self.number(*names)
        if found is None:
            return None
        value, units = found
        scale = _MM_PER_UNIT.get(units or default_units)
        if scale is None:
            raise GeometryError(f"{self.path}: {names[0]} has unknown length units {units!r}")
        return scaled(value, scale)


def _wavelength_A(tree: _Tree) -> float:
    found = tree.number(
        "/entry/instrument/beam/incident_wavelength",
        "/entry/sample/beam/incident_wavelength",
        "/entry/instrument/monochromator/wavelength",
    )
    if found is None:
        energy = tree.number("/entry/instrument/beam/incident_energy", "/entry/instrument/detector/"
                             "detectorSpecific/photon_energy")
        if energy is None:
            raise GeometryError(f"{tree.path}: NXmx tree gives no incident wavelength or photon energy")
        value, units = energy
        ev = value * {"kev": 1e3, "ev": 1.0, "": 1.0}.get(units, float("nan"))
        return scaled(12398.419843320026 / ev, 1.0) if ev else float("nan")
    value, units = found
    scale = _A_PER_UNIT.get(units or "angstrom")
    if scale is None:
        raise GeometryError(f"{tree.path}: incident_wavelength has unknown units {units!r}")
    return scaled(value, scale)


def _axis(tree: _Tree, name: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    """A module pixel direction converted to imgCIF, or the default if absent or unusable."""
    item = tree.first(f"/entry/instrument/detector/module/{name}")
    if item is None or "vector" not in item.attrs:
        return default
    vector = np.asarray(item.attrs["vector"], dtype=float).ravel()
    norm = float(np.linalg.norm(vector)) if vector.size == 3 else 0.0
    if not math.isfinite(norm) or norm < 1e-6:
        return default
    return tuple(float(v) for v in vector * _MCSTAS_TO_IMGCIF / norm)


def _read_geometry(tree: _Tree, image_size_px: tuple[int, int]) -> tuple[DetectorGeometry, dict]:
    det = "/entry/instrument/detector"
    wavelength = _wavelength_A(tree)
    distance = tree.length_mm(f"{det}/detector_distance", f"{det}/distance")
    if distance is None:
        raise GeometryError(f"{tree.path}: NXmx tree gives no {det}/detector_distance")
    pixel_x = tree.length_mm(f"{det}/x_pixel_size", f"{det}/module/fast_pixel_direction")
    pixel_y = tree.length_mm(f"{det}/y_pixel_size", f"{det}/module/slow_pixel_direction")
    if pixel_x is None or pixel_y is None:
        raise GeometryError(f"{tree.path}: NXmx tree gives no pixel size ({det}/x_pixel_size)")
    beam = []
    for axis, pixel in (("x", pixel_x), ("y", pixel_y)):
        found = tree.number(f"{det}/beam_center_{axis}")
        if found is None:
            raise GeometryError(f"{tree.path}: NXmx tree gives no {det}/beam_center_{axis}")
        value, units = found
        # DECTRIS writes pixels; other writers may give a length.
        if units in ("", "pixel", "pixels"):
            beam.append(value)
        else:
            beam.append(scaled(value, _MM_PER_UNIT.get(units, math.nan) / pixel))
    thickness = tree.length_mm(f"{det}/sensor_thickness") or 0.0
    material_item = tree.first(f"{det}/sensor_material")
    material = _text(material_item[()]) if material_item is not None else ""
    name_item = tree.first(f"{det}/description", f"{det}/local_name")
    name = _text(name_item[()]) if name_item is not None else ""

    saturation = tree.number(f"{det}/saturation_value", f"{det}/detectorSpecific/countrate_correction_count_cutoff")
    underload = tree.number(f"{det}/underload_value")
    high = saturation[0] if saturation is not None else _NO_CUTOFF
    low = underload[0] if underload is not None else 0.0  # as dxtbx for EIGER: 0 and up are counts
    if not (math.isfinite(high) and math.isfinite(low)):
        raise GeometryError(f"{tree.path}: trusted range ({low}, {high}) is not finite")

    geometry = make_geometry(
        tree.path,
        wavelength_A=wavelength,
        distance_mm=distance,
        beam_center_px=(beam[0], beam[1]),
        pixel_size_mm=(pixel_x, pixel_y),
        image_size_px=image_size_px,
        trusted_range=(low, high),
        detector_name=name,
        thickness_mm=thickness,
        mu_per_mm=sensor_mu_per_mm(material, wavelength) if math.isfinite(wavelength) else 0.0,
        fast_axis=_axis(tree, "fast_pixel_direction", (1.0, 0.0, 0.0)),
        slow_axis=_axis(tree, "slow_pixel_direction", (0.0, -1.0, 0.0)),
    )
    return geometry, {"detector": name, "sensor_material": material}


# Geometry and static mask of recently opened masters: a worker handed frame after frame of
# one series would otherwise re-read (and gunzip) a 16M pixel mask for every frame.
_MASTER_CACHE: dict[tuple, tuple[DetectorGeometry, dict, np.ndarray | None]] = {}
_MASTER_CACHE_SIZE = 4
_MASTER_CACHE_LOCK = threading.Lock()

# Fields of the DECTRIS NXdetector (and its detectorSpecific collection) worth keeping with each frame.
_DETECTOR_FIELDS = {
    "detector_number": "detector_number",
    "bit_depth_image": "bit_depth_image",
    "count_time": "count_time_s",
    "frame_time": "frame_time_s",
    "threshold_energy": "threshold_energy_eV",
    "detectorSpecific/compression": "compression",
    "detectorSpecific/eiger_fw_version": "firmware_version",
    "detectorSpecific/software_version": "software_version",
    "detectorSpecific/photon_energy": "photon_energy_eV",
    "detectorSpecific/nimages": "nimages",
    "detectorSpecific/ntrigger": "ntrigger",
    "detectorSpecific/data_collection_date": "collection_date",
}


def _detector_metadata(tree: _Tree) -> dict:
    """The DECTRIS detector's own record (serial number, firmware, compression, bit depth, ...) found in the tree.

    Fields that are absent or dangle (nexgen links many into a ``_meta.h5`` file) are left out.
    """
    metadata: dict = {}
    for field, key in _DETECTOR_FIELDS.items():
        item = tree.first(f"/entry/instrument/detector/{field}")
        if item is None or getattr(item, "size", 0) != 1:
            continue
        value = np.asarray(item[()]).item()
        metadata[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return metadata


def _master_shape(tree: _Tree) -> tuple[int, int] | None:
    """(slow, fast) size of a frame as the master declares it, without opening a data file.

    DECTRIS and nexgen both write ``detectorSpecific/{x,y}_pixels_in_detector``; an NXmx
    ``module/data_size`` is in data order (slow, fast) as dxtbx reads it.
    """
    det = "/entry/instrument/detector"
    fast = tree.number(f"{det}/detectorSpecific/x_pixels_in_detector")
    slow = tree.number(f"{det}/detectorSpecific/y_pixels_in_detector")
    if fast is not None and slow is not None:
        return int(slow[0]), int(fast[0])
    item = tree.first(f"{det}/module/data_size")
    if item is not None:
        size = np.asarray(item[()]).ravel()
        if size.size == 2:
            return int(size[0]), int(size[1])
    mask = _mask_item(tree)
    if mask is not None and getattr(mask, "ndim", 0) == 2:
        return tuple(int(n) for n in mask.shape)  # type: ignore[return-value]
    return None


_MASK_PATHS = ("/entry/instrument/detector/pixel_mask", "/entry/instrument/detector/detectorSpecific/pixel_mask")


def _mask_item(tree: _Tree) -> Any | None:
    """The pixel-mask dataset, or None if the master has none.

    A mask linked into another file (nexgen links ``pixel_mask`` to the ``_meta.h5`` file the
    detector's writer leaves next to the master) that is missing is an error naming the file:
    analysing without the mask would turn every hot pixel into a spot.
    """
    h5py = _h5()
    item = tree.first(*_MASK_PATHS)
    if item is not None:
        return item
    for path in _MASK_PATHS:
        parent, _, name = path.rpartition("/")
        group = tree.handle.get(parent)
        link = group.get(name, getlink=True) if isinstance(group, h5py.Group) else None
        if isinstance(link, h5py.ExternalLink):
            target = Path(link.filename)
            target = target if target.is_absolute() else tree.path.parent / target
            problem = f"has no {link.path}" if target.is_file() else "is missing"
            raise ImageReadError(f"{tree.path}: pixel mask file {target} (linked as {path}) {problem}")
    return None


def _read_master_metadata(tree: _Tree, shape: tuple[int, int]) -> tuple[DetectorGeometry, dict, np.ndarray | None]:
    """(geometry, metadata, static_good) of a master file whose frames have ``shape`` (slow, fast)."""
    if tree.first("/entry/instrument/detector") is None:
        raise GeometryError(
            f"{tree.path}: no /entry/instrument/detector; this looks like a data file, open its master file"
        )
    geometry, metadata = _read_geometry(tree, (shape[1], shape[0]))
    metadata.update(_detector_metadata(tree))
    mask_item = _mask_item(tree)
    if mask_item is None:
        return geometry, metadata, None
    try:
        pixel_mask = np.asarray(mask_item[()])
    except (OSError, RuntimeError) as exc:
        raise ImageReadError(f"{tree.path}: cannot read {mask_item.name}: {exc}") from None
    if pixel_mask.shape != shape:
        raise ImageReadError(f"{tree.path}: pixel_mask shape {pixel_mask.shape} differs from the image size {shape}")
    static_good = pixel_mask == 0
    static_good.setflags(write=False)
    return geometry, metadata, static_good


def _cached_master_metadata(tree: _Tree, shape: tuple[int, int]) -> tuple[DetectorGeometry, dict, np.ndarray | None]:
    """:func:`_read_master_metadata`, remembered for the few masters read most recently (keyed by mtime and size)."""
    stat = tree.path.stat()
    key = (str(tree.path.resolve()), stat.st_mtime_ns, stat.st_size, shape)
    cached = _MASTER_CACHE.get(key)
    if cached is None:
        cached = _read_master_metadata(tree, shape)
        with _MASTER_CACHE_LOCK:  # a worker's threads read frames of the same master at once
            _MASTER_CACHE[key] = cached
            while len(_MASTER_CACHE) > _MASTER_CACHE_SIZE:
                _MASTER_CACHE.pop(next(iter(_MASTER_CACHE)))
    return cached


@dataclass(frozen=True)
class NexusMaster:
    """What an NXmx master file says on its own, without its data files.

    ``good_pixels`` is ``pixel_mask == 0`` (read-only, (slow, fast)), or None when the master has no mask;
    ``metadata`` holds the detector's name, sensor material and the DECTRIS record (serial number,
    firmware, compression, bit depth, photon and threshold energies, image counts) where present.
    """

    path: Path
    geometry: DetectorGeometry
    good_pixels: np.ndarray | None
    metadata: dict
    data_files: tuple[Path, ...]


def read_master(path: str | Path) -> NexusMaster:
    """Geometry, pixel mask and detector metadata of an NXmx master file, without opening any data file.

    The image size comes from the master (``x/y_pixels_in_detector``, ``module/data_size`` or the
    pixel mask's shape), so this works while the data files are still being written, or are gone.
    Raises a :class:`DiffractionError` naming the file and what is missing or wrong.
    """
    with NexusSource(path) as source:
        return source.master()


class _Block:
    """One 3-D stack of frames: an internal dataset or the target of an external link."""

    def __init__(self, label: str, file_path: Path | None, dataset_path: str) -> None:
        self.label = label
        self.file_path = file_path  # None: inside the master file
        self.dataset_path = dataset_path
        self.dataset: Any = None
        self.handle: Any = None
        self.checker: Any = None
        self.reader: Any = None  # the fast path for one-chunk bitshuffle-LZ4 frames, when the layout allows


class NexusSource(ImageSource):
    """An NXmx master file (DECTRIS EIGER layout). Data files are opened on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = require_file(path)
        h5py = _h5()
        try:
            self._master = h5py.File(self.path, "r")
        except OSError as exc:
            raise ImageReadError(f"{self.path}: cannot open as HDF5 (truncated or corrupt?): {exc}") from None
        try:
            with _damaged_metadata_is_read_error(self.path):
                self._blocks = self._find_blocks()
            self._counts: list[int | None] = [None] * len(self._blocks)
            self._geometry: DetectorGeometry | None = None
            self._static_good: np.ndarray | None = None
            self._metadata: dict = {}
        except BaseException:
            self.close()
            raise

    # --- structure -------------------------------------------------------------------------
    def _find_blocks(self) -> list[_Block]:
        h5py = _h5()
        group = self._master.get("/entry/data")
        if not isinstance(group, h5py.Group):
            raise ImageReadError(f"{self.path}: no /entry/data group; not an NXmx master file")
        names = sorted(name for name in group if _DATA_LINK.match(name))
        if not names and "data" in group:
            names = ["data"]  # NXmx single dataset (plain or virtual)
        if not names:
            raise ImageReadError(f"{self.path}: /entry/data holds no data_NNNNNN links or data dataset")
        blocks = []
        for name in names:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                target = Path(link.filename)
                if not target.is_absolute():
                    # DECTRIS writes bare file names, relative to the master's folder.
                    target = self.path.parent / target
                blocks.append(_Block(name, target, link.path))
            else:
                blocks.append(_Block(name, None, f"/entry/data/{name}"))
        return blocks

    def _open_block(self, index: int) -> Any:
        block = self._blocks[index]
        if block.dataset is not None:
            return block.dataset
        h5py = _h5()
        where = f"{self.path}" if block.file_path is None else f"data file {block.file_path}"
        if block.file_path is None:
            handle = self._master
        else:
            if not block.file_path.exists():
                # A bare name is next to the master (named above); a link elsewhere needs its full path.
                shown = block.file_path.name if block.file_path.parent == self.path.parent else block.file_path
                raise ImageReadError(
                    f"{self.path}: data file {shown} (linked as /entry/data/{block.label}) is missing"
                )
            try:
                # SWMR: readable while the detector's file writer still appends to it.
                handle = block.handle = h5py.File(block.file_path, "r", swmr=True)
            except OSError as exc:
                raise ImageReadError(f"{where}: cannot open as HDF5 (truncated or corrupt?): {exc}") from None
        try:
            dataset = handle[block.dataset_path]
        except (KeyError, OSError, RuntimeError) as exc:
            raise ImageReadError(f"{where}: cannot open dataset {block.dataset_path}: {exc}") from None
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 3:
            raise ImageReadError(f"{where}: {block.dataset_path} is not a 3-D stack of frames")
        if dataset.dtype.kind not in "iuf":
            raise ImageReadError(f"{where}: {block.dataset_path} has non-numeric type {dataset.dtype}")
        first = self._blocks[0].dataset
        if first is not None and dataset.shape[1:] != first.shape[1:]:
            raise ImageReadError(f"{where}: frame shape {dataset.shape[1:]} differs from {first.shape[1:]}")
        block.dataset = dataset
        block.reader = frame_reader(dataset)
        block.checker = None if block.reader is not None else chunk_checker(dataset)
        self._counts[index] = int(dataset.shape[0])
        return dataset

    def __len__(self) -> int:
        return sum(self._count(i) for i in range(len(self._blocks)))

    def _count(self, index: int) -> int:
        if self._counts[index] is None:
            with _damaged_metadata_is_read_error(self.path):
                self._open_block(index)
        return int(self._counts[index])  # type: ignore[arg-type]

    def _locate(self, frame: int) -> tuple[int, int]:
        """(block index, frame within block) of a global frame index."""
        if isinstance(frame, bool) or not isinstance(frame, int | np.integer) or frame < 0:
            check_frame(frame, len(self), self.path)  # raises with the full count
        start = 0
        for index in range(len(self._blocks)):
            count = self._count(index)
            if frame < start + count:
                return index, int(frame) - start
            start += count
        check_frame(frame, start, self.path)
        raise FrameIndexError(f"{self.path}: frame index {frame} is out of range")  # unreachable

    # --- metadata ---------------------------------------------------------------------------
    def _prepare(self, shape: tuple[int, int]) -> None:
        if self._geometry is not None:
            return
        cached = _cached_master_metadata(_Tree(self.path, self._master), shape)
        self._geometry, self._metadata, self._static_good = cached

    def master(self) -> NexusMaster:
        """The master's own geometry, mask and metadata (see :func:`read_master`); no data file is opened."""
        tree = _Tree(self.path, self._master)
        with _damaged_metadata_is_read_error(self.path):
            shape = _master_shape(tree)
            if shape is None:
                raise GeometryError(f"{self.path}: the master gives no image size (no detectorSpecific/"
                                    "x_pixels_in_detector, module/data_size or pixel_mask)")
            geometry, metadata, good = _cached_master_metadata(tree, shape)
        files = tuple(block.file_path or self.path for block in self._blocks)
        return NexusMaster(self.path, geometry, good, dict(metadata), files)

    def read(self, frame: int = 0) -> DiffractionImage:
        """Read one frame (0-based, global across data files), decompressing only its chunk."""
        index, local = self._locate(frame)
        dataset = self._blocks[index].dataset
        with _damaged_metadata_is_read_error(self.path):
            self._prepare(tuple(dataset.shape[1:]))
        block = self._blocks[index]
        where = self.path if block.file_path is None else block.file_path
        # Check the compressed chunk first: a damaged one can crash the HDF5 filter.
        problem = block.checker(local) if block.checker is not None else None
        if problem:
            raise ImageReadError(f"{where}: frame {local} of {block.dataset_path} is corrupt: {problem}")
        try:
            raw = block.reader(local) if block.reader is not None else dataset[local]
        except CorruptChunk as exc:
            raise ImageReadError(f"{where}: frame {local} of {block.dataset_path} is corrupt: {exc}") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise ImageReadError(f"{where}: cannot read frame {local} of {block.dataset_path} "
                                 f"(truncated or corrupt data?): {exc}") from None
        data = _as_counts(raw)
        assert self._geometry is not None
        return DiffractionImage(
            data=data,
            mask=trusted_mask(data, self._geometry.trusted_range, self._static_good),
            geometry=self._geometry,
            source=str(self.path),
            frame_index=int(frame),
            metadata={"format": "nxmx", "data_file": str(block.file_path or self.path), **self._metadata},
        )

    def close(self) -> None:
        """Close the master and any data files opened."""
        for block in getattr(self, "_blocks", []):
            if block.handle is not None:
                block.handle.close()
                block.handle = None
            block.dataset = None
        master = getattr(self, "_master", None)
        if master is not None:
            master.close()


def _as_counts(raw: np.ndarray) -> np.ndarray:
    """Signed 32-bit counts; the top values of unsigned data become the -1/-2 markers as in dxtbx."""
    if raw.dtype == np.int32:
        return raw
    if raw.dtype == np.uint32:
        return raw.view(np.int32)  # 0xFFFFFFFF -> -1 and 0xFFFFFFFE -> -2 for free
    if raw.dtype.kind == "u" and raw.dtype.itemsize < 4:
        top = np.iinfo(raw.dtype).max
        data = raw.astype(np.int32)
        data[raw == top] = -1
        data[raw == top - 1] = -2
        return data
    if raw.dtype.kind in "iu":
        return raw.astype(np.int32)
    return raw
