"""Warm the engine before ``fab serve`` says ready: waves of requests that pass through every batch size.

The first benchmark after an lmdeploy server starts ran 12-15% below the next ones on the same server
(H200, 2026-12-03: 47.3-47.7 RPS, then 53.4-56.1), although lmdeploy warms its decoding at start-up: the
first real load through the API still pays for shapes and batch sizes not seen yet. With these waves
first, the first bench after ``fab serve`` ran within 0.4% of the second (55.69 and 55.93 RPS,
results/h200/2026-12-04/fast-by-default/). A user's first load should not pay for it, so ``fab serve``
sends :class:`Plan` first: ``waves`` times, ``requests`` chat completions at
once (the engine's max batch size), prompts of spread lengths (prefill shapes), and answers of staircase
lengths (``min_tokens`` for the first request up to ``max_tokens`` for the last), so the decode batch
steps down from ``requests`` to 1 and every CUDA-graph bucket is used once.

The requests run on the host itself (``python3``, standard library only: threads and ``http.client``),
so no tunnel is needed yet and the API key travels on stdin, never in argv.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.transport import Remote

# prompt lengths in words, cycled over a wave's requests (ShareGPT prompts: mean ~230 tokens, long tail)
PROMPT_WORDS = (16, 64, 128, 256, 512, 1024)
_WORD = "course"


class WarmupError(Llama3OpsError):
    """The server failed requests during its warm-up: it is not ready."""


@dataclass(frozen=True)
class Plan:
    requests: int  # at once, per wave
    waves: int = 2
    min_tokens: int = 2
    max_tokens: int = 128
    ignore_eos: bool = True  # lmdeploy: fixed answer lengths; transformers serve rejects the field

    def __post_init__(self) -> None:
        if self.requests < 1 or self.waves < 1 or not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"bad warm-up plan {self}")

    def tokens(self, i: int) -> int:
        """Answer length of request ``i`` of a wave: a staircase from min_tokens to max_tokens."""
        span = self.max_tokens - self.min_tokens
        return self.min_tokens + (span * i) // max(1, self.requests - 1)

    def describe(self) -> str:
        return (f"{self.waves} wave(s) of {self.requests} requests at once, answers of "
                f"{self.min_tokens}-{self.max_tokens} tokens")


def plan_for(engine: str, max_batch_size: int | None) -> Plan:
    """lmdeploy: two waves at the max batch size; transformers serve (CPU, one request at a time): a token."""
    if engine == "transformers":
        return Plan(requests=1, waves=1, min_tokens=1, max_tokens=2, ignore_eos=False)
    return Plan(requests=max(1, max_batch_size or 128))


@dataclass
class Result:
    plan: Plan
    seconds: float
    waves: list[dict[str, float | int]]  # per wave: ok, failed, seconds

    def to_dict(self) -> dict[str, object]:
        return {"plan": asdict(self.plan), "seconds": round(self.seconds, 2), "waves": self.waves}


# One wave on the host: every request in its own thread, released together; prints one JSON line.
_WAVE = r"""
import http.client, json, sys, threading, time
a = json.loads(sys.stdin.read())
words = a["words"]; ok = [0]; errors = []; lock = threading.Lock(); gate = threading.Event()
def one(i):
    body = {"model": a["model"], "max_tokens": a["tokens"][i], "temperature": 0.0,
            "messages": [{"role": "user", "content": " ".join([a["word"]] * words[i % len(words)])}]}
    if a["ignore_eos"]:
        body["ignore_eos"] = True
    headers = {"Content-Type": "application/json"}
    if a["key"]:
        headers["Authorization"] = "Bearer " + a["key"]
    gate.wait()
    try:
        c = http.client.HTTPConnection("127.0.0.1", a["port"], timeout=a["timeout"])
        c.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        r = c.getresponse(); text = r.read()[:200].decode(errors="replace")
        with lock:
            if r.status == 200: ok[0] += 1
            else: errors.append(f"HTTP {r.status}: {text}")
    except Exception as e:
        with lock: errors.append(f"{type(e).__name__}: {e}")
ts = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(a["tokens"]))]
for t in ts: t.start()
t0 = time.monotonic(); gate.set()
for t in ts: t.join()
print(json.dumps({"ok": ok[0], "failed": len(errors), "seconds": round(time.monotonic() - t0, 3),
                  "errors": errors[:3]}))
"""


def run(
    remote: Remote,
    port: int,
    model_id: str,
    plan: Plan,
    *,
    api_key: str | None = None,
    console: Console | None = None,
    wave_timeout: float = 600.0,
    on_wave: Callable[[int, dict[str, float | int]], None] | None = None,
) -> Result:
    """Send ``plan`` to the server on the host's 127.0.0.1:``port``; :class:`WarmupError` on any failure."""
    console = console or Console(stderr=True)
    arg = {"model": model_id, "port": port, "key": api_key, "word": _WORD, "words": list(PROMPT_WORDS),
           "tokens": [plan.tokens(i) for i in range(plan.requests)], "ignore_eos": plan.ignore_eos,
           "timeout": wave_timeout}
    waves: list[dict[str, float | int]] = []
    t0 = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} waves"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"warming up the engine: {plan.describe()}", total=plan.waves)
        for w in range(plan.waves):
            res = remote.run(f"python3 -c {shlex.quote(_WAVE)}", stdin=json.dumps(arg), timeout=wave_timeout + 60,
                             check=False)
            if res.rc != 0:
                raise WarmupError(f"warm-up wave {w + 1} could not run on {remote.label}: "
                                  f"{(res.stderr.strip() or res.stdout.strip())[-300:]}")
            try:
                out = json.loads((res.stdout.strip().splitlines() or [""])[-1])
            except ValueError:
                raise WarmupError(f"warm-up wave {w + 1} on {remote.label} printed no result: "
                                  f"{res.stdout.strip()[-300:]!r}") from None
            if out["failed"]:
                raise WarmupError(f"warm-up wave {w + 1}: {out['failed']} of {plan.requests} requests failed "
                                  f"(first: {out['errors'][0]}): the server is not ready; fab logs shows why")
            rec = {"ok": out["ok"], "failed": 0, "seconds": out["seconds"]}
            waves.append(rec)
            if on_wave:
                on_wave(w, rec)
            progress.advance(task)
    return Result(plan, time.monotonic() - t0, waves)
