"""Result JSON with provenance, the console table, baselines, comparison and the regression check.

Every run point is one JSON (schema ``llama3-ops.bench/1``) written atomically: to
``NAME.json.partial`` first, renamed at the end; only the final file has a final status:
``"complete"`` when every request succeeded, ``"complete_with_failures"`` when any failed (its
``failures`` says how many, the most common reasons, and how many ``--max-failures`` allowed).

Baselines live in ``llama3_ops/data/bench_baselines.json``. A baseline applies to a run when the GPU
model matches (:func:`gpu_key`: family + memory, e.g. ``"NVIDIA H100 80GB HBM3"`` -> ``H100-80G``),
the mode matches, and every setting the baseline names (engine, backend, concurrency,
max_batch_size, cache_max_entry_count ...) has the same value in the run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from llama3_ops.bench.errors import BenchError

SCHEMA = "llama3-ops.bench/1"
SUMMARY_SCHEMA = "llama3-ops.bench-summary/1"
COMPLETE = "complete"
COMPLETE_WITH_FAILURES = "complete_with_failures"
FINAL_STATUSES = (COMPLETE, COMPLETE_WITH_FAILURES)
KEY_FIELDS = (
    "mode",
    "engine",
    "backend",
    "concurrency",
    "max_batch_size",
    "cache_max_entry_count",
    "tp",
    "quant_policy",
)


# --------------------------------------------------------------------------- provenance


def gpu_info() -> dict[str, Any]:
    """GPU name/count/driver from nvidia-smi, or ``none`` when there is no nvidia-smi or GPU."""
    exe = shutil.which("nvidia-smi")
    none = {"name": "none", "count": 0, "driver": "none", "names": []}
    if exe is None:
        return none
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return none
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    if not rows:
        return none
    return {
        "name": rows[0][0],
        "count": len(rows),
        "driver": rows[0][1] if len(rows[0]) > 1 else "unknown",
        "memory": rows[0][2] if len(rows[0]) > 2 else "unknown",
        "names": [r[0] for r in rows],
    }


def gpu_key(name: str) -> str:
    """Normalise a GPU name: ``NVIDIA A100-SXM4-80GB`` or ``A100-80G`` -> ``A100-80G``."""
    up = name.upper()
    m = re.search(r"\b([A-Z]{1,2}\d{2,3}[A-Z]?)\b", up.replace("-", " "))
    if not m:
        return name.strip() or "none"
    mem = re.search(r"(\d{2,3})\s*G", up[m.end() :]) or re.search(r"(\d{2,3})\s*G", up)
    return f"{m.group(1)}-{mem.group(1)}G" if mem else m.group(1)


def bundle_commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this package, or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("-dirty" if dirty else "") if out else "unknown"


def package_version(name: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def provenance() -> dict[str, Any]:
    from llama3_ops import __version__

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_info(),
        "torch_version": package_version("torch"),
        "transformers_version": package_version("transformers"),  # transformers serve's speed moves with it
        "llama3_ops_version": __version__,
        "bundle_commit": bundle_commit(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- writing


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` via ``path.partial`` + rename (never a half-written final file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def run_record(
    *,
    mode: str,
    engine: dict[str, Any],
    profile: str,
    settings: dict[str, Any],
    dataset: dict[str, Any],
    metrics: dict[str, Any],
    concurrency: int,
    per_request: list[dict[str, Any]],
    prov: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run point's JSON (``status`` is set to ``complete`` by :func:`finalize`)."""
    settings = {**settings, "mode": mode, "engine": engine.get("name"), "concurrency": concurrency}
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "running",
        "mode": mode,
        "profile": profile,
        "provenance": prov or provenance(),
        "engine": engine,
        "settings": settings,
        "settings_key": settings_key(settings),
        "dataset": dataset,
        "concurrency": {
            "requested": concurrency,
            "achieved_max": metrics.get("achieved_concurrency_max"),
            "achieved_mean": metrics.get("achieved_concurrency_mean"),
        },
        "metrics": metrics,
        "per_request": per_request,
    }
    if extra:
        rec.update(extra)
    return rec


def finalize(rec: dict[str, Any]) -> dict[str, Any]:
    """Mark a run point finished: ``complete``, or ``complete_with_failures`` when a request failed."""
    failed = int(rec["metrics"].get("failed") or 0)
    rec["status"] = COMPLETE_WITH_FAILURES if failed else COMPLETE
    rec["failures"] = {
        "failed": failed,
        "allowed": allowed_failures(rec),
        "reasons": rec["metrics"].get("failure_reasons") or [],
    }
    return rec


def allowed_failures(rec: dict[str, Any]) -> int:
    """The run's ``--max-failures`` (0 for results recorded before the option existed)."""
    return int(rec.get("settings", {}).get("max_failures") or 0)


def too_many_failures(rec: dict[str, Any]) -> bool:
    """More failed requests than the run allowed: the run cannot count as a pass."""
    return int(rec["metrics"].get("failed") or 0) > allowed_failures(rec)


def failure_lines(rec: dict[str, Any], top: int = 5) -> list[str]:
    """``N of M requests failed (K allowed)``, then one line per most common reason, with its count."""
    m = rec["metrics"]
    failed = int(m.get("failed") or 0)
    if not failed:
        return []
    lines = [f"{failed} of {m.get('requests')} requests failed ({allowed_failures(rec)} allowed)"]
    reasons = m.get("failure_reasons")
    if reasons is None:  # recorded before reasons were counted: the distinct errors only
        lines += [f"  - {e}" for e in (m.get("errors") or [])[:top]]
    else:
        lines += [f"  {r['count']:>5} x {r['reason']}" for r in reasons[:top]]
        rest = failed - sum(r["count"] for r in reasons[:top])
        if rest > 0:
            lines.append(f"  {rest:>5} x other reasons")
    return lines


def say(console: Console, text: str, style: str | None = None) -> None:
    """Print ``text`` as it is: no markup, no emoji codes, no highlighting (it may hold user input)."""
    console.print(Text(text, style=style or ""))


# --------------------------------------------------------------------------- baselines


def _norm(v: Any) -> Any:
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v.strip().lower()
        return int(f) if f.is_integer() else f
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def settings_key(settings: dict[str, Any]) -> str:
    """Canonical ``k=v|...`` string over :data:`KEY_FIELDS` present in ``settings``."""
    return "|".join(f"{k}={_norm(settings[k])}" for k in KEY_FIELDS if settings.get(k) is not None)


def load_baselines(path: Path | None = None) -> list[dict[str, Any]]:
    if path is None:
        text = resources.files("llama3_ops").joinpath("data", "bench_baselines.json").read_text()
    else:
        if not path.is_file():
            raise BenchError(f"baselines file not found: {path}")
        text = path.read_text()
    data = json.loads(text)
    out: list[dict[str, Any]] = data["baselines"]
    return out


# Engine defaults for key settings a record may leave out: a run or baseline without ``tp`` ran on one
# GPU, one without ``quant_policy`` had no KV quantization. A tp=2 run never matches a tp=1 baseline.
SETTING_DEFAULTS: dict[str, Any] = {"tp": 1, "quant_policy": 0}


def baseline_matches(baseline: dict[str, Any], run: dict[str, Any]) -> bool:
    """Same GPU model, same mode, every setting the baseline names equal in the run, and the same
    ``tp`` and ``quant_policy`` (:data:`SETTING_DEFAULTS` where either side leaves them out)."""
    run_gpu = gpu_key(str(run["provenance"]["gpu"]["name"]))
    if baseline["gpu_key"] != run_gpu or baseline["mode"] != run["mode"]:
        return False
    bs = {**SETTING_DEFAULTS, **{k: v for k, v in baseline["settings"].items() if v is not None}}
    rs = {**SETTING_DEFAULTS, **{k: v for k, v in run["settings"].items() if v is not None}}
    return all(k in rs and _norm(rs[k]) == _norm(v) for k, v in bs.items() if k in KEY_FIELDS)


def comparable(baselines: Iterable[dict[str, Any]], run: dict[str, Any]) -> list[dict[str, Any]]:
    """Baselines of the same GPU model and mode (for the comparison table)."""
    run_gpu = gpu_key(str(run["provenance"]["gpu"]["name"]))
    return [b for b in baselines if b["gpu_key"] == run_gpu and b["mode"] == run["mode"]]


@dataclass
class CheckOutcome:
    run_key: str
    baseline_id: str | None
    rps: float | None
    baseline_rps: float | None
    threshold: float | None
    passed: bool
    message: str


def check_run(run: dict[str, Any], baselines: Sequence[dict[str, Any]], margin: float) -> CheckOutcome:
    """Fail when RPS < (1 - margin) x the matching baseline; no baseline -> passed, with a message."""
    if not 0.0 <= margin < 1.0:
        raise BenchError("--margin must be in [0, 1)")
    rps = run["metrics"].get("rps")
    gpu = gpu_key(str(run["provenance"]["gpu"]["name"]))
    key = run.get("settings_key") or settings_key(run["settings"])
    matches = [b for b in baselines if baseline_matches(b, run)]
    if not matches:
        return CheckOutcome(
            key,
            None,
            rps,
            None,
            None,
            True,
            f"no comparable baseline for GPU {gpu!r} and settings {key!r}: nothing to check (not a failure)",
        )
    # The most specific baseline (most settings named) wins.
    b = max(matches, key=lambda x: len(x["settings"]))
    thr = (1.0 - margin) * float(b["rps"])
    if rps is None:
        return CheckOutcome(key, b["id"], None, b["rps"], thr, False, f"run has no RPS; baseline {b['id']}")
    ok = rps >= thr
    verdict = "OK" if ok else "REGRESSION"
    msg = (
        f"{verdict}: {rps:.3f} RPS vs baseline {b['id']} {b['rps']} RPS "
        f"(threshold {thr:.3f} = (1 - {margin}) x baseline)"
    )
    return CheckOutcome(key, b["id"], rps, b["rps"], thr, ok, msg)


# --------------------------------------------------------------------------- console


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def results_table(runs: Sequence[dict[str, Any]]) -> Table:
    t = Table(title="llama3-ops bench", show_lines=False)
    for col in (
        "mode",
        "conc",
        "achieved max/mean",
        "ok/fail",
        "RPS",
        "out tok/s",
        "total tok/s",
        "TTFT p50/p99 s",
        "TPOT p50 ms",
        "ITL p50 ms",
        "e2e p50/p99 s",
        "wall s",
    ):
        t.add_column(col, justify="right")
    for r in runs:
        m = r["metrics"]
        c = r["concurrency"]
        tpot = m["tpot_s"]["p50"]
        itl = m["itl_s"]["p50"]
        t.add_row(
            r["mode"],
            str(c["requested"]),
            f"{_f(c['achieved_max'])}/{_f(c['achieved_mean'], 1)}",
            f"{m['successful']}/{m['failed']}",
            _f(m["rps"]),
            _f(m["output_tok_s"], 1),
            _f(m["total_tok_s"], 1),
            f"{_f(m['ttft_s']['p50'])}/{_f(m['ttft_s']['p99'])}",
            _f(tpot * 1000 if tpot is not None else None, 1),
            _f(itl * 1000 if itl is not None else None, 1),
            f"{_f(m['e2e_s']['p50'])}/{_f(m['e2e_s']['p99'])}",
            _f(m["wall_s"], 1),
        )
    return t


def comparison_table(run: dict[str, Any], baselines: Sequence[dict[str, Any]]) -> Table | None:
    cands = comparable(baselines, run)
    if not cands:
        return None
    m = run["metrics"]
    t = Table(
        title=f"vs baselines ({gpu_key(str(run['provenance']['gpu']['name']))}, {run['mode']}, "
        f"c={run['concurrency']['requested']})"
    )
    for col in ("baseline", "same settings", "RPS", "ratio", "out tok/s", "ratio", "total tok/s", "ratio"):
        t.add_column(col, justify="right")

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"

    for b in cands:
        t.add_row(
            b["id"],
            "yes" if baseline_matches(b, run) else "no",
            _f(b["rps"]),
            ratio(m["rps"], b["rps"]),
            _f(b["output_tok_s"], 1),
            ratio(m["output_tok_s"], b["output_tok_s"]),
            _f(b.get("total_tok_s"), 1),
            ratio(m["total_tok_s"], b.get("total_tok_s")),
        )
    return t


def print_report(
    runs: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]], console: Console | None = None
) -> None:
    console = console or Console()
    console.print(results_table(runs))
    for r in runs:
        ct = comparison_table(r, baselines)
        if ct is not None:
            console.print(ct)


def summary_record(
    runs: Sequence[dict[str, Any]], files: Sequence[Path], plots: Sequence[Path]
) -> dict[str, Any]:
    return {
        "schema": SUMMARY_SCHEMA,
        "status": COMPLETE_WITH_FAILURES if any(r["metrics"]["failed"] for r in runs) else COMPLETE,
        "provenance": runs[0]["provenance"] if runs else provenance(),
        "points": [
            {
                "file": str(f.name),
                "concurrency": r["concurrency"],
                "settings_key": r["settings_key"],
                "rps": r["metrics"]["rps"],
                "output_tok_s": r["metrics"]["output_tok_s"],
                "total_tok_s": r["metrics"]["total_tok_s"],
                "ttft_p50_s": r["metrics"]["ttft_s"]["p50"],
                "e2e_p50_s": r["metrics"]["e2e_s"]["p50"],
                "failed": r["metrics"]["failed"],
                "status": r["status"],
            }
            for r, f in zip(runs, files, strict=True)
        ],
        "plots": [str(p.name) for p in plots],
    }
