"""Typed errors of the science core: callers map them to dead letters or CLI messages."""


class DiffractionError(Exception):
    """Base class: anything the science core refuses, with a message naming what was wrong."""


class ImageReadError(DiffractionError):
    """A file could not be read as a detector image (missing, truncated, corrupt, wrong format)."""


class FrameIndexError(DiffractionError):
    """A frame index outside the frames a file holds."""


class GeometryError(DiffractionError):
    """Detector geometry that is missing, non-finite or inconsistent."""
