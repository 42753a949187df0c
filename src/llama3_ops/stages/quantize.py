"""``fab quantize``: W4A16 AWQ of the course model with lmdeploy's ``auto_awq``, calibrated offline.

The course runs ``lmdeploy lite auto_awq ~/model/Meta-Llama-3-8B-Instruct --calib-dataset ptb
--calib-samples 128 --calib-seqlen 1024 --w-bits 4 --w-group-size 128 --work-dir ..._4bit``. That
needs the Hugging Face Hub for ptb, and lmdeploy 0.18 rejects ``ptb`` outright (its argparse allows
wikitext2, c4, pileval, gsm8k, neuralmagic_calibration, open-platypus, openwebtext, all from the Hub),
while 0.4.1 rejects ``--batch-size``. So this stage uploads ``lm_files/awq_offline.py`` and runs it
with the env's python: lmdeploy's own ``auto_awq`` with ``get_calib_loaders`` replaced by a loader
over local text (default: the Python reference text every CPython ships, ``pydoc_data.topics``; or
``--calib-file``), same course parameters.

It runs as a supervised service (``quantize``, like ``fab serve``'s server): an SSH drop does not
kill it, and ``fab quantize`` again re-attaches. Progress comes from its log. The result appears at
``<model>_4bit`` only when complete (written to ``..._4bit.partial``, then renamed, with
``.llama3-ops-awq.json`` inside), so a failed run never leaves a directory that looks finished, and
``fab chat --model 4bit`` / ``fab serve --model 4bit`` (``--model-format awq``) find it.

AWQ on an H100 (sm_90) with the course's lmdeploy 0.4.1, which its docs do not list: the quantization
itself (``lmdeploy.lite``) is plain PyTorch and runs on any CUDA GPU. Inference of the result uses
TurboMind's ``gemm_s4_f16`` kernels; in the 0.4.1 wheel (``_turbomind.cpython-*.so``) every one of the
18 instantiations has native SASS for sm_75, 80, 86, 89 and 90 (11-57 KB each; a 128-byte stub on
sm_70), and the kernel source guards on ``__CUDA_ARCH__ >= 800`` with no upper bound. So sm_90 runs the
same mma.sync/ldmatrix kernels as Ampere (not Hopper-tuned wgmma). All instantiations are for group
size 128, matching 0.4.1's Python side, which sets ``cfg.group_size = 128`` for any AWQ model. 0.4.1's
PyTorch engine has no W4A16 path at all. lmdeploy 0.18's PyTorch engine runs AWQ with TurboMind's
Linear on sm_90 when the extension is present, else with its Triton ``awq_linear`` kernel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llama3_ops.errors import Llama3OpsError, returns_exit_code
from llama3_ops.remote import files as remote_files
from llama3_ops.remote import services, transport
from llama3_ops.remote.services import ServiceSpec
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import gpu
from llama3_ops.stages.host import AWQ_SUFFIX, Host, read_host
from llama3_ops.stages.lm_models import AWQ_MARKER, STAGE_FILES_DIR, LmdeployEnv, check_model, probe_env
from llama3_ops.stages.options import Opt, add_to

SERVICE = "quantize"
SCRIPT = "awq_offline.py"
CALIB_DIR = "~/.cache/llama3-ops/calib"
MAX_CALIB_BYTES = 64 * 1024 * 1024
PROGRESS_RE = re.compile(r"^@@llama3-ops (\{.*\})\s*$")
PACKED_RE = re.compile(r" weight (packed|skipped)\.\s*$")


class QuantizeError(Llama3OpsError, RuntimeError):
    pass


# fab quantize and `python -m llama3_ops.stages.quantize --local` take these (llama3_ops.stages.options).
OPTIONS: tuple[Opt, ...] = (
    Opt("model", "base", "base | merged | a path on the host"),
    Opt("out", None, "where the 4-bit model goes (default: the model's path + _4bit)"),
    Opt("calib_file", None, "a local UTF-8 text to calibrate on (default: the Python reference text on the host)"),
    Opt("calib_dataset", None, "lmdeploy's own calibration set instead (needs the Hugging Face Hub)"),
    Opt("calib_samples", 128, "calibration samples"),
    Opt("calib_seqlen", 1024, "tokens per calibration sample"),
    Opt("w_group_size", 128, "weights per quantization group", choices=(32, 64, 128)),
    Opt("batch_size", 1, "calibration batch size"),
    Opt("env", None, "bin directory of the lmdeploy env (default: host.json's)"),
    Opt("force", False, "quantize again over a finished result"),
)


def config_from(v: Any, **more: Any) -> QuantizeConfig:
    return QuantizeConfig(model=v.model, out=v.out, calib_file=Path(v.calib_file) if v.calib_file else None,
                          calib_dataset=v.calib_dataset, calib_samples=v.calib_samples, calib_seqlen=v.calib_seqlen,
                          w_group_size=v.w_group_size, batch_size=v.batch_size, env_bin_dir=v.env, force=v.force,
                          **more)


@dataclass(frozen=True)
class QuantizeConfig:
    model: str = "base"
    out: str | None = None  # default: the model's path + "_4bit"
    calib_file: Path | None = None  # a local UTF-8 text file, uploaded; None: pydoc (or calib_dataset)
    calib_dataset: str | None = None  # lmdeploy's own loader (needs the Hub or a filled datasets cache)
    calib_samples: int = 128
    calib_seqlen: int = 1024
    w_bits: int = 4
    w_group_size: int = 128
    batch_size: int = 1
    dtype: str = "float16"
    device: str = "cuda"
    env_bin_dir: str | None = None  # None: host.json's lmdeploy env
    force: bool = False
    check_gpu: bool = True
    env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.w_bits != 4:
            raise QuantizeError("lmdeploy's W4A16 kernels take 4-bit weights only (--w-bits 4)")
        if self.w_group_size not in (32, 64, 128):
            raise QuantizeError("--w-group-size must be 32, 64 or 128 (the course uses 128)")
        if self.calib_samples < 1:
            raise QuantizeError("--calib-samples must be at least 1 (the course uses 128)")
        if not 16 <= self.calib_seqlen <= 8192:
            raise QuantizeError("--calib-seqlen must be within 16..8192 (the course uses 1024)")
        if self.batch_size < 1:
            raise QuantizeError("--batch-size must be at least 1")
        if self.dtype not in ("float16", "bfloat16", "auto"):
            raise QuantizeError("--dtype must be float16, bfloat16 or auto")
        if self.calib_file is not None and self.calib_dataset:
            raise QuantizeError("give --calib-file or --calib-dataset, not both")

    def check_version(self, env: LmdeployEnv) -> None:
        if env.version_tuple < (0, 5):
            if self.w_group_size != 128:
                raise QuantizeError(
                    f"lmdeploy {env.version}'s TurboMind loads AWQ models with group size 128 only "
                    "(turbomind.py sets cfg.group_size = 128): keep --w-group-size 128"
                )
            if self.batch_size != 1:
                raise QuantizeError(f"lmdeploy {env.version}'s auto_awq has no --batch-size")
        if self.calib_dataset == "ptb" and env.version_tuple >= (0, 18):
            raise QuantizeError(
                f"lmdeploy {env.version} has no ptb calibration set (its auto_awq allows wikitext2, c4, pileval, "
                "gsm8k, neuralmagic_calibration, open-platypus, openwebtext, all from the Hub); leave "
                "--calib-dataset out for the offline default, or pass --calib-file"
            )


def output_path(model_path: str, out: str | None, host: Host) -> str:
    return host.expand(out) if out else model_path.rstrip("/") + AWQ_SUFFIX


def cli_equivalent(cfg: QuantizeConfig, env: LmdeployEnv, model_path: str, out: str) -> list[str]:
    """The plain ``lmdeploy lite auto_awq`` command with the same settings, for this lmdeploy version.

    Not what runs (it would fetch its calibration set from the Hub); printed for reference, and
    checked against lmdeploy 0.4.1's and 0.18's own parsers in the tests.
    """
    name = cfg.calib_dataset or ("ptb" if env.version_tuple < (0, 5) else "wikitext2")
    argv = [env.lmdeploy, "lite", "auto_awq", model_path, "--calib-dataset", name,
            "--calib-samples", str(cfg.calib_samples), "--calib-seqlen", str(cfg.calib_seqlen),
            "--w-bits", str(cfg.w_bits), "--w-group-size", str(cfg.w_group_size), "--work-dir", out]
    if env.version_tuple >= (0, 18):
        argv += ["--batch-size", str(cfg.batch_size), "--dtype", cfg.dtype]
    return argv


def wrapper_argv(cfg: QuantizeConfig, env: LmdeployEnv, home: str, model_path: str, out: str,
                 calib: str) -> list[str]:
    """``python awq_offline.py MODEL OUT --calib ... `` with the course parameters."""
    argv = [env.python, f"{home}/{STAGE_FILES_DIR[2:]}/{SCRIPT}", model_path, out, "--calib", calib,
            "--calib-samples", str(cfg.calib_samples), "--calib-seqlen", str(cfg.calib_seqlen),
            "--w-bits", str(cfg.w_bits), "--w-group-size", str(cfg.w_group_size),
            "--batch-size", str(cfg.batch_size), "--dtype", cfg.dtype, "--device", cfg.device]
    if cfg.force:
        argv.append("--force")
    return argv


def upload_calib_file(remote: Remote, path: Path) -> str:
    """Put a local calibration text on the host; returns ``file:<host path>``."""
    if not path.is_file():
        raise QuantizeError(f"calibration file {path} does not exist")
    data = path.read_bytes()
    if len(data) > MAX_CALIB_BYTES:
        raise QuantizeError(f"calibration file {path} is {len(data) >> 20} MiB; keep it under 64 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuantizeError(f"calibration file {path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise QuantizeError(f"calibration file {path} is empty")
    digest = hashlib.sha256(data).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", path.name)
    return "file:" + remote_files.put_text(remote, f"{CALIB_DIR}/{digest}-{safe}", text)


@dataclass
class Plan:
    spec: ServiceSpec
    model_path: str
    out: str
    env: LmdeployEnv
    equivalent: list[str]
    already: dict[str, Any] | None  # the marker of a finished output (nothing to do unless force)


def _read_marker(remote: Remote, out: str) -> dict[str, Any] | None:
    res = remote.run(f"cat {shlex.quote(out + '/' + AWQ_MARKER)} 2>/dev/null", timeout=30, check=False)
    if res.rc != 0 or not res.stdout.strip():
        return None
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        return None
    return data


def plan(remote: Remote, cfg: QuantizeConfig, console: Console | None = None) -> Plan:
    """Preflight (model, env, version rules, GPU memory, disk) and the service to run."""
    cfg.validate()
    host = read_host(remote)
    home = host.home
    model = check_model(remote, cfg.model, host)
    if model.quantization:
        raise QuantizeError(f"{model.path} is already quantized ({model.quantization.get('quant_method')})")
    env = probe_env(remote, host, cfg.env_bin_dir)
    cfg.check_version(env)
    out = output_path(model.path, cfg.out, host)
    if out.rstrip("/") == model.path.rstrip("/"):
        raise QuantizeError("the output directory must differ from the model directory")
    equivalent = cli_equivalent(cfg, env, model.path, out)
    already = None if cfg.force else _read_marker(remote, out)
    if already is None:
        if cfg.check_gpu:
            gpu.check_stage(remote, "quantize")
        gpu.check_disk(remote, "quantize", str(Path(out).parent))
    remote_files.put_package_file(remote, "llama3_ops.stages.lm_files", SCRIPT, f"{STAGE_FILES_DIR}/{SCRIPT}")
    if cfg.calib_file is not None:
        calib = upload_calib_file(remote, cfg.calib_file)
    elif cfg.calib_dataset:
        calib = f"lmdeploy:{cfg.calib_dataset}"
    else:
        calib = "pydoc"
    bin_dir = env.bin_dir
    spec_env = {"PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONUNBUFFERED": "1", **cfg.env}
    if not calib.startswith("lmdeploy:"):
        spec_env.setdefault("HF_DATASETS_OFFLINE", "1")
        spec_env.setdefault("HF_HUB_OFFLINE", "1")
    spec = ServiceSpec(name=SERVICE, argv=tuple(wrapper_argv(cfg, env, home, model.path, out, calib)), env=spec_env,
                       cwd="~")
    if console is not None:
        console.print(f"[bold]quantize[/] on {remote.label}: lmdeploy {env.version}, {model.path} -> {out}")
        console.print(f"calibration: {calib} ({cfg.calib_samples} x {cfg.calib_seqlen} tokens), "
                      f"w{cfg.w_bits} group {cfg.w_group_size}", markup=False, highlight=False)
        console.print("same as: " + " ".join(shlex.quote(a) for a in equivalent) + "  (with offline calibration)",
                      markup=False, highlight=False, style="dim")
    return Plan(spec, model.path, out, env, equivalent, already)


@dataclass
class LogState:
    phase: str = "starting"
    linears: int = 0
    packed: int = 0
    tokens: int = 0
    error: str = ""
    done: bool = False

    def feed(self, lines: list[str]) -> None:
        """Re-read the whole log tail (idempotent: counts are recomputed)."""
        self.packed = 0
        for line in lines:
            m = PROGRESS_RE.match(line)
            if m:
                try:
                    ev = json.loads(m.group(1))
                except ValueError:
                    continue
                self.phase = str(ev.get("phase", self.phase))
                if ev.get("linears"):
                    self.linears = int(ev["linears"])
                    self.packed = 0
                if ev.get("tokens"):
                    self.tokens = int(ev["tokens"])
                if self.phase == "error":
                    self.error = str(ev.get("message", ""))
                if self.phase == "done":
                    self.done = True
            elif PACKED_RE.search(line):
                self.packed += 1


DESCRIPTIONS = {
    "starting": "starting",
    "load": "loading the model (fp16, on CPU)",
    "calibration-data": "calibrating: running the samples through each layer",
    "smooth": "smoothing the activation outliers into the weights",
    "quantize": "packing the weights to 4 bits",
    "save": "saving",
    "done": "done",
    "error": "failed",
}


@dataclass
class QuantizeResult:
    out: str
    info: dict[str, Any]
    started_now: bool
    seconds: float


def follow(remote: Remote, out: str, console: Console, timeout: float, interval: float = 2.0) -> dict[str, Any]:
    """Show progress from the service log until it ends; the marker JSON, or :class:`QuantizeError`."""
    state = LogState()
    deadline = time.monotonic() + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("starting", total=None)
        while True:
            st = services.status(remote, SERVICE, log_lines=2000)
            state.feed(st.log_tail)
            desc = DESCRIPTIONS.get(state.phase, state.phase)
            if state.phase == "calibration-data" and state.tokens:
                desc += f" ({state.tokens} tokens of text)"
            total = state.linears if state.phase == "quantize" and state.linears else None
            progress.update(task, description=desc, total=total, completed=state.packed if total else 0)
            if not st.running:
                # look twice: services' process-group probe can miss a live group when another process
                # exits during its /proc scan (mawk stops at a vanished /proc/PID/stat)
                time.sleep(0.5)
                st = services.status(remote, SERVICE, log_lines=2000)
                state.feed(st.log_tail)
                if not st.running:
                    break
            if time.monotonic() > deadline:
                raise QuantizeError(f"quantization still running after {timeout:.0f}s; it goes on: "
                                    f"fab quantize again re-attaches, fab logs --service {SERVICE} shows it")
            time.sleep(interval)
    tail = [ln for ln in st.log_tail if ln.strip()][-25:]
    info = _read_marker(remote, out)
    if st.exit_status == "0" and info is not None and state.done:
        return info
    why = state.error or f"exit status {st.exit_status}"
    raise QuantizeError(f"quantization failed on {remote.label} ({why}); {out} was not written.\n  last log lines:\n"
                        + "\n".join(f"    {ln}" for ln in tail))


def quantize(remote: Remote, cfg: QuantizeConfig, *, console: Console | None = None,
             timeout: float = 4 * 3600.0, restart: bool = False) -> QuantizeResult:
    console = console or Console(stderr=True)
    t0 = time.monotonic()
    p = plan(remote, cfg, console)
    if p.already is not None:
        console.print(f"[green]already quantized[/]: {p.out} (finished {p.already.get('finished', '?')}, "
                      f"lmdeploy {p.already.get('lmdeploy', '?')}); --force makes it again")
        return QuantizeResult(p.out, p.already, False, 0.0)
    try:
        st, started_now = services.start(remote, p.spec, restart=restart)
    except services.FingerprintMismatchError as exc:
        raise QuantizeError(f"a quantization with other settings is running on {remote.label}: wait for it "
                            f"(fab logs --service {SERVICE}) or stop it (fab stop --service {SERVICE}).\n{exc}"
                            ) from exc
    console.print(f"{'started' if started_now else 're-attached to the running quantization'}: pid {st.pid} "
                  f"({st.mode}), log {st.log_path}")
    try:
        info = follow(remote, p.out, console, timeout)
    except KeyboardInterrupt:
        console.print(f"detached: the quantization goes on on {remote.label}; fab quantize re-attaches, "
                      f"fab stop --service {SERVICE} stops it")
        raise
    console.print(f"[green]done[/]: {p.out} ({info.get('seconds', '?')} s on the host); "
                  "use it with fab chat --model 4bit or fab serve --model 4bit (--model-format awq)")
    return QuantizeResult(p.out, info, started_now, time.monotonic() - t0)


def build_parser() -> argparse.ArgumentParser:
    """``python -m llama3_ops.stages.quantize --local [options]`` (the device run)."""
    ap = argparse.ArgumentParser(prog="python -m llama3_ops.stages.quantize")
    ap.add_argument("--local", action="store_true", required=True)
    add_to(ap, OPTIONS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--setenv", action="append", default=[], metavar="KEY=VALUE", help="the run's environment")
    ap.add_argument("--no-gpu-check", action="store_true")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0)
    ap.add_argument("--json")
    return ap


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    con = Console(stderr=True)
    cfg = config_from(a, device=a.device, check_gpu=not a.no_gpu_check, env=dict(e.split("=", 1) for e in a.setenv))
    from llama3_ops.stages.lm_models import ModelError

    try:
        res = quantize(transport.LocalRemote(), cfg, console=con, timeout=a.timeout)
    except (QuantizeError, ModelError, gpu.GPUCheckError, services.ServiceError) as exc:
        con.print(f"error: {exc}", style="red", markup=False, highlight=False)
        return 1
    if a.json:
        Path(a.json).write_text(json.dumps({"out": res.out, "info": res.info, "seconds": round(res.seconds, 1)},
                                           indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
