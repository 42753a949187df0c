"""Async OpenAI-compatible load generator (aiohttp): closed loop, ``concurrency`` requests in flight.

``concurrency`` workers pull requests from one queue (as lmdeploy's profile_throughput threads do),
so at most ``concurrency`` are in flight and a new one starts as soon as one ends.

Pitfall avoided: aiohttp's ``TCPConnector`` defaults to ``limit=100`` connections, which silently
caps any run at 100 in flight. We use ``limit=0`` (unlimited) by default and *measure* the achieved
concurrency from the time each request's headers were really sent (aiohttp trace
``on_request_headers_sent``), so a connection cap shows up in the result instead of hiding in it.

Output tokens: from ``usage.completion_tokens`` of the final chunk (we ask for it with
``stream_options.include_usage``); servers that do not send usage get the count of token chunks.

Token events: every chunk that carries a choice with text (``text`` or ``delta.content``), even
empty text. lmdeploy streams a token that ends inside a UTF-8 sequence as "" (random-weight models
produce many), so TTFT and ITL are timed on token events, and a request whose tokens all decode to
"" still succeeds. Not tokens: a chat role-only preamble, and a closing chunk with empty text and a
``finish_reason`` (``transformers serve`` ends every stream with one, carrying ``usage``).

A request succeeds only when its stream ended as streams end (``data: [DONE]``, or a chunk with a
``finish_reason``: ``transformers serve`` sends no ``[DONE]``); one cut off by a server that went
away fails, whatever it streamed before. Failed requests are recorded with their error; the caller
reports them (:func:`llama3_ops.bench.metrics.failure_reasons`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.metrics import RequestResult
from llama3_ops.bench.workload import Request

MAX_REQUESTS = 100_000


@dataclass
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "completions"  # "completions" | "chat"
    api_key: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # lmdeploy: top_k=1 takes the argmax shortcut instead of a top-p sort
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    total_timeout_s: float = 3600.0
    connector_limit: int = 0  # 0 = unlimited; aiohttp's default of 100 would cap concurrency
    max_requests: int = MAX_REQUESTS
    progress: bool = True

    def url(self) -> str:
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def public(self) -> dict[str, Any]:
        """Settings for the report: never the key itself."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.url(),
            "api_key": "set" if self.api_key else "none",
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
            "request_timeout_s": self.request_timeout_s,
            "total_timeout_s": self.total_timeout_s,
            "connector_limit": self.connector_limit,
        }


@dataclass
class LoadResult:
    results: list[RequestResult]
    wall_s: float
    timed_out: bool


def build_payload(cfg: ClientConfig, req: Request) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.output_len,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.top_k is not None:
        body["top_k"] = cfg.top_k
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _is_token_event(obj: dict[str, Any]) -> bool:
    """A chunk that carries a generated token, even one whose text is empty.

    Byte-level BPE tokens that end inside a UTF-8 sequence are streamed as empty text (lmdeploy
    holds the bytes back). Chat role-only preambles (``{"delta": {"role": ...}}``) are not tokens,
    nor is a closing chunk whose text is empty and which carries a ``finish_reason``: ``transformers
    serve`` sends one after the last token (with ``usage``); counted, it added one ITL gap per request.
    """
    choices = obj.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    if "delta" in c:
        delta = c.get("delta") or {}
        if "content" not in delta or ("role" in delta and not delta.get("content")):
            return False
        text = delta.get("content")
    elif "text" in c:
        text = c.get("text")
    else:
        return False
    return bool(text) or not c.get("finish_reason")


async def _on_headers_sent(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    rec = getattr(ctx, "trace_request_ctx", None)
    if isinstance(rec, RequestResult) and rec.sent is None:
        rec.sent = time.perf_counter()


class _Stream:
    """What one request's SSE events say: tokens and their timing, usage, whether it finished."""

    def __init__(self, rec: RequestResult) -> None:
        self.rec = rec
        self.chunks = 0
        self.last: float | None = None
        self.finished = False

    def feed(self, obj: dict[str, Any], now: float) -> None:
        rec = self.rec
        usage = obj.get("usage")
        if usage:
            rec.output_tokens = int(usage.get("completion_tokens") or 0)
            rec.output_tokens_source = "usage"
            if usage.get("prompt_tokens") is not None:
                rec.server_prompt_tokens = int(usage["prompt_tokens"])
        self.finished = self.finished or any(c.get("finish_reason") for c in obj.get("choices") or [])
        if _is_token_event(obj):
            self.chunks += 1
            if rec.first_token is None:
                rec.first_token = now
            elif self.last is not None:
                rec.itl.append(now - self.last)
            self.last = now

    def close(self) -> None:
        rec = self.rec
        if rec.output_tokens_source != "usage":
            rec.output_tokens = self.chunks
            rec.output_tokens_source = "chunks"
        rec.success = rec.first_token is not None and self.finished
        if rec.first_token is None:
            rec.error = "no tokens streamed"
        elif not self.finished:
            rec.error = "stream cut off: it ended without a finish_reason or [DONE]"


async def send_one(
    session: aiohttp.ClientSession,
    cfg: ClientConfig,
    idx: int,
    req: Request,
    rec: RequestResult | None = None,
) -> RequestResult:
    """One streaming request; raises only CancelledError (other errors are recorded on the result)."""
    if rec is None:
        rec = RequestResult(index=idx, prompt_len=req.prompt_len, requested_output_len=req.output_len)
    rec.start = time.perf_counter()
    stream = _Stream(rec)
    try:
        async with session.post(
            cfg.url(), json=build_payload(cfg, req), headers=cfg.headers(), trace_request_ctx=rec
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                rec.error = f"HTTP {resp.status}: {text}"
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    stream.finished = True
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if obj.get("error"):
                    rec.error = f"stream error: {str(obj['error'])[:200]}"
                    return rec
                stream.feed(obj, now)
        stream.close()
    except asyncio.CancelledError:
        rec.error = "cancelled (overall timeout)"
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        rec.end = time.perf_counter()
    return rec


async def check_server(cfg: ClientConfig, timeout_s: float = 10.0) -> dict[str, Any]:
    """GET /v1/models; BenchError if the server cannot be reached or refuses us."""
    url = cfg.base_url.rstrip("/") + "/v1/models"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
            s.get(url, headers=cfg.headers()) as r,
        ):
            if r.status in (401, 403):
                raise BenchError(f"{url}: HTTP {r.status} (check --api-key / the API key variable)")
            if r.status != 200:
                raise BenchError(f"{url}: HTTP {r.status}")
            data: dict[str, Any] = await r.json(content_type=None)
            return data
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise BenchError(f"cannot reach {cfg.base_url}: {type(exc).__name__}: {exc}") from exc


async def probe_ignore_eos(cfg: ClientConfig, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Does the server accept ``ignore_eos``? (lmdeploy and vLLM do; transformers serve rejects it.)

    Sends one 1-token request with ``ignore_eos: true``; a 4xx answer naming ``ignore_eos`` means no.
    """
    body = build_payload(cfg, Request("Hello", 1, 1))
    body["ignore_eos"] = True
    body["stream"] = False
    body.pop("stream_options", None)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
            s.post(cfg.url(), json=body, headers=cfg.headers()) as r,
        ):
            text = await r.text()
            if 400 <= r.status < 500 and "ignore_eos" in text:
                return False, f"server rejected ignore_eos (HTTP {r.status}): {text[:160]}"
            if r.status != 200:
                raise BenchError(f"{cfg.url()}: probe request failed with HTTP {r.status}: {text[:200]}")
            return True, "server accepts ignore_eos"
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"cannot reach {cfg.url()}: {type(exc).__name__}: {exc}") from exc


async def run_load(requests: Sequence[Request], concurrency: int, cfg: ClientConfig) -> LoadResult:
    """Send ``requests``, ``concurrency`` in flight; bounded by ``max_requests`` and ``total_timeout_s``."""
    if concurrency <= 0:
        raise BenchError("concurrency must be > 0")
    reqs = list(requests)[: cfg.max_requests]
    queue: asyncio.Queue[tuple[int, Request]] = asyncio.Queue()
    for i, r in enumerate(reqs):
        queue.put_nowait((i, r))
    results: list[RequestResult] = []
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    connector = aiohttp.TCPConnector(limit=cfg.connector_limit, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=30)
    progress = Progress(
        TextColumn(f"[bold]c={concurrency}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]} failed"),
        disable=not cfg.progress,
        transient=False,
    )
    task_id = progress.add_task("requests", total=len(reqs), failed=0)
    failed = 0
    in_flight: dict[int, RequestResult] = {}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        while True:
            try:
                i, r = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            rec = RequestResult(index=i, prompt_len=r.prompt_len, requested_output_len=r.output_len)
            in_flight[i] = rec
            await send_one(session, cfg, i, r, rec)
            del in_flight[i]
            results.append(rec)
            failed += 0 if rec.success else 1
            progress.update(task_id, advance=1, failed=failed)

    timed_out = False
    t0 = time.perf_counter()
    with progress:
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trace_configs=[trace]
        ) as session:
            tasks = [asyncio.create_task(worker(session)) for _ in range(min(concurrency, len(reqs)))]
            done, pending = await asyncio.wait(tasks, timeout=cfg.total_timeout_s)
            if pending:
                timed_out = True
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                results.extend(in_flight.values())
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
    t1 = time.perf_counter()
    started = {r.index for r in results}
    now = time.perf_counter()
    for i, r in enumerate(reqs):
        if i not in started:
            results.append(
                RequestResult(
                    index=i,
                    prompt_len=r.prompt_len,
                    requested_output_len=r.output_len,
                    start=now,
                    end=0.0,
                    error="not run (overall timeout)",
                )
            )
    ran = [r for r in results if r.end > 0]
    wall = (max(r.end for r in ran) - min(r.start for r in ran)) if ran else t1 - t0
    results.sort(key=lambda r: r.index)
    return LoadResult(results=results, wall_s=wall, timed_out=timed_out)
