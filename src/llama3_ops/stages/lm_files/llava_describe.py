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


def pin_pil_image_processor() -> bool:
    """Make lmdeploy's transformers-format LLaVA load the PIL image processor under transformers >= 5.

    lmdeploy 0.18's ``LlavaHfVisionModel.preprocess`` calls the image processor on a PIL image with
    ``input_data_format='channels_last'``. transformers 5 loads the torchvision backend by default
    where torchvision is installed, and that backend then normalizes the wrong axis ("The size of
    tensor a (640) must match the size of tensor b (3)"): the request fails and the pipeline returns
    an empty answer. The PIL backend (transformers 4's processor) handles that call. Returns whether
    the patch was applied.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return False
    try:
        from lmdeploy.vl.model import llava_hf
    except ImportError:
        return False
    real = llava_hf.AutoProcessor

    class PilAutoProcessor:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("backend", "pil")
            return real.from_pretrained(*args, **kwargs)

    llava_hf.AutoProcessor = PilAutoProcessor
    return True


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
    p.add_argument("--log-level", default="ERROR", help="lmdeploy's log level (ERROR, WARNING, INFO)")
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

    info["pil_image_processor"] = pin_pil_image_processor()
    t0 = time.monotonic()
    pipe = pipeline(args.model, backend_config=parts["backend_config"],
                    chat_template_config=parts["chat_template_config"], log_level=args.log_level)
    info["load_seconds"] = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    response = pipe((args.prompt, image), gen_config=parts["gen_config"])
    info["generate_seconds"] = round(time.monotonic() - t1, 1)
    info["text"] = response.text
    for key in ("generate_token_len", "input_token_len", "finish_reason"):
        info[key] = getattr(response, key, None)
    print(response.text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    close = getattr(pipe, "close", None)
    if callable(close):
        close()
    if info["finish_reason"] == "error" or not info["generate_token_len"]:
        print(f"lmdeploy returned no answer (finish_reason {info['finish_reason']!r}, "
              f"{info['generate_token_len']} tokens generated, {info['input_token_len']} prompt tokens); "
              "run again with --log-level INFO to see why", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
