"""Stage 3's pieces without a host: the rendered XTuner LLaVA configs (the course's numbers on GPU, the
CPU variant), the drawn data set, the options, and the tiny CLIP and projector the tests start from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from llama3_ops.stages import llava_finetune as lft
from llama3_ops.stages.finetune_config import ConfigInputs, render
from llama3_ops.stages.llava_data import ShapeSet


def _inputs(on_cpu: bool) -> ConfigInputs:
    return ConfigInputs(
        name="llava-finetune", fab_task="llava-finetune", course_config="configs/llama3-llava/x.py",
        model_path="/root/model/Meta-Llama-3-8B-Instruct", data_path="/root/llama3-course/data/llava/r.json",
        dataset_format="json", dataset_map_fn="llava_map_fn", system="", evaluation_inputs=("Describe this image.",),
        extra={"visual_encoder_path": "/root/model/clip-vit-large-patch14-336",
               "projector_path": "/root/model/llama3-llava-iter_2181.pth",
               "image_folder_path": "/root/llama3-course/data/llava",
               "evaluation_image_path": "/root/llama3-course/data/llava/images/a.png", "on_cpu": on_cpu,
               **lft.VISUAL_LORA})


def test_gpu_config_is_the_courses() -> None:
    text = render(_inputs(False), lft.COURSE_LLAVA, "xtuner_llava.py.j2")
    compile(text, "llava.py", "exec")
    for needle in ("from xtuner.model import LLaVAModel", "max_length = 1472", "r=512,", "lora_alpha=256,",
                   "lora_dropout=0.05,", "r=64, lora_alpha=16", "bnb_4bit_quant_type=\"nf4\"", "AmpOptimWrapper",
                   "save_steps = 500", "accumulative_counts = 1", "max_epochs = 1", "lr = 0.0002",
                   "LengthGroupedSampler", "PROMPT_TEMPLATE.llama3_chat", "SYSTEM = ''",
                   "pretrained_pth = '/root/model/llama3-llava-iter_2181.pth'",
                   "evaluation_images = '/root/llama3-course/data/llava/images/a.png'"):
        assert needle in text, needle
    assert "map_num_proc" not in text and "CPULLaVA" not in text and "https://" not in text


def test_cpu_config_uses_the_cpu_classes_and_plain_lora() -> None:
    text = render(_inputs(True), lft.COURSE_LLAVA.for_cpu(4), "xtuner_llava.py.j2")
    compile(text, "llava_cpu.py", "exec")
    for needle in ("from llama3_xtuner_llava_cpu import CPULLaVAModel as LLaVAModel", "map_num_proc=1,",
                   "torch_dtype=torch.float32", "OptimWrapper", "max_iters = 4", "backend='gloo'"):
        assert needle in text, needle
    assert "BitsAndBytesConfig" not in text and "AmpOptimWrapper" not in text


def test_relative_paths_are_refused() -> None:
    inputs = _inputs(False)
    bad = replace(inputs, extra={**inputs.extra, "projector_path": "model/p.pth"})
    with pytest.raises(Exception, match="projector_path must be an absolute path"):
        render(bad, lft.COURSE_LLAVA, "xtuner_llava.py.j2")


def test_the_drawn_set_is_the_courses_shape() -> None:
    s = ShapeSet()
    assert s.records == 1200  # six conversations x 200: the course's iter_1200.pth
    records = json.loads(s.repeated_text())
    assert len(records) == 1200 and records[6] == records[0]
    first = records[0]["conversations"]
    assert first[0] == {"from": "human", "value": "<image>\nDescribe this image."}
    assert [t["from"] for t in first] == ["human", "gpt"] * 3
    assert len({r["image"] for r in records}) == 6 and s.check_image == records[0]["image"]
    with pytest.raises(ValueError, match="--repeat must be between 1"):
        ShapeSet(repeat=0).validate()


def test_options_end_with_the_answer() -> None:
    until = next(o for o in lft.OPTIONS if o.name == "until")
    assert until.default == "answer" and until.choices == ("train", "convert", "answer")
    assert {o.name for o in lft.OPTIONS} >= {"visual_encoder", "projector", "repeat", "data", "image_folder", "image",
                                             "max_iters", "device"}


def test_tiny_parts_load_as_xtuner_and_transformers_expect(tmp_path: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from llama3_ops.lab.llava_checkpoint import make_xtuner_parts

    clip, proj = make_xtuner_parts(tmp_path / "clip", tmp_path / "p.pth", "tiny")
    model = CLIPVisionModel.from_pretrained(clip)
    assert model.config.image_size == 56 and model.config.patch_size == 14
    pixel = CLIPImageProcessor.from_pretrained(clip)(images=[__import__("PIL.Image").Image.new("RGB", (80, 60))],
                                                     return_tensors="pt")["pixel_values"]
    assert tuple(pixel.shape) == (1, 3, 56, 56)
    sd = torch.load(proj, weights_only=False)["state_dict"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "projector.model.0.weight": (64, 32), "projector.model.0.bias": (64,),
        "projector.model.2.weight": (64, 64), "projector.model.2.bias": (64,)}
