"""The dispersion thresholds agree exactly with a plain reference of DIALS's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from beamstream.diffraction.errors import SpotFindingParameterError
from beamstream.diffraction.threshold import BIG, ThresholdParams, erode_not_background, threshold_image
from tests.helpers.dials_reference import (
    chebyshev_distance,
    reference_dispersion,
    reference_dispersion_extended,
)
from tests.helpers.spotfinding_data import load_thaumatin

ALGORITHMS = ("dispersion", "dispersion_extended")
REFERENCE = {"dispersion": reference_dispersion, "dispersion_extended": reference_dispersion_extended}


def _reference(algorithm, data, mask, params: ThresholdParams):
    return REFERENCE[algorithm](
        data,
        mask,
        kernel_size=params.kernel_size,
        nsig_b=params.sigma_background,
        nsig_s=params.sigma_strong,
        threshold=params.global_threshold,
        min_count=params.min_count,
        gain=params.gain,
    )


def _crops(strong: np.ndarray, shape: tuple[int, int], size: int, n_spots: int) -> list[tuple[slice, slice]]:
    """Crops centred on a few strong pixels, plus the image corners (border handling) and a module gap."""
    height, width = shape
    js, is_ = np.nonzero(strong)
    picks = np.linspace(0, js.size - 1, n_spots).astype(int) if js.size else []
    crops = []
    for p in picks:
        j0 = int(np.clip(js[p] - size // 2, 0, height - size))
        i0 = int(np.clip(is_[p] - size // 2, 0, width - size))
        crops.append((slice(j0, j0 + size), slice(i0, i0 + size)))
    crops.append((slice(0, size), slice(0, size)))
    crops.append((slice(height - size, height), slice(width - size, width)))
    crops.append((slice(180, 180 + size), slice(460, 460 + size)))  # PILATUS module corner with gaps
    return crops


@pytest.mark.parametrize("number", [1, 8])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_full_frame_numba_equals_numpy(number, algorithm):
    image = load_thaumatin(number)
    fast = threshold_image(image.data, image.mask, algorithm=algorithm, backend="numba")
    slow = threshold_image(image.data, image.mask, algorithm=algorithm, backend="numpy")
    assert fast.sum() > 100
    assert np.array_equal(fast, slow)


@pytest.mark.parametrize("number", [1, 8])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_crops_match_reference(number, algorithm):
    image = load_thaumatin(number)
    params = ThresholdParams()
    strong = threshold_image(image.data, image.mask, params, algorithm=algorithm)
    n_checked = 0
    for rows, cols in _crops(strong, image.data.shape, size=72, n_spots=4):
        data = np.ascontiguousarray(image.data[rows, cols])
        mask = np.ascontiguousarray(image.mask[rows, cols])
        expected = _reference(algorithm, data, mask, params)
        for backend in ("numba", "numpy"):
            got = threshold_image(data, mask, params, algorithm=algorithm, backend=backend)
            assert np.array_equal(got, expected), (backend, rows, cols)
        n_checked += int(expected.sum())
    assert n_checked > 0


def _random_frame(seed: int, shape=(37, 45)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.poisson(2.0, size=shape).astype(np.int64)
    for _ in range(6):  # a few bright spots
        j, i = rng.integers(2, shape[0] - 2), rng.integers(2, shape[1] - 2)
        data[j - 1 : j + 2, i - 1 : i + 2] += rng.integers(20, 400, size=(3, 3))
    data[rng.random(shape) < 0.01] = -3  # negative counts in valid pixels
    data[rng.random(shape) < 0.005] = BIG + 5  # left out of DIALS's window sums
    mask = rng.random(shape) > 0.1
    mask[:, 20:22] = False  # a gap
    return data, mask


PARAMETER_SETS = [
    ThresholdParams(),
    ThresholdParams(kernel_size=(1, 1), min_local=0),
    ThresholdParams(kernel_size=(2, 3), min_local=5, global_threshold=4),
    ThresholdParams(gain=1.0),
    ThresholdParams(gain=1.7, sigma_background=3.0, sigma_strong=2.0),
    ThresholdParams(kernel_size=(3, 1), min_local=3),
]


@pytest.mark.parametrize("params", PARAMETER_SETS, ids=lambda p: f"k{p.kernel_size}-m{p.min_local}-g{p.gain}")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_frames_match_reference(params, algorithm, seed):
    data, mask = _random_frame(seed)
    expected = _reference(algorithm, data, mask, params)
    for backend in ("numba", "numpy"):
        got = threshold_image(data, mask, params, algorithm=algorithm, backend=backend)
        assert np.array_equal(got, expected), backend
    for dtype in (np.float64, np.float32):  # integral floats take the integer kernels
        got = threshold_image(data.astype(dtype), mask, params, algorithm=algorithm, backend="numba")
        assert np.array_equal(got, expected), dtype


def test_unsigned_and_tiny_frames():
    data, mask = _random_frame(3)
    data = np.clip(data, 0, 60000).astype(np.uint16)
    for algorithm in ALGORITHMS:
        expected = _reference(algorithm, data, mask, ThresholdParams())
        assert np.array_equal(threshold_image(data, mask, algorithm=algorithm), expected)
        assert np.array_equal(threshold_image(data.astype(">i4"), mask, algorithm=algorithm), expected)
    for shape in [(1, 1), (1, 9), (9, 1), (4, 3)]:
        tiny = np.full(shape, 7, dtype=np.int32)
        tiny.flat[0] = 500
        ok = np.ones(shape, dtype=bool)
        for algorithm in ALGORITHMS:
            expected = _reference(algorithm, tiny, ok, ThresholdParams())
            for backend in ("numba", "numpy"):
                assert np.array_equal(threshold_image(tiny, ok, algorithm=algorithm, backend=backend), expected)


def test_non_integral_float_frames_use_exact_dials_order():
    data, mask = _random_frame(4)
    noisy = data.astype(np.float64) * 1.37 + 0.25
    for algorithm in ALGORITHMS:
        a = threshold_image(noisy, mask, algorithm=algorithm, backend="numba")
        b = threshold_image(noisy, mask, algorithm=algorithm, backend="numpy")
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_erosion_equals_chamfer_distance_transform(seed):
    rng = np.random.default_rng(seed)
    not_background = rng.random((30, 41)) < 0.8
    not_background[5:15, 10:25] = True
    distance = np.array(chebyshev_distance(not_background.tolist()))
    for erosion in (1, 2, 3, 4):
        expected = not_background & (distance >= erosion)
        assert np.array_equal(erode_not_background(not_background, erosion), expected)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_frames_without_signal_have_no_strong_pixels(backend, algorithm):
    shape = (64, 80)
    cases = {
        "zeros": (np.zeros(shape, np.int32), np.ones(shape, bool)),
        "saturated_valid": (np.full(shape, 65535, np.int32), np.ones(shape, bool)),
        "saturated_masked": (np.full(shape, 2**31 - 1, np.int64), np.zeros(shape, bool)),
        "masked": (np.random.default_rng(0).poisson(5, shape), np.zeros(shape, bool)),
        "empty": (np.zeros((0, 5), np.int32), np.zeros((0, 5), bool)),
    }
    for name, (data, mask) in cases.items():
        strong = threshold_image(data, mask, algorithm=algorithm, backend=backend)
        assert strong.shape == data.shape and not strong.any(), name


def test_parameter_validation():
    with pytest.raises(SpotFindingParameterError):
        ThresholdParams(kernel_size=(0, 3))
    with pytest.raises(SpotFindingParameterError):
        ThresholdParams(min_local=1)
    with pytest.raises(SpotFindingParameterError):
        ThresholdParams(min_local=50)
    with pytest.raises(SpotFindingParameterError):
        ThresholdParams(gain=0.0)
    with pytest.raises(SpotFindingParameterError):
        ThresholdParams(global_threshold=-1)
    assert ThresholdParams(min_local=0).min_count == 49
    data = np.zeros((4, 4))
    with pytest.raises(SpotFindingParameterError):
        threshold_image(data, np.ones((4, 5), bool))
    with pytest.raises(SpotFindingParameterError):
        threshold_image(data, np.ones((4, 4), bool), algorithm="niblack")
    with pytest.raises(SpotFindingParameterError):
        threshold_image(data, np.ones((4, 4), bool), backend="cuda")


@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["dense", "sparse"])
def test_second_pass_dense_and_sparse_agree(monkeypatch, fraction):
    from beamstream.diffraction import _threshold_numba

    monkeypatch.setattr(_threshold_numba, "_DENSE_CANDIDATE_FRACTION", fraction)
    for seed in (0, 5):
        data, mask = _random_frame(seed, shape=(48, 52))
        for params in (ThresholdParams(), ThresholdParams(gain=1.3, kernel_size=(2, 1))):
            expected = _reference("dispersion_extended", data, mask, params)
            got = threshold_image(data, mask, params, algorithm="dispersion_extended", backend="numba")
            assert np.array_equal(got, expected)
