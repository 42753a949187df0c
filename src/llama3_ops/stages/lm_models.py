"""Models and the lmdeploy environment on the host, shared by ``fab chat``, ``fab quantize`` and ``fab llava``.

Model names resolve as in :func:`llama3_ops.stages.serve.resolve_model` (``base``, ``merged``, ``4bit`` or a
path; ``4bit`` means ``--model-format awq``). :func:`check_model` runs one remote script and fails with
a message that names the stage that makes the missing model.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from llama3_ops.remote.transport import Remote
from llama3_ops.stages import serve

STAGE_FILES_DIR = "~/.local/share/llama3-ops/stages"  # host-side scripts are uploaded here
AWQ_MARKER = ".llama3-ops-awq.json"  # written by lm_files/awq_offline.py when a quantization finished

# Which stage produces each named model, for "run X first" messages.
MADE_BY = {
    "base": "the model download (ansible-playbook site.yml --tags model)",
    "merged": "the fine-tune stage (fab finetune merges into it)",
    "4bit": "fab quantize",
}


class ModelError(ValueError):
    """A model (or the env that runs it) is missing or unusable on the host."""


@dataclass(frozen=True)
class HostModel:
    name: str  # what the user asked for: base, merged, 4bit or a path
    path: str  # absolute path on the host
    model_format: str | None  # "awq" for quantized models
    architectures: tuple[str, ...] = ()
    quantization: dict[str, Any] | None = None


@dataclass(frozen=True)
class LmdeployEnv:
    bin_dir: str  # absolute
    version: str
    python: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return version_tuple(self.version)

    @property
    def lmdeploy(self) -> str:
        return f"{self.bin_dir}/lmdeploy"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def expand(path: str, home: str) -> str:
    if path == "~":
        return home
    if path.startswith("~/"):
        return home.rstrip("/") + path[1:]
    return path


def resolve(model: str, home: str) -> tuple[str, str | None]:
    """``(absolute host path, model format)``, exactly as ``fab serve`` resolves it."""
    return serve.resolve_model(model, home)


def check_model(remote: Remote, model: str, home: str) -> HostModel:
    """The model directory with its config; :class:`ModelError` naming the stage that makes it if missing."""
    path, fmt = resolve(model, home)
    q = shlex.quote(path)
    script = (
        f"m={q}\n"
        'if [ ! -d "$m" ]; then echo "missing"; exit 3; fi\n'
        'if [ ! -f "$m/config.json" ]; then echo "noconfig"; exit 3; fi\n'
        f'if [ -f "$m/{AWQ_MARKER}" ]; then echo marker=1; else echo marker=0; fi\n'
        'echo "@@CONFIG"; cat "$m/config.json"\n'
    )
    res = remote.run(script, timeout=30, check=False)
    made_by = MADE_BY.get(model)
    if res.rc != 0:
        what = res.stdout.strip()
        if what == "missing":
            msg = f"model {model!r} not found on {remote.label}: {path} does not exist"
        elif what == "noconfig":
            msg = f"model {model!r} on {remote.label}: {path} has no config.json (not a Hugging Face model dir)"
        else:
            msg = f"could not check model {path} on {remote.label}: {res.stderr.strip() or what}"
        if made_by:
            msg += f"; it is made by {made_by}: run that first"
        raise ModelError(msg)
    head, _, cfg_text = res.stdout.partition("@@CONFIG\n")
    marker = "marker=1" in head
    try:
        cfg: dict[str, Any] = json.loads(cfg_text)
    except ValueError as exc:
        raise ModelError(f"{path}/config.json on {remote.label} is not valid JSON: {exc}") from exc
    quant = cfg.get("quantization_config") or None
    if fmt == "awq" or model == "4bit":
        if not marker and not quant:
            raise ModelError(
                f"{path} on {remote.label} is not a finished 4-bit model (no {AWQ_MARKER} and no "
                "quantization_config): an interrupted quantization? Run fab quantize (it redoes it)."
            )
        if quant and quant.get("quant_method") != "awq":
            raise ModelError(f"{path} is quantized with {quant.get('quant_method')!r}, not AWQ")
    elif quant and quant.get("quant_method") == "awq":
        fmt = "awq"  # a path to an AWQ model: lmdeploy needs --model-format awq (0.4.1 TurboMind)
    return HostModel(model, path, fmt, tuple(cfg.get("architectures") or ()), quant)


def probe_env(remote: Remote, bin_dir: str, home: str) -> LmdeployEnv:
    """The lmdeploy version in the env (read from its metadata, without importing lmdeploy)."""
    bd = expand(bin_dir, home).rstrip("/")
    script = (
        f"b={shlex.quote(bd)}\n"
        'if [ ! -x "$b/python" ]; then echo "nopython"; exit 4; fi\n'
        'if [ ! -x "$b/lmdeploy" ]; then echo "nolmdeploy"; exit 4; fi\n'
        '"$b/python" -c "import importlib.metadata as m; print(m.version(\'lmdeploy\'))"\n'
    )
    res = remote.run(script, timeout=60, check=False)
    out = res.stdout.strip()
    if res.rc != 0 or not out:
        if out == "nopython":
            detail = f"{bd}/python does not exist"
        elif out == "nolmdeploy":
            detail = f"{bd}/lmdeploy does not exist (lmdeploy is not installed in that env)"
        else:
            detail = res.stderr.strip()[-500:] or out
        raise ModelError(
            f"no lmdeploy environment at {bd} on {remote.label}: {detail}. Provision the host "
            "(ansible-playbook site.yml --tags python_env) or pass --env with the env's bin directory."
        )
    return LmdeployEnv(bd, out.splitlines()[-1].strip(), f"{bd}/python")
