"""``fab agent-finetune``: the course's Agent-FLAN stage (docs/agent.md, section 2) on the fine-tune machinery.

The course clones the Agent-FLAN dataset from Hugging Face (``git clone .../datasets/internlm/Agent-FLAN``),
converts its ``data/*.jsonl`` with ``tools/convert_agentflan.py`` into a ``save_to_disk`` dataset, and
trains ``configs/llama3-agentflan/llama3_8b_instruct_qlora_agentflan_3e.py``: QLoRA, LoRA r=64, packed
long samples, XTuner's ``openai_map_fn``, the ReAct system prompt with the ArxivSearch tool. Then
``pth_to_hf`` on a hard-coded ``iter_18516.pth`` and ``merge``.

Here:

1. **data**: the jsonl files are taken from ``data_dir`` on the host (default ``~/Agent-FLAN/data``,
   where the course's clone puts them), or uploaded from a local directory (``upload``); they are
   converted on the host by ``finetune_files/convert_agentflan.py`` (checked record by record) into
   ``~/llama3-course/data/agent_flan_converted``, again only when the source files changed;
2. config, train, convert (newest checkpoint), merge, load check: :func:`llama3_ops.stages.finetune.run`
   with :data:`~llama3_ops.stages.finetune_config.AGENT_FLAN` (r=64, max_length 4096), merged into
   ``~/model/llama3_agent_flan_merged`` for ``fab agent --model``.

Differences from the course file: max_length 4096 (the course's later config; its first one said 8192),
``use_varlen_attn=False`` (varlen attention needs flash-attn, which the envs do not install), and no
ThroughputHook (it reports GPU FLOPs only).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from llama3_ops.errors import returns_exit_code
from llama3_ops.remote import services
from llama3_ops.remote.files import put_text
from llama3_ops.remote.services import ServiceSpec
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import finetune_log
from llama3_ops.stages.finetune import (
    Device,
    FinetuneError,
    FinetuneResult,
    HostInfo,
    Job,
    Step,
    job_options,
    local_main,
    local_parser,
    read_json,
    run,
    run_step,
    step_env,
    upload_host_files,
)
from llama3_ops.stages.finetune_config import AGENT_FLAN, ConfigError, TrainParams
from llama3_ops.stages.options import Opt

DEFAULT_DATA_DIR = "~/Agent-FLAN/data"
MERGED_NAME = "llama3_agent_flan_merged"  # beside the base model
SOURCE_MARKER = ".llama3-ops-source.json"
EVALUATION_INPUT = "Please help me search the InternLM2 Technical Report."
# The course config's SYSTEM (Lagent's ReAct format with the ArxivSearch tool), as XTuner's
# EvaluateChatHook receives it after Python's string formatting ({{ }} -> { }).
SYSTEM = (
    "You are a assistant who can utilize external tools.\n"
    "[{'name': 'ArxivSearch.get_arxiv_article_information',"
    "'description': 'Run Arxiv search and get the article meta information.',"
    "'parameters': [{'name': 'query', 'type': 'STRING', 'description':"
    "'the content of search query'}], 'required': ['query'], 'return_data':"
    "[{'name': 'content', 'description': 'a list of 3 arxiv search papers', 'type': 'STRING'}],"
    "'parameter_description': 'If you call this tool, you must pass arguments in the JSON format"
    "{key: value}, where the key is the parameter name.'}]\n"
    "To use a tool, please use the following format:\n```\n"
    "Thought:Think what you need to solve, do you need to use tools?\n"
    "Action:the tool name, should be one of [['ArxivSearch']]\n"
    "Action Input:the input to the action\n```\n"
    "The response after utilizing tools should using the following format:\n```\n"
    "Response:the results after call the tool.\n```\n"
    "If you already know the answer, or you do not need to use tools,\n"
    "please using the following format to reply:\n```\n"
    "Thought:the thought process to get the final answer\n"
    "Final Answer:final answer\n```\nBegin!"
)


def _upload_jsonl(remote: Remote, local: Path, dest: str) -> int:
    files = sorted(p for p in local.iterdir() if p.suffix == ".jsonl" and p.is_file()) if local.is_dir() else []
    if not files:
        raise FinetuneError(f"{local} holds no .jsonl files to upload (Agent-FLAN keeps them in its data/ folder)")
    remote.run(f"rm -rf {shlex.quote(dest)} && mkdir -p {shlex.quote(dest)}", timeout=60)
    for p in files:
        put_text(remote, f"{dest}/{p.name}", p.read_text(encoding="utf-8"), timeout=600)
    return len(files)


def agent_flan_data(
    data_dir: str = DEFAULT_DATA_DIR, upload: Path | None = None
) -> Callable[[Remote, HostInfo, Console], tuple[str, str]]:
    """The data step: (upload and) convert the Agent-FLAN jsonl files on the host."""

    def prepare(remote: Remote, host: HostInfo, console: Console) -> tuple[str, str]:
        src = host.expand(data_dir)
        if upload is not None:
            src = f"{host.course_dir}/data/agent_flan_jsonl"
            n = _upload_jsonl(remote, upload, src)
            console.print(f"uploaded {n} Agent-FLAN file(s) from {upload} to {src}")
        res = remote.run(
            f"cd {shlex.quote(src)} 2>/dev/null || {{ echo missing; exit 0; }}; "
            "ls *.jsonl >/dev/null 2>&1 || { echo empty; exit 0; }; sha256sum *.jsonl",
            timeout=600,
        )
        out = res.stdout.strip()
        if out in ("missing", "empty"):
            raise FinetuneError(
                f"no Agent-FLAN data on {remote.label}: {src} "
                f"{'does not exist' if out == 'missing' else 'holds no .jsonl files'}. Clone the dataset there "
                "(git lfs clone https://huggingface.co/datasets/internlm/Agent-FLAN ~/Agent-FLAN) or pass "
                "--upload LOCAL_DIR with its data/*.jsonl"
            )
        digest = hashlib.sha256(out.encode()).hexdigest()
        out_dir = f"{host.course_dir}/data/agent_flan_converted"
        marker = read_json(remote, f"{out_dir}/{SOURCE_MARKER}")
        if marker is not None and marker.get("source") == digest:
            console.print(f"converted dataset {out_dir}: {marker.get('records')} records, unchanged")
            return out_dir, digest
        scripts = upload_host_files(remote, host)
        argv = (f"{host.env_bin}/python", f"{scripts}/convert_agentflan.py", src, out_dir)
        run_step(remote, ServiceSpec(name="agent-finetune-data", argv=argv, env=step_env(host, None),
                                     cwd=host.course_dir), console, what="Agent-FLAN conversion")

        log = services.logs(remote, "agent-finetune-data", lines=20).splitlines()
        summary = next((json.loads(line) for line in reversed(log) if line.startswith('{"records"')), None)
        if summary is None:
            raise FinetuneError("the Agent-FLAN conversion printed no summary:\n" + "\n".join(log[-10:]))
        put_text(remote, f"{out_dir}/{SOURCE_MARKER}",
                 json.dumps({"source": digest, "from": src, "records": summary["records"]}) + "\n")
        console.print(f"converted {summary['records']} records from {len(summary['files'])} file(s) into {out_dir}")
        return out_dir, digest

    return prepare


def agent_flan_job(
    data_dir: str = DEFAULT_DATA_DIR, upload: Path | None = None, params: TrainParams = AGENT_FLAN
) -> Job:
    return Job(
        name="agent-finetune", fab_task="agent-finetune", stage="agent_finetune",
        course_config="configs/llama3-agentflan/llama3_8b_instruct_qlora_agentflan_3e.py",
        config_name="llama3_8b_instruct_qlora_agentflan_3e", params=params, merged_name=MERGED_NAME,
        system=SYSTEM, evaluation_inputs=(EVALUATION_INPUT,), dataset_format="disk",
        dataset_map_fn="openai_map_fn", prepare_data=agent_flan_data(data_dir, upload),
    )


def run_agent_finetune(
    remote: Remote,
    *,
    data_dir: str = DEFAULT_DATA_DIR,
    upload: Path | None = None,
    base_model: str = "base",
    device: Device = "auto",
    cpu_iters: int = 2,
    max_iters: int = 0,
    params: TrainParams | None = None,
    until: Step = "merge",
    env_bin: str | None = None,
    console: Console | None = None,
    on_progress: Callable[[finetune_log.IterProgress], None] | None = None,
) -> FinetuneResult:
    """``fab agent-finetune``: Agent-FLAN data -> convert -> train (r=64, 4096) -> pth_to_hf -> merge.

    ``max_iters`` > 0 makes a GPU run short (:meth:`TrainParams.short`); CPU runs use ``cpu_iters``.
    """
    if max_iters:
        try:
            params = (params or AGENT_FLAN).short(max_iters)
        except ConfigError as exc:
            raise FinetuneError(str(exc)) from exc
    return run(remote, agent_flan_job(data_dir, upload), base_model=base_model, device=device, params=params,
               cpu_iters=cpu_iters, env_bin=env_bin, console=console, on_progress=on_progress, until=until)


# fab agent-finetune and `python -m llama3_ops.stages.agent_finetune --local` take these.
OPTIONS: tuple[Opt, ...] = (
    Opt("data_dir", DEFAULT_DATA_DIR, "Agent-FLAN's data/ folder on the host"),
    Opt("upload", None, "a local folder with Agent-FLAN's *.jsonl, uploaded instead"),
    *job_options(cpu_iters=2),
)


def agent_finetune_from(remote: Remote, v: Any, console: Console | None = None) -> FinetuneResult:
    """``fab agent-finetune`` with :data:`OPTIONS`' values."""
    return run_agent_finetune(remote, data_dir=v.data_dir, upload=Path(v.upload) if v.upload else None,
                              base_model=v.base_model, device=v.device, cpu_iters=v.cpu_iters,
                              max_iters=v.max_iters, until=v.until, env_bin=v.env, console=console)


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """``python -m llama3_ops.stages.agent_finetune --local [options]`` (the device run)."""
    a = local_parser("python -m llama3_ops.stages.agent_finetune", "agent-finetune", OPTIONS).parse_args(argv)
    return local_main(a.json, lambda remote, con: agent_finetune_from(remote, a, con))


if __name__ == "__main__":
    sys.exit(main())
