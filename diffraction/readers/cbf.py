"""PILATUS miniCBF reader (byte-offset compressed), optionally bzip2/gzip compressed.

The pixels are decoded by fabio; this module adds what a pipeline needs on top:
integrity checks (truncation, MD5), geometry from the miniCBF header and a
dxtbx-compatible mask (trusted range [0, Count_cutoff] plus module gaps).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import logging
import math
import re
import zlib
from pathlib import Path

import numpy as np

from beamstream.diffraction.detectors import find_layout, module_gap_mask, sensor_mu_per_mm
from beamstream.diffraction.errors import GeometryError, ImageReadError
from beamstream.diffraction.image import DiffractionImage
from beamstream.diffraction.readers._common import (
    ImageSource,
    check_frame,
    make_geometry,
    require_file,
    scaled,
    trusted_mask,
)

# Marks the start of the binary section of a CBF file.
_BINARY_START = b"\x0c\x1a\x04\xd5"
BZ2_MAGIC = b"BZh"
GZIP_MAGIC = b"\x1f\x8b"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
# One pattern per miniCBF header item we use; values are SI units as written by camserver.
_HEADER_PATTERNS = {
    "wavelength": re.compile(rf"^Wavelength\s+({_NUMBER})", re.I),
    "distance": re.compile(rf"^Detector_distance\s+({_NUMBER})", re.I),
    "beam_xy": re.compile(rf"^Beam_xy\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)", re.I),
    "pixel_size": re.compile(rf"^Pixel_size\s+({_NUMBER})\s*m\s*x\s*({_NUMBER})", re.I),
    "count_cutoff": re.compile(rf"^Count_cutoff\s+({_NUMBER})", re.I),
    "sensor": re.compile(rf"^(\w+)\s+sensor,\s*thickness\s+({_NUMBER})", re.I),
    "detector": re.compile(r"^Detector:\s*(.+)$", re.I),
    "exposure_time": re.compile(rf"^Exposure_time\s+({_NUMBER})", re.I),
    "exposure_period": re.compile(rf"^Exposure_period\s+({_NUMBER})", re.I),
    "start_angle": re.compile(rf"^Start_angle\s+({_NUMBER})", re.I),
    "angle_increment": re.compile(rf"^Angle_increment\s+({_NUMBER})", re.I),
    "timestamp": re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\s*$"),
}
# Without a Count_cutoff in the header, trust everything a signed 32-bit pixel can hold.
_NO_CUTOFF = float(2**31 - 1)

log = logging.getLogger(__name__)


def read_cbf_bytes(path: Path) -> bytes:
    """The file's bytes, decompressing bzip2/gzip (recognised by content) on the fly."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    try:
        if raw.startswith(BZ2_MAGIC):
            return bz2.decompress(raw)
        if raw.startswith(GZIP_MAGIC):
            return gzip.decompress(raw)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        kind = "bzip2" if raw.startswith(BZ2_MAGIC) else "gzip"
        raise ImageReadError(f"{path}: truncated or corrupt {kind} stream ({exc})") from None
    return raw


def parse_minicbf_header(text: str) -> dict[str, object]:
    """Parse the ``# Key value`` lines of a PILATUS miniCBF header into typed values.

    Lengths stay in the file's units (metres); numeric items become floats
    (possibly non-finite: the geometry check reports those). Unknown lines are ignored.
    """
    items: dict[str, object] = {}
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        for key, pattern in _HEADER_PATTERNS.items():
            match = pattern.match(line)
            if match is None or key in items:
                continue
            groups = match.groups()
            if key in ("detector", "timestamp"):
                items[key] = groups[0].strip()
            elif key == "sensor":
                items["sensor_material"] = groups[0]
                items["thickness_m"] = float(groups[1])
            elif len(groups) == 2:
                items[key] = (float(groups[0]), float(groups[1]))
            else:
                items[key] = float(groups[0])
            break
    return items


def _binary_section(raw: bytes, path: Path) -> tuple[dict[str, str], bytes]:
    """The MIME headers of the binary section and its payload, checking length and MD5."""
    start = raw.find(_BINARY_START)
    if start < 0 or b"_array_data" not in raw[:start]:
        raise ImageReadError(f"{path}: not a CBF image (no binary data section found)")
    mime_start = raw.rfind(b"--CIF-BINARY-FORMAT-SECTION--", 0, start)
    mime = raw[mime_start:start].decode("latin-1") if mime_start >= 0 else ""
    fields = {}
    for line in mime.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    payload = raw[start + len(_BINARY_START) :]
    try:
        size = int(fields["X-Binary-Size"])
    except (KeyError, ValueError):
        raise ImageReadError(f"{path}: CBF binary section has no valid X-Binary-Size") from None
    if len(payload) < size:
        raise ImageReadError(f"{path}: truncated: binary section holds {len(payload)} of {size} bytes")
    payload = payload[:size]
    expected_md5 = fields.get("Content-MD5")
    if expected_md5:
        # hashlib costs ~10 ms for a 6M frame; fabio's own check is several times slower.
        actual = base64.b64encode(hashlib.md5(payload).digest()).decode()
        if actual != expected_md5:
            raise ImageReadError(f"{path}: corrupt: MD5 of the binary section does not match its header")
    return fields, payload


class CbfSource(ImageSource):
    """A single-frame miniCBF file, decoded and checked on the first ``read``.

    Construction is cheap so counting frames of many files costs nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = require_file(path)
        self._image: DiffractionImage | None = None

    def __len__(self) -> int:
        return 1

    def read(self, frame: int = 0) -> DiffractionImage:
        """The file's only frame; ``frame`` must be 0."""
        check_frame(frame, 1, self.path)
        if self._image is None:
            self._image = _read_cbf(self.path)
        return self._image


def _decode_pixels(raw: bytes, path: Path, fields: dict[str, str]) -> tuple[np.ndarray, dict]:
    from fabio.cbfimage import CbfImage  # deferred: fabio's import costs ~0.2 s

    try:
        nx = int(fields["X-Binary-Size-Fastest-Dimension"])
        ny = int(fields["X-Binary-Size-Second-Dimension"])
    except (KeyError, ValueError):
        raise ImageReadError(f"{path}: CBF binary section does not give the image dimensions") from None
    try:
        cbf = CbfImage()
        cbf.read(io.BytesIO(raw), check_MD5=False)  # MD5 already checked, faster
        data = cbf.data
    except Exception as exc:  # fabio raises assorted exception types for bad data
        raise ImageReadError(f"{path}: cannot decode CBF pixels ({type(exc).__name__}: {exc})") from None
    if data is None or data.shape != (ny, nx):
        shape = None if data is None else data.shape
        raise ImageReadError(f"{path}: decoded pixel array has shape {shape}, header says {(ny, nx)}")
    if data.dtype != np.int32:
        data = data.astype(np.int32)
    return data, cbf.header


def _read_cbf(path: Path) -> DiffractionImage:
    raw = read_cbf_bytes(path)
    fields, _ = _binary_section(raw, path)
    data, header = _decode_pixels(raw, path, fields)
    items = parse_minicbf_header(str(header.get("_array_data.header_contents", "")))
    ny, nx = data.shape

    missing = [key for key in ("wavelength", "distance", "beam_xy", "pixel_size") if key not in items]
    if missing:
        raise GeometryError(f"{path}: miniCBF header lacks {', '.join(missing)}; cannot build the geometry")
    cutoff = float(items.get("count_cutoff", _NO_CUTOFF))
    if not math.isfinite(cutoff):
        raise GeometryError(f"{path}: Count_cutoff is not finite ({cutoff!r})")
    wavelength = float(items["wavelength"])
    name = str(items.get("detector", ""))
    material = str(items.get("sensor_material", ""))
    pixel_x_m, pixel_y_m = items["pixel_size"]
    geometry = make_geometry(
        path,
        wavelength_A=wavelength,
        distance_mm=scaled(float(items["distance"]), 1000.0),
        beam_center_px=items["beam_xy"],
        pixel_size_mm=(scaled(pixel_x_m, 1000.0), scaled(pixel_y_m, 1000.0)),
        image_size_px=(nx, ny),
        trusted_range=(0.0, cutoff),
        detector_name=name.split(",")[0].strip(),
        thickness_mm=scaled(float(items.get("thickness_m", 0.0)), 1000.0),
        mu_per_mm=sensor_mu_per_mm(material, wavelength),
    )
    gaps = module_gap_mask((nx, ny), find_layout((nx, ny), name))
    metadata = {
        "format": "cbf",
        "detector": name,
        "sensor_material": material,
        **{k: items[k] for k in ("exposure_time", "exposure_period", "start_angle", "angle_increment",
                                 "timestamp") if k in items},
    }
    return DiffractionImage(
        data=data,
        mask=trusted_mask(data, geometry.trusted_range, None if gaps is None else ~gaps),
        geometry=geometry,
        source=str(path),
        frame_index=0,
        metadata=metadata,
    )
