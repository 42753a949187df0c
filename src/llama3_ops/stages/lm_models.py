"""Models and the lmdeploy environment on the host, shared by ``fab chat``, ``fab quantize`` and ``fab llava``.

Model names resolve through the host contract, :meth:`llama3_ops.stages.host.Host.model` (``base``,
``merged``, ``4bit`` or a path; ``4bit`` means ``--model-format awq``). :func:`check_model` runs one
remote script and fails with a message that names the stage that makes the missing model.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.transport import Remote
from llama3_ops.stages.host import Host

STAGE_FILES_DIR = "~/.local/share/llama3-ops/stages"  # host-side scripts are uploaded here
LMDEPLOY_ENV = "lmdeploy"  # host.json's env that runs fab chat, quantize and llava
AWQ_MARKER = ".llama3-ops-awq.json"  # written by lm_files/awq_offline.py when a quantization finished

class ModelError(Llama3OpsError):
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


def check_model(remote: Remote, model: str, host: Host) -> HostModel:
    """The model directory with its config; :class:`ModelError` naming the stage that makes it if missing."""
    path, fmt = host.model(model)
    q = shlex.quote(path)
    script = (
        f"m={q}\n"
        'if [ ! -d "$m" ]; then echo "missing"; exit 3; fi\n'
        'if [ ! -f "$m/config.json" ]; then echo "noconfig"; exit 3; fi\n'
        f'if [ -f "$m/{AWQ_MARKER}" ]; then echo marker=1; else echo marker=0; fi\n'
        'echo "@@CONFIG"; cat "$m/config.json"\n'
    )
    res = remote.run(script, timeout=30, check=False)
    if res.rc != 0:
        what = res.stdout.strip()
        if what == "missing":
            msg = f"model {model!r} not found on {remote.label}: {path} does not exist"
        elif what == "noconfig":
            msg = f"model {model!r} on {remote.label}: {path} has no config.json (not a Hugging Face model dir)"
        else:
            msg = f"could not check model {path} on {remote.label}: {res.stderr.strip() or what}"
        raise ModelError(msg + host.model_hint(model))
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


def probe_env(remote: Remote, host: Host, override: str | None = None) -> LmdeployEnv:
    """The lmdeploy env (host.json's, or ``override``) and its version, read from its metadata without
    importing lmdeploy."""
    bd = host.env_bin(LMDEPLOY_ENV, override)
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
        source = "--env" if override else f"host.json's {LMDEPLOY_ENV!r} env"
        raise ModelError(
            f"no lmdeploy environment at {bd} ({source}) on {remote.label}: {detail}. Provision the host "
            "(ansible-playbook site.yml --tags python_env) or pass --env with the env's bin directory."
        )
    return LmdeployEnv(bd, out.splitlines()[-1].strip(), f"{bd}/python")
