"""analyse_image: the public entry point, its parameters, backends and bad frames."""

from __future__ import annotations

import numpy as np
import pytest

from beamstream.diffraction.analysis import (
    IMAGE_ANALYSIS_FIELDS,
    ImageAnalysis,
    SpotFindingParams,
    analyse_image,
    warm_up,
)
from beamstream.diffraction.dials_backend import dials_available
from beamstream.diffraction.errors import BackendUnavailableError, SpotFindingError, SpotFindingParameterError
from beamstream.diffraction.image import DetectorGeometry, DiffractionImage
from tests.helpers.spotfinding_data import load_thaumatin

EXPECTED_KEYS = {
    "n_spots_total",
    "n_spots_no_ice",
    "n_spots_4A",
    "total_intensity",
    "estimated_d_min",
    "d_min_distl_method_1",
    "d_min_distl_method_2",
    "noisiness_method_1",
    "noisiness_method_2",
    "n_strong_pixels",
    "time_threshold_s",
    "time_total_s",
}
TIMINGS = {"time_threshold_s", "time_total_s"}


def _geometry(shape) -> DetectorGeometry:
    return DetectorGeometry(
        wavelength_A=1.0,
        distance_mm=200.0,
        beam_center_px=(shape[1] / 2, shape[0] / 2),
        pixel_size_mm=(0.075, 0.075),
        image_size_px=(shape[1], shape[0]),
    )


def _image(data, mask) -> DiffractionImage:
    return DiffractionImage(data=data, mask=mask, geometry=_geometry(data.shape))


def _without_timings(result: ImageAnalysis) -> dict:
    return {k: v for k, v in result.to_dict().items() if k not in TIMINGS}


def test_thaumatin_numba_and_numpy_backends_agree():
    image = load_thaumatin(1)
    fast = analyse_image(image)
    slow = analyse_image(image, SpotFindingParams(backend="numpy"))
    assert set(fast.to_dict()) == EXPECTED_KEYS == set(IMAGE_ANALYSIS_FIELDS)
    assert _without_timings(fast) == _without_timings(slow)
    assert np.array_equal(fast.spots, slow.spots)
    assert fast.n_spots_total == len(fast.spots) > 100
    assert fast.n_strong_pixels >= fast.spots["n_pixels"].sum()
    assert 1.0 < fast.estimated_d_min < 10.0
    assert 0 < fast.time_threshold_s <= fast.time_total_s


def test_dispersion_and_resolution_limits():
    image = load_thaumatin(1)
    base = analyse_image(image)
    dispersion = analyse_image(image, SpotFindingParams(threshold_algorithm="dispersion"))
    assert dispersion.n_strong_pixels != base.n_strong_pixels
    limited = analyse_image(image, SpotFindingParams(d_min=3.0, d_max=30.0))
    assert 0 < limited.n_spots_total < base.n_spots_total
    assert limited.n_spots_4A <= base.n_spots_4A


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_bad_frames_give_valid_empty_results(backend):
    shape = (300, 310)
    ones = np.ones(shape, dtype=bool)
    frames = {
        "all_zero": (np.zeros(shape, np.int32), ones),
        "saturated_in_range": (np.full(shape, 65535, np.int32), ones),
        "saturated_masked": (np.full(shape, 2**32 - 1, np.uint32), np.zeros(shape, bool)),
        "fully_masked": (np.random.default_rng(1).poisson(3, shape).astype(np.int32), np.zeros(shape, bool)),
        "single_pixel": (np.ones((1, 1), np.int32), np.ones((1, 1), bool)),
    }
    for name, (data, mask) in frames.items():
        result = analyse_image(_image(data, mask), SpotFindingParams(backend=backend))
        values = result.to_dict()
        assert set(values) == EXPECTED_KEYS, name
        assert values["n_spots_total"] == values["n_spots_no_ice"] == values["n_spots_4A"] == 0, name
        assert values["total_intensity"] == 0.0 and values["n_strong_pixels"] == 0, name
        for key in ("estimated_d_min", "d_min_distl_method_1", "d_min_distl_method_2",
                    "noisiness_method_1", "noisiness_method_2"):
            assert values[key] is None, (name, key)
        assert len(result.spots) == 0


def test_noise_frame_is_refused_like_dials():
    # Every other pixel hot: far more than 25 % strong pixels, DIALS raises here.
    data = np.zeros((60, 60), np.int32)
    data[::2, ::2] = 1000
    data[1::2, 1::2] = 1000
    params = SpotFindingParams(threshold_algorithm="dispersion", min_local=0)
    with pytest.raises(SpotFindingError):
        analyse_image(_image(data, np.ones(data.shape, bool)), params)


def test_parameter_validation():
    with pytest.raises(SpotFindingParameterError):
        SpotFindingParams(threshold_algorithm="niblack")
    with pytest.raises(SpotFindingParameterError):
        SpotFindingParams(backend="gpu")
    with pytest.raises(SpotFindingParameterError):
        SpotFindingParams(d_min=3.0, d_max=2.0)
    with pytest.raises(SpotFindingParameterError):
        SpotFindingParams(kernel_size=(0, 0))
    with pytest.raises(SpotFindingParameterError):
        SpotFindingParams(min_spot_size=10, max_spot_size=10)
    assert SpotFindingParams().filter_params().min_spot_size == 3  # DIALS Auto for pixel-array detectors


@pytest.mark.skipif(dials_available(), reason="DIALS is installed")
def test_dials_backend_without_dials_is_a_typed_error():
    data = np.zeros((20, 20), np.int32)
    with pytest.raises(BackendUnavailableError):
        analyse_image(_image(data, np.ones(data.shape, bool)), SpotFindingParams(backend="dials"))


def test_dials_backend_matches_dials_itself():
    pytest.importorskip("dials", reason="DIALS (conda-forge only) is not installed")
    image = load_thaumatin(1)
    ours = analyse_image(image)
    theirs = analyse_image(image, SpotFindingParams(backend="dials"))
    assert _without_timings(ours) == _without_timings(theirs)
    assert np.array_equal(ours.spots, theirs.spots)


def test_warm_up_runs():
    warm_up()
