"""Cross-check our load generator against NVIDIA AIPerf on the same server and workload shape.

Both tools run the synthetic fixed-length workload (``input_len`` prompt tokens, ``output_len``
output tokens, ``ignore_eos`` when the server accepts it) at the same concurrency and request
count; we compare requests/s and output tokens/s (target: within 5 %). AIPerf writes its own
prompts (same token counts, its own corpus); per-request output lengths of ShareGPT cannot be
passed to its ``single_turn`` input format, hence the synthetic workload. AIPerf's
``--prompt-input-tokens-mean N`` includes the BOS its tokenizer adds; our prompts are N - 1 text
tokens, so the server counts N for both (recorded from each tool's ``usage``).

What can make the two differ besides the tools, and what is recorded against it:

* a server whose speed drifts (a CPU-bound ``transformers serve`` on a shared VM): several rounds,
  alternating the tools, and the throughputs rescaled to the server's median CPU time per request;
* a load generator's own CPU cost on a small machine (AIPerf runs several processes): the CPU
  seconds each tool used, and against the fixed-rate stand-in, each tool against the known ideal;
* other processes: the busy cores before every run (``BUSY_CORES`` makes a verdict inconclusive).

A run of either tool with a failed request ends the cross-check at once: its verdict is
``failed_requests`` (never a pass), with the count and the most common reasons.

AIPerf is not a dependency: install it in its own venv
(``python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf``) and pass
``--aiperf /tmp/aiperf-venv/bin/aiperf``. Its result file is ``profile_export_aiperf.json``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from llama3_ops.bench.client import ClientConfig, check_server, probe_ignore_eos, run_load
from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.metrics import aggregate
from llama3_ops.bench.report import COMPLETE, COMPLETE_WITH_FAILURES, say
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
        # Neither is measured here, and each is an optional AIPerf service: on a loaded 2-core machine one
        # missed its heartbeats, AIPerf dropped it and then failed the run for the missing share (CI, 2026-12-04).
        "--no-server-metrics", "--no-gpu-telemetry",
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
        "server_prompt_tokens_avg": avg("usage_prompt_tokens"),  # as the server's usage counts them
    }


def relative_diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return abs(a - b) / b


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far one tool's repeated runs on the same server moved."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else math.inf


# A machine whose other processes keep this many cores busy while nothing of ours runs is too busy
# for the comparison: both tools and the server share its cores.
BUSY_CORES = 0.3


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, total) jiffies summed over all CPUs, and the CPU count, from /proc/stat; None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    f = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
    ncpu = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    return busy, sum(f), ncpu


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by every process on the machine over ``seconds`` (call it while ours are idle)."""
    a = _cpu_ticks()
    time.sleep(seconds)
    b = _cpu_ticks()
    if a is None or b is None or b[1] == a[1]:
        return None
    return round((b[0] - a[0]) / (b[1] - a[1]) * b[2], 3)


def machine_load(settle_s: float = 0.5, probe_s: float = 1.0) -> dict[str, Any]:
    """Foreign load before a run: busy cores while the server and both tools are idle, and loadavg."""
    time.sleep(settle_s)  # let the server's threads go idle after the previous run
    return {"busy_cores": busy_cores(probe_s), "loadavg_1m": round(os.getloadavg()[0], 2)}


def verdict(
    ours: Sequence[float], theirs: Sequence[float], tolerance: float
) -> tuple[str, float | None, float, float]:
    """Compare medians of repeated runs: ("agree" | "disagree" | "inconclusive", diff, spreads).

    The difference is relative to AIPerf's median. A tool whose own runs spread by more than the
    tolerance cannot confirm or refute agreement within it: "inconclusive".
    """
    diff = relative_diff(statistics.median(ours), statistics.median(theirs))
    s_ours, s_theirs = spread(ours), spread(theirs)
    if diff is None:
        return "inconclusive", None, s_ours, s_theirs
    if max(s_ours, s_theirs) > tolerance:
        return "inconclusive", diff, s_ours, s_theirs
    return ("agree" if diff <= tolerance else "disagree"), diff, s_ours, s_theirs


FAILED_REQUESTS = "failed_requests"


def combine(verdicts: Sequence[str], busy: bool) -> str:
    """One verdict from the per-metric ones; failed requests fail it, a busy machine makes it inconclusive."""
    if FAILED_REQUESTS in verdicts:
        return FAILED_REQUESTS
    if busy or "inconclusive" in verdicts:
        return "inconclusive"
    return "disagree" if "disagree" in verdicts else "agree"


def added_special_tokens(tokenizer_dir: Path | None = None) -> int:
    """How many tokens the tokenizer adds to a prompt (Llama 3: BOS, 1).

    AIPerf's ``--prompt-input-tokens-mean N`` counts them (N - 1 words + BOS); our workloads count
    text tokens only (as lmdeploy's profile_throughput), so our prompts get N minus these.
    """
    from llama3_ops.bench.workload import load_tokenizer

    path = tokenizer_dir / "tokenizer.json" if tokenizer_dir else None
    tok, _ = load_tokenizer(path if path and path.is_file() else None)
    with_special = tok.encode("hello", add_special_tokens=True).ids
    return len(with_special) - len(tok.encode("hello", add_special_tokens=False).ids)


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) a live process has used; None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delta(after: float | None, before: float | None) -> float | None:
    return round(after - before, 3) if after is not None and before is not None else None


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_aiperf(cmd: list[str], timeout_s: float) -> float:
    """Run AIPerf; return the CPU seconds it and its worker processes used."""
    before = _children_cpu_s()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"aiperf did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"aiperf failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}")
    return round(_children_cpu_s() - before, 3)


def at_median_server_speed(runs: Sequence[dict[str, Any]], key: str) -> list[float] | None:
    """Each run's ``key`` rescaled to the server's median CPU seconds per request over all runs.

    A CPU-bound server's speed drifts on a shared VM (its CPU time per request moved by 25 % within
    minutes here); the tool's throughput times the server's CPU time per request is the share of the
    run the server spent on it, which drift does not move, and which a load generator that fails to
    keep the server busy, or mismeasures wall time, lowers.
    """
    per_req = [r.get("server_cpu_s_per_request") or 0.0 for r in runs]
    if min(per_req, default=0.0) <= 0:
        return None
    med = statistics.median(per_req)
    return [float(r[key] or 0.0) * c / med for r, c in zip(runs, per_req, strict=True)]


def aiperf_failures(theirs: dict[str, Any], num_prompts: int) -> dict[str, Any] | None:
    """AIPerf's failed requests (its error rate, or fewer requests than asked for), or None."""
    done = int(theirs.get("requests") or 0)
    rate = float(theirs.get("error_rate_pct") or 0.0)
    if rate <= 0 and done >= num_prompts:
        return None
    failed = max(num_prompts - done, round(num_prompts * rate / 100))
    reason = f"AIPerf error rate {rate:g} %, {done} of {num_prompts} requests counted"
    return {"failed": failed, "requests": num_prompts, "reasons": [{"reason": reason, "count": failed}]}


def failed_requests_result(
    tool: str, round_no: int, failures: dict[str, Any], base: dict[str, Any]
) -> dict[str, Any]:
    """The cross-check's result when a run of ``tool`` had failed requests: not a pass, and says why."""
    lines = [f"crosscheck: {tool}'s run {round_no} had {failures['failed']} of {failures['requests']} "
             "requests failed: not a pass"]
    lines += [f"  {r['count']:>5} x {r['reason']}" for r in failures["reasons"][:5]]
    return base | {
        "status": COMPLETE_WITH_FAILURES,
        "verdict": FAILED_REQUESTS,
        "within_tolerance": False,
        "failed_requests": {"tool": tool, "round": round_no, **failures, "lines": lines},
        "metrics": {},
        "judged_on": [],
        "busy_machine": False,
    }


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
    rounds: int = 1,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Run ours and AIPerf alternately ``rounds`` times (ours, AIPerf, ours, AIPerf, ...); compare medians.

    Every run records the CPU seconds the tool used and, with ``server_pid`` (a server on this
    machine), the server's. Each tool's spread over the rounds is recorded; a spread over the
    tolerance, or foreign CPU load before any run (``BUSY_CORES``), makes a verdict "inconclusive"
    rather than a pass or a fail. With ``server_pid`` and several rounds the verdict is taken on the
    throughputs rescaled to the server's median speed (:func:`at_median_server_speed`); the raw
    medians are recorded beside it. ``within_tolerance`` is verdict == "agree".
    """
    if rounds < 1:
        raise BenchError("rounds must be >= 1")
    console = console or Console()
    exe = shutil.which(aiperf) or (aiperf if Path(aiperf).is_file() else None)
    if exe is None:
        raise BenchError(f"aiperf not found: {aiperf!r} (install it in its own venv, see the module docs)")
    cfg = ClientConfig(base_url=base_url, model=model, progress=False)
    asyncio.run(check_server(cfg))
    cfg.ignore_eos, note = asyncio.run(probe_ignore_eos(cfg))
    ours_len = input_len - added_special_tokens(tokenizer_dir)
    wl = synthetic_workload(ours_len, output_len, num_prompts)
    ours_runs: list[dict[str, Any]] = []
    theirs_runs: list[dict[str, Any]] = []
    cmd: list[str] = []
    base = {"workload": f"synthetic:{input_len}:{output_len}", "concurrency": concurrency,
            "num_prompts": num_prompts, "rounds": rounds, "ignore_eos": note, "tolerance": tolerance,
            "ours_runs": ours_runs, "aiperf_runs": theirs_runs}  # fmt: skip

    def server_cost(before: float | None, requests: float | None) -> dict[str, Any]:
        used = _delta(process_cpu_s(server_pid), before)
        per_req = used / requests if used is not None and requests else None
        return {"server_cpu_s": used, "server_cpu_s_per_request": per_req}

    for i in range(rounds):
        load = machine_load()
        srv0, own0 = process_cpu_s(server_pid), time.process_time()
        lr = asyncio.run(run_load(wl.requests, concurrency, cfg))
        own = round(time.process_time() - own0, 3)
        m = aggregate(lr.results, lr.wall_s)
        prompt_toks = [r.server_prompt_tokens for r in lr.results if r.server_prompt_tokens is not None]
        ours_runs.append(
            {k: m[k] for k in ("rps", "output_tok_s", "total_tok_s", "wall_s", "failed", "achieved_concurrency_max")}
            | {"ttft_p50_s": m["ttft_s"]["p50"], "itl_p50_s": m["itl_s"]["p50"],
               "server_prompt_tokens_p50": statistics.median(prompt_toks) if prompt_toks else None,
               "tool_cpu_s": own, "load_before": load}
            | server_cost(srv0, len(lr.results))
        )  # fmt: skip
        if m["failed"]:
            ours_failed = {"failed": m["failed"], "requests": m["requests"], "reasons": m["failure_reasons"]}
            return failed_requests_result("ours", i + 1, ours_failed, base)
        art = out / "aiperf" / f"round{i}" if rounds > 1 else out / "aiperf"
        cmd = aiperf_command(exe, base_url, model, tokenizer_dir, concurrency, num_prompts, input_len, output_len,
                             art, cfg.ignore_eos, cfg.temperature, cfg.top_p)  # fmt: skip
        if i == 0:
            say(console, "running: " + " ".join(cmd))
        load = machine_load()
        srv0 = process_cpu_s(server_pid)
        tool_cpu = _run_aiperf(cmd, timeout_s)
        theirs = parse_aiperf_export(art / "profile_export_aiperf.json")
        theirs_runs.append(theirs | {"tool_cpu_s": tool_cpu, "load_before": load}
                           | server_cost(srv0, theirs["requests"]))  # fmt: skip
        theirs_failed = aiperf_failures(theirs, num_prompts)
        if theirs_failed:
            return failed_requests_result("AIPerf", i + 1, theirs_failed, base | {"aiperf_command": cmd})
        if rounds > 1:
            console.print(f"round {i + 1}/{rounds}: ours {ours_runs[-1]['rps']:.3f} RPS, "
                          f"aiperf {theirs_runs[-1]['rps'] or 0.0:.3f} RPS")  # fmt: skip
    metrics: dict[str, dict[str, Any]] = {}
    for key in ("rps", "output_tok_s"):
        series = {key: ([float(r[key]) for r in ours_runs], [float(r[key] or 0.0) for r in theirs_runs])}
        scaled = at_median_server_speed(ours_runs + theirs_runs, key) if rounds > 1 else None
        if scaled:
            series[f"{key}_at_median_server_speed"] = (scaled[:rounds], scaled[rounds:])
        for name, (o, t) in series.items():
            v, diff, s_o, s_t = verdict(o, t, tolerance)
            metrics[name] = {"ours_median": statistics.median(o), "aiperf_median": statistics.median(t),
                             "rel_diff": diff, "ours_spread": s_o, "aiperf_spread": s_t, "verdict": v}  # fmt: skip
    judged = [k for k in metrics if k.endswith("_at_median_server_speed")] or ["rps", "output_tok_s"]
    busy_probes = [r["load_before"]["busy_cores"] for r in ours_runs + theirs_runs]
    busy = any(b is not None and b > BUSY_CORES for b in busy_probes)
    final = combine([metrics[k]["verdict"] for k in judged], busy)
    return {
        "status": COMPLETE,
        "workload": f"synthetic:{input_len}:{output_len}",
        "prompt_tokens": {"aiperf_input_tokens_mean": input_len, "ours_text_tokens": ours_len,
                          "note": "both as the server counts them: text tokens plus the tokenizer's BOS"},
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "rounds": rounds,
        "order": "ours, AIPerf, alternating" if rounds > 1 else "ours, then AIPerf",
        "ignore_eos": note,
        # One round: that run; several: the medians of the raw figures.
        "ours": ours_runs[0] if rounds == 1 else {k: metrics[k]["ours_median"] for k in ("rps", "output_tok_s")},
        "aiperf": theirs_runs[0] if rounds == 1 else {k: metrics[k]["aiperf_median"] for k in ("rps", "output_tok_s")},
        "ours_runs": ours_runs,
        "aiperf_runs": theirs_runs,
        "metrics": metrics,
        "judged_on": judged,
        "rel_diff_rps": metrics[judged[0]]["rel_diff"],
        "rel_diff_output_tok_s": metrics[judged[1]]["rel_diff"],
        "tolerance": tolerance,
        "busy_cores_max_before_runs": max((b for b in busy_probes if b is not None), default=None),
        "busy_machine": busy,
        "verdict": final,
        "within_tolerance": final == "agree",
        "aiperf_command": cmd,
    }


AIPERF_OFF_IDEAL = "disagree: AIPerf is off the known ideal, ours is within the tolerance of it"


def ideal_outcome(verdict: str, ours_vs_ideal: float, aiperf_vs_ideal: float, tolerance: float) -> str:
    """A stand-in case's outcome: where the tools disagree, the known ideal says which one is off."""
    if verdict == "disagree" and abs(ours_vs_ideal - 1) <= tolerance < abs(aiperf_vs_ideal - 1):
        return AIPERF_OFF_IDEAL
    if verdict == "disagree" and abs(aiperf_vs_ideal - 1) <= tolerance < abs(ours_vs_ideal - 1):
        return "disagree: ours is off the known ideal, AIPerf is within the tolerance of it"
    return verdict


# transformers serve drifts run to run on a shared VM (separate 192-request runs of one tool moved
# between 10.4 and 16.0 RPS over an hour here), so its case alternates the tools and compares medians.
TSERVE_ROUNDS = 5
TSERVE_REQUESTS = 128

# (tokens/s per request, output tokens, concurrency, requests) for the stand-in cases.
STANDIN_CASES: tuple[tuple[float, int, int, int], ...] = (
    (20.0, 40, 8, 128),  # 160 SSE events/s, 2 s per request, ~32 s
    (20.0, 40, 64, 1024),  # 1,280 events/s, ~32 s
    (100.0, 100, 64, 1920),  # 6,400 events/s: the tools' own CPU cost shows here, ~30 s
)
