"""``backend='dials'``: DIALS's own threshold and strong-spot extraction, imported lazily.

Runs the same steps as DIALS's 2-D spot finder on an in-memory frame: the
``DispersionThreshold`` / ``DispersionExtendedThreshold`` classes, pixel-list
labelling, shoebox creation with the spot-size limits, centroids, summed
intensities and the peak-centroid distance filter. DIALS is not on PyPI; where
it is missing, :class:`BackendUnavailableError` says so.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from beamstream.diffraction.errors import BackendUnavailableError
from beamstream.diffraction.spotfinder import SPOT_DTYPE, check_strong_pixel_fraction, empty_spots

if TYPE_CHECKING:
    from beamstream.diffraction.analysis import SpotFindingParams


def _import_dials():
    try:
        from dials.algorithms.image import threshold as dials_threshold
        from dials.array_family import flex
        from dials.model.data import PixelList, PixelListLabeller
        from dxtbx import flumpy
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend='dials' needs DIALS importable in this Python (it is distributed through conda-forge, "
            f"not PyPI): {exc}"
        ) from exc
    return dials_threshold, flex, PixelList, PixelListLabeller, flumpy


def dials_available() -> bool:
    """True when DIALS can be imported."""
    try:
        _import_dials()
    except BackendUnavailableError:
        return False
    return True


def find_spots_with_dials(
    data: np.ndarray, mask: np.ndarray, params: SpotFindingParams
) -> tuple[np.ndarray, int, float]:
    """(spots, number of strong pixels, threshold seconds) from DIALS's own algorithms."""
    dials_threshold, flex, PixelList, PixelListLabeller, flumpy = _import_dials()
    image = flumpy.from_numpy(np.ascontiguousarray(data, dtype=np.float64))
    valid = flumpy.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    size = image.all()
    tp = params.threshold_params()
    algorithm_class = (
        dials_threshold.DispersionExtendedThreshold
        if params.threshold_algorithm == "dispersion_extended"
        else dials_threshold.DispersionThreshold
    )
    algorithm = algorithm_class(
        size, tuple(tp.kernel_size), tp.sigma_background, tp.sigma_strong, tp.global_threshold, tp.min_local
    )
    strong = flex.bool(flex.grid(size))
    t0 = time.perf_counter()
    if tp.gain is not None:
        algorithm(image, valid, flex.double(flex.grid(size), tp.gain), strong)
    else:
        algorithm(image, valid, strong)
    time_threshold = time.perf_counter() - t0

    n_strong = int(strong.count(True))
    fp = params.filter_params()
    check_strong_pixel_fraction(n_strong, int(np.prod(data.shape)), fp.max_strong_pixel_fraction)
    if n_strong == 0:
        return empty_spots(), 0, time_threshold

    labeller = PixelListLabeller()
    labeller.add(PixelList(0, image, strong))
    creator = flex.PixelListShoeboxCreator(labeller, 0, 0, True, fp.min_spot_size, fp.max_spot_size, False)
    shoeboxes = creator.result()
    allocated = shoeboxes.is_data_allocated() & shoeboxes.is_background_allocated()
    sizes = creator.spot_size().select(allocated)
    shoeboxes = shoeboxes.select(allocated)
    if len(shoeboxes) == 0:
        return empty_spots(), n_strong, time_threshold
    observed = flex.observation(shoeboxes.panels(), shoeboxes.centroid_valid(), shoeboxes.summed_intensity())
    if fp.max_separation is not None:
        peak = shoeboxes.peak_coordinates()
        keep = (peak - observed.centroids().px_position()).norms() <= fp.max_separation
        observed = observed.select(keep)
        shoeboxes = shoeboxes.select(keep)
        sizes = sizes.select(keep)
    table = flex.reflection_table(observed, shoeboxes)

    spots = np.zeros(len(table), dtype=SPOT_DTYPE)
    x, y, _ = table["xyzobs.px.value"].parts()
    spots["x_px"] = x.as_numpy_array()
    spots["y_px"] = y.as_numpy_array()
    spots["intensity"] = table["intensity.sum.value"].as_numpy_array()
    spots["variance"] = table["intensity.sum.variance"].as_numpy_array()
    spots["n_pixels"] = np.asarray(list(sizes), dtype=np.int32)
    spots["bbox"] = np.asarray([tuple(b)[:4] for b in table["bbox"]], dtype=np.int32).reshape(-1, 4)
    return spots, n_strong, time_threshold
