"""Read DIALS/dxtbx experiment models (``experiments.json``) into Beamstream's geometry.

Only what spot finding and the per-image statistics need: the single-panel
detector frame (origin, fast and slow axes), pixel size, image size, trusted
range, the parallax-correction parameters (sensor thickness and attenuation
coefficient, used when the panel's px/mm strategy is
``ParallaxCorrectedPxMmStrategy``) and the wavelength. No dxtbx import.

Beamstream's geometry assumes the beam runs along -z (dxtbx's default beam
``direction`` (0, 0, 1)). A tilted beam is handled by rotating the whole
experiment so that it does; every |s1 - s0| is unchanged by that rotation.
"""

from __future__ import annotations

import json
import math
from os import PathLike
from pathlib import Path

import numpy as np

from beamstream.diffraction.errors import GeometryError
from beamstream.diffraction.image import DetectorGeometry


def load_experiments(source: str | PathLike | dict) -> dict:
    """The experiment list as a dict (``source`` is a path or an already-parsed dict)."""
    if isinstance(source, dict):
        return source
    try:
        with open(Path(source), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise GeometryError(f"cannot read experiment list {source}: {exc}") from exc


def _rotation_onto_z(direction: np.ndarray) -> np.ndarray:
    """Rotation matrix taking unit ``direction`` onto +z (Rodrigues)."""
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(direction, z)
    sin_angle = float(np.linalg.norm(axis))
    cos_angle = float(np.dot(direction, z))
    if sin_angle < 1e-15:
        if cos_angle > 0:
            return np.eye(3)
        return np.diag([1.0, -1.0, -1.0])  # 180 degrees about x
    axis /= sin_angle
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + sin_angle * k + (1 - cos_angle) * (k @ k)


def _panel(experiments: dict, index: int) -> tuple[dict, dict]:
    try:
        experiment = experiments["experiment"][index]
        detector = experiments["detector"][experiment["detector"]]
        beam = experiments["beam"][experiment["beam"]]
    except (KeyError, IndexError, TypeError) as exc:
        raise GeometryError(f"experiment list has no complete experiment {index}: {exc}") from exc
    panels = detector.get("panels", [])
    if len(panels) != 1:
        raise GeometryError(f"only single-panel detectors are supported, this one has {len(panels)} panels")
    return panels[0], beam


def detector_geometry_from_experiments(source: str | PathLike | dict, experiment: int = 0) -> DetectorGeometry:
    """Build a :class:`DetectorGeometry` from a dxtbx experiment list (path or dict)."""
    panel, beam = _panel(load_experiments(source), experiment)
    try:
        fast = np.asarray(panel["fast_axis"], dtype=np.float64)
        slow = np.asarray(panel["slow_axis"], dtype=np.float64)
        origin = np.asarray(panel["origin"], dtype=np.float64)
        pixel_size = tuple(float(p) for p in panel["pixel_size"])
        image_size = tuple(int(s) for s in panel["image_size"])
        direction = np.asarray(beam["direction"], dtype=np.float64)
        wavelength = float(beam["wavelength"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GeometryError(f"incomplete panel or beam model: {exc}") from exc
    norm = float(np.linalg.norm(direction))
    if not norm > 0:
        raise GeometryError("beam direction is a zero vector")
    rotation = _rotation_onto_z(direction / norm)
    fast, slow, origin = rotation @ fast, rotation @ slow, rotation @ origin

    normal = np.cross(fast, slow)
    normal_length = float(np.linalg.norm(normal))
    if normal_length == 0:
        raise GeometryError("panel fast and slow axes are parallel")
    normal /= normal_length
    distance = abs(float(np.dot(origin, normal)))
    # Where the direct beam (along -z) meets the panel plane, in mm then pixels.
    d_matrix = np.column_stack([fast, slow, origin])
    try:
        hit = np.linalg.solve(d_matrix, np.array([0.0, 0.0, -1.0]))
    except np.linalg.LinAlgError as exc:
        raise GeometryError("the beam is parallel to the panel") from exc
    if hit[2] == 0:
        raise GeometryError("the beam does not meet the panel plane")
    beam_centre = (hit[0] / hit[2] / pixel_size[0], hit[1] / hit[2] / pixel_size[1])

    strategy = (panel.get("px_mm_strategy") or {}).get("type", "SimplePxMmStrategy")
    parallax = strategy == "ParallaxCorrectedPxMmStrategy"
    thickness = float(panel.get("thickness") or 0.0)
    mu = float(panel.get("mu") or 0.0) if parallax else 0.0
    trusted = tuple(float(t) for t in panel.get("trusted_range", (0.0, 65535.0)))
    if not all(math.isfinite(v) for v in beam_centre):
        raise GeometryError("beam centre is not finite")
    return DetectorGeometry(
        wavelength_A=wavelength,
        distance_mm=distance,
        beam_center_px=(float(beam_centre[0]), float(beam_centre[1])),
        pixel_size_mm=pixel_size,
        image_size_px=image_size,
        trusted_range=trusted,
        fast_axis=tuple(float(v) for v in fast),
        slow_axis=tuple(float(v) for v in slow),
        origin_mm=tuple(float(v) for v in origin),
        detector_name=str(panel.get("name", "")),
        thickness_mm=thickness,
        mu_per_mm=mu,
    )


def untrusted_rectangle_mask(source: str | PathLike | dict, experiment: int = 0) -> np.ndarray:
    """The panel's static mask: False inside its untrusted rectangles ``(x0, y0, x1, y1)``, exclusive ends."""
    panel, _ = _panel(load_experiments(source), experiment)
    width, height = (int(s) for s in panel["image_size"])
    mask = np.ones((height, width), dtype=bool)
    for x0, y0, x1, y1 in panel.get("mask", []):
        mask[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)] = False
    return mask
