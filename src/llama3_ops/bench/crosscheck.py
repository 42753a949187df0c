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
import os
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
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    cmd = [
        aiperf, "profile", "--model", model, "--url", base_url, "--endpoint-type", "completions",
        "--streaming", "--concurrency", str(concurrency), "--request-count", str(num_prompts),
        "--prompt-input-tokens-mean", str(input_len), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(output_len), "--prompt-output-tokens-stddev", "0",
        "--tokenizer", str(tokenizer_dir), "--artifact-dir", str(artifact_dir), "--ui-type", "none",
        "--use-server-token-count",
    ]  # fmt: skip
    # The same sampling as our client sends: without it the server uses the model's generation_config
    # (Llama 3 Instruct: temperature 0.6, top-p 0.9), and a top-p sort over 128k logits per token made
    # AIPerf's requests 2.5x slower on transformers serve than ours (RPS 3.66 vs 9.26 on this 2-core
    # machine; with the same sampling: 9.34 vs 9.89).
    cmd += ["--extra-inputs", f"temperature:{temperature}", f"top_p:{top_p}"]
    if ignore_eos:
        cmd += ["ignore_eos:true"]
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
    bracket: bool = False,
) -> dict[str, Any]:
    """Run ours then AIPerf; return both figures, the relative differences and the verdict.

    ``bracket``: run ours again after AIPerf and compare AIPerf with the mean of our two runs, for a
    real server whose speed drifts between runs; the spread of our two runs is recorded beside it.
    """
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
                         art, cfg.ignore_eos, cfg.temperature, cfg.top_p)  # fmt: skip
    console.print("running: " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"aiperf did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"aiperf failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}")
    theirs = parse_aiperf_export(art / "profile_export_aiperf.json")
    runs = [ours]
    if bracket:
        again = asyncio.run(run_load(wl.requests, concurrency, cfg))
        runs.append(aggregate(again.results, again.wall_s))
    mean_rps = sum(r["rps"] for r in runs) / len(runs)
    mean_tok = sum(r["output_tok_s"] for r in runs) / len(runs)
    d_rps = relative_diff(mean_rps, theirs["rps"])
    d_tok = relative_diff(mean_tok, theirs["output_tok_s"])
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
        "ours_after": ({k: runs[1][k] for k in ("rps", "output_tok_s", "wall_s", "failed")}
                       | {"ttft_p50_s": runs[1]["ttft_s"]["p50"]}) if bracket else None,
        "ours_spread_rps": relative_diff(max(r["rps"] for r in runs), min(r["rps"] for r in runs)),
        "compared": "mean of ours before and after AIPerf" if bracket else "ours",
        "rel_diff_rps": d_rps,
        "rel_diff_output_tok_s": d_tok,
        "tolerance": tolerance,
        "within_tolerance": ok,
        "aiperf_command": cmd,
    }


# (tokens/s per request, output tokens, concurrency, requests) for the stand-in cases.
STANDIN_CASES: tuple[tuple[float, int, int, int], ...] = (
    (20.0, 40, 8, 128),  # 160 SSE events/s, 2 s per request, ~32 s
    (20.0, 40, 64, 1024),  # 1,280 events/s, ~32 s
    (100.0, 100, 64, 1920),  # 6,400 events/s: the tools' own CPU cost shows here, ~30 s
)


def crosscheck_local(aiperf: str, out: Path, console: Console | None = None) -> dict[str, Any]:
    """Cross-check on this machine: the fixed-rate stand-in and a real ``transformers serve``.

    The stand-in (100 tok/s per request) isolates the load generators; ``transformers serve`` with
    the tiny Llama-3-shaped model (real tokenizer) is a real server whose speed varies run to run.
    """
    from llama3_ops.bench.report import provenance
    from llama3_ops.bench.standin import standin_process, transformers_serve_process
    from llama3_ops.checkpoint import make_checkpoint

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    model = make_checkpoint(out / "tiny-model", "tiny")
    cases: list[dict[str, Any]] = []
    # The stand-in's answer is known: each request streams OUT tokens at RATE tok/s, the first at once,
    # so a closed loop of C requests in flight gives at most C x RATE / (OUT - 1) requests/s. Each case
    # runs ~30 s, so start-up and drain (AIPerf starts several processes) are a small share of it; the
    # event rate (C x RATE SSE events/s) is what a 2-core machine shared by server and client can carry.
    for rate, out_len, conc, n in STANDIN_CASES:
        with standin_process(tokens_per_s=rate) as base:
            console.rule(f"stand-in {rate:g} tok/s, {out_len} tokens, concurrency {conc}")
            res = crosscheck(base_url=base, model="standin", tokenizer_dir=model, concurrency=conc,
                             num_prompts=n, input_len=128, output_len=out_len, aiperf=aiperf,
                             out=out / f"standin-r{rate:g}-c{conc}", console=console)  # fmt: skip
        ideal = conc * rate / (out_len - 1)  # the first token comes at once, then one per 1/RATE s
        res["ideal_rps"] = ideal
        res["ours_vs_ideal"] = res["ours"]["rps"] / ideal
        res["aiperf_vs_ideal"] = (res["aiperf"]["rps"] or 0.0) / ideal
        res["sse_events_per_s"] = conc * rate
        cases.append({"server": f"standin ({rate:g} tok/s per request)"} | res)
    # transformers serve is CPU-bound, and AIPerf's own processes take about one core (measured here:
    # 0.96 cores on average over a run): sharing cores, the server would run slower under AIPerf than
    # under our client, and the comparison would be about the server. So the server gets core 0 and
    # both load generators (this process, and AIPerf, which inherits its affinity) the others.
    all_cpus = os.sched_getaffinity(0)
    server_cpus = {min(all_cpus)} if len(all_cpus) >= 2 else None
    with transformers_serve_process(str(model), timeout_s=600, cpus=server_cpus) as base:
        console.rule("transformers serve, tiny model, concurrency 4")
        if server_cpus:
            os.sched_setaffinity(0, all_cpus - server_cpus)
        try:
            res = crosscheck(base_url=base, model=str(model), tokenizer_dir=model, concurrency=4,
                             num_prompts=192, input_len=128, output_len=32, aiperf=aiperf, out=out / "tserve-c4",
                             console=console, bracket=True)  # fmt: skip
        finally:
            os.sched_setaffinity(0, all_cpus)
        res["cpu_split"] = {"server": sorted(server_cpus), "load_generators": sorted(all_cpus - server_cpus)} \
            if server_cpus else None
        cases.append({"server": "transformers serve (CPU, tiny model)"} | res)
    return {
        "kind": "crosscheck",
        "provenance": provenance(),
        # Both tools share this machine's cores with the server: a busy machine starves the heavier
        # one (AIPerf runs several worker processes) and the comparison stops being about the tools.
        "load_avg_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "cases": cases,
        "all_within_tolerance": all(c["within_tolerance"] for c in cases),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from llama3_ops.bench.report import write_json_atomic

    ap = argparse.ArgumentParser(prog="python -m llama3_ops.bench.crosscheck", description=crosscheck_local.__doc__)
    ap.add_argument("--aiperf", required=True, help="aiperf executable")
    ap.add_argument("--out", required=True, help="result JSON path")
    args = ap.parse_args(argv)
    out = Path(args.out)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llama3-crosscheck-") as work:
        res = crosscheck_local(args.aiperf, Path(work))
    write_json_atomic(out, res)
    for c in res["cases"]:
        print(f"{c['server']:40s} c={c['concurrency']:<3d} ours {c['ours']['rps']:.3f} RPS "
              f"{c['ours']['output_tok_s']:.1f} tok/s | aiperf {c['aiperf']['rps']:.3f} RPS "
              f"{c['aiperf']['output_tok_s']:.1f} tok/s | diff {c['rel_diff_rps']:.1%} / "
              f"{c['rel_diff_output_tok_s']:.1%}"
              + (f" | ideal {c['ideal_rps']:.2f} RPS" if "ideal_rps" in c else ""))  # fmt: skip
    return 0 if res["all_within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
