"""Readers: real PILATUS CBFs from a thaumatin grid scan, and generated EIGER HDF5 / CBF round trips."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from beamstream.diffraction.detectors import PILATUS, module_gap_mask
from beamstream.diffraction.errors import FrameIndexError
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.readers import count_frames, detect_format, iter_frames, open_image, open_source
from beamstream.diffraction.readers.nexus import _as_counts
from beamstream.diffraction.synthetic import SyntheticSpec, generate_frames, generate_image
from beamstream.diffraction.writers import write_cbf, write_master, write_nexus

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
THAUMATIN = DATA / "thaumatin_grid"
FIRST = THAUMATIN / "thau_3_2_0001.cbf.bz2"


@pytest.fixture(scope="module")
def thaumatin_image() -> DiffractionImage:
    if not FIRST.exists():
        pytest.fail(f"shared data file {FIRST} is missing")
    return open_image(FIRST)


def test_real_cbf_geometry_comes_from_the_minicbf_header(thaumatin_image):
    g = thaumatin_image.geometry
    assert g.wavelength_A == pytest.approx(0.96859)
    assert g.distance_mm == pytest.approx(351.0)
    assert g.beam_center_px == pytest.approx((1261.61, 1306.96))
    assert g.pixel_size_mm == pytest.approx((0.172, 0.172))
    assert g.image_size_px == (2463, 2527)
    assert g.trusted_range == (0.0, 115897.0)
    assert g.thickness_mm == pytest.approx(0.45)
    assert g.detector_name == "PILATUS3 6M"
    # dxtbx's panel frame: origin puts the beam centre on the beam axis.
    assert g.fast_axis == (1.0, 0.0, 0.0) and g.slow_axis == (0.0, -1.0, 0.0)
    assert g.origin_mm == pytest.approx((-1261.61 * 0.172, 1306.96 * 0.172, -351.0))
    assert 3.7 < g.mu_per_mm < 4.0  # silicon at 12.8 keV
    assert thaumatin_image.metadata["exposure_time"] == pytest.approx(0.019)


def test_real_cbf_mask_covers_gaps_and_bad_pixels(thaumatin_image):
    data, mask = thaumatin_image.data, thaumatin_image.mask
    assert data.shape == (2527, 2463) and data.dtype == np.int32
    assert np.count_nonzero(data == -1) > 500_000 and np.count_nonzero(data == -2) > 0
    assert not mask[data < 0].any()
    assert not mask[data > 115897].any()
    # Everything else is usable, and the known PILATUS module gaps are masked.
    assert np.array_equal(~mask, (data < 0) | (data > 115897))
    gaps = module_gap_mask((2463, 2527), PILATUS)
    assert not mask[gaps].any()
    assert not mask[:, 487:494].any() and not mask[195:212, :].any()


def test_real_cbf_counts_one_frame_and_refuses_others():
    assert count_frames(FIRST) == 1
    assert detect_format(FIRST) == "cbf"
    assert [image.frame_index for image in iter_frames(FIRST)] == [0]
    with pytest.raises(FrameIndexError, match="thau_3_2_0001.cbf.bz2.*out of range"):
        open_image(FIRST, frame=1)


def test_all_real_files_share_the_geometry():
    files = sorted(THAUMATIN.glob("thau_3_2_*.cbf.bz2"))
    assert len(files) == 16
    last = open_image(files[-1])
    assert last.geometry.beam_center_px == pytest.approx((1261.61, 1306.96))
    assert last.geometry.trusted_range[1] == 115897.0


def _assert_same(read: DiffractionImage, written: DiffractionImage) -> None:
    assert read.data.dtype == np.int32
    assert np.array_equal(read.data, written.data)
    assert np.array_equal(read.mask, written.mask)
    assert read.geometry == written.geometry


@pytest.fixture(scope="module")
def eiger_series(tmp_path_factory):
    """Five EIGER2 4M frames (one empty) written two per data file."""
    folder = tmp_path_factory.mktemp("eiger")
    frames = list(generate_frames(5, SyntheticSpec(detector="eiger2_4m"), seed=11, strengths=[1, 0.5, 0, 1, 0.8]))
    master = write_nexus(frames, folder / "grid_master.h5", frames_per_file=2)
    return master, frames


def test_eiger_series_reads_back_frame_by_frame(eiger_series):
    master, frames = eiger_series
    assert master.name == "grid_master.h5"
    assert sorted(p.name for p in master.parent.iterdir()) == [
        "grid_data_000001.h5", "grid_data_000002.h5", "grid_data_000003.h5", "grid_master.h5",
    ]
    assert count_frames(master) == 5
    assert detect_format(master) == "nexus"
    for index in (4, 0, 2, 3, 1):  # any order: global index across data files
        image = open_image(master, index)
        _assert_same(image, frames[index])
        assert image.frame_index == index
    read = list(iter_frames(master))
    assert [image.frame_index for image in read] == [0, 1, 2, 3, 4]
    assert read[3].metadata["data_file"].endswith("grid_data_000002.h5")


def test_bitshuffle_lz4_frames_are_decompressed_outside_hdf5_and_match_its_filter(eiger_series):
    master, frames = eiger_series
    source = open_source(master)
    for index in range(len(frames)):
        fast = source.read(index)
        block, local = source._blocks[source._locate(index)[0]], source._locate(index)[1]
        assert block.reader is not None  # the one-chunk-per-frame bitshuffle-LZ4 layout takes the fast path
        through_hdf5 = _as_counts(block.dataset[local])
        assert np.array_equal(fast.data, through_hdf5)
        _assert_same(fast, frames[index])


def test_other_layouts_are_read_through_hdf5(tmp_path):
    frames = list(generate_frames(2, SyntheticSpec(detector="eiger2_4m"), seed=3, strengths=[1, 0]))
    master = write_nexus(frames, tmp_path / "plain_master.h5", compression=None)
    source = open_source(master)
    image = source.read(1)
    assert source._blocks[0].reader is None
    _assert_same(image, frames[1])


def test_eiger_master_follows_the_dectris_layout(eiger_series):
    master, frames = eiger_series
    with h5py.File(master) as f:
        link = f["/entry/data"].get("data_000002", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "grid_data_000002.h5"
        det = f["/entry/instrument/detector"]
        assert det["x_pixel_size"][()] == pytest.approx(75e-6) and det["x_pixel_size"].attrs["units"] == "m"
        assert f["/entry/instrument/beam/incident_wavelength"][()] == pytest.approx(0.96859)
        assert det["detectorSpecific/nimages"][()] == 5
        mask = det["pixel_mask"][()]
        assert mask.shape == (2162, 2068)
        assert np.array_equal(mask != 0, frames[0].data < 0)  # gaps (1) and dead pixels (2)
        assert set(np.unique(mask)) == {0, 1, 2}
    with h5py.File(master.with_name("grid_data_000002.h5")) as f:
        data = f["/entry/data/data"]
        assert data.chunks == (1, 2162, 2068)  # one chunk per frame: read one, decompress one
        assert data.dtype == np.uint32
        assert data.id.get_create_plist().get_filter(0)[0] == 32008  # bitshuffle (LZ4)
        assert (data.attrs["image_nr_low"], data.attrs["image_nr_high"]) == (3, 4)
        assert data[0].max() == 0xFFFFFFFF  # gaps as a real EIGER writes them


def test_eiger_geometry_round_trips_exactly(eiger_series):
    master, frames = eiger_series
    g = open_image(master, 0).geometry
    assert g == frames[0].geometry
    assert g.image_size_px == (2068, 2162)
    assert g.pixel_size_mm == (0.075, 0.075)
    assert g.detector_name == "EIGER2 X 4M"


def test_data_files_resolve_next_to_the_master_from_any_directory(eiger_series, tmp_path, monkeypatch):
    master, frames = eiger_series
    monkeypatch.chdir(tmp_path)
    _assert_same(open_image(master, 4), frames[4])


def test_open_source_keeps_files_open_for_many_frames(eiger_series):
    master, frames = eiger_series
    with open_source(master) as source:
        assert len(source) == 5
        _assert_same(source.read(1), frames[1])
        _assert_same(source.read(3), frames[3])


@pytest.mark.parametrize("name", ["frame.cbf", "frame.cbf.bz2", "frame.cbf.gz"])
def test_generated_cbf_reads_back_identically(tmp_path, name):
    image = generate_image(SyntheticSpec(detector="pilatus6m"), seed=5)
    path = write_cbf(image, tmp_path / name)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    read = open_image(path)
    _assert_same(read, image)
    assert read.metadata["format"] == "cbf"


def test_format_detection_uses_content_not_name(tmp_path, eiger_series):
    image = generate_image(SyntheticSpec(detector="eiger2_4m"), seed=2)
    write_cbf(image, tmp_path / "a.cbf")
    os.rename(tmp_path / "a.cbf", tmp_path / "frame.img")
    assert detect_format(tmp_path / "frame.img") == "cbf"
    _assert_same(open_image(tmp_path / "frame.img"), image)
    master, _ = eiger_series
    copy = tmp_path / "series.bin"
    shutil.copy(master, copy)
    assert detect_format(copy) == "nexus"


def test_eiger_data_of_other_widths_becomes_signed_counts_with_markers():
    raw16 = np.array([[0, 5, 65535, 65534]], dtype=np.uint16)
    assert _as_counts(raw16).tolist() == [[0, 5, -1, -2]]
    raw32 = np.array([[0, 7, 0xFFFFFFFF]], dtype=np.uint32)
    assert _as_counts(raw32).tolist() == [[0, 7, -1]]


def test_rotation_angles_reach_the_master(tmp_path):
    full = generate_image(SyntheticSpec(detector="eiger2_4m"), seed=3)
    frames = []
    for index in range(3):
        frame = DiffractionImage(full.data, full.mask, full.geometry, metadata={"start_angle": 10 + 0.1 * index,
                                                                                 "angle_increment": 0.1})
        frames.append(frame)
    master = write_nexus(frames, tmp_path / "rot_master.h5", compression=None)
    with h5py.File(master) as f:
        assert f["/entry/sample/transformations/omega"][()] == pytest.approx([10.0, 10.1, 10.2])
        assert f["/entry/sample/depends_on"][()] == b"/entry/sample/transformations/omega"


def test_a_series_master_can_link_data_files_written_separately(tmp_path):
    frames = list(generate_frames(2, SyntheticSpec(detector="eiger2_4m"), seed=8, strengths=[1.0, 0.2]))
    write_nexus([frames[0]], tmp_path / "a_master.h5")
    write_nexus([frames[1]], tmp_path / "b_master.h5")
    data_files = [tmp_path / "a_data_000001.h5", tmp_path / "b_data_000001.h5"]
    master = write_master(frames[0], tmp_path / "series_master.h5", data_files, omega=[0.0, 0.0])
    assert count_frames(master) == 2
    _assert_same(open_image(master, 1), frames[1])


def test_small_custom_images_round_trip(tmp_path):
    full = generate_image(SyntheticSpec(detector="eiger2_4m"), seed=3)
    geometry = dataclasses.replace(full.geometry, image_size_px=(300, 200))
    small = DiffractionImage(full.data[:200, :300].copy(), full.mask[:200, :300].copy(), geometry)
    master = write_nexus([small, small], tmp_path / "roi_master.h5", compression="gzip")
    _assert_same(open_image(master, 1), small)
    master = write_nexus([small], tmp_path / "raw_master.h5", compression=None)
    _assert_same(open_image(master), small)
