"""Analysers: what the analysis stage runs on one image (read it, analyse it, shape the result fields).

An analyser is a function (file path, frame index) -> ImageResult fields. No Kafka here:
the analysis stage (:mod:`beamstream.streams.analysis_stage`) calls one per image event and
wraps the fields into an ImageResult.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from beamstream.diffraction.analysis import SpotFindingParams, analyse_image
from beamstream.diffraction.readers import open_image
from beamstream.diffraction.resolution import spot_rlp_norm
from beamstream.diffraction.statistics import PerImageStatistics

BRIGHTEST_SPOTS = 20

#: An analyser: (file path, frame index) -> ImageResult fields.
Analyser = Callable[[str, int], dict]


def _brightest(spots: np.ndarray, geometry) -> list[dict]:
    if len(spots) == 0:
        return []
    order = np.argsort(spots["intensity"])[::-1][:BRIGHTEST_SPOTS]
    chosen = spots[order]
    norms = spot_rlp_norm(geometry, chosen["x_px"], chosen["y_px"])
    return [
        {"x_px": float(s["x_px"]), "y_px": float(s["y_px"]), "intensity": float(s["intensity"]),
         "d_A": float(1.0 / n) if n > 0 else None}
        for s, n in zip(chosen, norms, strict=True)
    ]


def analyse_file(path: str, frame_index: int, params: SpotFindingParams | None = None) -> dict:
    """Read one frame and run the DIALS-compatible per-image analysis on it.

    Raises the science core's typed errors (ImageReadError, FrameIndexError ...)
    for input that cannot be analysed.
    """
    params = params or SpotFindingParams()
    started = time.perf_counter()
    image = open_image(path, frame_index)
    read_done = time.perf_counter()
    analysis = analyse_image(image, params)
    fields = {k: v for k, v in analysis.to_dict().items() if not k.startswith("time_")}
    fields["brightest_spots"] = _brightest(analysis.spots, image.geometry)
    fields["read_time_s"] = read_done - started
    fields["analysis_time_s"] = time.perf_counter() - read_done
    fields["analysis_backend"] = params.backend
    return fields


#: What the no-op analysis finds: no spots (zeros, and no resolution). Built once: its own cost would
#: otherwise be a third of the pipeline's per-event work it is there to measure.
_NOTHING_FOUND = {
    **PerImageStatistics().to_dict(),
    "n_strong_pixels": 0, "read_time_s": 0.0, "analysis_time_s": 0.0, "analysis_backend": "noop",
}


def noop_analysis(path: str, frame_index: int) -> dict:
    """An analysis that reads nothing and finds nothing: measures the pipeline's own overhead."""
    return {**_NOTHING_FOUND, "brightest_spots": []}


def timed_noop_analysis(seconds: float) -> Analyser:
    """A no-op analysis that takes ``seconds`` (sleeping, so it costs no CPU): sizes a deployment and
    tests scaling with an analysis time like the real one's, on machines with fewer cores than workers."""
    def analysis(path: str, frame_index: int) -> dict:
        time.sleep(seconds)
        fields = noop_analysis(path, frame_index)
        fields["analysis_time_s"] = seconds
        return fields
    analysis.backend = "noop"  # type: ignore[attr-defined]
    return analysis


noop_analysis.backend = "noop"  # type: ignore[attr-defined]


