"""Typed errors of the science core: callers map them to dead letters or CLI messages."""


class DiffractionError(Exception):
    """Base class: anything the science core refuses, with a message naming what was wrong."""


class ImageReadError(DiffractionError):
    """A file could not be read as a detector image (missing, truncated, corrupt, wrong format)."""


class FrameIndexError(DiffractionError):
    """A frame index outside the frames a file holds."""


class GeometryError(DiffractionError):
    """Detector geometry that is missing, non-finite or inconsistent."""


class SpotFindingError(DiffractionError):
    """Spot finding refused a frame, e.g. far too many strong pixels (DIALS raises here too)."""


class SpotFindingParameterError(DiffractionError, ValueError):
    """Spot-finding parameters that DIALS would reject (kernel size, sigmas, spot sizes ...)."""


class BackendUnavailableError(DiffractionError):
    """A requested computation backend (e.g. ``dials``) cannot be imported on this machine."""
