"""A fast OpenAI-compatible stand-in server that streams N tokens at a fixed rate (aiohttp).

For testing load generators and tunnels without a model: every completion streams exactly
``max_tokens`` chunks of one token each (``ignore_eos`` is implied), the first after ``--ttft-ms``,
the following ones every ``1 / --tokens-per-s`` seconds on an absolute schedule (no drift). The
final chunk carries ``usage`` when the request asks for it (``stream_options.include_usage``).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming or not), ``GET /stats`` (requests, in flight, max in
flight since start or last reset, requests by ``max_tokens`` since start), ``POST /stats/reset``.

``--fail-every N`` answers every Nth completion request (the Nth, 2Nth, ... since start) with HTTP
500 and :data:`FAILURE_BODY`, for testing how a client reports failed requests.

Usage: ``python -m llama3_ops.lab.standin --port P --tokens-per-s R [--ttft-ms T] [--fail-every N] [--host H]``

In Python: ``with standin_process(tokens_per_s=50) as base_url: ...`` runs it in a subprocess on a
free port and waits until ``/health`` answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llama3_ops.remote.procs import stop_process

DEFAULT_MAX_TOKENS = 16
TOKEN_TEXT = " hi"  # noqa: S105 - not a secret
FAILURE_BODY = {"error": {"message": "standin: injected failure (--fail-every)", "type": "server_error"}}


@dataclass
class StandinConfig:
    tokens_per_s: float = 50.0
    ttft_s: float = 0.0
    model: str = "standin"
    # The first N tokens of each stream carry empty text, as lmdeploy streams tokens that end
    # inside a UTF-8 sequence (random-weight models produce many).
    empty_tokens: int = 0
    fail_every: int = 0  # every Nth completion request gets HTTP 500 (0: none)


@dataclass
class _Stats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    completions: int = 0  # since start (not reset): what --fail-every counts
    failed: int = 0
    max_tokens: dict[int, int] = field(default_factory=dict)  # max_tokens asked -> requests (since start)


def _chunk(kind: str, model: str, rid: str, text: str | None, finish: str | None) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def make_app(cfg: StandinConfig) -> web.Application:
    stats = _Stats()
    app = web.Application()

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": cfg.model, "object": "model"}]})

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(
            {"requests": stats.requests, "in_flight": stats.in_flight, "max_in_flight": stats.max_in_flight,
             "failed": stats.failed, "max_tokens": {str(k): v for k, v in sorted(stats.max_tokens.items())}}
        )

    async def reset_stats(_: web.Request) -> web.Response:
        stats.requests = 0
        stats.max_in_flight = stats.in_flight
        return web.json_response({"ok": True})

    async def complete(request: web.Request, kind: str) -> web.StreamResponse:
        t0 = time.perf_counter()
        body = await request.json()
        stats.completions += 1
        if cfg.fail_every and stats.completions % cfg.fail_every == 0:
            stats.failed += 1
            return web.json_response(FAILURE_BODY, status=500)
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        stats.max_tokens[n] = stats.max_tokens.get(n, 0) + 1
        if kind == "chat":
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        else:
            prompt = str(body.get("prompt", ""))
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": n,
            "total_tokens": len(prompt.split()) + n,
        }
        model = str(body.get("model") or cfg.model)
        rid = f"standin-{stats.requests}"
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            interval = 1.0 / cfg.tokens_per_s
            first = t0 + cfg.ttft_s
            if not body.get("stream"):
                await asyncio.sleep(max(0.0, first + (n - 1) * interval - time.perf_counter()))
                choice: dict[str, Any] = (
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": TOKEN_TEXT * n},
                        "finish_reason": "length",
                    }
                    if kind == "chat"
                    else {"index": 0, "text": TOKEN_TEXT * n, "finish_reason": "length"}
                )
                return web.json_response(
                    {"id": rid, "object": "completion", "model": model, "choices": [choice], "usage": usage}
                )
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            def text_of(k: int) -> str:
                return "" if k < cfg.empty_tokens else TOKEN_TEXT

            for k in range(n):
                delay = first + k * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                finish = "length" if k == n - 1 else None
                await resp.write(
                    f"data: {json.dumps(_chunk(kind, model, rid, text_of(k), finish))}\n\n".encode()
                )
            if (body.get("stream_options") or {}).get("include_usage"):
                last = _chunk(kind, model, rid, None, None)
                last["choices"] = []
                last["usage"] = usage
                await resp.write(f"data: {json.dumps(last)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            stats.in_flight -= 1

    async def completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, "text")

    async def chat(request: web.Request) -> web.StreamResponse:
        return await complete(request, "chat")

    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    return app


class ServerURL(str):
    """A server's base URL that also names its process (``pid``), for CPU accounting."""

    pid: int

    def __new__(cls, url: str, pid: int) -> ServerURL:
        obj = super().__new__(cls, url)
        obj.pid = pid
        return obj


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; raise TimeoutError (or RuntimeError if ``proc`` died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:  # noqa: S310 - local http URL
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def standin_process(
    tokens_per_s: float = 50.0,
    ttft_ms: float = 0.0,
    host: str = "127.0.0.1",
    port: int | None = None,
    empty_tokens: int = 0,
    fail_every: int = 0,
) -> Iterator[ServerURL]:
    """Run the stand-in in a subprocess; yields its base URL (``http://host:port``) and pid."""
    port = port or free_port(host)
    cmd = [
        sys.executable,
        "-m",
        "llama3_ops.lab.standin",
        "--host",
        host,
        "--port",
        str(port),
        "--tokens-per-s",
        str(tokens_per_s),
        "--ttft-ms",
        str(ttft_ms),
        "--empty-tokens",
        str(empty_tokens),
        "--fail-every",
        str(fail_every),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    base = ServerURL(f"http://{host}:{port}", proc.pid)
    try:
        wait_http_ok(base + "/health", 30.0, proc)
        yield base
    finally:
        stop_process(proc, timeout=10)


@contextlib.contextmanager
def transformers_serve_process(
    model_dir: str, port: int | None = None, timeout_s: float = 120.0, cpus: set[int] | None = None
) -> Iterator[ServerURL]:
    """Run a real ``transformers serve`` on CPU for ``model_dir``; yields its base URL and pid.

    ``cpus`` pins the server (and its torch threads) to those cores, so that a load generator on the
    other cores does not slow it down.
    """
    import os
    import shutil
    from pathlib import Path

    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    if not Path(exe).exists():
        raise FileNotFoundError("transformers CLI not installed (pip install 'llama3-ops[model]')")
    port = port or free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if cpus:
        env["OMP_NUM_THREADS"] = str(len(cpus))
    proc = subprocess.Popen(
        [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", model_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    base = ServerURL(f"http://127.0.0.1:{port}", proc.pid)
    try:
        wait_http_ok(base + "/health", timeout_s, proc)
        yield base
    finally:
        stop_process(proc, timeout=15)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m llama3_ops.lab.standin", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="per-request streaming rate")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    ap.add_argument("--model", default="standin")
    ap.add_argument("--empty-tokens", type=int, default=0, help="first N tokens stream empty text")
    ap.add_argument("--fail-every", type=int, default=0, help="answer every Nth completion with HTTP 500")
    args = ap.parse_args(argv)
    if args.tokens_per_s <= 0:
        ap.error("--tokens-per-s must be > 0")
    if args.fail_every < 0:
        ap.error("--fail-every must be >= 0")
    cfg = StandinConfig(tokens_per_s=args.tokens_per_s, ttft_s=args.ttft_ms / 1000.0, model=args.model,
                         empty_tokens=args.empty_tokens, fail_every=args.fail_every)
    print(f"standin listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(make_app(cfg), host=args.host, port=args.port, print=None, backlog=4096, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
