"""One exception family for everything a user can get wrong or a stage can refuse.

Why one family: the CLI, the Slicer module and scripts catch ``CovidCTDxError`` and show
its message as is, so each message must say what was found and what to do about it.
Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class CovidCTDxError(Exception):
    """Base of every error a user can act on."""


class InputError(CovidCTDxError):
    """The input file or volume cannot be used (missing, corrupt, wrong kind of image)."""


class NotCTError(InputError):
    """The image is not a CT in Hounsfield units (wrong modality or value range)."""


class GeometryError(InputError):
    """Spacing, direction or dimensionality make the image unusable."""


class VolumeTooLargeError(InputError):
    """Loading the image would need more memory than allowed."""


class LungsNotFoundError(CovidCTDxError):
    """No lungs could be found in the image (e.g. a head or abdomen-only CT)."""


class WeightsError(CovidCTDxError):
    """A weights file is missing, corrupt, tampered with, or made for another model."""


class OutputError(CovidCTDxError):
    """The output location cannot take the results (a file, read-only, full, or locked by another run)."""


class CancelledError(CovidCTDxError):
    """The user cancelled a running job; nothing was written."""
