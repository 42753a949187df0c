"""Import-only stand-in for ``torchvision.transforms`` (see the package docstring)."""

from __future__ import annotations

from torchvision import _WHY


def __getattr__(name: str) -> object:
    raise AttributeError(f"torchvision.transforms.{name}: {_WHY}")
