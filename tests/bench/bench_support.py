"""Helpers shared by the bench tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# A path of this machine inside a recorded string: one that starts with "/", or a "/dir/" after a
# space, quote or "=" (as in an error message), or a site-packages directory.
_ABS = re.compile(r"(?:^|[\s'\"=(])/[^\s/'\"]+/|site-packages")


def absolute_paths(obj: Any, where: str = "") -> list[str]:
    """Every string in a JSON value (keys included) that names an absolute path, with where it is."""
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in absolute_paths(k, where) + absolute_paths(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [hit for i, v in enumerate(obj) for hit in absolute_paths(v, f"{where}[{i}]")]
    if isinstance(obj, str) and (_ABS.search(obj) or str(Path.home()) in obj):
        return [f"{where}: {obj}"]
    return []
