"""XTuner configs for the fine-tune stages, rendered from ``finetune_files/xtuner_sft.py.j2``.

The course ships hand-edited copies of XTuner's example configs with ``/root/...`` paths, CRLF line
ends in places, and one hard-coded checkpoint name in the commands that follow. Here the config is
rendered for each host from one template and a :class:`TrainParams`:

* :data:`COURSE` is the self-cognition stage as the course runs it (``configs/assistant/
  llama3_8b_instruct_qlora_assistant.py``): QLoRA with the base weights in 4-bit NF4, LoRA r=16 /
  alpha=16 / dropout 0.1, max_length 512 packed, batch 1 x 16 accumulation, 3 epochs, lr 2e-4,
  checkpoints every 500 iterations (2 kept), AMP fp16;
* :data:`AGENT_FLAN` is the Agent-FLAN stage: LoRA r=64 at max_length 4096 (course:
  ``configs/llama3-agentflan/llama3_8b_instruct_qlora_agentflan_3e.py``), otherwise the same;
* :meth:`TrainParams.for_cpu` is the variant for CPU hosts (the cpu profile): the same LoRA on
  un-quantized fp32 weights (bitsandbytes' NF4 kernels are CUDA only: transformers refuses
  ``load_in_4bit`` with "CUDA is required but not available for bitsandbytes"), a plain
  optimizer wrapper (mmengine's AmpOptimWrapper needs CUDA), the gloo backend, one dataset worker
  instead of 32, and a few iterations (``max_iters``), each one an optimizer step, instead of 3
  epochs of 16 accumulated batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any, Literal

import jinja2

from llama3_ops.errors import Llama3OpsError

PACKAGE = "llama3_ops.stages"
TEMPLATE = "finetune_files/xtuner_sft.py.j2"

Quantization = Literal["nf4", "none"]


class ConfigError(Llama3OpsError, ValueError):
    """Fine-tune settings that cannot make a working XTuner config."""


@dataclass(frozen=True)
class TrainParams:
    """Hyperparameters and runtime settings of one XTuner SFT run (the course's, by default)."""

    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    max_length: int = 512
    pack_to_max_length: bool = True
    batch_size: int = 1
    accumulative_counts: int = 16
    max_epochs: int = 3
    max_iters: int | None = None  # set: train this many iterations instead of max_epochs
    lr: float = 2e-4
    save_steps: int = 500
    save_total_limit: int = 2
    evaluation_freq: int = 500
    eval_max_new_tokens: int = 600
    quantization: Quantization = "nf4"
    torch_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    optim_wrapper: Literal["AmpOptimWrapper", "OptimWrapper"] = "AmpOptimWrapper"
    model_class: Literal["SupervisedFinetune", "CPUSupervisedFinetune"] = "SupervisedFinetune"
    use_varlen_attn: bool = False
    map_num_proc: int = 32
    log_interval: int = 10
    dist_backend: Literal["nccl", "gloo"] = "nccl"
    seed: int | None = None

    def for_cpu(self, max_iters: int = 4, save_steps: int | None = None) -> TrainParams:
        """The same LoRA for a CPU host: no NF4, fp32, no AMP, and ``max_iters`` iterations."""
        return replace(
            self,
            quantization="none",
            torch_dtype="float32",
            optim_wrapper="OptimWrapper",
            model_class="CPUSupervisedFinetune",
            use_varlen_attn=False,
            map_num_proc=1,
            log_interval=1,
            dist_backend="gloo",
            accumulative_counts=1,
            max_iters=max_iters,
            save_steps=save_steps if save_steps is not None else max(1, max_iters // 2),
            evaluation_freq=max_iters + 1,  # the hook still answers before and after training
            eval_max_new_tokens=min(self.eval_max_new_tokens, 24),
            seed=0 if self.seed is None else self.seed,
        )

    def short(self, max_iters: int) -> TrainParams:
        """A short run with the same model settings (a GPU smoke test): ``max_iters`` iterations
        (micro-batches; an optimizer step every ``accumulative_counts``) instead of ``max_epochs``, a
        checkpoint halfway and at the end, and evaluation answers capped at 64 tokens before and after."""
        if max_iters < 2:
            raise ConfigError(f"a short run needs max_iters >= 2 (checkpoints halfway and at the end), got {max_iters}")
        return replace(
            self,
            max_iters=max_iters,
            save_steps=max_iters // 2,
            evaluation_freq=max_iters + 1,
            eval_max_new_tokens=min(self.eval_max_new_tokens, 64),
            log_interval=min(self.log_interval, max(1, max_iters // 8)),
        )

    @property
    def on_cpu(self) -> bool:
        return self.model_class == "CPUSupervisedFinetune"

    def validate(self) -> None:
        ints = {
            "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "max_length": self.max_length,
            "batch_size": self.batch_size, "accumulative_counts": self.accumulative_counts,
            "max_epochs": self.max_epochs, "save_steps": self.save_steps, "evaluation_freq": self.evaluation_freq,
            "eval_max_new_tokens": self.eval_max_new_tokens, "map_num_proc": self.map_num_proc,
            "log_interval": self.log_interval,
        }
        bad = [f"{k}={v}" for k, v in ints.items() if v < 1]
        if self.max_iters is not None and self.max_iters < 1:
            bad.append(f"max_iters={self.max_iters}")
        if not 0 < self.lr < 1:
            bad.append(f"lr={self.lr}")
        if not 0 <= self.lora_dropout < 1:
            bad.append(f"lora_dropout={self.lora_dropout}")
        if self.save_total_limit == 0 or self.save_total_limit < -1:
            bad.append(f"save_total_limit={self.save_total_limit} (-1 keeps all, else >= 1)")
        if bad:
            raise ConfigError("bad fine-tune settings: " + ", ".join(bad))
        if self.quantization == "nf4" and (self.on_cpu or self.torch_dtype == "float32"):
            raise ConfigError(
                "QLoRA (NF4, bitsandbytes) runs on CUDA only and computes in fp16/bf16: "
                "use quantization='none' (plain LoRA) on CPU"
            )
        if self.optim_wrapper == "AmpOptimWrapper" and self.on_cpu:
            raise ConfigError("AmpOptimWrapper (fp16 AMP) needs CUDA: use OptimWrapper on CPU")
        if self.use_varlen_attn and self.on_cpu:
            raise ConfigError("use_varlen_attn needs flash-attn on CUDA")


# The course's self-cognition run.
COURSE = TrainParams()
# The course's Agent-FLAN run: LoRA r=64 at max_length 4096.
AGENT_FLAN = TrainParams(lora_r=64, max_length=4096)


@dataclass(frozen=True)
class ConfigInputs:
    """What a rendered config points at on the host (absolute paths) and what it evaluates."""

    name: str  # the stage (finetune, agent-finetune)
    fab_task: str
    course_config: str  # the course file this one reproduces
    model_path: str
    data_path: str
    dataset_format: Literal["json", "disk"]  # load_dataset('json', ...) or load_from_disk(...)
    dataset_map_fn: str | None  # XTuner map fn name (openai_map_fn for Agent-FLAN), None: already XTuner format
    system: str
    evaluation_inputs: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # more template values (the LLaVA stage's paths)


def _template_text(name: str) -> str:
    return resources.files(PACKAGE).joinpath(f"finetune_files/{name}").read_text(encoding="utf-8")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(  # noqa: S701 - renders Python source, not HTML
        # {% include 'x.py.j2' %}: the parts the SFT and LLaVA templates share, from finetune_files/
        loader=jinja2.FunctionLoader(_template_text),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["py"] = repr
    return env


def template_values(inputs: ConfigInputs, params: TrainParams) -> dict[str, Any]:
    params.validate()
    for label, path in (("model_path", inputs.model_path), ("data_path", inputs.data_path)):
        if not path.startswith("/"):
            raise ConfigError(f"{label} must be an absolute path on the host, got {path!r}")
    if inputs.dataset_map_fn is not None and not inputs.dataset_map_fn.isidentifier():
        raise ConfigError(f"dataset_map_fn must be an XTuner map function name, got {inputs.dataset_map_fn!r}")
    for label, path in inputs.extra.items():
        if label.endswith("_path") and not str(path).startswith("/"):
            raise ConfigError(f"{label} must be an absolute path on the host, got {path!r}")
    values = {**asdict(params), **asdict(inputs), **inputs.extra}
    values["evaluation_inputs"] = list(inputs.evaluation_inputs)
    # EvaluateChatHook str.format()s the system text together with the instruction: literal braces
    # (the Agent-FLAN tool description) are doubled, as the course config writes them.
    values["system"] = inputs.system.replace("{", "{{").replace("}", "}}")
    return values


def render(inputs: ConfigInputs, params: TrainParams, template: str = TEMPLATE) -> str:
    """The XTuner config text: LF line ends, only the paths in ``inputs``."""
    name = template.removeprefix("finetune_files/")
    out = _environment().get_template(name).render(**template_values(inputs, params))
    return out.replace("\r\n", "\n")
