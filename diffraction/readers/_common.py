"""Pieces shared by the format readers: the source interface, frame checks, masks, geometry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from beamstream.diffraction.errors import FrameIndexError, GeometryError, ImageReadError
from beamstream.diffraction.image import DetectorGeometry, DiffractionImage


class ImageSource(ABC):
    """An open image file (or master file) that can hand out frames by 0-based index.

    Use as a context manager so HDF5 handles are closed; reading several frames
    from one source avoids re-parsing headers for each frame.
    """

    path: Path

    @abstractmethod
    def __len__(self) -> int:
        """Number of frames the file holds."""

    @abstractmethod
    def read(self, frame: int = 0) -> DiffractionImage:
        """Read one frame (0-based)."""

    def close(self) -> None:
        """Release file handles; the default source holds none."""
        return None

    def __iter__(self) -> Iterator[DiffractionImage]:
        for frame in range(len(self)):
            yield self.read(frame)

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def scaled(value: float, factor: float) -> float:
    """``value * factor`` rounded to 12 significant digits.

    Unit conversions such as 172e-6 m -> mm otherwise leave binary noise
    (0.17200000000000001) that breaks exact comparisons of round-tripped geometry.
    """
    return float(f"{value * factor:.12g}")


def check_frame(frame: int, n_frames: int, path: Path) -> int:
    """Return ``frame`` as an int if 0 <= frame < n_frames, else raise FrameIndexError."""
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
        raise FrameIndexError(f"{path}: frame index must be an integer, got {frame!r}")
    frame = int(frame)
    if not 0 <= frame < n_frames:
        held = "1 frame (index 0)" if n_frames == 1 else f"{n_frames} frames (indices 0-{n_frames - 1})"
        raise FrameIndexError(f"{path}: frame index {frame} is out of range; the file holds {held}")
    return frame


def require_file(path: str | Path) -> Path:
    """The path as a Path, raising ImageReadError if it is not a readable regular file."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file")
    return path


def trusted_mask(
    data: np.ndarray, trusted_range: tuple[float, float], static_good: np.ndarray | None = None
) -> np.ndarray:
    """True where a pixel is usable: inside the inclusive trusted range and statically good.

    Inclusive on both ends as dxtbx's ``Panel.apply_trusted_range_mask``: with
    the (0, cutoff) range, the -1 gap and -2 bad-pixel markers fall outside.
    ``static_good`` is False on gaps and flagged pixels (the inverse of a pixel mask).
    """
    low, high = trusted_range
    if low == 0 and data.dtype == np.int32 and 0 <= high < 2**32:
        # One comparison instead of two: negative counts become huge as unsigned.
        mask = data.view(np.uint32) <= np.uint32(high)
    else:
        mask = data >= low
        mask &= data <= high
    if static_good is not None:
        mask &= static_good
    return mask


def make_geometry(
    path: Path | str,
    *,
    wavelength_A: float,
    distance_mm: float,
    beam_center_px: tuple[float, float],
    pixel_size_mm: tuple[float, float],
    image_size_px: tuple[int, int],
    trusted_range: tuple[float, float],
    detector_name: str = "",
    thickness_mm: float = 0.0,
    mu_per_mm: float = 0.0,
    fast_axis: tuple[float, float, float] = (1.0, 0.0, 0.0),
    slow_axis: tuple[float, float, float] = (0.0, -1.0, 0.0),
) -> DetectorGeometry:
    """Build the geometry of a flat detector normal to the beam, naming ``path`` in any error.

    ``path`` is only used in error messages (a file, or a label for generated data).

    The panel frame follows dxtbx/imgCIF: the beam travels along -z, the
    detector sits at z = -distance and the origin is the outer corner of the
    first pixel, placed so the beam centre (in pixels) lies on the beam axis.
    """
    try:
        for name, value in (("thickness", thickness_mm), ("sensor mu", mu_per_mm)):
            if not math.isfinite(value):
                raise GeometryError(f"detector geometry: {name} is not finite ({value!r})")
        bx, by = beam_center_px
        px, py = pixel_size_mm
        origin = tuple(
            float(-bx * px * f - by * py * s + c)
            for f, s, c in zip(fast_axis, slow_axis, (0.0, 0.0, -distance_mm), strict=True)
        )
        return DetectorGeometry(
            wavelength_A=float(wavelength_A),
            distance_mm=float(distance_mm),
            beam_center_px=(float(bx), float(by)),
            pixel_size_mm=(float(px), float(py)),
            image_size_px=(int(image_size_px[0]), int(image_size_px[1])),
            trusted_range=(float(trusted_range[0]), float(trusted_range[1])),
            fast_axis=tuple(float(v) for v in fast_axis),
            slow_axis=tuple(float(v) for v in slow_axis),
            origin_mm=origin if all(math.isfinite(v) for v in origin) else None,
            detector_name=detector_name,
            thickness_mm=float(thickness_mm),
            mu_per_mm=float(mu_per_mm),
        )
    except GeometryError as exc:
        raise GeometryError(f"{path}: {exc}") from None
