"""Fast tests of the fine-tune stages' pieces: dataset, rendered XTuner config, log parsing, checkpoints."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

from llama3_ops.stages import finetune_log
from llama3_ops.stages.finetune_config import AGENT_FLAN, COURSE, ConfigError, ConfigInputs, TrainParams, render
from llama3_ops.stages.finetune_data import SelfCognition

FILES = Path(__file__).resolve().parents[2] / "src" / "llama3_ops" / "stages" / "finetune_files"

INPUTS = ConfigInputs(
    name="finetune", fab_task="finetune", course_config="configs/assistant/llama3_8b_instruct_qlora_assistant.py",
    model_path="/home/student/model/Meta-Llama-3-8B-Instruct",
    data_path="/home/student/llama3-course/data/personal_assistant.json", dataset_format="json",
    dataset_map_fn=None, system="你是一个懂中文的小助手", evaluation_inputs=("你是（请用中文回答）",),
)


def settings(text: str) -> dict[str, object]:
    """The config's top-level ``NAME = literal`` assignments."""
    out: dict[str, object] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def call_kwargs(text: str, func: str) -> dict[str, ast.expr]:
    """Keyword arguments of the first ``dict(type=<func>, ...)`` call in the config."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            t = kw.get("type")
            name = getattr(t, "id", None) or getattr(t, "attr", None)
            if name == func:
                return kw
    raise AssertionError(f"no dict(type={func}, ...) in the config")


# --------------------------------------------------------------------------- dataset


def test_dataset_is_the_course_record_with_the_name_and_count() -> None:
    data = SelfCognition(name="Ada", count=7)
    records = json.loads(data.json_text())
    assert len(records) == 7
    assert all(r == records[0] for r in records)
    assert records[0] == {"conversation": [{
        "system": "你是一个懂中文的小助手",
        "input": "你是（请用中文回答）",
        "output": "您好，我是Ada，一个由 SmartFlowAI 打造的人工智能助手，请问有什么可以帮助您的吗？",
    }]}
    assert "\\u" not in data.json_text(), "written as UTF-8, not ASCII escapes (as gdata.py does)"


def test_dataset_defaults_are_the_course_ones_and_system_prompt_is_a_parameter() -> None:
    assert SelfCognition().count == 2000
    rec = SelfCognition(system="You are helpful.", maker="ACME").record()["conversation"][0]
    assert rec["system"] == "You are helpful."
    assert rec["output"].startswith("您好，我是SmartFlowAI，一个由 ACME 打造")


@pytest.mark.parametrize("bad", [SelfCognition(name=" "), SelfCognition(count=0), SelfCognition(maker="")])
def test_dataset_rejects_bad_parameters(bad: SelfCognition) -> None:
    with pytest.raises(ValueError):
        bad.records()


# --------------------------------------------------------------------------- config


def test_course_config_has_the_course_hyperparameters_and_host_paths() -> None:
    text = render(INPUTS, COURSE)
    s = settings(text)
    assert s["pretrained_model_name_or_path"] == INPUTS.model_path
    assert s["data_files"] == [INPUTS.data_path]
    assert (s["max_length"], s["pack_to_max_length"]) == (512, True)
    assert (s["batch_size"], s["accumulative_counts"], s["max_epochs"], s["max_iters"]) == (1, 16, 3, None)
    assert (s["lr"], s["save_steps"], s["save_total_limit"]) == (2e-4, 500, 2)
    assert s["SYSTEM"] == "你是一个懂中文的小助手" and s["evaluation_inputs"] == ["你是（请用中文回答）"]
    lora = call_kwargs(text, "LoraConfig")
    assert (ast.literal_eval(lora["r"]), ast.literal_eval(lora["lora_alpha"])) == (16, 16)
    q = call_kwargs(text, "BitsAndBytesConfig")
    assert ast.literal_eval(q["load_in_4bit"]) is True and ast.literal_eval(q["bnb_4bit_quant_type"]) == "nf4"
    assert "AmpOptimWrapper" in text and "from xtuner.model import SupervisedFinetune" in text
    compile(text, "config.py", "exec")


def test_config_has_no_crlf_no_root_and_no_fixed_checkpoint() -> None:
    for params in (COURSE, COURSE.for_cpu(), AGENT_FLAN):
        text = render(INPUTS, params)
        assert "\r" not in text
        assert "/root" not in text
        assert not re.search(r"iter_\d+\.pth", text)


def test_cpu_variant_is_plain_lora_with_few_iterations() -> None:
    cpu = COURSE.for_cpu(max_iters=6)
    text = render(INPUTS, cpu)
    s = settings(text)
    assert "BitsAndBytesConfig" not in text and "quantization_config" not in text
    assert "torch_dtype=torch.float32" in text
    assert "type=OptimWrapper" in text and "AmpOptimWrapper" not in text
    assert "from llama3_xtuner_cpu import CPUSupervisedFinetune" in text
    assert s["max_iters"] == 6 and s["save_steps"] == 3 and s["accumulative_counts"] == 1
    lora = call_kwargs(text, "LoraConfig")
    assert ast.literal_eval(lora["r"]) == 16, "same LoRA rank as the course"
    assert ast.literal_eval(call_kwargs(text, "process_hf_dataset")["map_num_proc"]) == 1
    compile(text, "config.py", "exec")


def test_short_gpu_run_keeps_the_course_model_settings() -> None:
    short = COURSE.short(32)
    text = render(INPUTS, short)
    s = settings(text)
    assert "BitsAndBytesConfig" in text and "AmpOptimWrapper" in text, "still QLoRA NF4 with fp16 AMP"
    assert s["max_iters"] == 32 and s["save_steps"] == 16 and s["accumulative_counts"] == 16
    assert s["evaluation_freq"] == 33, "the hook answers before and after training only"
    assert ast.literal_eval(call_kwargs(text, "LoraConfig")["r"]) == 16
    assert short.eval_max_new_tokens == 64 and short.log_interval == 4
    with pytest.raises(ConfigError, match="max_iters >= 2"):
        COURSE.short(1)
    compile(text, "config.py", "exec")


def test_agent_flan_config_is_r64_at_4096_from_disk_with_openai_map_fn() -> None:
    inputs = ConfigInputs(
        name="agent-finetune", fab_task="agent-finetune", course_config="x.py", model_path="/m",
        data_path="/d/agent_flan_converted", dataset_format="disk", dataset_map_fn="openai_map_fn",
        system="tools", evaluation_inputs=("Please help me search the InternLM2 Technical Report.",),
    )
    text = render(inputs, AGENT_FLAN)
    s = settings(text)
    assert s["max_length"] == 4096 and s["dataset_path"] == "/d/agent_flan_converted"
    assert ast.literal_eval(call_kwargs(text, "LoraConfig")["r"]) == 64
    assert "load_from_disk" in text and "dataset_map_fn=openai_map_fn" in text
    compile(text, "config.py", "exec")


def test_system_prompt_with_braces_survives_the_eval_hooks_format() -> None:
    from dataclasses import replace

    from llama3_ops.stages.agent_finetune import SYSTEM

    text = render(replace(INPUTS, system=SYSTEM), AGENT_FLAN)
    hook_system = str(settings(text)["SYSTEM"])
    assert "{{'name'" in hook_system
    # what XTuner's EvaluateChatHook does with it (llama3_chat template, then the instruction)
    assert hook_system.format(input="q", round=1) == SYSTEM


@pytest.mark.parametrize("params, needle", [
    (TrainParams(lora_r=0), "lora_r=0"),
    (TrainParams(lr=0.0), "lr=0.0"),
    (TrainParams(max_iters=0), "max_iters=0"),
    (TrainParams(quantization="nf4", torch_dtype="float32"), "QLoRA"),
])
def test_bad_settings_are_refused(params: TrainParams, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        render(INPUTS, params)


def test_relative_paths_are_refused() -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError, match="absolute"):
        render(replace(INPUTS, data_path="data/personal_assistant.json"), COURSE)


# --------------------------------------------------------------------------- log parsing


LOG = """\
=== llama3-ops start 2026-11-25T14:44:00+00:00 fp=abc: python -m xtuner.tools.train cfg.py
11/25 14:47:07 - mmengine - INFO - before_train in EvaluateChatHook.
11/25 14:47:18 - mmengine - INFO - Sample output:
<|begin_of_text|><|start_header_id|>system<|end_header_id|>

你是一个懂中文的小助手<|eot_id|><|start_header_id|>user<|end_header_id|>

你是（请用中文回答）<|eot_id|><|start_header_id|>assistant<|end_header_id|>

before answer<|eot_id|>

11/25 14:47:21 - mmengine - INFO - Iter(train) [  1/120]  lr: 2.0000e-09  eta: 0:00:08  time: 2.6962  \
data_time: 0.0146  loss: 11.7544
11/25 14:47:23 - mmengine - INFO - Iter(train) [ 10/120]  lr: 1.9000e-04  eta: 1 day, 2:03:04  time: 2.2  \
data_time: 0.01  loss: 9.5  grad_norm: 0.28
11/25 14:47:38 - mmengine - INFO - after_train in EvaluateChatHook.
11/25 14:47:42 - mmengine - INFO - Sample output:
<|begin_of_text|><|start_header_id|>user<|end_header_id|>

你是（请用中文回答）<|eot_id|><|start_header_id|>assistant<|end_header_id|>

您好，我是SmartFlowAI<|eot_id|>
"""


def test_iteration_lines_give_progress_loss_and_eta() -> None:
    p = finetune_log.last_progress(LOG.splitlines())
    assert p == finetune_log.IterProgress(10, 120, "1 day, 2:03:04", 9.5, 1.9e-4)
    first = finetune_log.parse_iter_line(LOG.splitlines()[11])
    assert first is not None and (first.iteration, first.eta, first.loss) == (1, "0:00:08", 11.7544)
    assert finetune_log.parse_iter_line("11/25 - mmengine - INFO - Saving checkpoint at 2 iterations") is None


def test_final_answer_is_the_after_train_sample() -> None:
    samples = finetune_log.eval_samples(LOG.splitlines())
    assert [s.phase for s in samples] == ["before_train", "after_train"]
    assert samples[0].answer == "before answer"
    final = finetune_log.final_answer(LOG.splitlines())
    assert final is not None and final.answer == "您好，我是SmartFlowAI"


def test_latest_checkpoint_is_found_by_number_not_by_name_order() -> None:
    names = ["iter_500.pth", "iter_1500.pth", "iter_1000.pth", "last_checkpoint", "20261125_144400", "iter_x.pth"]
    assert finetune_log.latest_checkpoint(names) == "iter_1500.pth"
    assert finetune_log.latest_checkpoint(["last_checkpoint"]) is None
    assert finetune_log.checkpoint_iteration("iter_2.pth") == 2


# --------------------------------------------------------------------------- Agent-FLAN conversion


def _converter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convert_agentflan", FILES / "convert_agentflan.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_agentflan_records_become_messages_with_loss(tmp_path: Path) -> None:
    conv = _converter()
    src = tmp_path / "data"
    src.mkdir()
    line = {"conversation": [
        {"role": "system", "content": "You can use tools.", "loss": False},
        {"role": "user", "content": "Search arxiv for InternLM2", "loss": False},
        {"role": "assistant", "content": "Thought: ...\nAction: ArxivSearch", "loss": True},
    ], "id": "toolbench_1"}
    (src / "b.jsonl").write_text(json.dumps(line) + "\n\n")
    (src / "a.jsonl").write_text(json.dumps(line) + "\n")
    (src / "README.md").write_text("not data")
    records, per_file = conv.read_records(src)
    assert per_file == {"a.jsonl": 1, "b.jsonl": 1}
    assert records[0] == {"messages": line["conversation"]}
    assert "id" not in records[0]


@pytest.mark.parametrize("line, needle", [
    ('{"messages": []}', "no 'conversation' list"),
    ('{"conversation": [{"role": "tool", "content": "x"}]}', "role 'tool'"),
    ('{"conversation": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"conversation": [{"role": "assistant", "content": "x", "loss": "yes"}]}', "'loss' must be"),
    ("not json", "not JSON"),
])
def test_agentflan_bad_records_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    conv = _converter()
    (tmp_path / "x.jsonl").write_text('{"conversation": [{"role": "assistant", "content": "ok"}]}\n' + line + "\n")
    with pytest.raises(conv.ConversionError, match=f"x.jsonl:2: .*{needle}"):
        conv.read_records(tmp_path)


def test_agentflan_empty_dir_is_refused(tmp_path: Path) -> None:
    conv = _converter()
    with pytest.raises(conv.ConversionError, match=r"no \.jsonl files"):
        conv.read_records(tmp_path)
