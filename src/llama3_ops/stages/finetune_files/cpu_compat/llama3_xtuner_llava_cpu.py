"""XTuner 0.2.0's LLaVAModel and LLaVADataset, made to run on a CPU-only host (llama3-ops, cpu profile).

* ``CPULLaVAModel``: ``LLaVAModel._prepare_for_flash_attn`` (every build: ``xtuner train`` and
  ``pth_to_hf``) asks ``get_torch_device().is_bf16_supported()``; without CUDA that is ``torch.cpu``,
  which has no such function, and the build raises AttributeError before a weight is loaded. Skipped
  without CUDA (flash-attention needs CUDA; transformers then uses SDPA with the config's dtype). The
  class name keeps "LLaVAModel": ``pth_to_hf`` recognises a LLaVA config by it.
* ``CPULLaVADataset``: ``LLaVADataset.__init__`` calls ``process_hf_dataset`` without ``map_num_proc``,
  so its default of 32 applies and ``datasets`` forks up to 32 processes for each of its ~6 map and
  filter passes; on a 2-core host that cost more than the training (35 s against 21 s for 4 tiny
  iterations). The subclass passes ``map_num_proc`` through for the duration of its own ``__init__``.

With CUDA both are XTuner's classes unchanged; the config rendered by llama3-ops names them only for
CPU runs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import xtuner.dataset.llava as _xtuner_llava
from xtuner.dataset import LLaVADataset
from xtuner.model import LLaVAModel


class CPULLaVAModel(LLaVAModel):  # type: ignore[misc]
    @staticmethod
    def _prepare_for_flash_attn(cfg: Any, llm_cfg: Any) -> Any:
        if torch.cuda.is_available():
            return LLaVAModel._prepare_for_flash_attn(cfg, llm_cfg)
        return cfg, llm_cfg


class CPULLaVADataset(LLaVADataset):  # type: ignore[misc]
    def __init__(self, *args: Any, map_num_proc: int = 1, **kwargs: Any) -> None:
        original = _xtuner_llava.process_hf_dataset
        _xtuner_llava.process_hf_dataset = functools.partial(original, map_num_proc=map_num_proc)
        try:
            super().__init__(*args, **kwargs)
        finally:
            _xtuner_llava.process_hf_dataset = original
