"""PNG plots of a sweep (matplotlib, Agg backend): throughput vs concurrency and latency CDFs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def throughput_plot(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """RPS and output tok/s against requested concurrency (one point per run)."""
    pts = sorted(runs, key=lambda r: r["concurrency"]["requested"])
    xs = [r["concurrency"]["requested"] for r in pts]
    rps = [r["metrics"]["rps"] or 0.0 for r in pts]
    tok = [r["metrics"]["output_tok_s"] or 0.0 for r in pts]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(xs, rps, "o-", color="tab:blue", label="requests/s")
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("requests/s", color="tab:blue")
    if len(set(xs)) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax2 = ax.twinx()
    ax2.plot(xs, tok, "s--", color="tab:orange", label="output tok/s")
    ax2.set_ylabel("output tokens/s", color="tab:orange")
    title = pts[0]["engine"].get("name", "") if pts else ""
    ax.set_title(f"throughput vs concurrency {title}".strip())
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def latency_cdf_plot(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Empirical CDFs of TTFT and end-to-end latency, one line per concurrency."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for r in sorted(runs, key=lambda r: r["concurrency"]["requested"]):
        label = f"c={r['concurrency']['requested']}"
        ok = [q for q in r["per_request"] if q.get("success")]
        for ax, key in ((a1, "ttft"), (a2, "e2e")):
            xs = sorted(float(q[key]) for q in ok if q.get(key) is not None)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=label)
    for ax, name in ((a1, "TTFT"), (a2, "end-to-end latency")):
        ax.set_xlabel(f"{name} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{name} CDF")
    return _save(fig, path)
