"""Load a merged model and answer one question (runs on the host, llama3 env).

The fine-tune stage marks a merged model ready only after this script has loaded the tokenizer and
the weights from the new directory and generated an answer with the Llama 3 chat template. It
prints one JSON line: the answer, the parameter count and the dtype.

Usage: python check_merged.py MODEL_DIR --question Q [--system S] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--question", required=True)
    ap.add_argument("--system", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok: Any = AutoTokenizer.from_pretrained(args.model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(
        args.model_dir, torch_dtype=torch.float16 if device == "cuda" else torch.float32
    )
    model = model.to(device)
    model.eval()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.question})
    ids: Any = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").to(device)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=False,
            eos_token_id=[t for t in (tok.eos_token_id, eot) if t is not None],
            pad_token_id=tok.eos_token_id,
        )
    answer = tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip()
    print(json.dumps({
        "answer": answer,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": device,
    }, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
