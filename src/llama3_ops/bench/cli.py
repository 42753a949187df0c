"""Command line: ``python -m llama3_ops.bench {online,offline,check,crosscheck}``.

Exit codes: 0 done (and ``--check`` passed or had no comparable baseline), 1 ``--check`` found a
regression, 2 bad input or unreachable target (one message, no traceback, no complete-marked JSON),
3 more requests failed than ``--max-failures`` allows (the JSONs are written, with
``"status": "complete_with_failures"``; the failures and their most common reasons are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.text import Text

from llama3_ops import engine_settings
from llama3_ops.bench import report
from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.metrics import aggregate
from llama3_ops.bench.workload import Workload, build_workload

DEFAULT_API_KEY_ENV = "LLAMA3_OPS_BENCH_API_KEY"
EXIT_REGRESSION = 1
EXIT_FAILED_REQUESTS = 3


def parse_concurrency(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise BenchError(f"--concurrency must be a comma-separated list of integers, got {text!r}") from exc
    if not vals or any(v <= 0 for v in vals):
        raise BenchError(f"--concurrency values must be > 0, got {text!r}")
    return vals


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise BenchError(f"--engine-setting takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def online_settings(items: Sequence[str], tp: int | None) -> dict[str, Any]:
    """``--engine-setting`` pairs plus ``--tp`` (recorded as ``tp``; the two must agree)."""
    out = parse_settings(items)
    if tp is not None:
        if tp < 1:
            raise BenchError(f"--tp must be at least 1, got {tp}")
        if "tp" in out and out["tp"] != str(tp):
            raise BenchError(f"--tp {tp} contradicts --engine-setting tp={out['tp']}")
        out["tp"] = str(tp)
    return out


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--concurrency", default=None,
                    help="comma-separated list; one run per value (online default 256; offline: the max batch "
                         "size, default the GPU table's, llama3_ops/data/engine_settings.yml)")
    ap.add_argument("--num-prompts", type=int, default=1000, help="requests per run point")
    ap.add_argument(
        "--dataset",
        default="sharegpt",
        help="'sharegpt' (packaged, truncated file), a ShareGPT JSON path, or synthetic:IN:OUT",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or model dir (default: real Llama 3)")
    ap.add_argument(
        "--max-output-len",
        type=int,
        default=None,
        help="cap each request's output tokens (CPU smoke tests); recorded in the JSON",
    )
    ap.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="failed requests a run point may have and still pass (default 0); recorded in the JSON",
    )
    ap.add_argument("--out", default=None, help="output directory (default bench-results/<UTC time>)")
    ap.add_argument("--profile", default="course", help="a label recorded in the JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if RPS < (1 - margin) x matching baseline")
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--baselines", default=None, help="baselines JSON (default: the packaged one)")
    ap.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llama3_ops.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    on = sub.add_parser(
        "online", help="load an OpenAI-compatible server (lmdeploy api_server, transformers serve)"
    )
    on.add_argument("--base-url", required=True)
    on.add_argument("--model", required=True, help="model id sent in each request")
    on.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    on.add_argument(
        "--api-key-env",
        default=DEFAULT_API_KEY_ENV,
        help=f"environment variable holding the API key (default {DEFAULT_API_KEY_ENV}); never printed",
    )
    on.add_argument("--temperature", type=float, default=0.0)
    on.add_argument("--top-p", type=float, default=1.0)
    on.add_argument("--top-k", type=int, default=None, help="sent as top_k (lmdeploy: 1 = greedy argmax)")
    on.add_argument(
        "--ignore-eos",
        choices=("auto", "on", "off"),
        default="auto",
        help="send ignore_eos (auto: probe once; transformers serve rejects the field, lmdeploy accepts it)",
    )
    on.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    on.add_argument("--timeout", type=float, default=3600.0, help="overall seconds per run point")
    on.add_argument(
        "--connector-limit",
        type=int,
        default=0,
        help="aiohttp connection cap (0 = none; aiohttp's own default 100 would cap concurrency)",
    )
    on.add_argument(
        "--engine", default="openai-compatible", help="server engine name, recorded (e.g. lmdeploy)"
    )
    on.add_argument("--engine-version", default="unknown")
    on.add_argument("--backend", default=None, help="server backend, recorded (e.g. pytorch, turbomind)")
    on.add_argument(
        "--engine-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server settings for the record and the baseline key, e.g. max_batch_size=512",
    )
    on.add_argument(
        "--tp", type=int, default=None, help="the server's tensor-parallel degree (fab serve --tp N), recorded"
    )
    on.add_argument(
        "--warmup",
        type=int,
        default=-1,
        metavar="N",
        help="requests from the workload sent at each point's concurrency before it is measured, not counted "
        "(default -1: as many as the concurrency, one full wave; 0: none); recorded in the JSON",
    )
    on.add_argument(
        "--server-warmed",
        action="store_true",
        help="the server was warmed before this bench (fab serve does so unless --no-warmup): recorded",
    )
    _common(on)

    off = sub.add_parser("offline", help="lmdeploy in-process pipeline (as profile_throughput.py)")
    off.add_argument("--model", required=True, help="model path")
    off.add_argument("--backend", choices=("pytorch", "turbomind"), default="pytorch")
    off.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="engine max batch size (= concurrency, as profile_throughput); default: --concurrency",
    )
    off.add_argument("--cache-max-entry-count", type=float, default=None,
                     help="the KV cache's share of free GPU memory (default: the GPU table's)")
    off.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another engine-config field (JSON value), e.g. max_prefill_token_num=8192",
    )
    off.add_argument(
        "--driver",
        choices=("pipeline", "engine"),
        default="pipeline",
        help="pipeline: lmdeploy.pipeline (detokenizes); engine: the PyTorch engine driven with token ids, "
        "as benchmark/profile_throughput.py does",
    )
    off.add_argument("--tp", type=int, default=1)
    off.add_argument("--session-len", type=int, default=4096)
    off.add_argument("--quant-policy", type=int, default=None, choices=(0, 4, 8, 16),
                     help="KV cache: 0 none, 4 int4, 8 int8, 16 fp8 (default: the GPU table's)")
    off.add_argument("--top-k", type=int, default=1)
    off.add_argument("--no-stream", action="store_true", help="batch call: RPS/tok/s only")
    _common(off)

    wl = sub.add_parser("workload", help="sample a workload once and save it (for hosts without the dataset)")
    wl.add_argument("--dataset", default="sharegpt")
    wl.add_argument("--num-prompts", type=int, default=2000)
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--tokenizer", default=None)
    wl.add_argument("--max-output-len", type=int, default=None)
    wl.add_argument("--out", required=True)

    ck = sub.add_parser("check", help="compare result JSONs with the baselines; exit 1 on regression")
    ck.add_argument("results", nargs="+")
    ck.add_argument("--margin", type=float, default=0.1)
    ck.add_argument("--baselines", default=None)

    cc = sub.add_parser("crosscheck", help="run aiperf against the same server + workload and compare")
    cc.add_argument("--base-url", required=True)
    cc.add_argument("--model", required=True)
    cc.add_argument("--tokenizer-dir", required=True, help="HF tokenizer dir for aiperf (e.g. the model dir)")
    cc.add_argument("--concurrency", type=int, default=4)
    cc.add_argument("--num-prompts", type=int, default=16)
    cc.add_argument("--input-len", type=int, default=128)
    cc.add_argument("--output-len", type=int, default=32)
    cc.add_argument("--aiperf", default="aiperf", help="aiperf executable (e.g. /tmp/aiperf-venv/bin/aiperf)")
    cc.add_argument("--out", default="bench-crosscheck")
    cc.add_argument("--tolerance", type=float, default=0.05)
    cc.add_argument("--rounds", type=int, default=1,
                    help="alternate the tools this many times and compare medians (for a server that drifts)")
    cc.add_argument("--server-pid", type=int, default=None,
                    help="the server's process, when it runs on this machine: its CPU time per request "
                         "rescales each run to the server's median speed")
    return ap


def _out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path("bench-results") / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _workload(args: argparse.Namespace, console: Console) -> Workload:
    if args.num_prompts <= 0:
        raise BenchError("--num-prompts must be > 0")
    if args.max_output_len is not None and args.max_output_len <= 0:
        raise BenchError("--max-output-len must be > 0")
    with console.status(
        Text(f"building workload {args.dataset} (first ShareGPT use tokenizes ~17k conversations)")
    ):
        wl = build_workload(
            args.dataset,
            args.num_prompts,
            args.seed,
            Path(args.tokenizer) if args.tokenizer else None,
            args.max_output_len,
        )
    i = wl.info
    if i.kind == "sharegpt":
        report.say(
            console,
            f"dataset {i.source}: {i.complete_records} complete records"
            f"{f' (file cut at byte {i.cut_offset} of {i.file_bytes})' if i.truncated else ''}, "
            f"{i.usable} usable, {i.sampled} sampled (seed {i.seed})",
        )
    return wl


def _check_max_failures(args: argparse.Namespace) -> None:
    if args.max_failures < 0:
        raise BenchError(f"--max-failures must be >= 0, got {args.max_failures}")


def _report_failures(runs: Sequence[dict[str, Any]], console: Console) -> int:
    """Print each run point's failed requests and their most common reasons; the exit code they make."""
    rc = 0
    for r in runs:
        lines = report.failure_lines(r)
        if not lines:
            continue
        over = report.too_many_failures(r)
        rc = EXIT_FAILED_REQUESTS if over else rc
        head = f"{r['mode']} c={r['concurrency']['requested']}: {lines[0]}"
        report.say(console, head + ("" if over else ": within --max-failures"), "bold red" if over else "yellow")
        for line in lines[1:]:
            report.say(console, line)
    return rc


def _finish(runs: list[dict[str, Any]], out: Path, args: argparse.Namespace, console: Console) -> int:
    baselines = report.load_baselines(Path(args.baselines) if args.baselines else None)
    files = []
    for r in runs:
        name = f"{r['mode']}-c{r['concurrency']['requested']:04d}.json"
        files.append(report.write_json_atomic(out / name, report.finalize(r)))
    try:
        from llama3_ops.bench.plots import latency_cdf_plot, throughput_plot
    except ImportError:  # a GPU host without matplotlib: the JSONs are the result; plot them elsewhere
        report.say(console, "warning: matplotlib is not installed: no PNGs (the JSONs hold every point)", "yellow")
        plots: list[Path] = []
    else:
        plots = [
            throughput_plot(runs, out / "throughput_vs_concurrency.png"),
            latency_cdf_plot(runs, out / "latency_cdf.png"),
        ]
    summary = report.summary_record(runs, files, plots)
    rc = 0
    if args.check:
        checks = [report.check_run(r, baselines, args.margin) for r in runs]
        summary["check"] = [c.__dict__ for c in checks]
        for c in checks:
            report.say(console, c.message, "green" if c.passed else "red")
        rc = 0 if all(c.passed for c in checks) else EXIT_REGRESSION
    report.write_json_atomic(out / "summary.json", summary)
    report.print_report(runs, baselines, console)
    report.say(console, f"results: {out}/ ({len(files)} point JSONs, summary.json, {len(plots)} PNGs)")
    return max(rc, _report_failures(runs, console))


def cmd_online(args: argparse.Namespace, console: Console) -> int:
    from llama3_ops.bench.client import ClientConfig, check_server, probe_ignore_eos, run_load

    conc = parse_concurrency(args.concurrency or "256")
    _check_max_failures(args)
    if args.warmup < -1:
        raise BenchError(f"--warmup must be -1 (one wave at each concurrency), 0 (none) or a count, got {args.warmup}")
    u = urlparse(args.base_url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise BenchError(f"--base-url must be http(s)://host:port, got {args.base_url!r}")
    server_settings = online_settings(args.engine_setting, args.tp)
    cfg = ClientConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        api_key=os.environ.get(args.api_key_env) or None,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        ignore_eos=args.ignore_eos != "off",
        request_timeout_s=args.request_timeout,
        total_timeout_s=args.timeout,
        connector_limit=args.connector_limit,
        progress=not args.no_progress,
    )
    asyncio.run(check_server(cfg))
    ignore_eos_note = f"--ignore-eos {args.ignore_eos}"
    if args.ignore_eos == "auto":
        cfg.ignore_eos, ignore_eos_note = asyncio.run(probe_ignore_eos(cfg))
        if not cfg.ignore_eos:
            report.say(console, f"warning: {ignore_eos_note}; output lengths are then only upper bounds", "yellow")
    wl = _workload(args, console)
    engine = {
        "name": args.engine,
        "version": args.engine_version,
        "backend": args.backend,
        "settings": server_settings,
    }
    out = _out_dir(args.out)
    prov = report.provenance()
    runs = []
    for c in conc:
        warm = _warm_up(wl.requests, c, args.warmup, cfg, console)
        cpu0 = time.process_time()
        lr = asyncio.run(run_load(wl.requests, c, cfg))
        m = aggregate(lr.results, lr.wall_s)
        m["timed_out"] = lr.timed_out
        # The client's own CPU time over the run: near 1.0 x wall means the (single-threaded) client,
        # not the server, may be what limits the figure.
        m["client_cpu_s"] = round(time.process_time() - cpu0, 3)
        m["client_cpu_per_wall"] = round(m["client_cpu_s"] / lr.wall_s, 3) if lr.wall_s else None
        settings: dict[str, Any] = {
            **engine["settings"],
            "backend": args.backend,
            **cfg.public(),
            "num_prompts": args.num_prompts,
            "seed": args.seed,
            "max_output_len": args.max_output_len,
            "max_failures": args.max_failures,
            "ignore_eos_note": ignore_eos_note,
        }
        runs.append(
            report.run_record(
                mode="online",
                engine=engine,
                profile=args.profile,
                settings=settings,
                dataset=wl.info.to_dict(),
                metrics=m,
                concurrency=c,
                per_request=[r.to_compact() for r in lr.results],
                prov=prov,
                extra={"warmup": {**warm, "server_warmed": args.server_warmed},
                       "warm": warm["requests"] > 0 or args.server_warmed},
            )
        )
    return _finish(runs, out, args, console)


def _warm_up(requests: Sequence[Any], concurrency: int, n: int, cfg: Any, console: Console) -> dict[str, Any]:
    """Send ``n`` requests (-1: ``concurrency``) of the workload, cycled, at ``concurrency``; not measured.

    The first load after a server starts runs slow (12-15% on the H200, 2026-12-03), so a point
    measured cold understates the server. What the warm-up did is recorded beside the point.
    """
    from dataclasses import replace

    from llama3_ops.bench.client import run_load

    count = concurrency if n == -1 else n
    if count == 0:
        return {"requests": 0, "failed": 0, "wall_s": 0.0}
    reqs = [requests[i % len(requests)] for i in range(count)]
    report.say(console, f"c={concurrency}: warm-up, {count} requests (not counted)")
    lr = asyncio.run(run_load(reqs, concurrency, replace(cfg, progress=False)))
    failed = sum(1 for r in lr.results if not r.success)
    if failed:
        report.say(console, f"warning: {failed} of {count} warm-up requests failed", "yellow")
    return {"requests": count, "failed": failed, "wall_s": round(lr.wall_s, 3)}


def _json_values(items: dict[str, Any]) -> dict[str, Any]:
    """``"8192"`` -> 8192, ``"false"`` -> False; anything that is not JSON stays a string."""
    out: dict[str, Any] = {}
    for k, v in items.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _offline_tuning(args: argparse.Namespace, max_batch_size: int | None) -> engine_settings.Tuning:
    """This machine's GPU's settings from the table, with every flag given winning for its setting."""
    gpu = report.gpu_info()
    try:
        mib = int(str(gpu.get("memory", "")).split()[0])
    except (IndexError, ValueError):
        mib = -1
    base = engine_settings.choose(gpu["name"] if gpu.get("count") else None, mib, args.backend)
    return engine_settings.with_flags(base, max_batch_size=max_batch_size,
                                      cache_max_entry_count=args.cache_max_entry_count,
                                      quant_policy=args.quant_policy)


def cmd_offline(args: argparse.Namespace, console: Console) -> int:
    from llama3_ops.bench.offline import OfflineSettings, run_offline

    if args.max_batch_size is not None and args.max_batch_size <= 0:
        raise BenchError("--max-batch-size must be > 0")
    if args.cache_max_entry_count is not None and not 0.0 < args.cache_max_entry_count <= 1.0:
        raise BenchError("--cache-max-entry-count must be in (0, 1]")
    # each point's max batch size: --max-batch-size, else each --concurrency, else the GPU table's
    given = [args.max_batch_size] if args.max_batch_size is not None else (
        parse_concurrency(args.concurrency) if args.concurrency else [])
    tune = _offline_tuning(args, max(given) if given else None)
    conc = given or [tune.max_batch_size]
    report.say(console, f"engine settings: {tune.line()}")
    if not Path(args.model).exists():
        raise BenchError(f"model path not found: {args.model}")
    _check_max_failures(args)
    wl = _workload(args, console)
    out = _out_dir(args.out)
    prov = report.provenance()
    runs = []
    for c in conc:
        st = OfflineSettings(
            backend=args.backend,
            max_batch_size=c,
            cache_max_entry_count=tune.cache_max_entry_count,
            tp=args.tp,
            session_len=args.session_len,
            quant_policy=tune.quant_policy,
            top_k=args.top_k,
            stream=not args.no_stream,
            driver=args.driver,
            engine_options={**({"max_prefill_token_num": tune.max_prefill_token_num}
                               if tune.max_prefill_token_num else {}),
                            **_json_values(parse_settings(args.engine_option))},
        )
        results, wall, engine = run_offline(args.model, wl.requests, st)
        m = aggregate(results, wall)
        settings = {
            **st.to_dict(),
            "num_prompts": args.num_prompts,
            "seed": args.seed,
            "max_output_len": args.max_output_len,
            "max_failures": args.max_failures,
            "model": args.model,
            "tuning_source": tune.source,
        }
        runs.append(
            report.run_record(
                mode="offline",
                engine=engine,
                profile=args.profile,
                settings=settings,
                dataset=wl.info.to_dict(),
                metrics=m,
                concurrency=c,
                per_request=[r.to_compact() for r in results],
                prov=prov,
            )
        )
    return _finish(runs, out, args, console)


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    baselines = report.load_baselines(Path(args.baselines) if args.baselines else None)
    rc = 0
    runs = []
    for f in args.results:
        p = Path(f)
        try:
            run = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read result {f}: {exc}") from exc
        if run.get("schema") != report.SCHEMA or run.get("status") not in report.FINAL_STATUSES:
            raise BenchError(f"{f} is not a complete {report.SCHEMA} result")
        runs.append(run)
        c = report.check_run(run, baselines, args.margin)
        report.say(console, f"{p.name}: {c.message}", "green" if c.passed else "red")
        rc = max(rc, 0 if c.passed else EXIT_REGRESSION)
    report.print_report(runs, baselines, console)
    return max(rc, _report_failures(runs, console))


def cmd_crosscheck(args: argparse.Namespace, console: Console) -> int:
    from llama3_ops.bench.crosscheck import crosscheck

    res = crosscheck(
        base_url=args.base_url,
        model=args.model,
        tokenizer_dir=Path(args.tokenizer_dir),
        concurrency=args.concurrency,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        aiperf=args.aiperf,
        out=Path(args.out),
        tolerance=args.tolerance,
        console=console,
        rounds=args.rounds,
        server_pid=args.server_pid,
    )
    report.write_json_atomic(Path(args.out) / "crosscheck.json", res)
    console.print_json(json.dumps({k: v for k, v in res.items() if k != "aiperf_raw"}))
    for line in res.get("failed_requests", {}).get("lines", []):
        report.say(console, line, "bold red")
    if res.get("failed_requests"):
        return EXIT_FAILED_REQUESTS
    return 0 if res.get("within_tolerance") else EXIT_REGRESSION


def cmd_workload(args: argparse.Namespace, console: Console) -> int:
    from llama3_ops.bench.workload import save_workload

    wl = build_workload(args.dataset, args.num_prompts, args.seed,
                        Path(args.tokenizer) if args.tokenizer else None, args.max_output_len)
    path = save_workload(wl, Path(args.out))
    mean_in = sum(r.prompt_len for r in wl.requests) / len(wl.requests)
    mean_out = sum(r.output_len for r in wl.requests) / len(wl.requests)
    report.say(console, f"saved {len(wl.requests)} requests to {path} (mean prompt {mean_in:.0f}, "
                        f"mean output {mean_out:.0f} tokens; {wl.info.complete_records} complete records in the "
                        f"source, cut at byte {wl.info.cut_offset})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Wide enough for the results table when the output goes to a log file rather than a terminal.
    console = Console(width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, soft_wrap=True)  # one line a message, however long: no wrapping
    handlers = {
        "online": cmd_online,
        "offline": cmd_offline,
        "check": cmd_check,
        "workload": cmd_workload,
        "crosscheck": cmd_crosscheck,
    }
    try:
        return handlers[args.cmd](args, console)
    except BenchError as exc:
        err.print(Text.assemble(("error:", "bold red"), " ", str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
