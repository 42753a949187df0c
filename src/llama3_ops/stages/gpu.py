"""The host's GPUs (from ``nvidia-smi``) and the per-stage preflight against stage_requirements.yml.

``check_stage(remote, "chat")`` fails before a stage starts when GPU 0 has less free memory than the
stage needs, with one message that says what to do instead, e.g.::

    stage chat needs ~16.2 GiB of GPU memory; GPU 0 (NVIDIA GeForce RTX 3060) has 11.4 GiB free of
    12.0 GiB. Try: fab chat --model 4bit (chat_4bit needs ~6.5 GiB) after fab quantize, or a GPU with
    more memory.

The numbers come from ``llama3_ops/data/stage_requirements.yml`` only (the Ansible preflight reads the
same file). A host without ``nvidia-smi`` (or with a driver that does not answer) gets a clear error
for GPU-only stages and passes for stages marked ``gpu: false``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.transport import Remote

QUERY_FIELDS = ("index", "name", "memory.total", "memory.used")
MIB_PER_GIB = 1024.0

# What to try instead when a stage does not fit; {stage} is replaced by the stage name.
HINTS: dict[str, str] = {
    "chat": "fab chat --model 4bit (chat_4bit needs ~{chat_4bit} GiB) after fab quantize, "
    "or a GPU with more memory",
    "serve": "fab serve --model 4bit (chat_4bit needs ~{chat_4bit} GiB) after fab quantize, "
    "or a GPU with more memory",
    "chat_4bit": "a GPU with more memory (the 4-bit model is already the smallest the course uses)",
    "quantize": "quantize on a larger GPU and copy the ..._4bit directory to this host",
    "llava": "a GPU with more memory (LLaVA-Llama-3-8B loads fp16 weights)",
    "finetune": "a GPU with more memory (QLoRA at max_length 512 is the course's smallest setting)",
}


class GPUCheckError(Llama3OpsError, RuntimeError):
    """The host cannot run a stage: no usable GPU, or not enough GPU memory."""


class NoGPUError(GPUCheckError):
    """``nvidia-smi`` is missing or does not answer on the host."""


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int

    @property
    def memory_free_mib(self) -> int:
        return max(0, self.memory_total_mib - self.memory_used_mib)

    @property
    def total_gib(self) -> float:
        return self.memory_total_mib / MIB_PER_GIB

    @property
    def free_gib(self) -> float:
        return self.memory_free_mib / MIB_PER_GIB

    @property
    def used_gib(self) -> float:
        return self.memory_used_mib / MIB_PER_GIB


@dataclass(frozen=True)
class StageRequirement:
    stage: str
    gpu_mem_gb: float
    disk_gb: float
    basis: str
    gpu: bool = True


@cache
def requirements() -> dict[str, StageRequirement]:
    """Every stage in ``stage_requirements.yml``."""
    text = resources.files("llama3_ops").joinpath("data/stage_requirements.yml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    out: dict[str, StageRequirement] = {}
    for name, body in data["stages"].items():
        out[name] = StageRequirement(
            stage=name,
            gpu_mem_gb=float(body["gpu_mem_gb"]),
            disk_gb=float(body.get("disk_gb", 0)),
            basis=str(body.get("basis", "")),
            gpu=bool(body.get("gpu", True)),
        )
    return out


def requirement(stage: str) -> StageRequirement:
    reqs = requirements()
    if stage not in reqs:
        raise KeyError(f"unknown stage {stage!r}; stage_requirements.yml has {', '.join(sorted(reqs))}")
    return reqs[stage]


def _int_field(value: str) -> int:
    v = value.strip()
    if not v or v.startswith("["):  # [N/A], [Not Supported] (MIG slices, some vGPUs)
        return -1
    return int(float(v))


def parse_query(text: str) -> list[GPU]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits``."""
    gpus: list[GPU] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        # a GPU name never holds a comma in practice, but keep the middle together if one does
        index, name, total, used = parts[0], ", ".join(parts[1:-2]), parts[-2], parts[-1]
        gpus.append(GPU(int(index), name, _int_field(total), _int_field(used)))
    return gpus


def query_gpus(remote: Remote) -> list[GPU]:
    """The host's GPUs; :class:`NoGPUError` when ``nvidia-smi`` is missing, fails or lists none."""
    cmd = (
        "command -v nvidia-smi >/dev/null 2>&1 || { echo 'nvidia-smi: not found'; exit 127; }\n"
        f"exec nvidia-smi --query-gpu={','.join(QUERY_FIELDS)} --format=csv,noheader,nounits 2>&1\n"
    )
    res = remote.run(cmd, timeout=60, check=False)
    out = res.stdout.strip()
    if res.rc == 127:
        raise NoGPUError(f"{remote.label} has no nvidia-smi: no NVIDIA driver is installed there")
    if res.rc != 0:
        detail = out.splitlines()[0] if out else f"exit status {res.rc}"
        raise NoGPUError(f"nvidia-smi on {remote.label} failed: {detail}")
    try:
        gpus = parse_query(out)
    except ValueError as exc:
        raise NoGPUError(f"nvidia-smi on {remote.label} answered something unexpected: {exc}") from exc
    if not gpus:
        raise NoGPUError(f"nvidia-smi on {remote.label} lists no GPU")
    return gpus


def _hint(stage: str) -> str:
    hint = HINTS.get(stage, "a GPU with more memory")
    reqs = requirements()
    return hint.format(**{k: f"{r.gpu_mem_gb:g}" for k, r in reqs.items()})


def check_stage(remote: Remote, stage: str, gpu_index: int = 0) -> GPU | None:
    """Fail with one clear message when GPU ``gpu_index`` cannot hold ``stage``; returns that GPU.

    Stages marked ``gpu: false`` return ``None`` on hosts without a GPU (they run on CPU there).
    """
    req = requirement(stage)
    try:
        gpus = query_gpus(remote)
    except NoGPUError as exc:
        if not req.gpu:
            return None
        raise NoGPUError(f"stage {stage} needs an NVIDIA GPU with ~{req.gpu_mem_gb:g} GiB: {exc}") from exc
    by_index = {g.index: g for g in gpus}
    if gpu_index not in by_index:
        have = ", ".join(f"{g.index} ({g.name})" for g in gpus)
        raise GPUCheckError(f"stage {stage}: {remote.label} has no GPU {gpu_index}; it has {have}")
    gpu = by_index[gpu_index]
    if gpu.memory_total_mib < 0 or gpu.memory_used_mib < 0:
        return gpu  # memory not reported (MIG slice, vGPU): nothing to compare against
    if gpu.free_gib >= req.gpu_mem_gb:
        return gpu
    msg = (
        f"stage {stage} needs ~{req.gpu_mem_gb:g} GiB of GPU memory; GPU {gpu.index} ({gpu.name}) "
        f"has {gpu.free_gib:.1f} GiB free of {gpu.total_gib:.1f} GiB."
    )
    if gpu.total_gib >= req.gpu_mem_gb:
        msg += (
            f" {gpu.used_gib:.1f} GiB is in use by other processes: stop them first "
            "(fab status / fab down for the bundle's services; nvidia-smi on the host lists them)."
        )
    else:
        others = [g for g in gpus if g.index != gpu.index and g.free_gib >= req.gpu_mem_gb]
        if others:
            g = others[0]
            msg += (
                f" GPU {g.index} ({g.name}) has {g.free_gib:.1f} GiB free: run it there "
                f"(CUDA_VISIBLE_DEVICES={g.index})."
            )
        else:
            msg += f" Try: {_hint(stage)}."
    msg += f" (Basis: {req.basis}.)"
    raise GPUCheckError(msg)


def check_tp(remote: Remote, stage: str, tp: int) -> list[GPU]:
    """Fail when the host has fewer than ``tp`` GPUs, or when one of the first ``tp`` cannot hold its share.

    Tensor parallelism splits the weights evenly, so each of GPUs ``0..tp-1`` (the ones the engine
    takes) needs ``gpu_mem_gb / tp`` free; the KV cache then takes its ratio of what is left on each.
    ``tp == 1`` is :func:`check_stage` on GPU 0. Returns the GPUs that will be used.
    """
    if tp < 1:
        raise GPUCheckError(f"stage {stage}: --tp must be at least 1, got {tp}")
    if tp == 1:
        g = check_stage(remote, stage)
        return [g] if g is not None else []
    req = requirement(stage)
    try:
        gpus = sorted(query_gpus(remote), key=lambda g: g.index)
    except NoGPUError as exc:
        raise NoGPUError(f"stage {stage} with --tp {tp} needs {tp} NVIDIA GPUs: {exc}") from exc
    if len(gpus) < tp:
        have = ", ".join(f"{g.index} ({g.name})" for g in gpus)
        raise GPUCheckError(
            f"stage {stage} with --tp {tp} needs {tp} GPUs; {remote.label} has {len(gpus)}: {have}. "
            f"Use --tp {len(gpus)} or fewer, or a host with more GPUs."
        )
    share = req.gpu_mem_gb / tp
    used = gpus[:tp]
    short = [g for g in used if g.memory_total_mib >= 0 and g.memory_used_mib >= 0 and g.free_gib < share]
    if short:
        detail = "; ".join(f"GPU {g.index} ({g.name}) has {g.free_gib:.1f} GiB free of {g.total_gib:.1f} GiB"
                           for g in short)
        raise GPUCheckError(
            f"stage {stage} with --tp {tp} needs ~{share:.1f} GiB free on each of GPUs 0-{tp - 1} "
            f"(~{req.gpu_mem_gb:g} GiB split {tp} ways): {detail}. Stop what holds them (fab status / "
            f"fab down; nvidia-smi on the host lists them). (Basis: {req.basis}.)"
        )
    return used


def free_disk_gib(remote: Remote, path: str) -> float:
    """Free space (GiB) on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = f'"$HOME"/{shlex.quote(path[2:])}' if path.startswith("~/") else shlex.quote(path)
    script = f'p={p}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; df -Pk "$p" | awk \'NR==2 {{print $4}}\''
    res = remote.run(script, timeout=30)
    return int(res.stdout.strip()) / (1024.0 * 1024.0)


def check_disk(remote: Remote, stage: str, path: str) -> float:
    """Fail when the filesystem of ``path`` has less free space than the stage writes; returns GiB free."""
    req = requirement(stage)
    free = free_disk_gib(remote, path)
    if free < req.disk_gb:
        raise GPUCheckError(
            f"stage {stage} writes ~{req.disk_gb:g} GiB under {path}; only {free:.1f} GiB is free there on "
            f"{remote.label}. Free some space (old checkpoints, ~/.cache/huggingface) first."
        )
    return free


def memory_line(gpus: list[GPU]) -> str:
    """``GPU 0 (NAME): 16176 / 81559 MiB in use`` for each GPU, as the course reads nvidia-smi."""
    return "; ".join(f"GPU {g.index} ({g.name}): {g.memory_used_mib} / {g.memory_total_mib} MiB in use" for g in gpus)
