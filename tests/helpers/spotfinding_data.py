"""Locate and load the real reference data used by the spot-finding tests (never copied into the repo)."""

from __future__ import annotations

import bz2
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from beamstream.diffraction.image import DiffractionImage

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
THAUMATIN_DIR = DATA_DIR / "thaumatin_grid"
CENTROID_DIR = DATA_DIR / "dials_centroid_strong"


def missing_data(path: Path) -> None:
    """A science test without its reference data: skipped on a workstation, a failure in CI (``CI`` set),
    where a missing ``../shared/data`` must not pass as a green run."""
    if os.environ.get("CI"):
        pytest.fail(f"reference data missing: {path} (CI needs ../shared/data next to the checkout)")
    pytest.skip(f"reference data missing: {path}")


def thaumatin_path(number: int) -> Path:
    """Path of ``thau_3_2_NNNN.cbf.bz2``; skips the test when the data set is absent (fails in CI)."""
    path = THAUMATIN_DIR / f"thau_3_2_{number:04d}.cbf.bz2"
    if not path.is_file():
        missing_data(path)
    return path


def _open_with_fabio(path: Path) -> DiffractionImage:
    """Fallback reader: fabio on the decompressed CBF, mask = 0 <= counts <= Count_cutoff."""
    import fabio

    from beamstream.diffraction.image import DetectorGeometry

    raw = bz2.decompress(path.read_bytes())
    with tempfile.NamedTemporaryFile(suffix=".cbf") as handle:
        handle.write(raw)
        handle.flush()
        frame = fabio.open(handle.name)
        data = np.array(frame.data)
        header = frame.header.get("_array_data.header_contents", "")
    cutoff = float(re.search(r"Count_cutoff\s+(\d+)", header).group(1))
    wavelength = float(re.search(r"Wavelength\s+([\d.]+)", header).group(1))
    distance = float(re.search(r"Detector_distance\s+([\d.]+)", header).group(1)) * 1000
    bx, by = (float(v) for v in re.search(r"Beam_xy\s+\(([\d.]+),\s*([\d.]+)\)", header).groups())
    geometry = DetectorGeometry(
        wavelength_A=wavelength,
        distance_mm=distance,
        beam_center_px=(bx, by),
        pixel_size_mm=(0.172, 0.172),
        image_size_px=(data.shape[1], data.shape[0]),
        trusted_range=(0.0, cutoff),
    )
    return DiffractionImage(data=data, mask=(data >= 0) & (data <= cutoff), geometry=geometry, source=str(path))


@lru_cache(maxsize=4)
def load_thaumatin(number: int) -> DiffractionImage:
    """One thaumatin grid-scan frame (PILATUS3 6M), read with Beamstream's reader when it exists."""
    path = thaumatin_path(number)
    try:
        from beamstream.diffraction.readers import open_image
    except ImportError:
        return _open_with_fabio(path)
    return open_image(path, frame=0)


def centroid_data() -> tuple[Path, np.ndarray]:
    """(experiments.json path, strong_spots.csv as a structured array) of DIALS's centroid test data."""
    experiments = CENTROID_DIR / "experiments.json"
    spots_csv = CENTROID_DIR / "strong_spots.csv"
    if not (experiments.is_file() and spots_csv.is_file()):
        missing_data(CENTROID_DIR)
    spots = np.genfromtxt(spots_csv, delimiter=",", names=True)
    return experiments, spots


def decompressed_thaumatin(folder: Path, count: int) -> list[str]:
    """The first ``count`` thaumatin frames written into ``folder`` as plain CBF, as a detector writes them."""
    paths = []
    for source in sorted(THAUMATIN_DIR.glob("*.cbf.bz2"))[:count]:
        target = folder / source.name.removesuffix(".bz2")
        target.write_bytes(bz2.decompress(source.read_bytes()))
        paths.append(str(target))
    return paths
