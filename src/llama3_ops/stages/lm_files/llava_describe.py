"""Describe an image with LLaVA-Llama-3 through lmdeploy's ``pipeline`` (``fab llava``).

Runs on the course host with the lmdeploy env's python::

    python llava_describe.py MODEL IMAGE [--prompt TEXT] [--backend turbomind|pytorch]
        [--chat-template NAME] [--session-len 8192] [--cache-max-entry-count F] [--max-new-tokens N]
        [--json OUT] [--dry-run]

IMAGE is a local path on the host or an http(s) URL (fetched by ``lmdeploy.vl.load_image``). The
course's version::

    pipe = pipeline('xtuner/llava-llama-3-8b-v1_1-hf', chat_template_config=ChatTemplateConfig(model_name='llama3'))
    print(pipe(('describe this image', load_image(URL))).text)

``--dry-run`` loads the image and builds every config object without starting the engine (it needs
no GPU), so the script is checked against the installed lmdeploy's API.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def build(args: argparse.Namespace) -> dict[str, Any]:
    from lmdeploy import ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig
    from lmdeploy.vl import load_image

    cfg_cls = TurbomindEngineConfig if args.backend == "turbomind" else PytorchEngineConfig
    engine_kw: dict[str, Any] = {"session_len": args.session_len}
    if args.cache_max_entry_count is not None:
        engine_kw["cache_max_entry_count"] = args.cache_max_entry_count
    image = load_image(args.image)
    return {
        "backend_config": cfg_cls(**engine_kw),
        "chat_template_config": ChatTemplateConfig(model_name=args.chat_template) if args.chat_template else None,
        "gen_config": GenerationConfig(max_new_tokens=args.max_new_tokens),
        "image": image,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Describe an image with LLaVA through lmdeploy's pipeline")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--backend", default="turbomind", choices=["turbomind", "pytorch"])
    p.add_argument("--chat-template", default=None, help="an lmdeploy template name (0.4.1: llama3)")
    p.add_argument("--session-len", type=int, default=8192)
    p.add_argument("--cache-max-entry-count", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)

    import lmdeploy

    parts = build(args)
    image = parts.pop("image")
    info: dict[str, Any] = {"lmdeploy": lmdeploy.__version__, "model": args.model, "image": args.image,
                            "image_size": list(image.size), "prompt": args.prompt, "backend": args.backend,
                            "engine_config": repr(parts["backend_config"])}
    if args.dry_run:
        print(json.dumps(info), flush=True)
        return 0
    from lmdeploy import pipeline

    t0 = time.monotonic()
    pipe = pipeline(args.model, backend_config=parts["backend_config"],
                    chat_template_config=parts["chat_template_config"], log_level="ERROR")
    info["load_seconds"] = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    response = pipe((args.prompt, image), gen_config=parts["gen_config"])
    info["generate_seconds"] = round(time.monotonic() - t1, 1)
    info["text"] = response.text
    info["generate_token_len"] = getattr(response, "generate_token_len", None)
    print(response.text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    close = getattr(pipe, "close", None)
    if callable(close):
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
