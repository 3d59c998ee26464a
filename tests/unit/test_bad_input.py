"""Damaged or odd input gives typed errors naming the file (never a crash), or a valid empty result."""

from __future__ import annotations

import bz2
import dataclasses
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from beamstream.diffraction.analysis import analyse_image
from beamstream.diffraction.errors import DiffractionError, FrameIndexError, GeometryError, ImageReadError
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.readers import count_frames, iter_frames, open_image
from beamstream.diffraction.synthetic import SyntheticSpec, generate_image
from beamstream.diffraction.writers import write_cbf, write_nexus


@pytest.fixture(scope="module")
def small_image() -> DiffractionImage:
    """A 256 x 192 corner of an EIGER2 4M frame (crossing a module gap): fast to write and read."""
    full = generate_image(SyntheticSpec(detector="eiger2_4m"), seed=21)
    geometry = dataclasses.replace(full.geometry, image_size_px=(256, 192))
    rows, cols = slice(450, 642), slice(900, 1156)
    return DiffractionImage(full.data[rows, cols].copy(), full.mask[rows, cols].copy(), geometry)


@pytest.fixture
def cbf_file(tmp_path, small_image) -> Path:
    return write_cbf(small_image, tmp_path / "frame.cbf")


@pytest.fixture
def series(tmp_path, small_image) -> Path:
    """Four frames in two data files."""
    return write_nexus([small_image] * 4, tmp_path / "s_master.h5", frames_per_file=2)


def _damage(path: Path, edit) -> None:
    path.write_bytes(edit(path.read_bytes()))


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ImageReadError, match="nothing.cbf: no such file"):
        open_image(tmp_path / "nothing.cbf")
    with pytest.raises(ImageReadError, match="not a regular file"):
        count_frames(tmp_path)
    empty = tmp_path / "empty.cbf"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.cbf: file is empty"):
        open_image(empty)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(os.urandom(4000))
    with pytest.raises(ImageReadError, match="junk.dat: unrecognised image format"):
        open_image(junk)
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(ImageReadError, match="fake.h5.*no HDF5 signature"):
        open_image(fake)


def test_truncated_cbf(cbf_file):
    _damage(cbf_file, lambda raw: raw[: len(raw) * 2 // 3])
    with pytest.raises(ImageReadError, match=r"frame.cbf: truncated: binary section holds \d+ of \d+ bytes"):
        open_image(cbf_file)


def test_corrupt_cbf_fails_its_md5(cbf_file):
    def flip(raw: bytes) -> bytes:
        middle = len(raw) * 3 // 4
        return raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1 :]

    _damage(cbf_file, flip)
    with pytest.raises(ImageReadError, match="frame.cbf: corrupt: MD5"):
        open_image(cbf_file)


def test_cbf_without_header_is_not_cbf(cbf_file):
    _damage(cbf_file, lambda raw: raw.replace(b"\x0c\x1a\x04\xd5", b"XXXX"))
    with pytest.raises(ImageReadError, match="no binary data section"):
        open_image(cbf_file)


def test_truncated_bz2_cbf(tmp_path, cbf_file):
    packed = tmp_path / "frame.cbf.bz2"
    packed.write_bytes(bz2.compress(cbf_file.read_bytes())[:5000])
    with pytest.raises(ImageReadError, match="frame.cbf.bz2: truncated or corrupt bzip2 stream"):
        open_image(packed)


@pytest.mark.parametrize(
    ("find", "replace", "message"),
    [
        (b"Wavelength 0.96859", b"Wavelength nan    ", "wavelength_A is not finite"),
        (b"Detector_distance 0.12", b"Detector_distance inf ", "distance_mm is not finite"),
        (b"# Beam_xy", b"# Beam_zz", "lacks beam_xy"),
        (b"Pixel_size 75e-6 m", b"Pixel_size -75e-6 m", "pixel_size_mm.* must be positive"),
    ],
)
def test_cbf_with_bad_geometry(cbf_file, find, replace, message):
    assert find in cbf_file.read_bytes()
    _damage(cbf_file, lambda raw: raw.replace(find, replace))
    with pytest.raises(GeometryError, match=f"frame.cbf: .*{message}"):
        open_image(cbf_file)


def test_frame_index_out_of_range(cbf_file, series):
    with pytest.raises(FrameIndexError, match="frame.cbf: frame index 1 is out of range; the file holds 1 frame"):
        open_image(cbf_file, 1)
    with pytest.raises(FrameIndexError, match=r"s_master.h5: frame index 4 is out of range; .*4 frames \(indices 0-3"):
        open_image(series, 4)
    with pytest.raises(FrameIndexError, match="frame index -1"):
        open_image(series, -1)
    with pytest.raises(FrameIndexError, match="must be an integer"):
        open_image(series, 1.5)  # type: ignore[arg-type]
    with pytest.raises(FrameIndexError, match="frame index 9"):
        list(iter_frames(series, [0, 9]))  # checked before any frame is read


def test_truncated_master(series):
    _damage(series, lambda raw: raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="s_master.h5: cannot open as HDF5"):
        count_frames(series)


def test_master_whose_data_file_is_missing(series):
    series.with_name("s_data_000002.h5").unlink()
    with pytest.raises(ImageReadError, match=r"s_master.h5: data file s_data_000002.h5 .* is missing"):
        count_frames(series)
    with pytest.raises(ImageReadError, match="s_data_000002.h5 .* is missing"):
        open_image(series, 2)
    assert open_image(series, 1).data.shape == (192, 256)  # frames in the data file present still read


def test_truncated_data_file(series):
    _damage(series.with_name("s_data_000001.h5"), lambda raw: raw[: len(raw) - 3000])
    with pytest.raises(ImageReadError, match="s_data_000001.h5"):
        open_image(series, 0)


def test_corrupt_compressed_chunk_is_an_error_not_a_crash(series):
    """Damaged bitshuffle block sizes make the HDF5 filter read out of bounds; the reader checks first."""
    data_file = series.with_name("s_data_000001.h5")
    with h5py.File(data_file) as f:
        offset = f["/entry/data/data"].id.get_chunk_info(0).byte_offset

    def clobber(raw: bytes) -> bytes:
        start = offset + 12  # first block's compressed-size field
        return raw[:start] + b"\x7f\xff\xff\xf0" + raw[start + 4 :]

    _damage(data_file, clobber)
    with pytest.raises(ImageReadError, match="s_data_000001.h5: frame 0 of /entry/data/data is corrupt"):
        open_image(series, 0)


def test_corrupt_legacy_lz4_stream_is_an_error_not_a_crash(tmp_path, small_image):
    """The LZ4 filter (32004) trusts the stream (LZ4_decompress_fast); the reader dry-runs it first."""
    master = write_nexus([small_image, small_image], tmp_path / "old_master.h5", compression="lz4")
    assert np.array_equal(open_image(master, 1).data, small_image.data)
    data_file = tmp_path / "old_data_000001.h5"
    with h5py.File(data_file) as f:
        offset = f["/entry/data/data"].id.get_chunk_info(1).byte_offset

    def clobber(raw: bytes) -> bytes:
        start = offset + 16  # past the chunk header and the block's size: the first LZ4 token
        return raw[:start] + b"\x0f\xff\xff" + raw[start + 3 :]  # a match reaching before the output

    _damage(data_file, clobber)
    assert open_image(master, 0).data.shape == (192, 256)
    with pytest.raises(ImageReadError, match="old_data_000001.h5: frame 1 .* corrupt LZ4 block"):
        open_image(master, 1)


def test_random_damage_to_data_files_never_escapes_as_untyped(tmp_path, series):
    rng = np.random.default_rng(5)
    pristine = series.with_name("s_data_000001.h5").read_bytes()
    for _ in range(25):
        damaged = bytearray(pristine)
        for position in rng.integers(len(pristine) // 4, len(pristine), size=8):
            damaged[position] = rng.integers(0, 256)
        series.with_name("s_data_000001.h5").write_bytes(bytes(damaged))
        try:
            list(iter_frames(series, [0, 1]))
        except DiffractionError:
            pass  # typed; undetectable damage (no checksums) may also read "fine"


def test_geometry_that_is_not_finite_in_a_master(series):
    with h5py.File(series, "r+") as f:
        f["/entry/instrument/detector/detector_distance"][()] = np.nan
    with pytest.raises(GeometryError, match="s_master.h5: detector geometry: distance_mm is not finite"):
        open_image(series, 0)


def test_master_without_wavelength(series):
    with h5py.File(series, "r+") as f:
        del f["/entry/instrument/beam/incident_wavelength"]
    with pytest.raises(GeometryError, match="s_master.h5: NXmx tree gives no incident wavelength"):
        open_image(series, 0)


def test_data_file_given_instead_of_master(series):
    with pytest.raises(GeometryError, match="s_data_000001.h5: .*looks like a data file, open its master file"):
        open_image(series.with_name("s_data_000001.h5"))


def test_hdf5_without_nxmx_data(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(ImageReadError, match="other.h5: no /entry/data group"):
        count_frames(path)


def test_moved_master_reports_missing_data_files(tmp_path, series):
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    shutil.copy(series, elsewhere / series.name)
    with pytest.raises(ImageReadError, match="data file s_data_000001.h5 .* is missing"):
        open_image(elsewhere / series.name)


@pytest.mark.parametrize("fill", ["zero", "saturated", "all_at_cutoff", "all_masked"])
def test_empty_looking_frames_give_a_valid_empty_analysis(tmp_path, small_image, fill):
    cutoff = int(small_image.geometry.trusted_range[1])
    data = {
        "zero": np.zeros_like(small_image.data),
        "saturated": np.full_like(small_image.data, cutoff + 1),
        "all_at_cutoff": np.full_like(small_image.data, cutoff),
        "all_masked": np.full_like(small_image.data, -1),
    }[fill]
    frame = DiffractionImage(data, small_image.mask.copy(), small_image.geometry)
    master = write_nexus([frame], tmp_path / "flat_master.h5")
    image = open_image(master)
    if fill in ("saturated", "all_masked"):
        assert not image.mask.any()
    result = analyse_image(image).to_dict()
    assert result["n_spots_total"] == 0 and result["n_spots_no_ice"] == 0
    assert result["total_intensity"] == 0
    assert result["estimated_d_min"] is None
