"""Sweep ``fab serve``'s engine settings on one host, each point served, warmed and benchmarked as a user does.

``python -m llama3_ops.lab.sweep --inventory INV --host-name gpu --point max_batch_size=1024
--point quant_policy=16 --point top_k=1 -- --dataset workload:gpu/sharegpt-2000-seed0.json --num-prompts 2000``

The first point is always ``default``: ``fab serve`` with no tuning flag (the GPU table's choice,
:mod:`llama3_ops.engine_settings`). Each ``--point K=V[,K=V...]`` changes those settings over the default:
``max_batch_size``, ``cache_max_entry_count``, ``quant_policy``, ``max_prefill_token_num`` (engine
flags), ``extra`` (more api_server flags, space-separated, e.g. ``extra=--eager-mode``) and ``top_k``
(the bench's sampling: 1 is greedy). For every point: ``serve --restart`` with those settings (warmed
before ready), then the bench online (``python -m llama3_ops.bench online``, arguments after ``--``)
through ``fab serve``'s tunnel (or direct with ``--local``), with samples on the host every
``--interval`` seconds through the whole run: GPU busy and memory (``nvidia-smi``) and the CPU of each
process of the server (the engine and the API process), so each point says what bounds it.

``OUT/sweep.json``: every point (settings, RPS, tok/s, TTFT, the samples' summary, the bound), the best
point, and the default's share of the best (issue #16's target: 0.95).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llama3_ops.bench import cli as bench_cli
from llama3_ops.errors import Llama3OpsError, report, returns_exit_code
from llama3_ops.remote import services, tunnel
from llama3_ops.remote.transport import Remote, SSHRemote
from llama3_ops.stages import serve as srv
from llama3_ops.stages.options import values

ENGINE_KEYS = ("max_batch_size", "cache_max_entry_count", "quant_policy", "max_prefill_token_num")
POINT_KEYS = (*ENGINE_KEYS, "extra", "top_k")
GPU_BUSY = 90.0  # % mean utilisation from which the GPU is what bounds a point
CORE_BUSY = 0.9  # cores of one process from which that process is what bounds a point


class SweepError(Llama3OpsError):
    pass


@dataclass
class Point:
    name: str
    engine: dict[str, Any] = field(default_factory=dict)  # ServeConfig fields over the default
    extra: tuple[str, ...] = ()
    top_k: int | None = None


def parse_point(text: str) -> Point:
    """``max_batch_size=1024,quant_policy=16`` -> a :class:`Point` (one-line errors name the fix)."""
    opts = {o.name: o for o in srv.OPTIONS}
    pt = Point(name=text)
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise SweepError(f"--point {text!r}: each setting is KEY=VALUE (keys: {', '.join(POINT_KEYS)})")
        if key not in POINT_KEYS:
            raise SweepError(f"--point {text!r}: unknown setting {key!r} (keys: {', '.join(POINT_KEYS)})")
        if key == "extra":
            pt.extra = tuple(shlex.split(raw))
        elif key == "top_k":
            try:
                pt.top_k = int(raw)
            except ValueError:
                raise SweepError(f"--point {text!r}: top_k takes a whole number, not {raw!r}") from None
        else:
            pt.engine[key] = values([opts[key]], {key: raw.strip()}).__dict__[key]
    return pt


# On the host: every INTERVAL s until STOP exists (or MAX s), one JSON line: GPU busy/memory and the CPU
# (cores) of each process in the service's process group since the last line.
_SAMPLER = r"""
import json, os, subprocess, sys, time
pgid, interval, stop, limit = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
tick = os.sysconf("SC_CLK_TCK")
def procs():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            if int(f[2]) != pgid:
                continue
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            out[int(d)] = ((int(f[11]) + int(f[12])) / tick, cmd.strip()[:120])
        except (OSError, IndexError, ValueError):
            pass
    return out
def gpus():
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return [[float(x) for x in line.split(",")] for line in r.stdout.strip().splitlines() if line.strip()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
t0 = time.monotonic(); last = procs(); lt = t0
while not os.path.exists(stop) and time.monotonic() - t0 < limit:
    time.sleep(interval)
    now = time.monotonic(); cur = procs(); dt = now - lt
    cpu = {str(p): {"cores": round((c - last[p][0]) / dt, 3), "cmd": cmd} for p, (c, cmd) in cur.items() if p in last}
    print(json.dumps({"t": round(now - t0, 2), "gpus": gpus(), "procs": cpu}), flush=True)
    last, lt = cur, now
"""


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean GPU busy, peak memory, each process's mean cores, and the bound these show."""
    util = [g[0] for s in samples for g in s.get("gpus", [])[:1]]
    mem = [g[1] for s in samples for g in s.get("gpus", [])[:1]]
    per: dict[str, list[float]] = {}
    cmds: dict[str, str] = {}
    for s in samples:
        for pid, p in s.get("procs", {}).items():
            per.setdefault(pid, []).append(float(p["cores"]))
            cmds[pid] = str(p["cmd"])
    procs: list[dict[str, Any]] = sorted(
        ({"pid": int(pid), "cmd": cmds[pid], "cores_mean": round(sum(v) / len(v), 3),
          "cores_max": round(max(v), 3)} for pid, v in per.items()), key=lambda p: -float(p["cores_mean"]))
    gpu_mean = round(sum(util) / len(util), 1) if util else None
    top = procs[0] if procs else None
    if gpu_mean is not None and gpu_mean >= GPU_BUSY:
        bound = f"GPU busy ({gpu_mean:g}% mean)"
    elif top is not None and top["cores_mean"] >= CORE_BUSY:
        bound = f"one server process's CPU ({top['cores_mean']:.2f} cores: {top['cmd'][:60]})"
    else:
        bound = (f"neither the GPU ({gpu_mean if gpu_mean is not None else '-'}% mean) nor one process "
                 f"({top['cores_mean'] if top else '-'} cores) is saturated: per-step time, or the client")
    return {"samples": len(samples), "gpu_busy_mean": gpu_mean, "gpu_mem_peak_mib": max(mem) if mem else None,
            "processes": procs[:6], "bound": bound}


STOP_FILE = "$HOME/.cache/llama3-ops/sweep-sampler.stop"  # the host's sampler ends when it exists


def sample_during(remote: Remote, pgid: int, interval: float, limit: float, log: Path) -> subprocess.Popen[str]:
    remote.run(f'mkdir -p "$HOME/.cache/llama3-ops"; rm -f {STOP_FILE}', timeout=30)
    script = f'python3 -c {shlex.quote(_SAMPLER)} {pgid} {interval} {STOP_FILE} {limit}'
    return remote.popen(script, stdout=log.open("w"))


def stop_sampling(remote: Remote, proc: subprocess.Popen[str], log: Path) -> list[dict[str, Any]]:
    remote.run(f"touch {STOP_FILE}", timeout=30, check=False)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def run_point(remote: Remote, base: srv.ServeConfig, pt: Point, bench_args: Sequence[str], out: Path,
              *, local_port: int, interval: float, console: Console) -> dict[str, Any]:
    cfg = replace(base, **pt.engine, extra_args=base.extra_args + pt.extra)
    res = srv.serve(remote, cfg, restart=True, console=console)
    assert res.ready is not None
    if isinstance(remote, SSHRemote):
        state = tunnel.up_or_reuse(tunnel.TunnelSpec(target=remote.target, remote_port=cfg.port,
                                                     local_port=local_port, name=cfg.name))
        url, path = state.url, "tunnel"
    else:
        url, path = f"http://127.0.0.1:{cfg.port}", "direct"
    d = out / pt.name.replace("/", "_").replace(" ", "")
    d.mkdir(parents=True, exist_ok=True)
    settings = res.tuning.settings() if res.tuning else {}
    argv = ["online", "--base-url", url, "--model", res.ready.model_id, "--out", str(d / "bench"),
            "--engine", cfg.engine, "--backend", cfg.backend, "--tp", str(cfg.tp), "--server-warmed",
            *(f"--engine-setting={k}={v}" for k, v in settings.items() if v is not None),
            *([f"--top-k={pt.top_k}"] if pt.top_k is not None else []), *bench_args]
    sampler = sample_during(remote, res.status.pid or 0, interval, 3600.0, d / "samples.jsonl")
    t0 = time.monotonic()
    try:
        rc = bench_cli.main(argv)
    finally:
        samples = stop_sampling(remote, sampler, d / "samples.jsonl")
    points = sorted((d / "bench").glob("online-c*.json"))
    if rc != 0 or not points:
        raise SweepError(f"point {pt.name}: the bench exited {rc}; its output is in {d / 'bench'}")
    run = json.loads(points[-1].read_text())
    m = run["metrics"]
    return {"name": pt.name, "path": path, "settings": settings, "extra": list(pt.extra), "top_k": pt.top_k,
            "tuning_source": res.tuning.source if res.tuning else "", "ready_s": round(res.ready.seconds, 1),
            "warmup_s": round(res.warmup.seconds, 1) if res.warmup else None,
            "bench_wall_s": round(time.monotonic() - t0, 1), "concurrency": run["concurrency"]["requested"],
            "rps": m["rps"], "output_tok_s": m.get("output_tok_s"), "ttft_s": m.get("ttft_s"),
            "failed": m.get("failed"), "json": str(points[-1]), "host": summarize(samples)}


def sweep(remote: Remote, base: srv.ServeConfig, points: Sequence[Point], bench_args: Sequence[str], out: Path,
          *, local_port: int = 23333, interval: float = 2.0, console: Console | None = None,
          keep: bool = False) -> dict[str, Any]:
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"schema": "llama3-ops.sweep/1", "host": remote.label, "base": base.settings(),
                              "bench_args": list(bench_args), "points": []}
    path = out / "sweep.json"
    try:
        for pt in [Point("default"), *points]:
            console.print(f"sweep point {pt.name}", style="bold", markup=False)
            record["points"].append(run_point(remote, base, pt, bench_args, out, local_port=local_port,
                                              interval=interval, console=console))
            _finish(record)
            path.write_text(json.dumps(record, indent=1))  # after every point: a cut sweep keeps what it has
    finally:
        if not keep:
            services.stop(remote, base.name)
            if isinstance(remote, SSHRemote):
                tunnel.down(base.name)
    _print(record, console)
    return record


def _finish(record: dict[str, Any]) -> None:
    pts = record["points"]
    best = max(pts, key=lambda p: p["rps"])
    record["best"] = best["name"]
    record["default_share_of_best"] = round(pts[0]["rps"] / best["rps"], 4) if best["rps"] else None


def _print(record: dict[str, Any], console: Console) -> None:
    t = Table(title=f"sweep on {record['host']}: default at {record['default_share_of_best']} of the best")
    for col in ("point", "RPS", "out tok/s", "TTFT p50 s", "GPU busy %", "bound"):
        t.add_column(col)
    for p in record["points"]:
        ttft = (p.get("ttft_s") or {}).get("p50")
        t.add_row(p["name"] + (" (best)" if p["name"] == record["best"] else ""), f"{p['rps']:.2f}",
                  f"{p['output_tok_s'] or 0:.0f}", f"{ttft:.3f}" if ttft is not None else "-",
                  str(p["host"]["gpu_busy_mean"] if p["host"]["gpu_busy_mean"] is not None else "-"),
                  p["host"]["bound"])
    console.print(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama3_ops.lab.sweep", description=__doc__.split("\n\n")[0])
    srv.add_target_args(p)
    p.add_argument("--point", action="append", default=[], metavar="K=V[,K=V]",
                   help=f"a point over the default (keys: {', '.join(POINT_KEYS)}); repeat")
    p.add_argument("--backend", default="pytorch", choices=("pytorch", "turbomind"))
    p.add_argument("--engine", default="lmdeploy", choices=("lmdeploy", "transformers"))
    p.add_argument("--model", default="base")
    p.add_argument("--port", type=int, default=23333, help="the server's port on the host")
    p.add_argument("--local-port", type=int, default=23334, help="the tunnel's local end")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between host samples")
    p.add_argument("--out", default="sweep-results", help="where sweep.json and each point's files go")
    p.add_argument("--keep", action="store_true", help="leave the last point's server and tunnel running")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the bench online's arguments")
    return p


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    bench_args = [a for a in args.bench_args if a != "--"]
    try:
        points = [parse_point(p) for p in args.point]
        names = [p.name for p in points]
        if len(set(names)) != len(names) or "default" in names:
            raise SweepError("--point values must differ from each other (and 'default' is always the first)")
        base = srv.ServeConfig(engine=args.engine, backend=args.backend, model=args.model, port=args.port)
        sweep(srv.remote_from_args(args), base, points, bench_args, Path(args.out), local_port=args.local_port,
              interval=args.interval, console=console, keep=args.keep)
    except Llama3OpsError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
