"""XTuner 0.2.0's SupervisedFinetune, made to build on a CPU-only host (llama3-ops, cpu profile).

``SupervisedFinetune._prepare_for_flash_attn`` picks the flash-attention dtype with
``get_torch_device().is_bf16_supported()``. Without CUDA the device namespace is ``torch.cpu``, which
has no ``is_bf16_supported``, so every model build (``xtuner train`` and ``xtuner convert pth_to_hf``)
raises AttributeError before loading a weight. This subclass skips that preparation when CUDA is not
available: flash-attention needs CUDA anyway, and transformers then uses its default (SDPA)
attention with the dtype the config asks for. With CUDA it is XTuner's class unchanged.

The config rendered by llama3-ops names this class only for CPU runs; GPU runs use XTuner's own.
"""

from __future__ import annotations

from typing import Any

import torch
from xtuner.model import SupervisedFinetune


class CPUSupervisedFinetune(SupervisedFinetune):  # type: ignore[misc]
    @staticmethod
    def _prepare_for_flash_attn(cfg: Any, llm_cfg: Any) -> Any:
        if torch.cuda.is_available():
            return SupervisedFinetune._prepare_for_flash_attn(cfg, llm_cfg)
        return cfg
