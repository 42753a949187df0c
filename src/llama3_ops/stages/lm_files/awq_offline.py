"""W4A16 AWQ quantization with lmdeploy's own ``auto_awq``, calibrated without the network.

Runs on the course host with the lmdeploy environment's python (``fab quantize`` uploads it)::

    python awq_offline.py MODEL OUT [--calib pydoc | --calib file:PATH | --calib lmdeploy:NAME]
        [--calib-samples 128] [--calib-seqlen 1024] [--w-bits 4] [--w-group-size 128]
        [--batch-size 1] [--device cuda] [--force]

Why a wrapper: ``lmdeploy lite auto_awq --calib-dataset ptb`` (the course command) downloads ptb from
the Hugging Face Hub, and lmdeploy 0.12+ no longer accepts ``ptb`` at all. Every dataset lmdeploy
knows (wikitext2, c4, pileval, ...) needs the Hub or a pre-filled ``datasets`` cache, and there is no
local-file option in either 0.4.1 or 0.18. So this script replaces
``lmdeploy.lite.apis.calibrate.get_calib_loaders`` with a loader over local text, with the same
sampling rule as lmdeploy's wikitext2 loader (random windows of ``seqlen`` tokens from the whole
tokenised text, ``random.seed(seed)``), in the return shape that the installed version's
``calibrate()`` expects (0.4.1: ``(list of (input, target), test_enc)``; 0.18: ``list of input``).
Then it calls lmdeploy's real ``auto_awq``.

Calibration sources:

* ``pydoc`` (default): the Python Language Reference text that every CPython ships as
  ``pydoc_data.topics`` (about 465 kB, ~110k Llama 3 tokens): in the env's own stdlib, so it is
  always there, offline.
* ``file:PATH``: any UTF-8 text file (``fab quantize --calib-file`` uploads one).
* ``lmdeploy:NAME``: lmdeploy's own loader for NAME, unchanged (needs the Hub, a mirror via
  HF_ENDPOINT, or a cache filled beforehand with HF_DATASETS_OFFLINE=1).

The output is written to ``OUT.partial`` and renamed to ``OUT`` only when lmdeploy finished and the
result has a ``quantization_config``; ``OUT/.llama3-ops-awq.json`` marks it complete. Progress lines
start with ``@@llama3-ops`` followed by JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = ".llama3-ops-awq.json"
PROGRESS = "@@llama3-ops"
# calib_dataset names each lmdeploy version's calibrate() asserts on (read from their sources).
LMDEPLOY_041_DATASETS = ("c4", "ptb", "wikitext2", "pileval")
LMDEPLOY_018_DATASETS = ("wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus",
                         "openwebtext")
# The name passed to calibrate() when our loader is injected: accepted by 0.4.1 and 0.18 alike and
# never loaded (our get_calib_loaders ignores it).
INJECTED_NAME = "wikitext2"


class CalibrationError(RuntimeError):
    pass


def emit(phase: str, **data: Any) -> None:
    print(f"{PROGRESS} {json.dumps({'phase': phase, **data}, sort_keys=True)}", flush=True)


def pydoc_text() -> str:
    """The Python Language Reference topics shipped with every CPython (``pydoc_data.topics``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data out
        raise CalibrationError(
            f"this Python ({sys.executable}) has no pydoc_data module; pass a text file instead "
            "(fab quantize --calib-file FILE)"
        ) from exc
    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str) -> tuple[str, str]:
    """``(text, description)`` for a ``pydoc`` or ``file:PATH`` calibration source."""
    if source == "pydoc":
        return pydoc_text(), "pydoc_data.topics of " + sys.executable
    if source.startswith("file:"):
        path = Path(source[5:]).expanduser()
        if not path.is_file():
            raise CalibrationError(f"calibration text file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"calibration text file {path} is not UTF-8 text: {exc}") from exc
        return text, str(path)
    raise CalibrationError(f"unknown calibration source {source!r}: use pydoc, file:PATH or lmdeploy:NAME")


def sample_windows(input_ids: Any, nsamples: int, seqlen: int, seed: int = 0) -> list[Any]:
    """``nsamples`` windows ``[1, seqlen]`` of ``input_ids`` (``[1, N]``), lmdeploy's wikitext2 rule."""
    total = int(input_ids.shape[1])
    if total < seqlen:
        raise CalibrationError(
            f"the calibration text is {total} tokens long, shorter than one sample of --calib-seqlen "
            f"{seqlen}: use a longer text or a smaller seqlen"
        )
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        i = rng.randint(0, total - seqlen)
        windows.append(input_ids[:, i : i + seqlen])
    return windows


def loader_returns_tuple(calibrate_fn: Callable[..., Any]) -> bool:
    """Does this lmdeploy's ``calibrate()`` unpack ``(loader, test_data)`` (0.4.x) or take a list (0.18)?"""
    src = inspect.getsource(calibrate_fn)
    if re.search(r"calib_loader\s*,\s*_\s*=\s*get_calib_loaders\(", src):
        return True
    if re.search(r"calib_loader\s*=\s*get_calib_loaders\(", src):
        return False
    raise CalibrationError(
        "cannot tell how this lmdeploy's calibrate() calls get_calib_loaders (neither "
        "'calib_loader, _ = get_calib_loaders(' nor 'calib_loader = get_calib_loaders(' in its source)"
    )


def make_loader(text: str, tuple_form: bool, stats: dict[str, Any]) -> Callable[..., Any]:
    """A drop-in for lmdeploy's ``get_calib_loaders(name, tokenizer, nsamples, seed, seqlen)``."""

    def get_calib_loaders(name: str, tokenizer: Any, nsamples: int = 128, seed: int = 0,
                          seqlen: int = 2048) -> Any:
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        windows = sample_windows(input_ids, nsamples, seqlen, seed)
        stats.update(tokens=int(input_ids.shape[1]), samples=len(windows), seqlen=seqlen, seed=seed)
        emit("calibration-data", tokens=stats["tokens"], samples=len(windows), seqlen=seqlen)
        if tuple_form:
            pairs = []
            for inp in windows:
                tar = inp.clone()
                tar[:, :-1] = -100
                pairs.append((inp, tar))
            return pairs, None
        return windows

    return get_calib_loaders


def _version() -> str:
    import lmdeploy

    return str(getattr(lmdeploy, "__version__", "unknown"))


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_dataset_name(name: str, version: str) -> None:
    """Refuse names the installed lmdeploy's calibrate() would reject (lists read from 0.4.1 and 0.18)."""
    v = _version_tuple(version)
    allowed = LMDEPLOY_041_DATASETS if v < (0, 5) else LMDEPLOY_018_DATASETS if v >= (0, 18) else None
    if allowed is not None and name not in allowed:
        hint = " (ptb needs the Hub and newer lmdeploy dropped it)" if name == "ptb" else ""
        raise CalibrationError(
            f"lmdeploy {version} accepts the calibration sets {', '.join(allowed)}, not {name!r}{hint}; "
            "for offline work use --calib pydoc or file:PATH"
        )


def _patch_progress(auto_awq_module: Any) -> None:
    """Phase lines around lmdeploy's smoothing and packing steps (module globals of auto_awq)."""
    for fn_name, phase in (("smooth_layers", "smooth"), ("quant_weights", "quantize")):
        orig = getattr(auto_awq_module, fn_name, None)
        if orig is None:
            continue

        def wrapped(*args: Any, _orig: Callable[..., Any] = orig, _phase: str = phase, **kwargs: Any) -> Any:
            count = len(args[1]) if _phase == "quantize" and len(args) > 1 else None
            emit(_phase, linears=count)
            return _orig(*args, **kwargs)

        setattr(auto_awq_module, fn_name, wrapped)


def _check_output(work: Path, w_bits: int, group: int) -> dict[str, Any]:
    cfg_path = work / "config.json"
    if not cfg_path.is_file():
        raise CalibrationError(f"lmdeploy finished but wrote no config.json in {work}")
    qcfg = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "awq" or qcfg.get("bits") != w_bits or qcfg.get("group_size") != group:
        raise CalibrationError(f"unexpected quantization_config in {cfg_path}: {qcfg}")
    weights = [p.name for p in work.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise CalibrationError(f"lmdeploy finished but wrote no weight files in {work}")
    return {"quantization_config": qcfg, "weights": sorted(weights)}


def quantize(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().resolve()
    model = str(Path(args.model).expanduser().resolve())
    marker = out / MARKER
    if marker.is_file() and not args.force:
        emit("done", already=True, out=str(out))
        print(f"{out} is already quantized ({MARKER} present); --force makes it again", flush=True)
        return 0
    if out.exists() and not marker.is_file() and not args.force:
        raise CalibrationError(
            f"{out} exists but is not a finished llama3-ops quantization (no {MARKER}): move it away, "
            "or pass --force to replace it"
        )
    if not (Path(model) / "config.json").is_file():
        raise CalibrationError(f"{model} has no config.json: not a Hugging Face model directory")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)

    t0 = time.monotonic()
    emit("load", model=model)
    import lmdeploy.lite.apis.auto_awq as awq_mod
    import lmdeploy.lite.apis.calibrate as cal_mod

    version = _version()
    calib: dict[str, Any] = {"source": args.calib}
    name = INJECTED_NAME
    if args.calib.startswith("lmdeploy:"):
        name = args.calib.split(":", 1)[1]
        check_dataset_name(name, version)
    else:
        text, described = load_text(args.calib)
        calib.update(description=described, sha256=hashlib.sha256(text.encode()).hexdigest(), chars=len(text))
        cal_mod.get_calib_loaders = make_loader(text, loader_returns_tuple(cal_mod.calibrate), calib)
    _patch_progress(awq_mod)

    params = inspect.signature(awq_mod.auto_awq).parameters
    kwargs: dict[str, Any] = {
        "work_dir": str(partial),
        "calib_dataset": name,
        "calib_samples": args.calib_samples,
        "calib_seqlen": args.calib_seqlen,
        "w_bits": args.w_bits,
        "w_sym": False,
        "w_group_size": args.w_group_size,
        "device": args.device,
    }
    if "batch_size" in params:
        kwargs["batch_size"] = args.batch_size
    elif args.batch_size != 1:
        raise CalibrationError(f"lmdeploy {version}'s auto_awq has no batch_size (it runs one sample at a time)")
    if "dtype" in params:
        # lmdeploy 0.4.1 always loads float16 for AWQ; 0.18's "auto" would keep the checkpoint's bf16,
        # which TurboMind's W4A16 kernels do not take.
        kwargs["dtype"] = args.dtype
    awq_mod.auto_awq(model, **kwargs)

    emit("save", out=str(out))
    result = _check_output(partial, args.w_bits, args.w_group_size)
    info = {
        "source_model": model,
        "lmdeploy": version,
        "calibration": calib,
        "calib_samples": args.calib_samples,
        "calib_seqlen": args.calib_seqlen,
        "w_bits": args.w_bits,
        "w_group_size": args.w_group_size,
        "seconds": round(time.monotonic() - t0, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **result,
    }
    (partial / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old)
    emit("done", out=str(out), seconds=info["seconds"])
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="AWQ W4A16 with lmdeploy's auto_awq and offline calibration")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--calib", default="pydoc", help="pydoc | file:PATH | lmdeploy:NAME")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--w-group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "auto"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return quantize(args)
    except CalibrationError as exc:
        emit("error", message=str(exc))
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
