"""``fab finetune``: the course's self-cognition fine-tune, end to end, resumable, from the laptop.

Replaces the course's ``python tools/gdata.py``, a hand-edited XTuner config with ``/root`` paths,
``xtuner train``, ``xtuner convert pth_to_hf .../iter_500.pth`` and ``xtuner convert merge`` typed
in a foreground terminal. Steps, each skipped when a marker says it is done for the same inputs:

1. **data**: the self-cognition dataset (:mod:`llama3_ops.stages.finetune_data`), written to
   ``~/llama3-course/data/personal_assistant.json``;
2. **config**: the XTuner config rendered for this host (:mod:`llama3_ops.stages.finetune_config`)
   into ``~/llama3-course/configs/``;
3. **train**: ``xtuner train`` as the supervised service ``finetune-train``
   (:mod:`llama3_ops.remote.services`); progress (iteration, loss, eta) is read from its log into a rich
   progress bar. Ctrl-C detaches: training goes on, and running the task again follows it. A run
   that stopped part-way is resumed from its newest checkpoint (``--resume``);
4. **convert**: ``xtuner convert pth_to_hf`` on the newest ``iter_<N>.pth`` of the work dir
   (found, not assumed) into ``<work dir>/hf_adapter``;
5. **merge**: ``xtuner convert merge`` into a temporary directory next to ``~/model/llama3_hf_merged``
   (what ``fab serve --model merged`` serves); the merged model is loaded and asked the evaluation
   question, and only then renamed into place with a ready marker (``.llama3-ops-ready.json``).
   A failure anywhere before leaves the previous merged model, if any, as it was.

The trainer is XTuner's own ``tools/train.py`` run as ``python -m xtuner.tools.train`` (what
``xtuner train`` runs in a child process, but with its exit status: the ``xtuner`` CLI exits 0 even
when training fails). The same holds for the two converters.

On a CPU host (the cpu profile) the stage uses :meth:`TrainParams.for_cpu`: plain LoRA instead of
QLoRA and a few iterations, and puts on the PYTHONPATH of the XTuner commands
``finetune_files/cpu_compat`` (a SupervisedFinetune that builds without CUDA) and, only when the
env's torchvision does not import, ``finetune_files/torchvision_standin`` (import-only names).

``--until train|convert`` stops after that step. Markers (work dir: ``.llama3-ops-run.json``,
``.llama3-ops-train-done.json``, ``.llama3-ops-convert-done.json``; merged model:
``.llama3-ops-ready.json``) record the run's fingerprint (rendered config + dataset digest): other
settings or data start a new run, and the previous work dir is moved to ``<work dir>.prev``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llama3_ops.errors import Llama3OpsError, returns_exit_code
from llama3_ops.remote import services, transport
from llama3_ops.remote.files import put_text
from llama3_ops.remote.services import ServiceSpec, ServiceStatus
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import finetune_log
from llama3_ops.stages.finetune_config import (
    AGENT_FLAN,
    COURSE,
    TEMPLATE,
    ConfigError,
    ConfigInputs,
    TrainParams,
    render,
)
from llama3_ops.stages.finetune_data import SelfCognition
from llama3_ops.stages.gpu import GPUCheckError, NoGPUError, check_disk, check_stage, query_gpus
from llama3_ops.stages.host import MERGED_NAME, Host
from llama3_ops.stages.host import read_host as read_contract
from llama3_ops.stages.options import Opt, add_to

PACKAGE = "llama3_ops.stages"
TRAIN_ENV = "llama3"  # host.json's env with XTuner
READY_MARKER = ".llama3-ops-ready.json"
RUN_MARKER = ".llama3-ops-run.json"
TRAIN_DONE = ".llama3-ops-train-done.json"
CONVERT_DONE = ".llama3-ops-convert-done.json"
# Host-side helpers, uploaded to <course dir>/scripts/finetune/.
HOST_FILES = (
    "cpu_compat/llama3_xtuner_cpu.py",
    "torchvision_standin/torchvision/__init__.py",
    "torchvision_standin/torchvision/transforms/__init__.py",
    "torchvision_standin/torchvision/transforms/functional.py",
    "cpu_compat/llama3_xtuner_llava_cpu.py",
    "check_merged.py",
    "convert_agentflan.py",
    "llava_images.py",
    "llava_answer.py",
)
Device = Literal["auto", "gpu", "cpu"]
Step = Literal["train", "convert", "merge", "answer"]
STEPS: tuple[Step, ...] = ("train", "convert", "merge")


class FinetuneError(Llama3OpsError):
    """A bad input or a failed step, as one clear message; nothing half-done is marked complete."""


class FinetuneDetached(Exception):
    """The user stopped following; the step's service keeps running on the host."""


@dataclass(frozen=True)
class HostInfo:
    """The host contract plus the env this fine-tune runs in (host.json's llama3 env, or ``--env-bin``)."""

    host: Host
    env_bin: str  # absolute bin dir

    @property
    def home(self) -> str:
        return self.host.home

    @property
    def course_dir(self) -> str:
        return self.host.course_dir

    @property
    def profile(self) -> str:
        return self.host.profile

    def expand(self, path: str) -> str:
        return self.host.expand(path)


@dataclass(frozen=True)
class Job:
    """One fine-tune stage: its data, config inputs and output paths (finetune, agent-finetune)."""

    name: str  # service and work dir prefix
    fab_task: str
    stage: str  # key in stage_requirements.yml
    course_config: str
    config_name: str  # file name under <course dir>/configs (GPU; CPU runs add _cpu)
    params: TrainParams
    merged_name: str  # the merged model's directory, beside the base model
    system: str
    evaluation_inputs: tuple[str, ...]
    dataset_format: Literal["json", "disk"]
    dataset_map_fn: str | None
    # Puts the dataset on the host; returns (absolute data path, digest of its content).
    prepare_data: Callable[[Remote, HostInfo, Console], tuple[str, str]]
    template: str = TEMPLATE  # the XTuner config template (finetune_files/)
    # More template values for this host and these parameters (the LLaVA stage's encoder and projector).
    config_extra: Callable[[HostInfo, TrainParams], dict[str, Any]] | None = None
    adapter_check: str = "adapter_config.json"  # what pth_to_hf must have written, under its output
    # The last step after convert: merge into a model (None), or another (the LLaVA stage's answer).
    final: Callable[[_Run, str, str], tuple[str, str | None]] | None = None
    final_step: Step = "merge"

    @property
    def steps(self) -> tuple[Step, ...]:
        return ("train", "convert", self.final_step)

    def work_dir(self, host: HostInfo) -> str:
        return f"{host.course_dir}/work_dirs/{self.name}"

    def service(self, step: str) -> str:
        return f"{self.name}-{step}"


@dataclass
class FinetuneResult:
    merged_path: str | None  # None: stopped before the merge (until=)
    checkpoint: str
    adapter: str | None  # None: stopped before the conversion
    params: TrainParams
    eval_answer: str | None  # XTuner's EvaluateChatHook, after training (from the log)
    merged_answer: str | None  # the merged model's answer to the same question
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- host facts


def read_host(remote: Remote, env_bin: str | None = None) -> HostInfo:
    """The host contract (:mod:`llama3_ops.stages.host`) and the env with XTuner."""
    host = read_contract(remote)
    return HostInfo(host, host.env_bin(TRAIN_ENV, env_bin))


def choose_device(remote: Remote, host: HostInfo, device: Device) -> Literal["gpu", "cpu"]:
    """``auto``: the GPU when ``nvidia-smi`` answers, else CPU (a cpu-profile host always gets CPU)."""
    if device != "auto":
        return device
    if host.profile == "cpu":
        return "cpu"
    try:
        query_gpus(remote)
    except NoGPUError:
        return "cpu"
    return "gpu"


def check_base_model(remote: Remote, host: HostInfo, model: str) -> str:
    path, _ = host.host.model(model)
    script = (
        f"m={shlex.quote(path)}\n"
        '[ -d "$m" ] || { echo "missing"; exit 0; }\n'
        '[ -f "$m/config.json" ] || { echo "noconfig"; exit 0; }\n'
        'ls "$m" | grep -Eq "\\.(safetensors|bin)$" || { echo "noweights"; exit 0; }\n'
        "echo ok\n"
    )
    state = remote.run(script, timeout=30).stdout.strip()
    why = {
        "missing": "does not exist",
        "noconfig": "has no config.json (not a Hugging Face model directory)",
        "noweights": "has no *.safetensors or *.bin weights (an interrupted download? git lfs pull)",
    }
    if state != "ok":
        raise FinetuneError(
            f"base model {path} on {remote.label} {why.get(state, state)}: the fine-tune needs it. "
            "Provision the host (fab provision downloads the model there) or pass --base-model PATH."
        )
    return path


def check_env(remote: Remote, host: HostInfo, standin_dir: str) -> bool:
    """The llama3 env can run XTuner; returns whether the env's own torchvision imports.

    When it does not (the cpu profile: PyPI has no CPU torchvision), XTuner is tried with the
    torchvision stand-in in ``standin_dir`` first on the path, as the fine-tune steps will run it.
    """
    py = f"{host.env_bin}/python"
    script = (
        f"py={shlex.quote(py)}\n"
        '[ -x "$py" ] || { echo "nopython"; exit 0; }\n'
        'if "$py" -c "import torchvision" >/dev/null 2>&1; then echo tv=1; pp=; else echo tv=0; '
        f"pp={shlex.quote(standin_dir)}; fi\n"
        'PYTHONPATH="$pp" "$py" -c "import xtuner, xtuner.dataset, mmengine.runner, peft, datasets; '
        "print('xtuner=' + xtuner.__version__)\" 2>&1 | tail -n 3\n"
    )
    out = remote.run(script, timeout=300).stdout
    if "nopython" in out:
        raise FinetuneError(
            f"{py} does not exist on {remote.label}: the llama3 env is missing (fab provision creates it)"
        )
    if "xtuner=" not in out:
        last = out.strip().splitlines()[-1] if out.strip() else "no output"
        raise FinetuneError(
            f"XTuner does not import in {host.env_bin} on {remote.label}: {last}. "
            "Provision again (the profile's llama3 env installs xtuner)."
        )
    return "tv=1" in out


# --------------------------------------------------------------------------- following a service


def _exit_ok(st: ServiceStatus) -> bool:
    return (st.exit_status or "").strip() == "0"


def _confirm_ended(remote: Remote, name: str, st: ServiceStatus, tries: int = 3) -> bool:
    """A service seen ended with no exit status is looked at again before it counts as ended.

    The status check walks /proc with awk; a process that exits during the walk can make one check
    miss the live group (mawk stops at an unreadable file), so a lone "dead" is not trusted.
    """
    if st.exit_status:
        return True
    for _ in range(tries):
        time.sleep(1.0)
        again = services.status(remote, name, log_lines=0)
        if again.running:
            return False
        if again.exit_status:
            return True
    return True


def wait_service(
    remote: Remote,
    name: str,
    console: Console,
    *,
    what: str,
    on_progress: Callable[[finetune_log.IterProgress], None] | None = None,
    poll: float = 2.0,
    timeout: float | None = None,
) -> ServiceStatus:
    """Follow a one-shot service until it ends; a rich bar from ``Iter(train)`` lines, else a spinner.

    Raises :class:`FinetuneError` (with the last log lines) when it ends with a non-zero status, and
    :class:`FinetuneDetached` on Ctrl-C (the service keeps running).
    """
    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    last: finetune_log.IterProgress | None = None
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(what, total=None, detail="starting", count="")
            while True:
                st = services.status(remote, name, log_lines=60)
                p = finetune_log.last_progress(st.log_tail)
                if p is not None and p != last:
                    last = p
                    detail = " ".join(x for x in (
                        f"loss {p.loss:.4f}" if p.loss is not None else "",
                        f"eta {p.eta}" if p.eta else "",
                    ) if x)
                    progress.update(task, total=p.total, completed=p.iteration, detail=detail,
                                    count=f"iter {p.iteration}/{p.total}")
                    if on_progress is not None:
                        on_progress(p)
                elif last is None and st.log_tail:
                    progress.update(task, detail=st.log_tail[-1].strip()[-60:])
                if not st.running and _confirm_ended(remote, name, st):
                    break
                if timeout is not None and time.monotonic() - start > timeout:
                    services.stop(remote, name)
                    raise FinetuneError(f"{what} did not finish within {timeout:.0f}s; stopped it", )
                time.sleep(poll)
    except KeyboardInterrupt:
        raise FinetuneDetached(
            f"stopped following {what}: it goes on on {remote.label} as service {name} "
            f"(log: fab logs --service {name}); run the task again to follow it"
        ) from None
    st = services.status(remote, name, log_lines=40)
    if not _exit_ok(st):
        tail = "\n".join(f"    {line}" for line in st.log_tail[-25:])
        code = st.exit_status or "none recorded (killed?)"
        raise FinetuneError(f"{what} failed on {remote.label} (exit status {code}); last log lines:\n{tail}")
    return st


def run_step(
    remote: Remote,
    spec: ServiceSpec,
    console: Console,
    *,
    what: str,
    on_progress: Callable[[finetune_log.IterProgress], None] | None = None,
    timeout: float | None = None,
) -> ServiceStatus:
    """Start ``spec`` (or attach when it already runs with the same settings) and wait for it."""
    cur = services.status(remote, spec.name, log_lines=0)
    if cur.running and cur.fingerprint != spec.fingerprint():
        raise FinetuneError(
            f"service {spec.name} on {remote.label} is running with other settings ({cur.command}); "
            f"stop it first (fab down {spec.name}) or wait for it"
        )
    st, started = services.start(remote, spec)
    console.print(f"{'started' if started else 'following the running'} {what}: {spec.display()}")
    console.print(f"  log on the host: {st.log_path}")
    return wait_service(remote, spec.name, console, what=what, on_progress=on_progress, timeout=timeout)


# --------------------------------------------------------------------------- steps


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_json(remote: Remote, path: str) -> dict[str, Any] | None:
    res = remote.run(f"cat {shlex.quote(path)} 2>/dev/null", timeout=30, check=False)
    if res.rc != 0 or not res.stdout.strip():
        return None
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def list_checkpoints(remote: Remote, work_dir: str) -> list[str]:
    res = remote.run(f"ls -1 {shlex.quote(work_dir)} 2>/dev/null", timeout=30, check=False)
    return [n for n in res.stdout.split() if finetune_log.checkpoint_iteration(n) is not None]


def upload_host_files(remote: Remote, host: HostInfo) -> str:
    """Put the host-side helpers in ``<course dir>/scripts/finetune``; returns that directory."""
    base = f"{host.course_dir}/scripts/finetune"
    for name in HOST_FILES:
        text = resources.files(PACKAGE).joinpath(f"finetune_files/{name}").read_text(encoding="utf-8")
        put_text(remote, f"{base}/{name}", text)
    return base


def step_env(host: HostInfo, compat_dir: str | None) -> dict[str, str]:
    env = {
        "PATH": f"{host.env_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        # Every path in the config is local: never reach for the Hub.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MKL_SERVICE_FORCE_INTEL": "1",  # as the course sets it before merging
        "PYTHONUNBUFFERED": "1",
    }
    if compat_dir:
        env["PYTHONPATH"] = compat_dir
    return env


def _detail_params(params: TrainParams) -> str:
    quant = "QLoRA NF4" if params.quantization == "nf4" else "LoRA (no quantization)"
    length = f"{params.max_iters} iterations" if params.max_iters else f"{params.max_epochs} epochs"
    return (f"{quant} r={params.lora_r} alpha={params.lora_alpha}, max_length {params.max_length}"
            f"{' packed' if params.pack_to_max_length else ''}, batch {params.batch_size} x "
            f"{params.accumulative_counts}, {length}, lr {params.lr:g}, save every {params.save_steps}, "
            f"{params.torch_dtype}")


@dataclass
class _Run:
    """One fine-tune run's context, shared by its steps."""

    remote: Remote
    job: Job
    host: HostInfo
    params: TrainParams
    where: Literal["gpu", "cpu"]
    model_path: str
    scripts: str
    pythonpath: list[str]
    console: Console
    on_progress: Callable[[finetune_log.IterProgress], None] | None
    train_timeout: float | None
    t0: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    config_path: str = ""
    data_path: str = ""
    run_fp: str = ""

    @property
    def work_dir(self) -> str:
        return self.job.work_dir(self.host)

    @property
    def py(self) -> str:
        return f"{self.host.env_bin}/python"

    @property
    def env(self) -> dict[str, str]:
        return step_env(self.host, ":".join(self.pythonpath) or None)

    def service(self, argv: Sequence[str], step: str, env: dict[str, str] | None = None) -> ServiceSpec:
        return ServiceSpec(name=self.job.service(step), argv=tuple(argv), env=env or self.env,
                           cwd=self.host.course_dir)

    def result(self, checkpoint: str, eval_answer: str | None, adapter: str | None = None,
               merged: str | None = None, merged_answer: str | None = None) -> FinetuneResult:
        timings = {**self.timings, "total": time.monotonic() - self.t0}
        return _finish(self.console, self.job, FinetuneResult(
            merged_path=merged, checkpoint=checkpoint, adapter=adapter, params=self.params, eval_answer=eval_answer,
            merged_answer=merged_answer, skipped=self.skipped, timings=timings))


def _prepare(remote: Remote, job: Job, *, base_model: str, device: Device, params: TrainParams | None,
             cpu_iters: int, env_bin: str | None, console: Console) -> _Run:
    """Preflight: the host, where to train, the parameters, GPU and disk, the base model and the env."""
    if device not in ("auto", "gpu", "cpu"):
        raise FinetuneError(f"device must be auto, gpu or cpu, got {device!r}")
    host = read_host(remote, env_bin)
    where = choose_device(remote, host, device)
    p = params or job.params
    if where == "cpu" and not p.on_cpu:
        p = p.for_cpu(max_iters=cpu_iters)
        console.print(
            "[yellow]CPU host:[/] plain LoRA on fp32 weights instead of QLoRA (bitsandbytes' NF4 needs CUDA), "
            f"{p.max_iters} iterations instead of {job.params.max_epochs} epochs, no fp16 AMP"
        )
    try:
        p.validate()
        if where == "gpu":
            gpu = check_stage(remote, job.stage)
            check_disk(remote, job.stage, "~/model")
            if gpu is not None:
                console.print(f"GPU {gpu.index} ({gpu.name}): {gpu.free_gib:.1f} GiB free")
    except (ConfigError, GPUCheckError) as exc:
        raise FinetuneError(str(exc)) from exc
    model_path = check_base_model(remote, host, base_model)
    scripts = upload_host_files(remote, host)
    standin = f"{scripts}/torchvision_standin"
    torchvision_ok = check_env(remote, host, standin)
    if not torchvision_ok and not p.on_cpu:
        raise FinetuneError(
            f"torchvision does not import in {host.env_bin} on {remote.label}, and a GPU run needs the real one "
            "(install the torchvision build that matches the env's torch)"
        )
    # CPU runs: CPUSupervisedFinetune (cpu_compat), and the torchvision stand-in only when the real
    # torchvision does not import.
    pythonpath = [f"{scripts}/cpu_compat"] if p.on_cpu else []
    if not torchvision_ok:
        pythonpath.append(standin)
    return _Run(remote, job, host, p, where, model_path, scripts, pythonpath, console, None, None)


def _configure(r: _Run) -> None:
    """1-2. The data and the XTuner config on the host; the run's fingerprint covers both."""
    t = time.monotonic()
    r.data_path, data_digest = r.job.prepare_data(r.remote, r.host, r.console)
    r.timings["data"] = time.monotonic() - t
    r.config_path = f"{r.host.course_dir}/configs/{r.job.config_name}{'_cpu' if r.params.on_cpu else ''}.py"
    inputs = ConfigInputs(
        name=r.job.name, fab_task=r.job.fab_task, course_config=r.job.course_config, model_path=r.model_path,
        data_path=r.data_path, dataset_format=r.job.dataset_format, dataset_map_fn=r.job.dataset_map_fn,
        system=r.job.system, evaluation_inputs=r.job.evaluation_inputs,
        extra=r.job.config_extra(r.host, r.params) if r.job.config_extra else {},
    )
    try:
        config_text = render(inputs, r.params, r.job.template)
    except ConfigError as exc:
        raise FinetuneError(str(exc)) from exc
    put_text(r.remote, r.config_path, config_text)
    r.run_fp = _sha(config_text + "\0" + data_digest)[:16]


def _claim_work_dir(r: _Run, running: ServiceStatus) -> None:
    """The work dir belongs to this run: another run's is moved aside (never while it trains)."""
    remote, work_dir = r.remote, r.work_dir
    marker = read_json(remote, f"{work_dir}/{RUN_MARKER}")
    if marker is not None and marker.get("run") != r.run_fp:
        if running.running:
            raise FinetuneError(
                f"a training with other settings or data is running on {remote.label} ({running.command}); wait "
                f"for it (run the task with its settings to follow it) or stop it: fab stop --service "
                f"{r.job.service('train')}"
            )
        aside = f"{work_dir}.prev"
        remote.run(f"rm -rf {shlex.quote(aside)}; mv {shlex.quote(work_dir)} {shlex.quote(aside)}", timeout=120)
        r.console.print(f"new settings or data: the previous work dir was moved to {aside}")
        marker = None
    remote.run(f"mkdir -p {shlex.quote(work_dir)}", timeout=30)
    if marker is None:
        put_text(remote, f"{work_dir}/{RUN_MARKER}", json.dumps(
            {"run": r.run_fp, "config": r.config_path, "data": r.data_path, "params": _detail_params(r.params)}) + "\n")


def _train(r: _Run) -> tuple[str, str, str | None]:
    """3. Train (resuming from the newest checkpoint, or following a running training); the checkpoint
    ``(name, path)`` and XTuner's evaluation answer."""
    remote, work_dir, train_name = r.remote, r.work_dir, r.job.service("train")
    t = time.monotonic()
    running = services.status(remote, train_name, log_lines=0)
    _claim_work_dir(r, running)
    done = read_json(remote, f"{work_dir}/{TRAIN_DONE}")
    if done is not None and done.get("run") == r.run_fp:
        r.skipped.append("train")
        r.console.print(f"training already finished ({done.get('checkpoint')}): skipped")
    else:
        if running.running:
            r.console.print(f"training is running on {remote.label}: following it")
            wait_service(remote, train_name, r.console, what="training", on_progress=r.on_progress,
                         timeout=r.train_timeout)
        else:
            _start_training(r)
        _check_training_complete(r, train_name)
    r.timings["train"] = time.monotonic() - t
    sample = finetune_log.final_answer(services.logs(remote, train_name, lines=2000).splitlines())
    latest = finetune_log.latest_checkpoint(list_checkpoints(remote, work_dir))
    if latest is None:
        raise FinetuneError(f"{work_dir} holds no iter_<N>.pth checkpoint to convert")
    return latest, f"{work_dir}/{latest}", sample.answer if sample else None


def _start_training(r: _Run) -> None:
    latest = finetune_log.latest_checkpoint(list_checkpoints(r.remote, r.work_dir))
    argv = [r.py, "-m", "xtuner.tools.train", r.config_path, "--work-dir", r.work_dir]
    train_env = r.env
    if latest:
        argv += ["--resume", f"{r.work_dir}/{latest}"]
        # XTuner 0.2.0 and mmengine read the checkpoint (optimizer state, message hub) with
        # torch.load's default, which is weights_only=True from torch 2.6 on and refuses
        # mmengine's objects. The file is this work dir's own, written by this trainer.
        train_env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        r.console.print(f"resuming from {latest} (the newest checkpoint in {r.work_dir})")
    run_step(r.remote, r.service(argv, "train", train_env), r.console, what="training", on_progress=r.on_progress,
             timeout=r.train_timeout)


def _check_training_complete(r: _Run, train_name: str) -> None:
    latest = finetune_log.latest_checkpoint(list_checkpoints(r.remote, r.work_dir))
    if latest is None:
        raise FinetuneError(f"training ended but {r.work_dir} holds no iter_<N>.pth checkpoint")
    final = finetune_log.last_progress(services.logs(r.remote, train_name, lines=400).splitlines())
    if final is not None and finetune_log.checkpoint_iteration(latest) != final.total:
        raise FinetuneError(
            f"training ended at {latest}, but the run has {final.total} iterations: not complete "
            "(run the task again to resume)"
        )
    put_text(r.remote, f"{r.work_dir}/{TRAIN_DONE}", json.dumps(
        {"run": r.run_fp, "checkpoint": latest, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def _convert(r: _Run, latest: str, ckpt: str) -> str:
    """4. ``pth_to_hf`` of the newest checkpoint into ``<work dir>/hf_adapter`` (renamed into place)."""
    t = time.monotonic()
    remote, work_dir = r.remote, r.work_dir
    adapter = f"{work_dir}/hf_adapter"
    conv = read_json(remote, f"{work_dir}/{CONVERT_DONE}")
    if conv is not None and conv.get("run") == r.run_fp and conv.get("checkpoint") == latest:
        r.skipped.append("convert")
        r.console.print(f"adapter already converted from {latest}: skipped")
    else:
        tmp = f"{adapter}.tmp"
        remote.run(f"rm -rf {shlex.quote(tmp)} {shlex.quote(work_dir)}/{CONVERT_DONE}", timeout=60)
        argv = [r.py, "-m", "xtuner.tools.model_converters.pth_to_hf", r.config_path, ckpt, tmp]
        run_step(remote, r.service(argv, "convert"), r.console, what=f"pth_to_hf {latest}")
        remote.run(
            f"set -e; test -f {shlex.quote(tmp)}/{r.job.adapter_check}; rm -rf {shlex.quote(adapter)}; "
            f"mv {shlex.quote(tmp)} {shlex.quote(adapter)}",
            timeout=120,
        )
        put_text(remote, f"{work_dir}/{CONVERT_DONE}", json.dumps({"run": r.run_fp, "checkpoint": latest}) + "\n")
    r.timings["convert"] = time.monotonic() - t
    return adapter


def _merge(r: _Run, latest: str, adapter: str) -> tuple[str, str | None]:
    """5. Merge, load-check, then rename into place with the ready marker; ``(merged dir, its answer)``."""
    t = time.monotonic()
    remote, job = r.remote, r.job
    merged = r.host.host.sibling(job.merged_name)
    ready = read_json(remote, f"{merged}/{READY_MARKER}")
    if ready is not None and ready.get("run") == r.run_fp and ready.get("checkpoint") == latest:
        r.skipped.append("merge")
        r.console.print(f"{merged} is already merged from {latest}: skipped")
        r.timings["merge"] = time.monotonic() - t
        return merged, ready.get("answer")
    tmp = f"{merged}.tmp-llama3-ops"
    remote.run(f"rm -rf {shlex.quote(tmp)}; mkdir -p {shlex.quote(merged.rsplit('/', 1)[0])}", timeout=120)
    argv = [r.py, "-m", "xtuner.tools.model_converters.merge", r.model_path, adapter, tmp,
            "--max-shard-size", "2GB", "--safe-serialization", "--device", "cuda" if r.where == "gpu" else "cpu"]
    run_step(remote, r.service(argv, "merge"), r.console, what="merge")
    question = job.evaluation_inputs[0]
    check_argv = [r.py, f"{r.scripts}/check_merged.py", tmp, "--question", question, "--system", job.system,
                  "--max-new-tokens", "32" if r.where == "cpu" else "64"]
    run_step(remote, r.service(check_argv, "check"), r.console, what="load check of the merged model")
    out = services.logs(remote, job.service("check"), lines=50).splitlines()
    result = next((json.loads(line) for line in reversed(out) if line.startswith("{\"answer\"")), None)
    if result is None:
        raise FinetuneError(f"the load check of {tmp} printed no answer:\n" + "\n".join(out[-15:]))
    merged_answer = str(result["answer"])
    marker_text = json.dumps({
        "run": r.run_fp, "checkpoint": latest, "adapter": adapter, "base": r.model_path, "answer": merged_answer,
        "question": question, "parameters": result.get("parameters"), "dtype": result.get("dtype"),
        "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, ensure_ascii=False) + "\n"
    put_text(remote, f"{tmp}/{READY_MARKER}", marker_text)
    q_m, q_t = shlex.quote(merged), shlex.quote(tmp)
    remote.run(f"set -e; old={q_m}.old-$$; if [ -e {q_m} ]; then mv {q_m} \"$old\"; fi; mv {q_t} {q_m}; "
               'rm -rf "$old"', timeout=600)  # fmt: skip
    r.timings["merge"] = time.monotonic() - t
    return merged, merged_answer


def run(
    remote: Remote,
    job: Job,
    *,
    base_model: str = "base",
    device: Device = "auto",
    params: TrainParams | None = None,
    cpu_iters: int = 4,
    env_bin: str | None = None,
    console: Console | None = None,
    on_progress: Callable[[finetune_log.IterProgress], None] | None = None,
    train_timeout: float | None = None,
    until: Step | None = None,
) -> FinetuneResult:
    """Run ``job`` on the host through train -> convert -> its final step (merge, or the LLaVA stage's
    answer), or ``until`` an earlier step, skipping what is already done."""
    until = until or job.final_step  # None: every step
    if until not in job.steps:
        raise FinetuneError(f"until must be one of {', '.join(job.steps)}, got {until!r}")
    console = console or Console(stderr=True)
    t0 = time.monotonic()
    r = _prepare(remote, job, base_model=base_model, device=device, params=params, cpu_iters=cpu_iters,
                 env_bin=env_bin, console=console)
    r.on_progress, r.train_timeout, r.t0 = on_progress, train_timeout, t0
    console.print(f"[bold]{job.fab_task}[/] on {remote.label}: {_detail_params(r.params)}")
    _configure(r)
    latest, ckpt, eval_answer = _train(r)
    if until == "train":
        return r.result(ckpt, eval_answer)
    adapter = _convert(r, latest, ckpt)
    if until == "convert":
        return r.result(ckpt, eval_answer, adapter)
    merged, merged_answer = (job.final or _merge)(r, latest, adapter)
    return r.result(ckpt, eval_answer, adapter, merged, merged_answer)


def _finish(console: Console, job: Job, result: FinetuneResult) -> FinetuneResult:
    """Say what was made and what to do with it."""
    name = PurePosixPath(result.checkpoint).name
    if result.merged_path is not None and job.final is not None:
        console.print(f"[green]done[/]: {result.merged_path} (from {name}) answered about the image: "
                      f"{result.merged_answer!r}", highlight=False)
    elif result.merged_path is not None:
        model_arg = "merged" if job.merged_name == MERGED_NAME else result.merged_path
        console.print(f"[green]done[/]: {result.merged_path} (from {name}); serve it with "
                      f"`fab serve --model {model_arg}`")
    elif result.adapter is not None:
        console.print(f"[green]done[/]: adapter {result.adapter} (from {name}); merge it with `fab {job.fab_task}`")
    else:
        console.print(f"[green]done[/]: trained to {result.checkpoint}; convert and merge with `fab {job.fab_task}`")
    if result.eval_answer is not None:
        console.print(f"XTuner's evaluation after training ({job.evaluation_inputs[0]!r}): {result.eval_answer!r}")
    if result.merged_answer is not None and job.final is None:
        console.print(f"the merged model answers: {result.merged_answer!r}")
    return result


def merged_ready(remote: Remote, path: str = "merged") -> dict[str, Any] | None:
    """The ready marker of a merged model (``None``: absent, or not marked ready)."""
    full, _ = read_contract(remote).model(path)
    return read_json(remote, f"{full}/{READY_MARKER}")


# --------------------------------------------------------------------------- the self-cognition job


def self_cognition_job(data: SelfCognition | None = None, params: TrainParams = COURSE) -> Job:
    d = data or SelfCognition()

    def prepare(remote: Remote, host: HostInfo, console: Console) -> tuple[str, str]:
        text = d.json_text()
        path = f"{host.course_dir}/data/personal_assistant.json"
        digest = _sha(text)
        cur = remote.run(f"sha256sum {shlex.quote(path)} 2>/dev/null", timeout=60, check=False).stdout.split()
        if cur and cur[0] == digest:
            console.print(f"dataset {path}: {d.count} records, unchanged")
        else:
            put_text(remote, path, text)
            console.print(f"dataset {path}: {d.count} records of {d.name!r}")
        return path, digest

    return Job(
        name="finetune", fab_task="finetune", stage="finetune",
        course_config="configs/assistant/llama3_8b_instruct_qlora_assistant.py",
        config_name="llama3_8b_instruct_qlora_assistant", params=params, merged_name=MERGED_NAME,
        system=d.system, evaluation_inputs=(d.question,), dataset_format="json", dataset_map_fn=None,
        prepare_data=prepare,
    )


def run_finetune(
    remote: Remote,
    *,
    name: str = "SmartFlowAI",
    count: int = 2000,
    system: str | None = None,
    maker: str | None = None,
    base_model: str = "base",
    device: Device = "auto",
    cpu_iters: int = 4,
    max_iters: int = 0,
    until: Step = "merge",
    env_bin: str | None = None,
    console: Console | None = None,
    on_progress: Callable[[finetune_log.IterProgress], None] | None = None,
) -> FinetuneResult:
    """``fab finetune``: self-cognition data for ``name`` -> train -> convert -> merge.

    ``max_iters`` > 0 makes a GPU run short (:meth:`TrainParams.short`); CPU runs use ``cpu_iters``.
    """
    data = SelfCognition(name=name, count=count, **({"system": system} if system is not None else {}),
                         **({"maker": maker} if maker is not None else {}))
    try:
        data.validate()
        params = COURSE.short(max_iters) if max_iters else COURSE
    except (ValueError, ConfigError) as exc:
        raise FinetuneError(str(exc)) from exc
    return run(remote, self_cognition_job(data, params), base_model=base_model, device=device, cpu_iters=cpu_iters,
               env_bin=env_bin, console=console, on_progress=on_progress, until=until)


def tiny_cpu_finetune(remote: Remote, console: Console | None = None) -> FinetuneResult:
    """The demo's fine-tune: 50 records, 4 LoRA iterations on CPU, merged into ~/model/llama3_hf_merged."""
    return run_finetune(remote, count=50, device="cpu", cpu_iters=4, console=console)


def job_options(cpu_iters: int) -> tuple[Opt, ...]:
    """What every fine-tune job's fab task and ``--local`` entry point take (llama3_ops.stages.options)."""
    return (
        Opt("base_model", "base", "base | a model path on the host"),
        Opt("device", "auto", "where to train (cpu: LoRA instead of QLoRA, --cpu-iters iterations)",
            choices=("auto", "gpu", "cpu")),
        Opt("max_iters", 0, "a short GPU run of N iterations (0: the course's 3 epochs)"),
        Opt("cpu_iters", cpu_iters, "iterations of a CPU run"),
        Opt("until", "merge", "the last step to run", choices=STEPS),
        Opt("env", None, "bin directory of the env with XTuner (default: host.json's llama3 env)"),
    )


# fab finetune and `python -m llama3_ops.stages.finetune --local` take these.
OPTIONS: tuple[Opt, ...] = (
    Opt("name", "SmartFlowAI", "the assistant's name the dataset teaches"),
    Opt("count", 2000, "identical records in the dataset"),
    Opt("system", None, "system prompt of the records (default: the course's)"),
    *job_options(cpu_iters=4),
)


def local_parser(prog: str, task: str, options: tuple[Opt, ...]) -> argparse.ArgumentParser:
    """A fine-tune job's ``--local`` entry point (the device runs): its options, ``--local`` and ``--json``."""
    ap = argparse.ArgumentParser(prog=prog, description=f"fab {task} on this machine (needs ~/llama3-course/host.json)")
    ap.add_argument("--local", action="store_true", required=True, help="run on this machine (LocalRemote)")
    add_to(ap, options)
    ap.add_argument("--json", help="write the result here")
    return ap


def finetune_from(remote: Remote, v: Any, console: Console | None = None) -> FinetuneResult:
    """``fab finetune`` with :data:`OPTIONS`' values."""
    return run_finetune(remote, name=v.name, count=v.count, system=v.system, base_model=v.base_model,
                        device=v.device, cpu_iters=v.cpu_iters, max_iters=v.max_iters, until=v.until,
                        env_bin=v.env, console=console)


def local_main(json_path: str | None, call: Callable[[Remote, Console], FinetuneResult]) -> int:
    """Run ``call`` on this machine: one message and exit 1 on a :class:`FinetuneError`; the result
    (or the error) as JSON in ``json_path``."""
    con = Console(stderr=True)
    try:
        res = call(transport.LocalRemote(), con)
        out: dict[str, Any] = {**asdict(res), "params": asdict(res.params), "params_text": _detail_params(res.params)}
        rc = 0
    except FinetuneError as exc:
        con.print(f"error: {exc}", style="red", markup=False, highlight=False)
        out, rc = {"error": str(exc)}, 1
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return rc


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """``python -m llama3_ops.stages.finetune --local [options]`` (the device run)."""
    a = local_parser("python -m llama3_ops.stages.finetune", "finetune", OPTIONS).parse_args(argv)
    return local_main(a.json, lambda remote, con: finetune_from(remote, a, con))


__all__: Sequence[str] = (
    "AGENT_FLAN",
    "COURSE",
    "OPTIONS",
    "FinetuneDetached",
    "FinetuneError",
    "FinetuneResult",
    "HostInfo",
    "Job",
    "finetune_from",
    "job_options",
    "local_main",
    "local_parser",
    "main",
    "merged_ready",
    "read_host",
    "run",
    "run_finetune",
    "self_cognition_job",
    "tiny_cpu_finetune",
)


if __name__ == "__main__":
    sys.exit(main())
