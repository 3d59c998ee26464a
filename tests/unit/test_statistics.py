"""Per-image statistics reproduce the figures DIALS publishes for its centroid test data.

Expected values and tolerances are those of DIALS's own
``tests/algorithms/spot_finding/test_per_image_analysis.py`` (``pytest.approx``
defaults), computed there from the same 654 strong spots and experiment model.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from beamstream.diffraction.dxtbx_models import (
    detector_geometry_from_experiments,
    load_experiments,
    untrusted_rectangle_mask,
)
from beamstream.diffraction.resolution import panel_frame, pixel_resolution_rows, resolution_mask, spot_rlp_norm
from beamstream.diffraction.statistics import (
    PerImageStatistics,
    estimate_resolution_limit,
    estimate_resolution_limit_distl_method1,
    estimate_resolution_limit_distl_method2,
    ice_ring_d_star_sq,
    ice_rings_selection,
    statistics_from_spots,
    stats_for_spots,
)
from tests.helpers.spotfinding_data import centroid_data

DIALS_EXPECTED = {
    "d_min_distl_method_1": 1.8771983880778702,
    "d_min_distl_method_2": 1.6293601446185495,
    "estimated_d_min": 1.446715534174674,
    "n_spots_4A": 76,
    "n_spots_no_ice": 578,
    "n_spots_total": 654,
    "noisiness_method_1": 0.021021021021021023,
    "noisiness_method_2": 0.0858974358974359,
    "total_intensity": 919847.0,
}


@pytest.fixture(scope="module")
def centroid():
    experiments, spots = centroid_data()
    geometry = detector_geometry_from_experiments(experiments)
    norms = spot_rlp_norm(geometry, spots["x_px"], spots["y_px"])
    return geometry, spots, norms


def test_geometry_from_experiments(centroid):
    geometry, _, _ = centroid
    assert geometry.image_size_px == (2463, 2527)
    assert geometry.distance_mm == pytest.approx(190.18)
    assert geometry.beam_center_px == pytest.approx((1235.34, 1279.08))
    assert geometry.thickness_mm == pytest.approx(0.32)
    assert geometry.mu_per_mm == pytest.approx(3.9603818101507735)
    assert geometry.wavelength_A == pytest.approx(0.9795)


def test_estimators_match_dials(centroid):
    _, spots, norms = centroid
    variances = spots["variance"]
    d_min, noisiness = estimate_resolution_limit_distl_method1(norms, variances)
    assert d_min == pytest.approx(1.8771983880778702)
    assert noisiness == pytest.approx(0.021021021021021023)
    d_min, noisiness = estimate_resolution_limit_distl_method2(norms, variances)
    assert d_min == pytest.approx(1.6293601446185495)
    assert noisiness == pytest.approx(0.0858974358974359)
    ice = ice_rings_selection(1 / norms, width=0.004)
    assert ice.sum() == 76
    for ice_sel in (None, ice):
        estimate = estimate_resolution_limit(norms**2, spots["intensity"], variances, ice_sel=ice_sel)
        assert estimate == pytest.approx(1.446715534174674)


def test_stats_for_reflection_table_matches_dials(centroid):
    geometry, spots, _ = centroid
    result = statistics_from_spots(spots, geometry).to_dict()
    for key, value in DIALS_EXPECTED.items():
        assert result[key] == pytest.approx(value), key


def test_no_resolution_analysis_no_ice_filtering(centroid):
    geometry, spots, _ = centroid
    result = statistics_from_spots(spots, geometry, resolution_analysis=False, filter_ice=False).to_dict()
    expected = {"n_spots_4A": 76, "n_spots_no_ice": 654, "n_spots_total": 654, "total_intensity": 961472.0}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    # DIALS reports -1 for the skipped estimates; Beamstream reports None.
    for key in ("estimated_d_min", "d_min_distl_method_1", "d_min_distl_method_2",
                "noisiness_method_1", "noisiness_method_2"):
        assert result[key] is None


def test_stats_per_image_match_dials(centroid):
    geometry, spots, norms = centroid
    image = np.floor(spots["z_frame"]).astype(int)
    per_image = [statistics_from_spots(spots[image == i], geometry) for i in range(9)]
    assert [s.n_spots_total for s in per_image] == [90, 100, 67, 49, 54, 62, 68, 83, 81]
    first = per_image[0]
    # DIALS's table row for image 1: ["1", "90", "77", "28214", "1.56", "2.08 (0.09)", "1.59 (0.27)"]
    row = [
        str(first.n_spots_total),
        str(first.n_spots_no_ice),
        f"{first.total_intensity:.0f}",
        f"{first.estimated_d_min:.2f}",
        f"{first.d_min_distl_method_1:.2f} ({first.noisiness_method_1:.2f})",
        f"{first.d_min_distl_method_2:.2f} ({first.noisiness_method_2:.2f})",
    ]
    assert row == ["90", "77", "28214", "1.56", "2.08 (0.09)", "1.59 (0.27)"]


def test_ice_rings_are_hexagonal_ice():
    d = 1 / np.sqrt(ice_ring_d_star_sq(1.85))
    # The strong ice Ih powder lines (100), (002), (101), (102), (110), (103), (200), (112), (201).
    expected = [3.8954, 3.6690, 3.4406, 2.6708, 2.2490, 2.0715, 1.9477, 1.9174, 1.8825]
    assert np.allclose(sorted(d, reverse=True)[: len(expected)], expected, atol=1e-3)
    assert ice_rings_selection(np.array([])) is None


def test_empty_and_small_spot_lists(centroid):
    geometry, spots, _ = centroid
    assert statistics_from_spots(spots[:0], geometry) == PerImageStatistics()
    few = statistics_from_spots(spots[:5], geometry)
    assert few.n_spots_total == 5 and few.estimated_d_min is None and few.d_min_distl_method_1 is None
    stats = stats_for_spots(np.array([0.0, 0.1]), np.array([10.0, 20.0]), np.array([10.0, 20.0]))
    assert stats.n_spots_total == 1  # spots at the beam (|s1 - s0| = 0) are dropped, as in DIALS


def test_spot_level_resolution_filter(centroid):
    geometry, spots, norms = centroid
    d = 1 / norms
    stats = statistics_from_spots(spots, geometry, d_min=2.0, d_max=20.0, filter_ice=False)
    assert stats.n_spots_total == int(np.count_nonzero((d > 2.0) & (d < 20.0)))


def test_tilted_beam_is_rotated_away(centroid):
    experiments_path, spots = centroid_data()
    _, _, norms = centroid
    experiments = load_experiments(experiments_path)
    tilted = copy.deepcopy(experiments)
    angle = math.radians(2.0)
    rotate = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    tilted["beam"][0]["direction"] = list(rotate @ np.array(experiments["beam"][0]["direction"]))
    panel = tilted["detector"][0]["panels"][0]
    for key in ("origin", "fast_axis", "slow_axis"):
        panel[key] = list(rotate @ np.array(panel[key]))
    geometry = detector_geometry_from_experiments(json.loads(json.dumps(tilted)))
    assert np.allclose(spot_rlp_norm(geometry, spots["x_px"], spots["y_px"]), norms, rtol=1e-12)


def test_untrusted_rectangles(centroid):
    experiments_path, _ = centroid_data()
    mask = untrusted_rectangle_mask(experiments_path)
    assert mask.shape == (2527, 2463)
    assert not mask[:, 487:494].any() and mask[:195, 486].all() and not mask[195:212, :].any()


def test_pixel_resolution_mask_matches_dials_definition(centroid):
    geometry, _, _ = centroid
    keep = resolution_mask(geometry, (2527, 2463), d_min=2.5, d_max=None)
    rows = np.arange(0, 2527, 97)
    d = pixel_resolution_rows(panel_frame(geometry), 2463, rows)
    assert np.array_equal(keep[rows], ~(d <= 2.5))
    keep_low = resolution_mask(geometry, (2527, 2463), d_min=None, d_max=8.0)
    assert np.array_equal(keep_low[rows], ~(d >= 8.0))
    assert resolution_mask(geometry, (2527, 2463), None, None) is None
