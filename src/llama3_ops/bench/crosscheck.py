"""Cross-check our load generator against NVIDIA AIPerf on the same server and workload shape.

Both tools run the synthetic fixed-length workload (``input_len`` prompt tokens, ``output_len``
output tokens, ``ignore_eos`` when the server accepts it) at the same concurrency and request
count; we compare requests/s and output tokens/s (target: within 5 %). AIPerf writes its own
prompts (same token counts, its own corpus); per-request output lengths of ShareGPT cannot be
passed to its ``single_turn`` input format, hence the synthetic workload.

AIPerf is not a dependency: install it in its own venv
(``python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf``) and pass
``--aiperf /tmp/aiperf-venv/bin/aiperf``. Its result file is ``profile_export_aiperf.json``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console

from llama3_ops.bench.client import ClientConfig, check_server, probe_ignore_eos, run_load
from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.metrics import aggregate
from llama3_ops.bench.workload import synthetic_workload


def aiperf_command(
    aiperf: str,
    base_url: str,
    model: str,
    tokenizer_dir: Path,
    concurrency: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    artifact_dir: Path,
    ignore_eos: bool,
) -> list[str]:
    cmd = [
        aiperf, "profile", "--model", model, "--url", base_url, "--endpoint-type", "completions",
        "--streaming", "--concurrency", str(concurrency), "--request-count", str(num_prompts),
        "--prompt-input-tokens-mean", str(input_len), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(output_len), "--prompt-output-tokens-stddev", "0",
        "--tokenizer", str(tokenizer_dir), "--artifact-dir", str(artifact_dir), "--ui-type", "none",
        "--use-server-token-count",
    ]  # fmt: skip
    if ignore_eos:
        cmd += ["--extra-inputs", "ignore_eos:true"]
    return cmd


def parse_aiperf_export(path: Path) -> dict[str, Any]:
    """RPS, output tok/s, total tok/s, TTFT p50 (s), duration, count of ``profile_export_aiperf.json``."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read AIPerf result {path}: {exc}") from exc

    def avg(key: str) -> float | None:
        v = d.get(key)
        return float(v["avg"]) if isinstance(v, dict) and v.get("avg") is not None else None

    ttft = d.get("time_to_first_token") or {}
    return {
        "aiperf_version": d.get("aiperf_version"),
        "rps": avg("request_throughput"),
        "output_tok_s": avg("output_token_throughput"),
        "total_tok_s": avg("total_token_throughput"),
        "ttft_p50_s": float(ttft["p50"]) / 1000.0 if ttft.get("p50") is not None else None,
        "duration_s": avg("benchmark_duration"),
        "requests": avg("request_count"),
        "error_rate_pct": avg("request_error_rate"),
    }


def relative_diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return abs(a - b) / b


def crosscheck(
    *,
    base_url: str,
    model: str,
    tokenizer_dir: Path,
    concurrency: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    aiperf: str,
    out: Path,
    tolerance: float = 0.05,
    console: Console | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run ours then AIPerf; return both figures, the relative differences and the verdict."""
    console = console or Console()
    exe = shutil.which(aiperf) or (aiperf if Path(aiperf).is_file() else None)
    if exe is None:
        raise BenchError(f"aiperf not found: {aiperf!r} (install it in its own venv, see the module docs)")
    cfg = ClientConfig(base_url=base_url, model=model, progress=False)
    asyncio.run(check_server(cfg))
    cfg.ignore_eos, note = asyncio.run(probe_ignore_eos(cfg))
    wl = synthetic_workload(input_len, output_len, num_prompts)
    lr = asyncio.run(run_load(wl.requests, concurrency, cfg))
    ours = aggregate(lr.results, lr.wall_s)
    art = out / "aiperf"
    cmd = aiperf_command(exe, base_url, model, tokenizer_dir, concurrency, num_prompts, input_len, output_len,
                         art, cfg.ignore_eos)  # fmt: skip
    console.print("running: " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"aiperf did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"aiperf failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}")
    theirs = parse_aiperf_export(art / "profile_export_aiperf.json")
    d_rps = relative_diff(ours["rps"], theirs["rps"])
    d_tok = relative_diff(ours["output_tok_s"], theirs["output_tok_s"])
    ok = d_rps is not None and d_tok is not None and d_rps <= tolerance and d_tok <= tolerance
    return {
        "status": "complete",
        "workload": f"synthetic:{input_len}:{output_len}",
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "ignore_eos": note,
        "ours": {k: ours[k] for k in ("rps", "output_tok_s", "total_tok_s", "wall_s", "failed")}
        | {"ttft_p50_s": ours["ttft_s"]["p50"], "achieved_concurrency_max": ours["achieved_concurrency_max"]},
        "aiperf": theirs,
        "rel_diff_rps": d_rps,
        "rel_diff_output_tok_s": d_tok,
        "tolerance": tolerance,
        "within_tolerance": ok,
        "aiperf_command": cmd,
    }
