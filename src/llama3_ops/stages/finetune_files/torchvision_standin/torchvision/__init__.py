"""Import-only stand-in for torchvision on CPU hosts (llama3-ops, cpu profile).

PyPI's torchvision wheels for Linux x86_64 are CUDA builds: with the CPU build of torch their
``_C`` extension does not load and ``import torchvision`` raises. XTuner 0.2.0 imports
``torchvision.transforms`` at module level for its InternVL image dataset only, which a text
fine-tune never uses. llama3-ops puts this directory first on PYTHONPATH for the xtuner commands,
and only when the real torchvision cannot be imported. It carries no package metadata, so
transformers still reports torchvision as unavailable. Any other name raises AttributeError
(ImportError in a `from ... import`) with this explanation.
"""

from __future__ import annotations

__version__ = "0.0.0+llama3ops.cpu-compat"

_WHY = (
    "torchvision is not usable on this CPU host (PyPI only has CUDA builds); llama3-ops provides "
    "import-only names for XTuner's text fine-tune. Image datasets need a real torchvision."
)


def __getattr__(name: str) -> object:
    raise AttributeError(f"torchvision.{name}: {_WHY}")
