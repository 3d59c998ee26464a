"""The synthetic image generator: presets, determinism, spots, ice rings, strength and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from beamstream.diffraction.analysis import analyse_image
from beamstream.diffraction.detectors import PRESETS, module_gap_mask
from beamstream.diffraction.synthetic import ICE_RINGS, SyntheticSpec, generate_frames, generate_image

EIGER4M = SyntheticSpec(detector="eiger2_4m")


@pytest.mark.parametrize(
    ("key", "shape", "pixel_mm"),
    [("pilatus6m", (2527, 2463), 0.172), ("eiger2_16m", (4362, 4148), 0.075), ("eiger2_4m", (2162, 2068), 0.075)],
)
def test_presets_have_real_detector_shapes_and_gaps(key, shape, pixel_mm):
    image = generate_image(SyntheticSpec(detector=key), seed=1, strength=0.0)
    assert image.data.shape == shape and image.data.dtype == np.int32
    assert image.geometry.pixel_size_mm == (pixel_mm, pixel_mm)
    gaps = module_gap_mask(PRESETS[key].image_size_px, PRESETS[key].layout)
    assert gaps.any()
    assert (image.data[gaps] == -1).all() and not image.mask[gaps].any()
    assert np.count_nonzero(image.data == -2) == SyntheticSpec().n_dead_pixels
    assert not image.mask[image.data < 0].any()
    assert image.mask[image.data >= 0].all()  # nothing else is excluded


def test_same_seed_same_image_and_other_seeds_differ():
    first = generate_image(EIGER4M, seed=42, strength=0.7)
    again = generate_image(EIGER4M, seed=42, strength=0.7)
    other = generate_image(EIGER4M, seed=43, strength=0.7)
    assert np.array_equal(first.data, again.data)
    assert np.array_equal(first.metadata["spot_xy_px"], again.metadata["spot_xy_px"])
    assert not np.array_equal(first.data, other.data)
    assert not np.array_equal(first.metadata["orientation"], other.metadata["orientation"])


def test_orientation_seed_keeps_the_crystal_while_noise_changes():
    frames = list(generate_frames(2, EIGER4M, seed=7))
    assert np.array_equal(frames[0].metadata["orientation"], frames[1].metadata["orientation"])
    assert not np.array_equal(frames[0].data, frames[1].data)
    orientation = frames[0].metadata["orientation"]
    assert np.allclose(orientation @ orientation.T, np.eye(3)) and np.linalg.det(orientation) == pytest.approx(1)


def test_bragg_spots_are_drawn_where_recorded_and_found_by_spot_finding():
    image = generate_image(SyntheticSpec(detector="pilatus6m"), seed=3, strength=1.0)
    xy, counts, d = (image.metadata[k] for k in ("spot_xy_px", "spot_counts", "spot_d_A"))
    assert len(counts) > 500
    assert d.min() >= 1.5 - 1e-6  # the crystal's resolution limit
    strong = counts > 500
    x, y = np.floor(xy[strong]).astype(int).T
    values = image.data[y, x]
    usable = image.mask[y, x]
    assert np.median(values[usable]) > 20 * SyntheticSpec().background
    result = analyse_image(image)
    assert result.n_spots_no_ice > 300
    assert result.estimated_d_min is not None and result.estimated_d_min < 2.5


def test_strength_zero_is_background_only():
    spec = SyntheticSpec(detector="pilatus6m")
    image = generate_image(spec, seed=3, strength=0.0)
    assert len(image.metadata["spot_counts"]) == 0
    values = image.data[image.mask]
    assert 0.3 * spec.background < values.mean() < 1.5 * spec.background
    assert analyse_image(image).n_spots_total == 0


def test_more_strength_more_spots():
    found = [analyse_image(generate_image(EIGER4M, seed=9, strength=s)).n_spots_no_ice for s in (0.0, 0.5, 1.0)]
    assert found[0] == 0 < found[1] < found[2]


def test_ice_rings_add_powder_rings_and_ice_spots():
    spec = SyntheticSpec(detector="pilatus6m", ice_rings=True)
    image = generate_image(spec, seed=4, strength=0.0)
    plain = generate_image(SyntheticSpec(detector="pilatus6m"), seed=4, strength=0.0)
    g = image.geometry
    # Mean counts on the strongest ring clearly exceed the same annulus without ice.
    d_ring = ICE_RINGS[0][0]
    radius_px = g.distance_mm * np.tan(2 * np.arcsin(g.wavelength_A / (2 * d_ring))) / g.pixel_size_mm[0]
    yy, xx = np.indices(image.data.shape)
    r = np.hypot(xx + 0.5 - g.beam_center_px[0], yy + 0.5 - g.beam_center_px[1])
    ring = (np.abs(r - radius_px) < 1.5) & image.mask
    assert image.data[ring].mean() > plain.data[ring].mean() + 0.5 * spec.ice_ring_counts
    # Ice crystallite spots are found, and DIALS's ice filter removes them.
    result = analyse_image(image)
    assert result.n_spots_total > 100
    assert result.n_spots_no_ice <= 0.05 * result.n_spots_total
    assert analyse_image(plain).n_spots_total == 0


def test_bad_strength_is_refused():
    with pytest.raises(ValueError, match="strength"):
        generate_image(EIGER4M, strength=1.5)
    with pytest.raises(ValueError, match="unknown detector preset"):
        generate_image(SyntheticSpec(detector="pilatus2m"))


def test_a_pilatus_6m_frame_takes_well_under_a_second():
    spec = SyntheticSpec(detector="pilatus6m")
    generate_image(spec, seed=0)  # builds the cached background map and lattice
    timings = []
    for seed in range(1, 4):
        started = time.perf_counter()
        generate_image(spec, seed=seed)
        timings.append(time.perf_counter() - started)
    assert min(timings) < 0.5, timings
