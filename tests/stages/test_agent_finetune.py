"""`fab agent-finetune` (Agent-FLAN): the real conversion on a fixture in Agent-FLAN's schema, job wiring.

Agent-FLAN itself lives on Hugging Face (unreachable here). :func:`write_agent_flan` writes a few
records in its exact schema (``{"conversation": [{"role", "content", "loss"}], "id"}``, ReAct turns
with the ArxivSearch tool, as in data/agent_instruct_react.jsonl and toolbench_*.jsonl).
The full train -> convert -> merge run on a fresh host is in test_finetune_freshhost.py.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from llama3_ops.stages import agent_finetune
from llama3_ops.stages.finetune_config import AGENT_FLAN, render

REACT = (
    "Thought: I need to search arXiv for the InternLM2 technical report.\n"
    "Action: ArxivSearch.get_arxiv_article_information\n"
    'Action Input: {"query": "InternLM2 Technical Report"}'
)
RECORDS = {
    "agent_instruct_react.jsonl": [
        {"conversation": [
            {"role": "system", "content": agent_finetune.SYSTEM, "loss": False},
            {"role": "user", "content": "Please help me search the InternLM2 Technical Report.", "loss": False},
            {"role": "assistant", "content": REACT, "loss": True},
            {"role": "user", "content": "Response: Published: 2024-03-26\nTitle: InternLM2 Technical Report",
             "loss": False},
            {"role": "assistant", "content": "Thought: I found it.\nFinal Answer: InternLM2 Technical Report "
             "(arXiv, 2024-03-26).", "loss": True},
        ], "id": "agent_instruct_react_0"},
    ],
    "toolbench_negative.jsonl": [
        {"conversation": [
            {"role": "system", "content": "You are a helpful assistant.", "loss": False},
            {"role": "user", "content": "What is 2 + 2?", "loss": False},
            {"role": "assistant", "content": "Thought: No tool is needed.\nFinal Answer: 4", "loss": True},
        ], "id": "toolbench_negative_0"},
        {"conversation": [
            {"role": "user", "content": "Say hello.", "loss": False},
            {"role": "assistant", "content": "Hello!", "loss": True},
        ], "id": "toolbench_negative_1"},
    ],
}


def write_agent_flan(directory: Path, copies: int = 1) -> Path:
    """Agent-FLAN-shaped jsonl files (each record ``copies`` times) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, records in RECORDS.items():
        lines = [json.dumps(r, ensure_ascii=False) for r in records for _ in range(copies)]
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_job_is_the_course_agent_flan_stage() -> None:
    job = agent_finetune.agent_flan_job()
    assert (job.params.lora_r, job.params.max_length) == (64, 4096)
    assert job.params.quantization == "nf4" and job.params.max_epochs == 3
    assert job.dataset_format == "disk" and job.dataset_map_fn == "openai_map_fn"
    assert job.merged_name == "llama3_agent_flan_merged"
    assert job.evaluation_inputs == ("Please help me search the InternLM2 Technical Report.",)


def test_agent_flan_config_renders_the_course_settings() -> None:
    job = agent_finetune.agent_flan_job()
    from llama3_ops.stages.finetune_config import ConfigInputs

    text = render(ConfigInputs(
        name=job.name, fab_task=job.fab_task, course_config=job.course_config, model_path="/home/u/model/m",
        data_path="/home/u/llama3-course/data/agent_flan_converted", dataset_format=job.dataset_format,
        dataset_map_fn=job.dataset_map_fn, system=job.system, evaluation_inputs=job.evaluation_inputs,
    ), AGENT_FLAN)
    assert "lora_alpha=16" in text and "r=64" in text and "max_length = 4096" in text
    assert "bnb_4bit_quant_type=\"nf4\"" in text
    tree = ast.parse(text)
    names = {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    assert {"dataset_path", "SYSTEM", "evaluation_inputs", "train_dataset", "optim_wrapper"} <= names


def test_conversion_of_the_fixture_with_datasets(tmp_path: Path) -> None:
    """The host script end to end (needs `datasets`, as the llama3 env has it); skipped without it."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets is not installed in this venv (the fresh-host test runs it in the llama3 env)")
    src = write_agent_flan(tmp_path / "data")
    out = tmp_path / "converted"
    script = Path(agent_finetune.__file__).parent / "finetune_files" / "convert_agentflan.py"
    proc = subprocess.run([sys.executable, str(script), str(src), str(out)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["records"] == 3
    from datasets import load_from_disk

    ds = load_from_disk(str(out))
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"][2] == {"role": "assistant", "content": REACT, "loss": True}
