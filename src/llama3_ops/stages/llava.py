"""``fab llava``: describe an image with LLaVA-Llama-3 through lmdeploy's ``pipeline`` on the host.

The course's stage: ``pip install git+https://github.com/haotian-liu/LLaVA.git``, then
``pipeline('xtuner/llava-llama-3-8b-v1_1-hf', chat_template_config=ChatTemplateConfig(model_name='llama3'))``
and ``pipe(('describe this image', load_image(URL)))``. What this adds:

* the model is a path on the host (default ``~/model/llava-llama-3-8b-v1_1-hf``), checked before
  anything loads, and its format decides what the env needs:

  - ``LlavaLlamaForCausalLM`` (the original LLaVA format, which ``xtuner/llava-llama-3-8b-v1_1-hf``
    is): lmdeploy imports the ``llava`` package from the LLaVA repo. It must be installed with
    ``--no-deps`` (the model card and lmdeploy's own error message say so; the course omits it): the
    repo pins transformers 4.31 / torch 2.0.1 / accelerate 0.21, which would break lmdeploy's env.
    ``--install-llava`` runs that install;
  - ``LlavaForConditionalGeneration`` (transformers format, e.g. ``llava-hf/*``): lmdeploy 0.18
    reads it without the LLaVA repo; lmdeploy 0.4.1 cannot (its ``load_vl_model`` knows only
    ``LlavaLlamaForCausalLM`` among the LLaVA architectures);

* a local image is uploaded to ``~/.cache/llama3-ops/llava/`` first (a URL is fetched by the host);
* GPU memory is checked against stage_requirements.yml (``llava``: ~18 GiB);
* the chat template is ``llama3`` on lmdeploy 0.4.x (as the course); 0.18 has no ``llama3`` template
  name and uses the model's own Hugging Face chat template;
* under transformers >= 5 the host script makes lmdeploy load the PIL image processor: with the
  default torchvision backend, lmdeploy 0.18's call (a PIL image, ``input_data_format='channels_last'``)
  fails in preprocessing and the pipeline answers with nothing (found on the H200, 2026-12-01);
* an empty answer (``finish_reason`` "error" or no tokens) is a failure with one message.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from rich.console import Console

from llama3_ops.errors import Llama3OpsError, returns_exit_code
from llama3_ops.remote import files as remote_files
from llama3_ops.remote import transport
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import gpu
from llama3_ops.stages.host import read_host
from llama3_ops.stages.lm_models import STAGE_FILES_DIR, HostModel, LmdeployEnv, ModelError, check_model, probe_env
from llama3_ops.stages.options import Opt, add_to

SCRIPT = "llava_describe.py"
DEFAULT_MODEL = "~/model/llava-llama-3-8b-v1_1-hf"
LLAVA_REPO = "git+https://github.com/haotian-liu/LLaVA.git"
IMAGE_DIR = "~/.cache/llama3-ops/llava"
LogLevel = Literal["ERROR", "WARNING", "INFO", "DEBUG"]  # lmdeploy's, in the host's output
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
MAX_IMAGE_BYTES = 50 * 1024 * 1024
ORIGINAL_ARCHS = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")
HF_ARCHS = ("LlavaForConditionalGeneration",)
# magic bytes -> extension
IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
)


class LlavaError(Llama3OpsError, RuntimeError):
    pass


# fab llava and `python -m llama3_ops.stages.llava --local` take these (llama3_ops.stages.options).
OPTIONS: tuple[Opt, ...] = (
    Opt("image", None, "a local image file (uploaded) or an http(s) URL"),
    Opt("prompt", "Describe this image.", "what to ask about the image"),
    Opt("model", DEFAULT_MODEL, "LLaVA-Llama-3 on the host (a path)"),
    Opt("backend", "turbomind", "lmdeploy's engine", choices=("turbomind", "pytorch")),
    Opt("session_len", 8192, "tokens per session (an image takes 576)"),
    Opt("cache_max_entry_count", None, "the KV cache's share of free GPU memory", kind=float),
    Opt("max_new_tokens", 512, "tokens of the answer at most"),
    Opt("env", None, "bin directory of the lmdeploy env (default: host.json's)"),
    Opt("log_level", "ERROR", "lmdeploy's log level", choices=LOG_LEVELS),
)


def config_from(v: Any, **more: Any) -> LlavaConfig:
    if not v.image:
        raise LlavaError("--image is required: a local image file or an http(s) URL")
    return LlavaConfig(image=v.image, prompt=v.prompt, model=v.model, backend=v.backend, session_len=v.session_len,
                       cache_max_entry_count=v.cache_max_entry_count, max_new_tokens=v.max_new_tokens,
                       env_bin_dir=v.env, log_level=v.log_level, **more)


@dataclass(frozen=True)
class LlavaConfig:
    image: str  # a local file (uploaded) or an http(s) URL
    prompt: str = "Describe this image."
    model: str = DEFAULT_MODEL
    backend: Literal["turbomind", "pytorch"] = "turbomind"
    chat_template: str | None = None  # None: llama3 on lmdeploy 0.4.x, the model's own on newer
    session_len: int = 8192
    cache_max_entry_count: float | None = None
    max_new_tokens: int = 512
    env_bin_dir: str | None = None  # None: host.json's lmdeploy env
    install_llava: bool = False
    llava_ref: str = ""  # a tag or commit of the LLaVA repo; empty: its default branch, as the model card
    check_gpu: bool = True
    timeout: float = 1800.0
    env: dict[str, str] = field(default_factory=dict)
    log_level: LogLevel = "ERROR"

    def validate(self) -> None:
        if self.backend not in ("turbomind", "pytorch"):
            raise LlavaError(f"unknown backend {self.backend!r} (turbomind|pytorch)")
        if not self.prompt.strip():
            raise LlavaError("the prompt is empty")
        if self.cache_max_entry_count is not None and not 0 < self.cache_max_entry_count <= 1:
            raise LlavaError("cache_max_entry_count must be in (0, 1]")
        if self.max_new_tokens < 1 or self.session_len < 1024:
            raise LlavaError("max_new_tokens must be >= 1 and session_len >= 1024 (an image takes 576 tokens)")
        if self.log_level not in LOG_LEVELS:
            raise LlavaError(f"unknown log level {self.log_level!r} ({'|'.join(LOG_LEVELS)})")
        if self.llava_ref and not re.fullmatch(r"[A-Za-z0-9._/-]+", self.llava_ref):
            raise LlavaError(f"bad LLaVA git ref {self.llava_ref!r}")

    @property
    def is_url(self) -> bool:
        return self.image.startswith(("http://", "https://"))


def image_kind(data: bytes) -> str | None:
    """The file extension for image bytes (PNG, JPEG, GIF, BMP, WebP), or None."""
    for magic, ext in IMAGE_MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def read_local_image(path: Path) -> tuple[bytes, str]:
    if not path.is_file():
        raise LlavaError(f"image {path} does not exist (give a local file or an http(s) URL)")
    data = path.read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        raise LlavaError(f"image {path} is {len(data) >> 20} MiB; keep it under 50 MiB")
    ext = image_kind(data)
    if ext is None:
        raise LlavaError(f"{path} is not a PNG, JPEG, GIF, BMP or WebP image")
    return data, ext


def upload_image(remote: Remote, data: bytes, ext: str) -> str:
    """Put image bytes on the host (base64 over stdin); returns the absolute host path."""
    name = hashlib.sha256(data).hexdigest()[:16] + ext
    script = (
        "set -e; d=\"$HOME\"/" + shlex.quote(IMAGE_DIR[2:]) + "; mkdir -p \"$d\"; "
        f"tmp=\"$d/.{name}.$$\"; base64 -d > \"$tmp\"; mv -f \"$tmp\" \"$d/{name}\"; printf %s \"$d/{name}\""
    )
    return remote.run(script, stdin=base64.b64encode(data).decode(), timeout=300).stdout.strip()


def install_argv(env: LmdeployEnv, ref: str = "") -> list[str]:
    """``pip install --no-deps git+…/LLaVA.git`` into the env (the model card's command, with --no-deps)."""
    return [env.python, "-m", "pip", "install", "--no-deps", LLAVA_REPO + (f"@{ref}" if ref else "")]


def chat_template_for(cfg: LlavaConfig, env: LmdeployEnv) -> str | None:
    if cfg.chat_template:
        return cfg.chat_template
    return "llama3" if env.version_tuple < (0, 5) else None


def describe_argv(cfg: LlavaConfig, env: LmdeployEnv, home: str, model_path: str, image: str,
                  json_out: str | None = None, dry_run: bool = False) -> list[str]:
    argv = [env.python, f"{home}/{STAGE_FILES_DIR[2:]}/{SCRIPT}", model_path, image, "--prompt", cfg.prompt,
            "--backend", cfg.backend, "--session-len", str(cfg.session_len),
            "--max-new-tokens", str(cfg.max_new_tokens)]
    template = chat_template_for(cfg, env)
    if template:
        argv += ["--chat-template", template]
    if cfg.cache_max_entry_count is not None:
        argv += ["--cache-max-entry-count", f"{cfg.cache_max_entry_count:g}"]
    if json_out:
        argv += ["--json", json_out]
    if cfg.log_level != "ERROR":
        argv += ["--log-level", cfg.log_level]
    if dry_run:
        argv.append("--dry-run")
    return argv


def has_llava_package(remote: Remote, env: LmdeployEnv) -> bool:
    code = "import importlib.util as u; print(u.find_spec('llava') is not None)"
    res = remote.run(f"{shlex.quote(env.python)} -c {shlex.quote(code)}", timeout=60, check=False)
    return res.stdout.strip().endswith("True")


def check_env(remote: Remote, cfg: LlavaConfig, model: HostModel, env: LmdeployEnv,
              console: Console | None = None) -> None:
    """The model's LLaVA format against what the env can run; installs the LLaVA repo when asked."""
    arch = model.architectures[0] if model.architectures else ""
    if arch in HF_ARCHS:
        if env.version_tuple < (0, 5):
            raise LlavaError(
                f"{model.path} is a transformers-format LLaVA ({arch}); lmdeploy {env.version} runs LLaVA only in "
                f"the original LLaVA format ({', '.join(ORIGINAL_ARCHS)}), e.g. xtuner/llava-llama-3-8b-v1_1-hf"
            )
        return
    if arch not in ORIGINAL_ARCHS:
        raise LlavaError(f"{model.path} is not a LLaVA model (architectures: {', '.join(model.architectures) or '-'})")
    if has_llava_package(remote, env):
        return
    cmd = " ".join(shlex.quote(a) for a in install_argv(env, cfg.llava_ref))
    if not cfg.install_llava:
        raise LlavaError(
            f"{model.path} ({arch}) needs the LLaVA repo's llava package in {env.bin_dir}, which is not installed. "
            f"Install it without its dependencies (it pins transformers 4.31 and torch 2.0.1, which would break "
            f"lmdeploy): fab llava --install-llava, or on the host: {cmd}"
        )
    if console is not None:
        console.print(f"installing the LLaVA repo without dependencies: {cmd}", markup=False, highlight=False)
    res = remote.run(cmd, timeout=900, check=False)
    if res.rc != 0 or not has_llava_package(remote, env):
        out = (res.stdout + res.stderr)[-2000:]
        raise LlavaError(f"installing LLaVA failed on {remote.label} (exit {res.rc}):\n{out}")


@dataclass
class Prepared:
    home: str
    model: HostModel
    env: LmdeployEnv
    image: str  # host path or URL
    argv: list[str]
    json_out: str


def prepare(remote: Remote, cfg: LlavaConfig, console: Console | None = None, dry_run: bool = False) -> Prepared:
    cfg.validate()
    local: tuple[bytes, str] | None = None
    if not cfg.is_url:
        if "://" in cfg.image:
            raise LlavaError(f"{cfg.image}: only http(s) URLs or local files")
        local = read_local_image(Path(cfg.image).expanduser())
    host = read_host(remote)
    home = host.home
    try:
        model = check_model(remote, cfg.model, host)
    except ModelError as exc:
        raise LlavaError(f"{exc}. Download LLaVA-Llama-3 there first (the course uses "
                         "xtuner/llava-llama-3-8b-v1_1-hf) or pass --model PATH") from exc
    env = probe_env(remote, host, cfg.env_bin_dir)
    check_env(remote, cfg, model, env, console)
    if cfg.check_gpu and not dry_run:
        gpu.check_stage(remote, "llava")
    image = upload_image(remote, *local) if local else cfg.image
    remote_files.put_package_file(remote, "llama3_ops.stages.lm_files", SCRIPT, f"{STAGE_FILES_DIR}/{SCRIPT}")
    json_out = f"{home}/.local/state/llama3-ops/llava/describe-{time.strftime('%Y%m%dT%H%M%S')}.json"
    remote.run(f"mkdir -p {shlex.quote(str(Path(json_out).parent))}", timeout=30)
    argv = describe_argv(cfg, env, home, model.path, image, json_out, dry_run)
    if console is not None:
        arch = model.architectures[0] if model.architectures else "?"
        console.print(f"[bold]llava[/] on {remote.label}: lmdeploy {env.version}, {model.path} ({arch})")
        console.print(" ".join(shlex.quote(a) for a in argv), markup=False, highlight=False, style="dim")
    return Prepared(home, model, env, image, argv, json_out)


@dataclass
class Description:
    text: str
    info: dict[str, Any]
    command: str


def describe(remote: Remote, cfg: LlavaConfig, console: Console | None = None, dry_run: bool = False) -> Description:
    """Preflight, upload, run the pipeline on the host; the model's answer."""
    console = console or Console(stderr=True)
    p = prepare(remote, cfg, console, dry_run)
    env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(cfg.env.items()))
    cmd = (f"export PATH={shlex.quote(p.env.bin_dir)}:\"$PATH\"; "
           + (f"export {env_prefix}; " if env_prefix else "")
           + " ".join(shlex.quote(a) for a in p.argv))
    with console.status("loading LLaVA and describing the image (the first load takes minutes)"):
        res = remote.run(cmd, timeout=cfg.timeout, check=False)
    if res.rc != 0:
        hint = ""
        if "please install llava" in res.stderr:
            hint = " (the llava package is missing: fab llava --install-llava)"
        raise LlavaError(f"LLaVA on {remote.label} failed (exit {res.rc}){hint}:\n{res.stderr[-3000:]}")
    if dry_run:
        return Description("", json.loads(res.stdout.strip().splitlines()[-1]), cmd)
    info_res = remote.run(f"cat {shlex.quote(p.json_out)}", timeout=30, check=False)
    info = json.loads(info_res.stdout) if info_res.rc == 0 and info_res.stdout.strip() else {}
    if cfg.log_level != "ERROR":
        info["stderr_tail"] = res.stderr[-6000:]
    return Description(str(info.get("text", res.stdout.strip())), info, cmd)


def build_parser() -> argparse.ArgumentParser:
    """``python -m llama3_ops.stages.llava --local --image FILE [options]`` (the device run)."""
    p = argparse.ArgumentParser(prog="python -m llama3_ops.stages.llava")
    p.add_argument("--local", action="store_true", required=True, help="run on this machine (LocalRemote)")
    add_to(p, OPTIONS)
    p.add_argument("--setenv", action="append", default=[], metavar="KEY=VALUE", help="the run's environment")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--timeout", type=float, default=1800.0)
    return p


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    con = Console(stderr=True)
    cfg = config_from(args, timeout=args.timeout, env=dict(e.split("=", 1) for e in args.setenv))
    t0 = time.monotonic()
    try:
        res = describe(transport.LocalRemote(), cfg, console=con)
    except (LlavaError, ModelError, gpu.GPUCheckError) as exc:
        con.print(f"error: {exc}", style="red", markup=False, highlight=False)
        if args.json:
            Path(args.json).write_text(json.dumps({"error": str(exc)}, indent=2) + "\n", encoding="utf-8")
        return 1
    print(res.text)
    if args.json:
        Path(args.json).write_text(json.dumps({**res.info, "command": res.command,
                                               "seconds": round(time.monotonic() - t0, 1)},
                                              indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
