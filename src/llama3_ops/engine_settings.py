"""Engine settings chosen for the GPU: ``data/engine_settings.yml`` (measured rows, then rules by memory).

``fab serve`` and ``bench offline`` with no tuning flag take their max batch size, KV cache ratio, KV
quant policy and prefill size from here (shared by :mod:`llama3_ops.stages` and :mod:`llama3_ops.bench`,
so it depends on neither); a flag given on the command line wins over the table for that one setting::

    >>> t = choose("NVIDIA H200", 143771, backend="pytorch")
    >>> (t.max_batch_size, t.cache_max_entry_count, t.source)
    (512, 0.9, 'table row H200')
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any

import yaml

MIB_PER_GIB = 1024.0

SETTINGS = ("max_batch_size", "cache_max_entry_count", "quant_policy", "max_prefill_token_num")
# The PyTorch engine takes fp8 KV (16); TurboMind takes 0, 4 and 8 only.
QUANT_POLICIES = {"pytorch": (0, 4, 8, 16), "turbomind": (0, 4, 8)}


@dataclass(frozen=True)
class Tuning:
    """One set of engine settings and where it came from (a table row, a rule, flags)."""

    max_batch_size: int
    cache_max_entry_count: float
    quant_policy: int
    max_prefill_token_num: int | None
    source: str

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SETTINGS}

    def line(self) -> str:
        """``max batch 512, cache 0.9, KV fp16/bf16, prefill default (table row H200)``."""
        kv = {0: "fp16/bf16", 4: "int4", 8: "int8", 16: "fp8"}.get(self.quant_policy, str(self.quant_policy))
        prefill = self.max_prefill_token_num or "engine default"
        return (f"max batch {self.max_batch_size}, cache {self.cache_max_entry_count:g}, KV {kv}, "
                f"prefill {prefill} ({self.source})")


@cache
def table() -> dict[str, Any]:
    text = resources.files("llama3_ops").joinpath("data/engine_settings.yml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _from(body: dict[str, Any], source: str, backend: str) -> Tuning:
    qp = int(body["quant_policy"])
    if qp not in QUANT_POLICIES.get(backend, (0,)):
        qp, source = 0, f"{source}; KV fp16/bf16 on {backend}"
    prefill = body.get("max_prefill_token_num")
    return Tuning(
        max_batch_size=int(body["max_batch_size"]),
        cache_max_entry_count=float(body["cache_max_entry_count"]),
        quant_policy=qp,
        max_prefill_token_num=int(prefill) if prefill is not None else None,
        source=source,
    )


def choose(gpu_name: str | None, memory_total_mib: int = -1, backend: str = "pytorch") -> Tuning:
    """The settings for a GPU (GPU 0 of the replica): its table row, else the rule for its total memory.

    No name (no GPU answered) or memory not reported (-1: MIG slices, some vGPUs) gets the smallest rule.
    """
    data = table()
    total_gib = memory_total_mib / MIB_PER_GIB if memory_total_mib > 0 else 0.0
    if gpu_name is not None:
        for row in data["gpus"]:
            if row["match"].lower() in gpu_name.lower() and total_gib >= float(row["min_memory_gib"]):
                return _from(row, f"table row {row['name']}", backend)
    for rule in data["rules"]:
        if total_gib >= float(rule["min_memory_gib"]):
            what = f"{gpu_name}, {total_gib:.0f} GiB" if gpu_name is not None else "no GPU memory reported"
            return _from(rule, f"rule for >= {rule['min_memory_gib']} GiB ({what}; not in the table)", backend)
    raise ValueError("engine_settings.yml: no rule with min_memory_gib 0")  # the file's last rule catches all


def with_flags(base: Tuning, **given: Any) -> Tuning:
    """``base`` with every setting given (not None) replaced; the source says which ones the flags set."""
    flags = {k: v for k, v in given.items() if v is not None and k in SETTINGS}
    if not flags:
        return base
    changed = ", ".join("--" + k.replace("_", "-") for k in flags)
    src = "flags" if len(flags) == len(SETTINGS) else f"{base.source}; {changed} from the command line"
    return replace(base, **flags, source=src)
