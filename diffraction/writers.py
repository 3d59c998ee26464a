"""Write frames as real detectors do: PILATUS miniCBF and DECTRIS-style EIGER NXmx HDF5.

Both writers carry the geometry so :mod:`diffraction.readers` (and DIALS) read
the files back with the same geometry and identical pixels. Files appear
atomically (written under a temporary name, then renamed) so a file watcher
never sees half a file; for HDF5 the data files are complete before the master.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from beamstream.diffraction.image import DiffractionImage


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


def minicbf_header(image: DiffractionImage, exposure_time_s: float | None = None) -> str:
    """The ``# Key value`` header block PILATUS camserver writes, from the image's geometry."""
    g = image.geometry
    exposure = exposure_time_s or float(image.metadata.get("exposure_time", 0.02))
    stamp = image.metadata.get("timestamp") or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    name = g.detector_name or "PILATUS 6M"
    lines = [
        f"# Detector: {name}, S/N 00-0000 (Beamstream synthetic)",
        f"# {stamp}",
        f"# Pixel_size {g.pixel_size_mm[0] * 1e3:.10g}e-6 m x {g.pixel_size_mm[1] * 1e3:.10g}e-6 m",
        f"# Silicon sensor, thickness {g.thickness_mm / 1e3:.6f} m",
        f"# Exposure_time {exposure:.7f} s",
        f"# Exposure_period {exposure:.7f} s",
        "# Tau = 0 s",
        f"# Count_cutoff {int(g.trusted_range[1])} counts",
        f"# Wavelength {g.wavelength_A:.10g} A",
        f"# Detector_distance {g.distance_mm / 1e3:.10g} m",
        f"# Beam_xy ({g.beam_center_px[0]:.10g}, {g.beam_center_px[1]:.10g}) pixels",
        f"# Start_angle {float(image.metadata.get('start_angle', 0.0)):.4f} deg.",
        f"# Angle_increment {float(image.metadata.get('angle_increment', 0.0)):.4f} deg.",
        "# Detector_2theta 0.0000 deg.",
        "# Polarization 0.990",
    ]
    return "\r\n".join(lines)


def write_cbf(image: DiffractionImage, path: str | Path) -> Path:
    """Write a byte-offset miniCBF; a ``.bz2`` or ``.gz`` suffix compresses it. Returns the path."""
    from fabio.cbfimage import CbfImage  # deferred: fabio's import is slow

    path = Path(path)
    header = {
        "_array_data.header_convention": '"PILATUS_1.2"',
        "_array_data.header_contents": minicbf_header(image),
    }
    partial = _atomic_target(path)
    try:
        CbfImage(data=np.ascontiguousarray(image.data, dtype=np.int32), header=header).write(str(partial))
        if path.name.endswith((".bz2", ".gz")):
            raw = partial.read_bytes()
            packed = bz2.compress(raw, 5) if path.name.endswith(".bz2") else gzip.compress(raw, 5)
            partial.write_bytes(packed)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def nexus_file_names(master: str | Path, n_data_files: int) -> list[Path]:
    """DECTRIS naming: ``x_master.h5`` links ``x_data_000001.h5``, ``x_data_000002.h5``, ..."""
    master = Path(master)
    prefix = re.sub(r"_master$", "", master.name.removesuffix(".h5").removesuffix(".nxs"))
    return [master.with_name(f"{prefix}_data_{i:06d}.h5") for i in range(1, n_data_files + 1)]


def _compression(compression: str | None) -> dict:
    if compression is None:
        return {}
    if compression == "bslz4":
        import hdf5plugin

        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if compression == "lz4":  # the HDF5 LZ4 filter of early EIGER firmware
        import hdf5plugin

        return dict(hdf5plugin.LZ4())
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1}
    raise ValueError(f"unknown compression {compression!r}; use 'bslz4', 'lz4', 'gzip' or None")


def write_nexus(
    images: Iterable[DiffractionImage],
    master: str | Path,
    *,
    frames_per_file: int = 100,
    compression: str | None = "bslz4",
    pixel_mask: np.ndarray | None = None,
) -> Path:
    """Write an EIGER-style series: data files of up to ``frames_per_file`` frames, then the master.

    ``compression`` is ``"bslz4"`` (bitshuffle + LZ4, current EIGERs), ``"lz4"``
    (early EIGER firmware), ``"gzip"`` or None.
    Frames are stored as uint32, one chunk per frame, so -1/-2 markers become
    0xFFFFFFFF/0xFFFFFFFE as on a real EIGER. The first image supplies the
    geometry; ``pixel_mask`` (non-zero = bad) defaults to bit 0 for -1 pixels
    (gaps) and bit 1 for -2 pixels (dead) of the first image. Returns the master path.
    """
    import h5py

    if frames_per_file < 1:
        raise ValueError(f"frames_per_file must be at least 1, got {frames_per_file}")
    master = Path(master)
    options = _compression(compression)
    data_files: list[Path] = []
    first: DiffractionImage | None = None
    handle = dataset = None
    n_frames = 0
    angles: list[float] = []  # per-frame goniometer angle (rotation data sets it; stills keep 0)
    try:
        for image in images:
            if first is None:
                first = image
            elif image.data.shape != first.data.shape:
                raise ValueError(f"frame {n_frames} has shape {image.data.shape}, expected {first.data.shape}")
            if dataset is None or dataset.shape[0] == frames_per_file:
                _finish_data_file(handle, dataset, n_frames)
                data_files.append(nexus_file_names(master, len(data_files) + 1)[-1])
                handle = h5py.File(_atomic_target(data_files[-1]), "w")
                dataset = _new_data_file(handle, image.data.shape, options)
            dataset.resize(dataset.shape[0] + 1, axis=0)
            dataset[-1] = np.ascontiguousarray(image.data, dtype=np.int32).view(np.uint32)
            n_frames += 1
            angles.append(float(image.metadata.get("start_angle", 0.0)))
        if first is None:
            raise ValueError("no frames to write")
        _finish_data_file(handle, dataset, n_frames)
        handle = None
        for name in data_files:
            os.replace(_atomic_target(name), name)
        write_master(first, master, data_files, omega=angles, pixel_mask=pixel_mask)
    finally:
        if handle is not None:
            handle.close()
        for name in [*data_files, master]:
            _atomic_target(name).unlink(missing_ok=True)
    return master


def write_master(
    image: DiffractionImage,
    master: str | Path,
    data_files: list[Path],
    *,
    omega: list[float] | np.ndarray | None = None,
    pixel_mask: np.ndarray | None = None,
) -> Path:
    """Write (atomically) an NXmx master linking ``data_files``, with the geometry of ``image``.

    For series whose data files are written separately: ``omega`` gives every
    frame's goniometer angle (its length is the series' frame count; default:
    a single frame at 0 degrees). ``pixel_mask`` defaults as in
    :func:`write_nexus`. Returns the master path.
    """
    import h5py

    master = Path(master)
    angles = np.zeros(1) if omega is None else np.asarray(omega, dtype=float)
    if pixel_mask is None:
        pixel_mask = np.where(image.data == -1, 1, 0).astype(np.uint32)
        pixel_mask[image.data == -2] = 2
    partial = _atomic_target(master)
    try:
        with h5py.File(partial, "w") as out:
            _write_master_tree(out, image, [Path(name) for name in data_files], angles, pixel_mask)
        os.replace(partial, master)
    finally:
        partial.unlink(missing_ok=True)
    return master


def _new_data_file(handle, shape: tuple[int, int], options: dict):
    entry = handle.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    group = entry.create_group("data")
    group.attrs["NX_class"] = "NXdata"
    return group.create_dataset(
        "data", shape=(0, *shape), maxshape=(None, *shape), dtype=np.uint32, chunks=(1, *shape), **options
    )


def _finish_data_file(handle, dataset, n_frames_so_far: int) -> None:
    if handle is None:
        return
    # DECTRIS numbers images from 1 across the whole series.
    dataset.attrs["image_nr_low"] = np.int32(n_frames_so_far - dataset.shape[0] + 1)
    dataset.attrs["image_nr_high"] = np.int32(n_frames_so_far)
    handle.close()


def _group(parent, name: str, nx_class: str):
    group = parent.require_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _value(group, name: str, value, units: str | None = None, **attrs):
    dataset = group.create_dataset(name, data=value)
    if units is not None:
        dataset.attrs["units"] = units
    for key, item in attrs.items():
        dataset.attrs[key] = item
    return dataset


def _write_master_tree(out, image: DiffractionImage, data_files: list[Path], omega: np.ndarray, pixel_mask) -> None:
    """The NXmx tree (DECTRIS filewriter layout) describing the geometry of ``image``.

    ``omega`` holds each frame's goniometer angle (degrees), one per frame.
    """
    n_frames = omega.size
    import h5py

    g = image.geometry
    nx, ny = g.image_size_px
    entry = _group(out, "entry", "NXentry")
    _value(entry, "definition", "NXmx")
    _value(entry, "start_time", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    data = _group(entry, "data", "NXdata")
    for i, name in enumerate(data_files, start=1):
        data[f"data_{i:06d}"] = h5py.ExternalLink(name.name, "/entry/data/data")

    instrument = _group(entry, "instrument", "NXinstrument")
    beam = _group(instrument, "beam", "NXbeam")
    _value(beam, "incident_wavelength", g.wavelength_A, "angstrom")
    source = _group(instrument, "source", "NXsource")
    _value(source, "name", "Beamstream synthetic source")

    det = _group(instrument, "detector", "NXdetector")
    px_m, py_m = g.pixel_size_mm[0] / 1e3, g.pixel_size_mm[1] / 1e3
    _value(det, "description", g.detector_name or "EIGER2 16M")
    _value(det, "beam_center_x", g.beam_center_px[0], "pixel")
    _value(det, "beam_center_y", g.beam_center_px[1], "pixel")
    _value(det, "x_pixel_size", px_m, "m")
    _value(det, "y_pixel_size", py_m, "m")
    _value(det, "detector_distance", g.distance_mm / 1e3, "m")
    _value(det, "count_time", float(image.metadata.get("exposure_time", 0.01)), "s")
    _value(det, "sensor_material", "Silicon")
    _value(det, "sensor_thickness", g.thickness_mm / 1e3, "m")
    _value(det, "saturation_value", np.int64(g.trusted_range[1]))
    _value(det, "bit_depth_image", np.int32(32))
    _value(det, "bit_depth_readout", np.int32(32))
    _value(det, "depends_on", "/entry/instrument/detector/transformations/translation")
    det.create_dataset("pixel_mask", data=np.asarray(pixel_mask, dtype=np.uint32), compression="gzip",
                       compression_opts=1, chunks=True)
    specific = _group(det, "detectorSpecific", "NXcollection")
    specific["pixel_mask"] = det["pixel_mask"]  # DECTRIS keeps both paths; a hard link costs nothing
    _value(specific, "countrate_correction_count_cutoff", np.int64(g.trusted_range[1]))
    _value(specific, "nimages", np.int64(n_frames))
    _value(specific, "ntrigger", np.int64(1))
    _value(specific, "x_pixels_in_detector", np.int64(nx))
    _value(specific, "y_pixels_in_detector", np.int64(ny))
    _value(specific, "software_version", "beamstream-synthetic")

    transformations = _group(det, "transformations", "NXtransformations")
    _value(transformations, "translation", g.distance_mm / 1e3, "m", transformation_type="translation",
           vector=np.array([0.0, 0.0, 1.0]), depends_on=".")
    # Module origin in McStas coordinates (x and z flipped from imgCIF): the first
    # pixel's corner sits beam_centre pixels from the beam axis.
    offset = np.array([g.beam_center_px[0] * px_m, g.beam_center_px[1] * py_m, 0.0])
    norm = float(np.linalg.norm(offset)) or 1.0
    module = _group(det, "module", "NXdetector_module")
    _value(module, "data_origin", np.array([0, 0], dtype=np.int32))
    _value(module, "data_size", np.array([ny, nx], dtype=np.int32))
    _value(module, "data_stride", np.array([1, 1], dtype=np.int32))
    _value(module, "module_offset", norm, "m", transformation_type="translation", vector=offset / norm,
           offset=np.zeros(3), depends_on="/entry/instrument/detector/transformations/translation")
    mcstas = np.array([-1.0, 1.0, -1.0])
    axes = (
        ("fast_pixel_direction", g.fast_axis or (1.0, 0.0, 0.0), px_m),
        ("slow_pixel_direction", g.slow_axis or (0.0, -1.0, 0.0), py_m),
    )
    for name, axis, size in axes:
        _value(module, name, size, "m", transformation_type="translation",
               vector=np.asarray(axis, dtype=float) * mcstas + 0.0, offset=np.zeros(3),
               depends_on="/entry/instrument/detector/module/module_offset")

    sample = _group(entry, "sample", "NXsample")
    _value(sample, "depends_on", "/entry/sample/transformations/omega")
    sample["beam"] = beam  # older readers look for the beam under the sample
    # Omega per frame: constant for stills, stepping by angle_increment for rotation data.
    sample_axes = _group(sample, "transformations", "NXtransformations")
    _value(sample_axes, "omega", omega, "deg", transformation_type="rotation",
           vector=np.array([-1.0, 0.0, 0.0]), depends_on=".")
    goniometer = _group(sample, "goniometer", "NXcollection")
    goniometer["omega"] = sample_axes["omega"]
    _value(goniometer, "omega_range_average", float(image.metadata.get("angle_increment", 0.0)), "deg")
