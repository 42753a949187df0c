"""The cross-check run on this machine (``nox -s crosscheck``): our load generator against AIPerf.

Two kinds of server: the fixed-rate stand-in, whose answer is known, and a real ``transformers
serve`` with the tiny Llama-3-shaped model. The comparison itself is :mod:`llama3_ops.bench.crosscheck`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from llama3_ops.bench.crosscheck import (
    AIPERF_OFF_IDEAL,
    FAILED_REQUESTS,
    STANDIN_CASES,
    TSERVE_REQUESTS,
    TSERVE_ROUNDS,
    combine,
    crosscheck,
    ideal_outcome,
)
from llama3_ops.bench.report import provenance, write_json_atomic
from llama3_ops.lab.checkpoint import make_checkpoint
from llama3_ops.lab.standin import standin_process, transformers_serve_process


def with_ideal(res: dict[str, Any], rate: float, out_len: int, conc: int) -> dict[str, Any]:
    """A stand-in case's result against the known ideal, and its outcome (failed requests: that)."""
    res["sse_events_per_s"] = conc * rate
    if res["verdict"] == FAILED_REQUESTS:
        res["outcome"] = FAILED_REQUESTS
        return res
    ideal = conc * rate / (out_len - 1)  # the first token comes at once, then one per 1/RATE s
    res["ideal_rps"] = ideal
    res["ours_vs_ideal"] = res["ours"]["rps"] / ideal
    res["aiperf_vs_ideal"] = (res["aiperf"]["rps"] or 0.0) / ideal
    res["nearer_ideal"] = "ours" if abs(res["ours_vs_ideal"] - 1) <= abs(res["aiperf_vs_ideal"] - 1) else "aiperf"
    res["outcome"] = ideal_outcome(res["verdict"], res["ours_vs_ideal"], res["aiperf_vs_ideal"], res["tolerance"])
    return res


def client_validated(cases: list[dict[str, Any]]) -> bool:
    """Every case agrees, or where they differ the known ideal shows AIPerf off it and ours within the
    tolerance of it; a case with failed requests never validates."""
    return bool(cases) and all(c["outcome"] in ("agree", AIPERF_OFF_IDEAL) for c in cases)


def crosscheck_local(aiperf: str, out: Path, console: Console | None = None) -> dict[str, Any]:
    """Cross-check on this machine: the fixed-rate stand-in and a real ``transformers serve``.

    The stand-in (100 tok/s per request) isolates the load generators; ``transformers serve`` with
    the tiny Llama-3-shaped model (real tokenizer) is a real server whose speed varies run to run.
    """
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
                             out=out / f"standin-r{rate:g}-c{conc}", console=console,
                             server_pid=base.pid)  # fmt: skip
        cases.append({"server": f"standin ({rate:g} tok/s per request)"} | with_ideal(res, rate, out_len, conc))
    # transformers serve is CPU-bound, and AIPerf's own processes take about one core (measured here:
    # 0.96 cores on average over a run): sharing cores, the server would run slower under AIPerf than
    # under our client, and the comparison would be about the server. So the server gets core 0 and
    # both load generators (this process, and AIPerf, which inherits its affinity) the others.
    all_cpus = os.sched_getaffinity(0)
    server_cpus = {min(all_cpus)} if len(all_cpus) >= 2 else None
    with transformers_serve_process(str(model), timeout_s=600, cpus=server_cpus) as base:
        console.rule(f"transformers serve, tiny model, concurrency 4, {TSERVE_ROUNDS} alternating rounds")
        if server_cpus:
            os.sched_setaffinity(0, all_cpus - server_cpus)
        try:
            res = crosscheck(base_url=base, model=str(model), tokenizer_dir=model, concurrency=4,
                             num_prompts=TSERVE_REQUESTS, input_len=128, output_len=32, aiperf=aiperf,
                             out=out / "tserve-c4", console=console, rounds=TSERVE_ROUNDS,
                             server_pid=base.pid)  # fmt: skip
        finally:
            os.sched_setaffinity(0, all_cpus)
        res["cpu_split"] = {"server": sorted(server_cpus), "load_generators": sorted(all_cpus - server_cpus)} \
            if server_cpus else None
        res["outcome"] = res["verdict"]
        cases.append({"server": "transformers serve (CPU, tiny model)"} | res)
    verdicts = [c["verdict"] for c in cases]
    return {
        "kind": "crosscheck",
        "provenance": provenance(),
        # Both tools share this machine's cores with the server: a busy machine starves the heavier
        # one (AIPerf runs several worker processes), so each run records the foreign load before it.
        "load_avg_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "cases": cases,
        "verdict": combine(verdicts, busy=False),
        "all_within_tolerance": all(c["within_tolerance"] for c in cases),
        "our_client_validated": client_validated(cases),
    }


def _cpu_median(runs: list[dict[str, Any]]) -> str:
    return f"{statistics.median(r['tool_cpu_s'] for r in runs):.1f}" if runs else "-"


def case_lines(c: dict[str, Any]) -> list[str]:
    """What ``main`` prints for one case: its outcome, failed requests, and each metric's medians."""
    lines = [f"{c['server']}, concurrency {c['concurrency']}, {c['rounds']} round(s): {c['outcome']}"
             + (" (busy machine)" if c["busy_machine"] else "")
             + (f", ideal {c['ideal_rps']:.2f} RPS" if "ideal_rps" in c else "")
             + f"; CPU seconds per run: ours {_cpu_median(c['ours_runs'])}, aiperf {_cpu_median(c['aiperf_runs'])}"]
    lines += (c.get("failed_requests") or {}).get("lines", [])
    for name, m in c["metrics"].items():
        lines.append(f"  {name:36s} ours {m['ours_median']:9.3f} (spread {m['ours_spread']:.1%})  aiperf "
                     f"{m['aiperf_median']:9.3f} (spread {m['aiperf_spread']:.1%})  diff {m['rel_diff'] or 0:.1%}"
                     + ("  <- judged" if name in c["judged_on"] else ""))  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama3_ops.lab.crosscheck", description=crosscheck_local.__doc__)
    ap.add_argument("--aiperf", required=True, help="aiperf executable")
    ap.add_argument("--out", required=True, help="result JSON path")
    args = ap.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="llama3-crosscheck-") as work:
        res = crosscheck_local(args.aiperf, Path(work))
    write_json_atomic(out, res)
    for c in res["cases"]:
        print("\n".join(case_lines(c)))
    print(f"verdict: {res['verdict']}; our client validated: {res['our_client_validated']}")
    return 0 if res["our_client_validated"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
