"""``fab llava-finetune``: stage 3, the LLaVA image fine-tune the course skipped (no GPU), end to end.

The course (``docs/llava.md``, config ``configs/llama3-llava/llava_llama3_8b_instruct_qlora_clip_vit_large
_p14_336_lora_e1_finetune.py``) runs, by hand: ``repeat.py -n 200`` over a six-record image/conversation
set, ``xtuner train`` with QLoRA on Llama-3-8B-Instruct (LoRA r=512 / alpha 256 / dropout 0.05), a
LoRA on the frozen CLIP ViT-L/14-336 (r=64 / alpha 16) and xtuner's pretrained projector
(``llama3-llava-iter_2181.pth``), ``max_length = int(2048 - (336 / 14)**2)`` = 1472, batch 1, one
epoch, lr 2e-4; then ``xtuner convert pth_to_hf`` and ``xtuner chat MODEL --visual-encoder CLIP --llava
ADAPTER --prompt-template llama3_chat --image IMG``. Stated cost: about 44,447 MiB on one A100, 30 min.

Here, on the same machinery as ``fab finetune`` (:mod:`llama3_ops.stages.finetune`: supervised steps,
progress from the log, resume from the newest checkpoint, markers that skip what is done):

1. **data**: the bundle's own set drawn on the host (:mod:`llama3_ops.stages.llava_data`: six
   pictures, three turns each, repeated ``--repeat`` times; the course's photo cannot be downloaded
   offline), or ``--data FILE --image-folder DIR --image IMG`` for the user's own;
2. **config**: ``finetune_files/xtuner_llava.py.j2`` with this host's paths and the course's settings
   (a CPU host: plain LoRA in fp32 and XTuner's LLaVA classes with two CPU fixes,
   ``finetune_files/cpu_compat/llama3_xtuner_llava_cpu.py``);
3. **train**, 4. **convert** (``pth_to_hf`` of the newest checkpoint: ``llm_adapter/``,
   ``visual_encoder_adapter/``, ``projector/``);
5. **answer**: what ``xtuner chat --llava`` does for one turn (``finetune_files/llava_answer.py``),
   about one image; the converted model is marked done (``.llama3-ops-ready.json``) only when an answer
   comes back.

The visual encoder and the projector must be on the host (default: beside the model, under the
course's names); without them the stage says where they come from and starts nothing.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from rich.console import Console

from llama3_ops.errors import returns_exit_code
from llama3_ops.remote import services
from llama3_ops.remote.files import put_text
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import finetune as ft
from llama3_ops.stages.finetune import READY_MARKER, FinetuneError, FinetuneResult, HostInfo, Job, _Run
from llama3_ops.stages.finetune_config import ConfigError, TrainParams
from llama3_ops.stages.llava_data import COURSE_REPEAT, QUESTION, ShapeSet
from llama3_ops.stages.options import Opt

NAME = "llava-finetune"
CLIP_NAME = "clip-vit-large-patch14-336"  # beside the model, as the course links it
PROJECTOR_NAME = "llama3-llava-iter_2181.pth"
CLIP_SOURCE = (
    "openai/clip-vit-large-patch14-336 (Hugging Face; on InternStudio: "
    "ln -s /root/share/new_models/openai/clip-vit-large-patch14-336 {path})"
)
PROJECTOR_SOURCE = (
    "xtuner's pretrained LLaVA-Llama-3 projector (on InternStudio: "
    "ln -s /root/share/new_models/xtuner/llama3-llava-iter_2181.pth {path}; elsewhere the projector of "
    "xtuner/llava-llama-3-8b on Hugging Face, as an XTuner .pth)"
)
VISUAL_LORA = {"visual_lora_r": 64, "visual_lora_alpha": 16}  # the course's CLIP LoRA
CONTEXT = 2048  # the course's max_length is 2048 less the image's tokens

# The course's run (batch 1, no accumulation, one epoch of 1,200 records: its iter_1200.pth).
COURSE_LLAVA = TrainParams(
    lora_r=512, lora_alpha=256, lora_dropout=0.05, max_length=CONTEXT - 576, pack_to_max_length=False,
    batch_size=1, accumulative_counts=1, max_epochs=1, lr=2e-4, save_steps=500, save_total_limit=2,
    evaluation_freq=500, eval_max_new_tokens=64,
)


def _clip_config(remote: Remote, path: str) -> dict[str, Any]:
    """The encoder's ``config.json`` (a CLIPModel's ``vision_config``, or a CLIPVisionModel's own)."""
    script = (f"d={shlex.quote(path)}\n"
              '[ -f "$d/config.json" ] || { echo missing; exit 0; }\n'
              '[ -f "$d/preprocessor_config.json" ] || { echo noprocessor; exit 0; }\n'
              'cat "$d/config.json"\n')
    out = remote.run(script, timeout=30).stdout.strip()
    if out in ("missing", "noprocessor"):
        what = "does not exist (no config.json)" if out == "missing" else "has no preprocessor_config.json"
        raise FinetuneError(f"the visual encoder {path} on {remote.label} {what}: it is "
                            f"{CLIP_SOURCE.format(path=path)}; put it there or pass --visual-encoder PATH")
    try:
        cfg = json.loads(out)
    except ValueError:
        raise FinetuneError(f"the visual encoder's {path}/config.json on {remote.label} is not JSON") from None
    vision = cfg.get("vision_config") or cfg
    if not {"image_size", "patch_size"} <= set(vision):
        raise FinetuneError(f"{path}/config.json on {remote.label} names no image_size and patch_size: "
                            "not a CLIP vision model")
    return dict(vision)


def _check_projector(remote: Remote, path: str) -> None:
    res = remote.run(f"test -s {shlex.quote(path)}", timeout=30, check=False)
    if res.rc != 0:
        raise FinetuneError(f"the pretrained projector {path} is not on {remote.label}: it is "
                            f"{PROJECTOR_SOURCE.format(path=path)}; put it there or pass --projector PATH")


def llava_job(remote: Remote, *, visual_encoder: str | None, projector: str | None, data: str | None,
              image_folder: str | None, image: str | None, repeat: int, params: TrainParams,
              env_bin: str | None = None) -> Job:
    """The LLaVA fine-tune as a :class:`~llama3_ops.stages.finetune.Job` for this host."""
    if data is not None and (image_folder is None or image is None):
        raise FinetuneError("--data needs --image-folder (where its images are) and --image (the picture the "
                            "final answer is about), both paths on the host")
    if data is None and (image_folder is not None or image is not None):
        raise FinetuneError("--image-folder and --image go with --data (the bundle's own set has its own)")
    shapes = ShapeSet(repeat=repeat)
    try:
        shapes.validate()
    except ValueError as exc:
        raise FinetuneError(str(exc)) from exc
    host = ft.read_host(remote, env_bin)
    clip_path = host.expand(visual_encoder) if visual_encoder else host.host.sibling(CLIP_NAME)
    proj_path = host.expand(projector) if projector else host.host.sibling(PROJECTOR_NAME)
    vision = _clip_config(remote, clip_path)
    _check_projector(remote, proj_path)
    image_tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    folder = f"{host.course_dir}/data/llava"
    eval_image = host.expand(image) if image else f"{folder}/{shapes.check_image}"  # the final answer's too

    def prepare(remote: Remote, host: HostInfo, console: Console) -> tuple[str, str]:
        if data is not None:
            path = host.expand(data)
            res = remote.run(f"sha256sum {shlex.quote(path)} && test -d {shlex.quote(host.expand(image_folder or ''))}"
                             f" && test -f {shlex.quote(host.expand(image or ''))}", timeout=60, check=False)
            if res.rc != 0:
                raise FinetuneError(f"--data {data}, --image-folder {image_folder} and --image {image} must exist "
                                    f"on {remote.label}")
            console.print(f"dataset {path} (yours), images in {image_folder}")
            return path, res.stdout.split()[0]
        scripts = f"{host.course_dir}/scripts/finetune"
        specs = json.dumps(shapes.image_specs())
        drawn = remote.run(f"{shlex.quote(host.env_bin)}/python {scripts}/llava_images.py {shlex.quote(folder)}",
                           stdin=specs, timeout=300, check=False)
        if drawn.rc != 0:
            raise FinetuneError(f"drawing the images on {remote.label} failed: {drawn.stderr.strip()[-500:]}")
        text = shapes.repeated_text()
        path = f"{folder}/repeated_data.json"
        put_text(remote, path, text)
        console.print(f"dataset {path}: {shapes.records} records ({len(shapes.unique())} x {repeat}), "
                      f"images in {folder}/images")
        return path, ft._sha(text + specs)

    def extra(host: HostInfo, p: TrainParams) -> dict[str, Any]:
        return {"visual_encoder_path": clip_path, "projector_path": proj_path,
                "image_folder_path": host.expand(image_folder) if image_folder else folder,
                "evaluation_image_path": eval_image,
                "on_cpu": p.on_cpu, **VISUAL_LORA}

    def answer(r: _Run, latest: str, llava_dir: str) -> tuple[str, str | None]:
        t = time.monotonic()
        done = ft.read_json(r.remote, f"{llava_dir}/{READY_MARKER}")
        if done is not None and done.get("run") == r.run_fp and done.get("checkpoint") == latest:
            r.skipped.append("answer")
            r.console.print(f"{llava_dir} already answered from {latest}: skipped")
            return llava_dir, done.get("answer")
        argv = [r.py, f"{r.scripts}/llava_answer.py", r.model_path, "--visual-encoder", clip_path, "--llava",
                llava_dir, "--image", eval_image, "--prompt", QUESTION, "--max-new-tokens",
                "16" if r.where == "cpu" else "64"]
        ft.run_step(r.remote, r.service(argv, "answer"), r.console, what="the answer about the image")
        out = services.logs(r.remote, f"{NAME}-answer", lines=50).splitlines()
        result = next((json.loads(line) for line in reversed(out) if line.startswith('{"answer"')), None)
        if result is None:
            raise FinetuneError("the answer step printed no answer:\n" + "\n".join(out[-15:]))
        put_text(r.remote, f"{llava_dir}/{READY_MARKER}", json.dumps({
            "run": r.run_fp, "checkpoint": latest, "answer": result["answer"], "image": eval_image,
            "question": QUESTION, "visual_encoder": clip_path, "projector": proj_path, "base": r.model_path,
            "answered": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, ensure_ascii=False) + "\n")
        r.timings["answer"] = time.monotonic() - t
        return llava_dir, str(result["answer"])

    return Job(
        name=NAME, fab_task=NAME, stage="llava_finetune",
        course_config="configs/llama3-llava/llava_llama3_8b_instruct_qlora_clip_vit_large_p14_336_lora_e1_finetune.py",
        config_name="llava_llama3_8b_instruct_qlora_clip_vit_large_p14_336_lora_e1_finetune",
        params=replace(params, max_length=CONTEXT - image_tokens), merged_name="", system="",
        evaluation_inputs=(QUESTION,), dataset_format="json", dataset_map_fn="llava_map_fn",
        prepare_data=prepare, template="xtuner_llava.py.j2", config_extra=extra,
        adapter_check="llm_adapter/adapter_config.json", final=answer, final_step="answer",
    )


# fab llava-finetune and `python -m llama3_ops.stages.llava_finetune --local` take these.
OPTIONS: tuple[Opt, ...] = (
    Opt("visual_encoder", None, f"the CLIP vision model on the host (default: ~/model/{CLIP_NAME}, beside the model)"),
    Opt("projector", None, f"the pretrained projector .pth on the host (default: ~/model/{PROJECTOR_NAME})"),
    Opt("repeat", COURSE_REPEAT, "copies of the bundle's six image conversations (the course's repeat.py -n)"),
    Opt("data", None, "your own LLaVA-format JSON on the host (with --image-folder and --image)"),
    Opt("image_folder", None, "the folder --data's image paths are relative to, on the host"),
    Opt("image", None, "the picture the final answer is about, on the host (with --data)"),
    *[o if o.name != "until" else replace(o, choices=("train", "convert", "answer"), default="answer")
      for o in ft.job_options(cpu_iters=4)],
)


def llava_finetune_from(remote: Remote, v: Any, console: Console | None = None) -> FinetuneResult:
    """``fab llava-finetune`` with :data:`OPTIONS`' values."""
    try:
        params = COURSE_LLAVA.short(v.max_iters) if v.max_iters else COURSE_LLAVA
    except ConfigError as exc:
        raise FinetuneError(str(exc)) from exc
    job = llava_job(remote, visual_encoder=v.visual_encoder, projector=v.projector, data=v.data,
                    image_folder=v.image_folder, image=v.image, repeat=v.repeat, params=params, env_bin=v.env)
    return ft.run(remote, job, base_model=v.base_model, device=v.device, cpu_iters=v.cpu_iters, env_bin=v.env,
                  console=console, until=v.until)


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """``python -m llama3_ops.stages.llava_finetune --local [options]`` (the device run)."""
    a = ft.local_parser("python -m llama3_ops.stages.llava_finetune", NAME, OPTIONS).parse_args(argv)
    return ft.local_main(a.json, lambda remote, con: llava_finetune_from(remote, a, con))


__all__: Sequence[str] = ("COURSE_LLAVA", "OPTIONS", "llava_finetune_from", "llava_job", "main")

if __name__ == "__main__":
    sys.exit(main())
