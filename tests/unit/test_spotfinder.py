"""Strong pixels to spots: DIALS's connectivity, ordering, filters, centroids and intensities."""

from __future__ import annotations

import numpy as np
import pytest

from beamstream.diffraction.errors import SpotFindingError, SpotFindingParameterError
from beamstream.diffraction.spotfinder import SPOT_DTYPE, SpotFilterParams, find_spots
from beamstream.diffraction.threshold import threshold_image
from tests.helpers.dials_reference import reference_spots
from tests.helpers.spotfinding_data import load_thaumatin


def _as_records(spots: np.ndarray) -> list[dict]:
    return [
        {
            "x_px": float(s["x_px"]),
            "y_px": float(s["y_px"]),
            "intensity": float(s["intensity"]),
            "variance": float(s["variance"]),
            "n_pixels": int(s["n_pixels"]),
            "bbox": tuple(int(v) for v in s["bbox"]),
        }
        for s in spots
    ]


@pytest.mark.parametrize("number", [1, 8])
def test_thaumatin_spots_match_reference_exactly(number):
    image = load_thaumatin(number)
    strong = threshold_image(image.data, image.mask)
    expected = reference_spots(image.data, strong)
    assert len(expected) > 100
    for backend in ("numba", "numpy"):
        spots = find_spots(image.data, strong, backend=backend)
        assert spots.dtype == SPOT_DTYPE
        assert _as_records(spots) == expected, backend  # bit-identical floats


def test_four_connectivity_and_first_pixel_order():
    data = np.zeros((12, 12), dtype=np.int32)
    strong = np.zeros_like(data, dtype=bool)
    # Two 2x2 blocks touching only diagonally: two spots under 4-connectivity.
    strong[2:4, 6:8] = True
    strong[4:6, 4:6] = True
    # A U shape whose first raster pixel is at (7, 1): one spot.
    strong[7:10, 1] = True
    strong[9, 1:4] = True
    strong[7:10, 3] = True
    data[strong] = 10
    data[2, 7] = 50
    data[5, 5] = 50
    data[9, 2] = 50
    spots = find_spots(data, strong, SpotFilterParams(max_separation=None))
    assert [tuple(s["bbox"]) for s in spots] == [(6, 8, 2, 4), (4, 6, 4, 6), (1, 4, 7, 10)]
    assert list(spots["n_pixels"]) == [4, 4, 7]
    assert np.array_equal(find_spots(data, strong, SpotFilterParams(max_separation=None), backend="numpy"), spots)


def test_centroid_uses_pixel_centres_and_raw_counts():
    data = np.zeros((10, 10), dtype=np.int32)
    strong = np.zeros_like(data, dtype=bool)
    strong[3:6, 4:7] = True
    data[3:6, 4:7] = [[1, 2, 1], [2, 8, 2], [1, 2, 1]]
    (spot,) = find_spots(data, strong)
    assert spot["x_px"] == pytest.approx(5.5)
    assert spot["y_px"] == pytest.approx(4.5)
    assert spot["intensity"] == 20.0
    assert spot["variance"] == 20.0
    assert tuple(spot["bbox"]) == (4, 7, 3, 6)


def test_size_limits_are_inclusive_and_peak_distance_filter():
    data = np.zeros((20, 40), dtype=np.int32)
    strong = np.zeros_like(data, dtype=bool)
    strong[2, 2:4] = True  # 2 pixels: too small
    strong[5, 2:5] = True  # 3 pixels: kept (min 3 inclusive)
    strong[10, 0:6] = True  # 6 pixels: kept with max 6 inclusive
    strong[15, 0:7] = True  # 7 pixels: too large
    data[strong] = 5
    params = SpotFilterParams(min_spot_size=3, max_spot_size=6, max_separation=None)
    assert list(find_spots(data, strong, params)["n_pixels"]) == [3, 6]
    # Peak at one end of a long line, far (> 2 px) from the centroid: dropped by max_separation=2.
    line = np.zeros((5, 30), dtype=np.int32)
    line_strong = np.zeros_like(line, dtype=bool)
    line_strong[2, 0:12] = True
    line[2, 0:12] = 10
    line[2, 0] = 30
    assert len(find_spots(line, line_strong, SpotFilterParams(max_separation=2.0))) == 0
    assert len(find_spots(line, line_strong, SpotFilterParams(max_separation=None))) == 1


def test_too_many_strong_pixels_is_refused():
    data = np.ones((10, 10), dtype=np.int32)
    strong = np.zeros_like(data, dtype=bool)
    strong[:, :3] = True  # 30 % of the frame
    with pytest.raises(SpotFindingError):
        find_spots(data, strong)
    assert len(find_spots(data, strong, SpotFilterParams(max_strong_pixel_fraction=1.0, max_separation=None))) == 1


def test_empty_and_invalid_input():
    data = np.zeros((8, 8), dtype=np.int32)
    assert len(find_spots(data, np.zeros_like(data, dtype=bool))) == 0
    with pytest.raises(SpotFindingParameterError):
        find_spots(data, np.zeros((8, 9), dtype=bool))
    with pytest.raises(SpotFindingParameterError):
        SpotFilterParams(min_spot_size=5, max_spot_size=5)
    with pytest.raises(SpotFindingParameterError):
        SpotFilterParams(max_separation=-1.0)
