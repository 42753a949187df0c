"""``fab chat``: ``lmdeploy chat`` on the host in a remote terminal, interactive from the laptop.

The course runs ``lmdeploy chat /root/model/Meta-Llama-3-8B-Instruct [--cache-max-entry-count 0.01]``
in one terminal and ``nvidia-smi`` in another to see the GPU memory it holds. Here:

1. preflight: the model exists (``4bit`` must be a finished ``fab quantize`` output), the env has
   lmdeploy, and GPU 0 has the memory stage_requirements.yml gives for ``chat`` / ``chat_4bit``;
2. ``ssh -t`` (the project's SSH options: strict host keys, the inventory's key and known_hosts) runs
   ``lm_files/chat_session.sh``, which runs ``lmdeploy chat`` in the terminal while nvidia-smi samples
   memory.used every 500 ms;
3. after the chat ends, the peak memory is read back and printed next to the course's figure.

Flags are the ones ``lmdeploy chat`` has in both 0.4.1 (course) and 0.18 (current): ``--backend``,
``--tp``, ``--session-len``, ``--cache-max-entry-count``, ``--quant-policy``, ``--model-format``.
``--model-format awq`` is passed for TurboMind only: 0.18's PyTorch engine reads the AWQ settings from
config.json (and only warns about the flag), and 0.4.1's PyTorch engine has no AWQ kernels at all.

:func:`run_batch` runs the same script without a terminal, questions on stdin (the GPU device run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from llama3_ops.errors import Llama3OpsError, returns_exit_code
from llama3_ops.remote import files as remote_files
from llama3_ops.remote import transport
from llama3_ops.remote.connection import SSHTarget
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import gpu
from llama3_ops.stages.host import read_host
from llama3_ops.stages.lm_models import STAGE_FILES_DIR, HostModel, LmdeployEnv, ModelError, check_model, probe_env
from llama3_ops.stages.options import Opt, add_to

SESSION_SCRIPT = "chat_session.sh"
REPORT_DIR = "~/.local/state/llama3-ops/chat"
COURSE_MIB = {"chat": 16176}  # the course's nvidia-smi reading with --cache-max-entry-count 0.01


class ChatConfigError(Llama3OpsError, ValueError):
    pass


# fab chat and `python -m llama3_ops.stages.chat --local` take these (llama3_ops.stages.options).
OPTIONS: tuple[Opt, ...] = (
    Opt("model", "base", "base | merged | 4bit | a path on the host"),
    Opt("backend", "turbomind", "lmdeploy's engine", choices=("turbomind", "pytorch")),
    Opt("cache_max_entry_count", None, "the KV cache's share of free GPU memory (course: 0.5, then 0.01)",
        kind=float),
    Opt("session_len", None, "tokens per session (default: the model's)", kind=int),
    Opt("env", None, "bin directory of the lmdeploy env (default: host.json's)"),
)


def config_from(v: Any, **more: Any) -> ChatConfig:
    return ChatConfig(model=v.model, backend=v.backend, cache_max_entry_count=v.cache_max_entry_count,
                      session_len=v.session_len, env_bin_dir=v.env, **more)


@dataclass(frozen=True)
class ChatConfig:
    model: str = "base"
    backend: Literal["turbomind", "pytorch"] = "turbomind"
    cache_max_entry_count: float | None = None  # None: lmdeploy's default (0.8)
    session_len: int | None = None
    tp: int = 1
    quant_policy: Literal[0, 4, 8] = 0
    model_format: str | None = None  # None: awq for AWQ models on TurboMind
    env_bin_dir: str | None = None  # None: host.json's lmdeploy env
    gpu_index: int = 0
    check_gpu: bool = True
    env: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.backend not in ("turbomind", "pytorch"):
            raise ChatConfigError(f"unknown backend {self.backend!r} (turbomind|pytorch)")
        if self.cache_max_entry_count is not None and not 0 < self.cache_max_entry_count <= 1:
            raise ChatConfigError("cache_max_entry_count must be in (0, 1] (the course uses 0.5 and 0.01)")
        if self.session_len is not None and self.session_len < 64:
            raise ChatConfigError("session_len must be at least 64 tokens")
        if self.tp < 1:
            raise ChatConfigError("tp must be >= 1")
        if self.quant_policy not in (0, 4, 8):
            raise ChatConfigError("quant_policy must be 0, 4 or 8")
        for key in self.env:
            if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
                raise ChatConfigError(f"bad environment variable name {key!r}")

    @property
    def stage(self) -> str:
        return "chat_4bit" if self.model == "4bit" else "chat"


def lmdeploy_argv(cfg: ChatConfig, model: HostModel, env: LmdeployEnv) -> list[str]:
    """``lmdeploy chat MODEL ...`` with flags both 0.4.1 and 0.18 accept."""
    cfg.validate()
    fmt = cfg.model_format or model.model_format
    if fmt == "awq" and cfg.backend == "pytorch" and env.version_tuple < (0, 5):
        raise ChatConfigError(
            f"lmdeploy {env.version}'s PyTorch engine cannot run AWQ models (no W4A16 kernels in 0.4.x); "
            "use --backend turbomind"
        )
    argv = [env.lmdeploy, "chat", model.path, "--backend", cfg.backend, "--tp", str(cfg.tp)]
    if cfg.cache_max_entry_count is not None:
        argv += ["--cache-max-entry-count", f"{cfg.cache_max_entry_count:g}"]
    if cfg.session_len is not None:
        argv += ["--session-len", str(cfg.session_len)]
    if cfg.quant_policy:
        argv += ["--quant-policy", str(cfg.quant_policy)]
    if fmt and (cfg.backend == "turbomind" or cfg.model_format):
        argv += ["--model-format", fmt]
    argv += list(cfg.extra_args)
    return argv


def session_command(home: str, report: str, env: LmdeployEnv, argv: list[str], extra_env: dict[str, str]) -> str:
    """The host command line: the session script, the report path, the env's bin dir, then the chat.

    ``exec`` replaces the login shell that sshd starts, so Ctrl-C (SIGINT to the terminal's foreground
    group) meets only the session script, which lets lmdeploy end and still reports.
    """
    script = f"{home}/{STAGE_FILES_DIR[2:]}/{SESSION_SCRIPT}"
    cmd = ["exec", "sh", script, report, env.bin_dir, "--"]
    if extra_env:
        cmd += ["env", *[f"{k}={v}" for k, v in sorted(extra_env.items())]]
    return " ".join(shlex.quote(a) for a in cmd + argv)


def pty_argv(target: SSHTarget, command: str) -> list[str]:
    """``ssh -t`` with the project's options (strict host keys), for an interactive terminal session."""
    return [
        "ssh",
        "-t",
        *target.ssh_options(),
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
        "-o",
        "LogLevel=ERROR",  # no "Connection to ... closed." after the chat; errors still show
        target.destination,
        command,
    ]


@dataclass
class Prepared:
    cfg: ChatConfig
    home: str
    model: HostModel
    env: LmdeployEnv
    gpu: gpu.GPU | None
    argv: list[str]
    report: str
    command: str


def prepare(remote: Remote, cfg: ChatConfig, console: Console | None = None) -> Prepared:
    """Preflight (model, env, GPU memory) and upload the session script; nothing is started."""
    cfg.validate()
    host = read_host(remote)
    home = host.home
    model = check_model(remote, cfg.model, host)
    env = probe_env(remote, host, cfg.env_bin_dir)
    dev = gpu.check_stage(remote, cfg.stage, cfg.gpu_index) if cfg.check_gpu else None
    remote_files.put_package_file(
        remote, "llama3_ops.stages.lm_files", SESSION_SCRIPT, f"{STAGE_FILES_DIR}/{SESSION_SCRIPT}", mode="0755"
    )
    argv = lmdeploy_argv(cfg, model, env)
    report = f"{home}/{REPORT_DIR[2:]}/chat-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json"
    command = session_command(home, report, env, argv, cfg.env)
    if console is not None:
        where = f"GPU {dev.index} ({dev.name}, {dev.free_gib:.1f} GiB free)" if dev else "no GPU check"
        console.print(f"[bold]chat[/] on {remote.label}: lmdeploy {env.version}, {where}")
        console.print(" ".join(shlex.quote(a) for a in argv), markup=False, highlight=False)
    return Prepared(cfg, home, model, env, dev, argv, report, command)


@dataclass
class MemoryReport:
    rc: int
    seconds: int
    gpus: list[dict[str, Any]]
    note: str = ""

    def lines(self, stage: str = "chat") -> list[str]:
        if not self.gpus:
            return [f"GPU memory not reported: {self.note or 'no samples'}"]
        out = []
        for g in self.gpus:
            held = g["peak_mib"] - g["before_mib"]
            line = (
                f"GPU {g['index']} ({g['name']}): {g['peak_mib']} MiB of {g['total_mib']} MiB in use at the peak "
                f"({held:+d} MiB for the chat)"
            )
            if stage in COURSE_MIB:
                line += f"; the course saw {COURSE_MIB[stage]} MiB with --cache-max-entry-count 0.01"
            out.append(line)
        return out


def read_report(remote: Remote, report: str) -> MemoryReport:
    res = remote.run(f"cat {shlex.quote(report)}", timeout=30, check=False)
    if res.rc != 0 or not res.stdout.strip():
        return MemoryReport(-1, 0, [], note=f"no report at {report} (the session ended before writing it)")
    data = json.loads(res.stdout)
    return MemoryReport(int(data["rc"]), int(data.get("seconds", 0)), list(data.get("gpus", [])),
                        str(data.get("note", "")))


def run_interactive(remote: transport.SSHRemote, cfg: ChatConfig, console: Console | None = None) -> int:
    """The chat in this terminal over ``ssh -t``; prints the GPU memory report after it; returns its exit code."""
    console = console or Console(stderr=True)
    prep = prepare(remote, cfg, console)
    console.print("[dim]type a question, then an empty line to send it; `exit` + empty line ends the chat[/]")
    rc = subprocess.call(pty_argv(remote.target, prep.command))
    if rc == 255:
        console.print(f"[red]ssh to {remote.label} failed (exit 255)[/]")
        return rc
    for line in read_report(remote, prep.report).lines(cfg.stage):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return rc


@dataclass
class BatchResult:
    rc: int
    stdout: str
    stderr: str
    memory: MemoryReport
    command: str
    seconds: float


def run_batch(remote: Remote, cfg: ChatConfig, questions: list[str], *, timeout: float = 900.0,
              console: Console | None = None) -> BatchResult:
    """The same session without a terminal: each question, then ``exit`` (lmdeploy's prompt protocol:
    a message ends with an empty line)."""
    prep = prepare(remote, cfg, console)
    stdin = "".join(f"{q}\n\n" for q in questions) + "exit\n\n"
    t0 = time.monotonic()
    res = remote.run(prep.command, stdin=stdin, timeout=timeout, check=False)
    return BatchResult(res.rc, res.stdout, res.stderr, read_report(remote, prep.report), prep.command,
                       time.monotonic() - t0)


def build_parser() -> argparse.ArgumentParser:
    """``python -m llama3_ops.stages.chat --local [--model M] [--question Q ...]`` (the device run)."""
    p = argparse.ArgumentParser(prog="python -m llama3_ops.stages.chat")
    p.add_argument("--local", action="store_true", required=True, help="run on this machine (LocalRemote)")
    add_to(p, OPTIONS)
    p.add_argument("--setenv", action="append", default=[], metavar="KEY=VALUE", help="the chat's environment")
    p.add_argument("--question", action="append", default=[])
    p.add_argument("--no-gpu-check", action="store_true")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--timeout", type=float, default=900.0)
    return p


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    con = Console(stderr=True)
    cfg = config_from(args, env=dict(e.split("=", 1) for e in args.setenv), check_gpu=not args.no_gpu_check)
    try:
        res = run_batch(transport.LocalRemote(), cfg, args.question or ["Hello, who are you?"], timeout=args.timeout,
                        console=con)
    except (ChatConfigError, ModelError, gpu.GPUCheckError) as exc:
        con.print(f"error: {exc}", style="red", markup=False, highlight=False)
        return 1
    sys.stdout.write(res.stdout)
    for line in res.memory.lines(cfg.stage):
        con.print(line, markup=False, highlight=False)
    if args.json:
        with Path(args.json).open("w", encoding="utf-8") as fh:
            json.dump({"rc": res.rc, "command": res.command, "seconds": round(res.seconds, 1),
                       "memory": res.memory.__dict__, "stdout_tail": res.stdout[-4000:],
                       "stderr_tail": res.stderr[-4000:]}, fh, indent=2)
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
