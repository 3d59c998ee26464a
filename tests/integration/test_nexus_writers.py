"""NXmx master files from real writers: Diamond's nexgen and a DECTRIS EIGER's own firmware.

nexgen (PyPI) writes the master as Diamond's beamlines do, linking the data files and, for an
EIGER, the pixel mask and the DECTRIS record in the ``_meta.h5`` file the detector's writer leaves
next to it; the data and meta files are written here as that writer does (bitshuffle-LZ4, one chunk
per frame). The real EIGER 9M master in ``../shared/data/dectris_eiger/`` has lost its data file:
its geometry must still read, and a frame must fail with one line naming the missing file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from beamstream.diffraction.analysis import SpotFindingParams, analyse_image
from beamstream.diffraction.detectors import get_preset, module_gap_mask
from beamstream.diffraction.errors import ImageReadError
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.readers import count_frames, open_image, open_source, read_master
from beamstream.diffraction.readers._common import trusted_mask
from beamstream.producers.scanning import make_scanner

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DECTRIS_MASTER = DATA / "dectris_eiger" / "dectris_eiger_master.h5"

# The experiment nexgen records: an EIGER2 X 1M (two modules, one above the other).
PRESET = get_preset("eiger2_1m")
NX, NY = PRESET.image_size_px  # 1028 x 1062
BEAM_CENTRE = (520.25, 540.75)
DISTANCE_MM = 150.0
WAVELENGTH_A = 0.9762
OVERLOAD = 126_000
N_FRAMES = 3
GAP = np.uint32(0xFFFFFFFF)  # what an EIGER2 writes on gap pixels in 32-bit images
# Four-pixel clusters of hot pixels: strong and big enough to pass as spots unless masked.
HOT_CORNERS = ((100, 100), (900, 300), (300, 800))
MASK_GAP, MASK_NOISY = 1, 16  # DECTRIS pixel_mask bits


def _spots_of_frame(frame: int) -> np.ndarray:
    """Known (x, y) spot centres of a frame: a different set on each frame, all on active pixels."""
    rng = np.random.default_rng(100 + frame)
    gaps = module_gap_mask((NX, NY), PRESET.layout)
    spots: list[tuple[float, float]] = []
    while len(spots) < 8 + 3 * frame:
        x, y = rng.uniform(40, NX - 40), rng.uniform(40, NY - 40)
        near_gap = gaps[int(y) - 6 : int(y) + 7, int(x) - 6 : int(x) + 7].any()
        near_spot = any(abs(x - sx) < 25 and abs(y - sy) < 25 for sx, sy in spots)
        near_hot = any(abs(x - hx) < 25 and abs(y - hy) < 25 for hx, hy in HOT_CORNERS)
        if not (near_gap or near_spot or near_hot):
            spots.append((x, y))
    return np.array(spots)


def _frame(frame: int, gaps: np.ndarray) -> np.ndarray:
    """uint32 counts of one frame: Poisson background, Gaussian spots, hot clusters, gap markers."""
    rng = np.random.default_rng(frame)
    data = rng.poisson(1.5, size=(NY, NX)).astype(np.float64)
    yy, xx = np.mgrid[0:NY, 0:NX]
    for x, y in _spots_of_frame(frame):
        window = (slice(int(y) - 5, int(y) + 6), slice(int(x) - 5, int(x) + 6))
        # Pixel centres at +0.5 (the DIALS convention the spot finder reports in).
        stamp = np.exp(-(((xx[window] + 0.5 - x) ** 2 + (yy[window] + 0.5 - y) ** 2) / (2 * 1.1**2)))
        data[window] += 4000 * stamp / stamp.sum()
    counts = np.rint(data).astype(np.uint32)
    for hx, hy in HOT_CORNERS:
        counts[hy : hy + 2, hx : hx + 2] = 5000  # below the overload: only the pixel mask stops them
    counts[gaps] = GAP
    return counts


def _pixel_mask(gaps: np.ndarray) -> np.ndarray:
    mask = np.where(gaps, MASK_GAP, 0).astype(np.uint32)
    for hx, hy in HOT_CORNERS:
        mask[hy : hy + 2, hx : hx + 2] = MASK_NOISY
    return mask


def _write_detector_files(folder: Path, gaps: np.ndarray) -> list[np.ndarray]:
    """The data and meta files an EIGER's file writer leaves (Odin layout at Diamond): ``scan_000001.h5``
    with ``/data`` and ``scan_meta.h5`` with the mask, flat field and the ``_dectris`` record."""
    frames = [_frame(i, gaps) for i in range(N_FRAMES)]
    with h5py.File(folder / "scan_000001.h5", "w") as out:
        out.create_dataset("data", data=np.stack(frames), chunks=(1, NY, NX), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(folder / "scan_meta.h5", "w") as meta:
        meta.create_dataset("mask", data=_pixel_mask(gaps), compression="gzip")
        meta.create_dataset("flatfield", data=np.ones((NY, NX), dtype=np.float32), compression="gzip")
        record = meta.create_group("_dectris")
        for name, value in (("bit_depth_image", 32), ("detector_readout_time", 1e-7), ("threshold_energy", 6350.0),
                            ("photon_energy", 12700.5), ("software_version", b"1.8.0"), ("ntrigger", 1),
                            ("flatfield_correction_applied", 1), ("pixel_mask_applied", 0)):
            record.create_dataset(name, data=value)
    return frames


def _write_master_with_nexgen(master: Path, data_file: Path) -> None:
    from nexgen.nxs_utils import (
        Attenuator,
        Axis,
        Beam,
        Detector,
        EigerDetector,
        Goniometer,
        Source,
        TransformationType,
    )
    from nexgen.nxs_write.nxmx_writer import NXmxFileWriter

    omega = Axis("omega", ".", TransformationType.ROTATION, (-1, 0, 0), start_pos=0.0, increment=0.1,
                 num_steps=N_FRAMES)
    detector_axes = [
        Axis("two_theta", ".", TransformationType.ROTATION, (1, 0, 0), 0.0),
        Axis("det_z", "two_theta", TransformationType.TRANSLATION, (0, 0, 1), DISTANCE_MM),
    ]
    params = EigerDetector(PRESET.name, (NY, NX), "Si", OVERLOAD, 0)
    # Module vectors in McStas: fast along -x, slow along -y (the standard MX orientation).
    detector = Detector(params, detector_axes, list(BEAM_CENTRE), 0.01, [(-1, 0, 0), (0, -1, 0)])
    writer = NXmxFileWriter(master, Goniometer([omega]), detector, Source("I03"), Beam(WAVELENGTH_A),
                            Attenuator(1.0), N_FRAMES)
    writer.write(image_datafiles=[data_file])


@pytest.fixture(scope="module")
def nexgen_scan(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A nexgen master ``scan.nxs`` with its data and meta files; the frames as written (uint32)."""
    folder = tmp_path_factory.mktemp("nexgen")
    gaps = module_gap_mask((NX, NY), PRESET.layout)
    frames = _write_detector_files(folder, gaps)
    _write_master_with_nexgen(folder / "scan.nxs", folder / "scan_000001.h5")
    return folder / "scan.nxs", frames


def test_nexgen_writes_the_diamond_layout(nexgen_scan):
    master, _ = nexgen_scan
    with h5py.File(master) as f:
        assert f["/entry/definition"][()] == b"NXmx"
        data_link = f["/entry/data"].get("data_000001", getlink=True)
        assert (data_link.filename, data_link.path) == ("scan_000001.h5", "data")
        mask_link = f["/entry/instrument/detector"].get("pixel_mask", getlink=True)
        assert (mask_link.filename, mask_link.path) == ("scan_meta.h5", "mask")
        # nexgen gives the distance as `distance`, not DECTRIS's `detector_distance`.
        assert "detector_distance" not in f["/entry/instrument/detector"]
    with h5py.File(master.with_name("scan_000001.h5")) as f:
        assert f["data"].id.get_create_plist().get_filter(0)[0] == 32008  # bitshuffle
        assert f["data"].id.get_create_plist().get_filter(0)[2][4] == 2  # ... with LZ4


def test_nexgen_master_geometry_is_what_was_written(nexgen_scan):
    master, _ = nexgen_scan
    g = read_master(master).geometry
    assert g.beam_center_px == BEAM_CENTRE
    assert g.distance_mm == DISTANCE_MM
    assert g.wavelength_A == WAVELENGTH_A
    assert g.pixel_size_mm == (0.075, 0.075)
    assert g.image_size_px == (NX, NY)
    assert g.thickness_mm == 0.45 and g.mu_per_mm > 0  # silicon: parallax correction on
    assert g.trusted_range == (0.0, float(OVERLOAD))
    assert g.detector_name == PRESET.name
    assert g.fast_axis == (1.0, 0.0, 0.0) and g.slow_axis == (0.0, -1.0, 0.0)
    with h5py.File(master) as f:
        offset = f["/entry/instrument/detector/module/module_offset"]
        # nexgen's own origin of the first pixel (McStas, m) is ours flipped to imgCIF, in mm.
        mcstas_mm = np.asarray(offset.attrs["vector"]) * offset[()] * 1e3
    assert g.origin_mm[:2] == pytest.approx((-mcstas_mm[0], mcstas_mm[1]), abs=1e-9)
    assert g.origin_mm[2] == -DISTANCE_MM


def test_nexgen_mask_comes_from_the_meta_file(nexgen_scan):
    master, _ = nexgen_scan
    info = read_master(master)
    with h5py.File(master.with_name("scan_meta.h5")) as meta:
        written = meta["mask"][()]
    assert np.array_equal(info.good_pixels, written == 0)
    assert not info.good_pixels[HOT_CORNERS[0][1], HOT_CORNERS[0][0]]
    # The DECTRIS record nexgen links into the meta file travels with the geometry.
    assert info.metadata["bit_depth_image"] == 32
    assert info.metadata["software_version"] == "1.8.0"
    assert info.metadata["nimages"] == N_FRAMES


def test_nexgen_frames_read_back_through_the_bitshuffle_fast_path(nexgen_scan):
    master, frames = nexgen_scan
    assert count_frames(master) == N_FRAMES
    with open_source(master) as source:
        images = [source.read(i) for i in range(N_FRAMES)]
        assert source._blocks[0].reader is not None  # decompressed outside HDF5's lock
    for image, written in zip(images, frames, strict=True):
        assert np.array_equal(image.data, written.view(np.int32))  # gaps become -1
        assert image.geometry == read_master(master).geometry
        # Usable: inside [0, overload] and not flagged in the meta file's mask.
        assert np.array_equal(image.mask, (written <= OVERLOAD) & read_master(master).good_pixels)


def test_spot_finder_finds_the_written_spots_and_no_masked_hot_pixels(nexgen_scan):
    master, _ = nexgen_scan
    with open_source(master) as source:
        for frame in range(N_FRAMES):
            image = source.read(frame)
            found = analyse_image(image, SpotFindingParams(filter_ice=False)).spots
            truth = _spots_of_frame(frame)
            assert len(found) == len(truth), f"frame {frame}"
            xy = np.column_stack([found["x_px"], found["y_px"]])
            for x, y in truth:
                assert np.min(np.hypot(xy[:, 0] - x, xy[:, 1] - y)) < 0.3, f"frame {frame}: no spot at {x, y}"


def test_without_the_pixel_mask_the_hot_pixels_would_be_spots(nexgen_scan):
    # The control for the test above: the meta file's mask is what keeps the hot clusters out.
    master, _ = nexgen_scan
    image = open_image(master, 0)
    unmasked = DiffractionImage(image.data, trusted_mask(image.data, image.geometry.trusted_range), image.geometry)
    found = analyse_image(unmasked, SpotFindingParams(filter_ice=False)).spots
    assert len(found) == len(_spots_of_frame(0)) + len(HOT_CORNERS)


def test_the_file_watcher_finds_the_frames_of_a_nexgen_master(nexgen_scan):
    master, _ = nexgen_scan
    refs = make_scanner(master, N_FRAMES).scan()
    assert [(ref.image_number, ref.frame_index) for ref in refs] == [(1, 0), (2, 1), (3, 2)]


def test_a_missing_meta_file_is_one_line_naming_it(nexgen_scan, tmp_path):
    master, _ = nexgen_scan
    shutil.copy(master, tmp_path / "scan.nxs")
    shutil.copy(master.with_name("scan_000001.h5"), tmp_path / "scan_000001.h5")
    for read in (read_master, open_image):
        with pytest.raises(ImageReadError) as caught:
            read(tmp_path / "scan.nxs")
        message = str(caught.value)
        assert "\n" not in message
        assert f"pixel mask file {tmp_path / 'scan_meta.h5'}" in message


def test_nexgen_scan_through_the_command_line(nexgen_scan):
    master, _ = nexgen_scan
    result = subprocess.run([sys.executable, "-m", "beamstream", "analyse", f"{master}:1-3", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image_number"] for row in rows] == [1, 2, 3]
    assert [row["n_spots_total"] for row in rows] == [len(_spots_of_frame(i)) for i in range(N_FRAMES)]


# --- the real DECTRIS EIGER 9M master (2016 firmware); its data file is not available -------------


@pytest.fixture(scope="module")
def dectris() -> h5py.File:
    if not DECTRIS_MASTER.is_file():
        pytest.fail(f"shared data file {DECTRIS_MASTER} is missing")
    with h5py.File(DECTRIS_MASTER) as handle:
        yield handle


def _value(handle: h5py.File, name: str):
    return handle[f"/entry/instrument/detector/{name}"][()]


def test_real_eiger_geometry_matches_the_master(dectris):
    g = read_master(DECTRIS_MASTER).geometry
    assert g.distance_mm == pytest.approx(_value(dectris, "detector_distance") * 1e3, rel=1e-7)
    assert g.distance_mm == 134.255  # float32 in the file: the decimal the firmware meant, not its noise
    assert g.beam_center_px == pytest.approx((_value(dectris, "beam_center_x"), _value(dectris, "beam_center_y")))
    pixel_m = (_value(dectris, "x_pixel_size"), _value(dectris, "y_pixel_size"))
    assert g.pixel_size_mm == pytest.approx((pixel_m[0] * 1e3, pixel_m[1] * 1e3))
    assert g.pixel_size_mm == (0.075, 0.075)
    assert g.wavelength_A == pytest.approx(dectris["/entry/instrument/beam/incident_wavelength"][()], rel=1e-7)
    assert g.thickness_mm == pytest.approx(_value(dectris, "sensor_thickness") * 1e3) == 0.45
    assert g.image_size_px == (_value(dectris, "detectorSpecific/x_pixels_in_detector"),
                               _value(dectris, "detectorSpecific/y_pixels_in_detector")) == (3110, 3269)
    assert g.trusted_range == (0.0, float(_value(dectris, "detectorSpecific/countrate_correction_count_cutoff")))
    assert g.detector_name == "Dectris Eiger 9M"
    # The firmware's own NXgeometry gives the first pixel's corner in McStas (m): ours is it in imgCIF (mm).
    corner = dectris["/entry/instrument/detector/geometry/translation/distances"][()]
    assert g.origin_mm == pytest.approx((-corner[0] * 1e3, corner[1] * 1e3, corner[2] * 1e3), abs=1e-3)


def test_real_eiger_mask_and_detector_record(dectris):
    info = read_master(DECTRIS_MASTER)
    assert np.array_equal(info.good_pixels, _value(dectris, "detectorSpecific/pixel_mask") == 0)
    assert info.metadata["sensor_material"] == _value(dectris, "sensor_material").decode() == "Si"
    assert info.geometry.mu_per_mm > 0  # silicon is tabulated: the parallax correction applies
    assert info.metadata["detector_number"] == "E-18-0102"
    assert info.metadata["compression"] == "bslz4"
    assert info.metadata["firmware_version"].startswith("eiger-1.6.4")
    assert info.metadata["photon_energy_eV"] == 12650.0
    assert info.data_files == (DECTRIS_MASTER.with_name("dectris_eiger_data_000001.h5"),)
    assert not info.data_files[0].exists()


def test_real_eiger_frame_is_one_line_naming_the_missing_data_file():
    for read in (open_image, count_frames):
        with pytest.raises(ImageReadError) as caught:
            read(DECTRIS_MASTER)
        assert str(caught.value) == (f"{DECTRIS_MASTER}: data file dectris_eiger_data_000001.h5 "
                                     "(linked as /entry/data/data_000001) is missing")


def test_real_eiger_through_the_command_line_exits_2_with_that_line():
    result = subprocess.run([sys.executable, "-m", "beamstream", "analyse", f"{DECTRIS_MASTER}:1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"beamstream analyse: error: {DECTRIS_MASTER}: data file dectris_eiger_data_000001.h5 "
        "(linked as /entry/data/data_000001) is missing"
    ]
