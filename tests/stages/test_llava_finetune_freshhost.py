"""`fab llava-finetune` (stage 3) for real on the fresh host provisioned with the cpu profile.

The tiny Llama-3-shaped model is the host's ~/model/Meta-Llama-3-8B-Instruct (the `provisioned`
fixture); a tiny CLIP vision model and projector with random weights (real architectures:
``CLIPVisionModel``, XTuner's two-layer projector) go where the course links them. XTuner 0.2.0 from
the profile's llama3 env trains LoRA on both (QLoRA's NF4 needs CUDA), converts the newest checkpoint
and answers about one of the drawn images; a second run skips every step.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from hostlab import Provisioned
from llama3_ops.lab.llava_checkpoint import make_xtuner_parts
from llama3_ops.remote import services, transport
from llama3_ops.stages import llava_finetune as lft
from llama3_ops.stages.finetune import READY_MARKER, FinetuneError
from llama3_ops.stages.options import values

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]

HOME = "/home/student"
WORK = f"{HOME}/llama3-course/work_dirs/llava-finetune"
CLIP = f"{HOME}/model/clip-vit-large-patch14-336"
PROJECTOR = f"{HOME}/model/llama3-llava-iter_2181.pth"


def _opts(**given: object) -> object:
    return values(lft.OPTIONS, {"repeat": 2, "device": "cpu", "cpu_iters": 4, **given})


def test_llava_finetune_refuses_without_parts_then_trains_converts_and_answers(provisioned: Provisioned,
                                                                                tmp_path: Path) -> None:
    remote = transport.SSHRemote(provisioned.target)
    provisioned.sh(f"rm -rf {CLIP} {PROJECTOR} {WORK}")
    # No visual encoder on the host: one line that says where it comes from; nothing starts.
    with pytest.raises(FinetuneError, match=r"the visual encoder .*clip-vit-large-patch14-336 on .* does not exist "
                                            r".*openai/clip-vit-large-patch14-336.*InternStudio.*--visual-encoder"):
        lft.llava_finetune_from(remote, _opts())
    clip, proj = make_xtuner_parts(tmp_path / "clip", tmp_path / "projector.pth", "tiny")
    provisioned.lab.put(provisioned.name, provisioned.idx, clip, CLIP)
    with pytest.raises(FinetuneError, match=r"the pretrained projector .*llama3-llava-iter_2181.pth is not on .*"
                                            r"xtuner.*--projector PATH"):
        lft.llava_finetune_from(remote, _opts())
    assert not services.status(remote, "llava-finetune-train", log_lines=0).running
    assert not provisioned.exists(WORK)
    with pytest.raises(FinetuneError, match="--data needs --image-folder"):
        lft.llava_finetune_from(remote, _opts(data="~/x.json"))
    provisioned.lab.put(provisioned.name, provisioned.idx, proj, PROJECTOR)

    buf = io.StringIO()
    res = lft.llava_finetune_from(remote, _opts(), Console(file=buf, width=200))
    out = " ".join(buf.getvalue().split())
    # the data: six drawn pictures, three turns each, x2
    data = json.loads(provisioned.sh("cat ~/llama3-course/data/llava/repeated_data.json"))
    assert len(data) == 12 and data[0]["conversations"][0]["value"] == "<image>\nDescribe this image."
    assert provisioned.exists("~/llama3-course/data/llava/images/red_circle_on_white.png")
    # the config: the course's LoRA, XTuner's LLaVA classes with the CPU fixes, 2048 less 16 image tokens
    config = provisioned.sh("cat ~/llama3-course/configs/"
                            "llava_llama3_8b_instruct_qlora_clip_vit_large_p14_336_lora_e1_finetune_cpu.py")
    for needle in ("CPULLaVAModel as LLaVAModel", "r=512,", "lora_alpha=256,", "r=64, lora_alpha=16",
                   "max_length = 2032", f"pretrained_pth = '{PROJECTOR}'", "torch_dtype=torch.float32"):
        assert needle in config, needle
    # trained, converted (the LLaVA layout), answered, marked done with the answer
    assert res.checkpoint.endswith("/iter_4.pth") and res.adapter == f"{WORK}/hf_adapter"
    for part in ("llm_adapter/adapter_config.json", "visual_encoder_adapter/adapter_config.json",
                 "projector/config.json"):
        assert provisioned.exists(f"{WORK}/hf_adapter/{part}"), part
    assert res.merged_answer and isinstance(res.merged_answer, str)
    marker = json.loads(provisioned.sh(f"cat {WORK}/hf_adapter/{READY_MARKER}"))
    assert marker["answer"] == res.merged_answer and marker["image"].endswith("red_circle_on_white.png")
    assert marker["projector"] == PROJECTOR and marker["visual_encoder"] == CLIP
    assert "answered about the image" in out and res.eval_answer is not None  # XTuner's hook, after training
    # a second run finds every step done
    again = lft.llava_finetune_from(remote, _opts(), Console(file=io.StringIO()))
    assert again.skipped == ["train", "convert", "answer"] and again.merged_answer == res.merged_answer
