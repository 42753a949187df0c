"""Per-request records and their aggregation (RPS, tok/s, latency percentiles, achieved concurrency).

Definitions (all times in seconds, ``time.perf_counter`` clock):

* ``ttft``: request start (just before it is handed to the HTTP client / engine) to the first
  streamed chunk carrying text;
* ``itl``: gaps between consecutive text chunks of one request;
* ``tpot``: ``(e2e - ttft) / (output_tokens - 1)`` for requests with more than one output token;
* ``e2e``: request start to its last byte;
* ``wall``: first request start to last request end;
* ``rps`` = successful requests / wall; ``output_tok_s`` = output tokens of successful requests / wall;
  ``total_tok_s`` = (prompt + output tokens) / wall, as lmdeploy's profile_throughput;
* percentiles: linear interpolation between closest ranks (numpy's default ``linear`` method);
* achieved concurrency: from the intervals during which each request was really at the server
  (request headers sent -> last byte): the maximum overlap, and the time-weighted mean over the
  window [first send, last end] (= sum of interval lengths / window length).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    requested_output_len: int
    start: float = 0.0
    sent: float | None = None  # request headers on the wire (connection acquired)
    end: float = 0.0
    first_token: float | None = None
    output_tokens: int = 0
    output_tokens_source: str = "none"  # "usage" | "chunks" | "engine"
    server_prompt_tokens: int | None = None
    itl: list[float] = field(default_factory=list)
    success: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_compact(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("itl")
        d["ttft"] = self.ttft
        d["e2e"] = self.e2e
        d["tpot"] = self.tpot
        return d


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile out of range: {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(xs[lo])
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99, min, max of ``values`` (all None if empty)."""
    out: dict[str, float | None] = {"mean": (sum(values) / len(values)) if values else None}
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(values, q)
    out["min"] = min(values) if values else None
    out["max"] = max(values) if values else None
    return out


def achieved_concurrency(intervals: Sequence[tuple[float, float]]) -> tuple[int, float]:
    """(max overlap, time-weighted mean overlap over [min start, max end]) of half-open intervals."""
    ivs = [(a, b) for a, b in intervals if b >= a]
    if not ivs:
        return 0, 0.0
    events: list[tuple[float, int]] = []
    for a, b in ivs:
        events.append((a, 1))
        events.append((b, -1))
    # At equal times, ends (-1) sort before starts (+1): touching intervals do not overlap.
    events.sort()
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    window = max(b for _, b in ivs) - min(a for a, _ in ivs)
    mean = sum(b - a for a, b in ivs) / window if window > 0 else float(peak)
    return peak, mean


def failure_reasons(results: Sequence[RequestResult], top: int = 10) -> list[dict[str, Any]]:
    """The failed requests' errors, most common first: ``[{"reason": ..., "count": N}, ...]``."""
    counts = Counter(r.error or "unknown error" for r in results if not r.success)
    return [{"reason": reason, "count": n} for reason, n in counts.most_common(top)]


def aggregate(results: Sequence[RequestResult], wall_s: float | None = None) -> dict[str, Any]:
    """Run-level metrics from per-request results (see the module docstring for definitions)."""
    ok = [r for r in results if r.success]
    if wall_s is None:
        wall_s = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_len for r in ok)
    intervals = [(r.sent if r.sent is not None else r.start, r.end) for r in results if r.end > 0]
    peak, mean = achieved_concurrency(intervals)
    itl = [x for r in ok for x in r.itl]
    ttft = [t for r in ok if (t := r.ttft) is not None]
    tpot = [t for r in ok if (t := r.tpot) is not None]
    e2e = [r.e2e for r in ok]
    queue = [r.sent - r.start for r in results if r.sent is not None]

    def rate(x: float) -> float | None:
        return x / wall_s if wall_s > 0 else None

    return {
        "requests": len(results),
        "successful": len(ok),
        "failed": len(results) - len(ok),
        "wall_s": wall_s,
        "rps": rate(len(ok)),
        "output_tok_s": rate(out_tokens),
        "total_tok_s": rate(out_tokens + prompt_tokens),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "requested_output_tokens": sum(r.requested_output_len for r in ok),
        "output_tokens_source": sorted({r.output_tokens_source for r in ok}),
        "ttft_s": distribution(ttft),
        "tpot_s": distribution(tpot),
        "itl_s": distribution(itl),
        "e2e_s": distribution(e2e),
        "client_queue_s": distribution(queue),
        "achieved_concurrency_max": peak,
        "achieved_concurrency_mean": mean,
        "errors": sorted({r.error for r in results if r.error})[:10],
        "failure_reasons": failure_reasons(results),
    }
