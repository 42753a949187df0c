"""Import-only stand-in for ``torchvision.transforms.functional`` (see the package docstring)."""

from __future__ import annotations

from enum import Enum

from torchvision import _WHY


class InterpolationMode(Enum):
    """The interpolation names, as torchvision defines them (imported by XTuner's InternVL dataset)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name: str) -> object:
    raise AttributeError(f"torchvision.transforms.functional.{name}: {_WHY}")
