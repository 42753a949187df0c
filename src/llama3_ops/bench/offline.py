"""lmdeploy in-process ("offline") throughput, as ``benchmark/profile_throughput.py`` runs it.

The engine is built with ``lmdeploy.pipeline(model, backend_config=...)``: ``PytorchEngineConfig``
(or ``TurbomindEngineConfig`` for ``backend="turbomind"``) with ``max_batch_size = concurrency``
(profile_throughput sets the batch size to its ``--concurrency``), ``cache_max_entry_count``, ``tp``,
``session_len`` and ``quant_policy``. Every request gets
``GenerationConfig(max_new_tokens=output_len, ignore_eos=True, top_k=1, ...)``.

Streaming (``pipeline.stream_infer``, lmdeploy >= 0.5) gives per-request TTFT/ITL/e2e, measured
from the moment the batch is submitted (so TTFT includes the engine's queueing, as in
profile_throughput); without it we fall back to the batch call ``pipeline(prompts, gen_config=...)``
and report RPS/tok/s only.

lmdeploy is imported inside the functions (it is not installable on CPU-only hosts); the
``lmdeploy_module`` argument takes any object with the same attributes, which is how the unit tests
check the configs. A script that starts the engine must guard with ``if __name__ == "__main__":``
(lmdeploy spawns worker processes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.metrics import RequestResult
from llama3_ops.bench.workload import Request


@dataclass
class OfflineSettings:
    backend: str = "pytorch"  # "pytorch" | "turbomind"
    max_batch_size: int = 256
    cache_max_entry_count: float = 0.8
    tp: int = 1
    session_len: int = 4096
    quant_policy: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 1
    stream: bool = True
    chat_template: bool = False
    # "pipeline": lmdeploy.pipeline (detokenizes every step, as a user's script does);
    # "engine": the PyTorch engine driven directly with pre-tokenized ids and no detokenization,
    # concurrency workers each with an engine instance (what benchmark/profile_throughput.py does).
    driver: str = "pipeline"
    # Further engine-config fields, passed through as given (e.g. max_prefill_token_num=8192).
    engine_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_lmdeploy() -> Any:
    try:
        import lmdeploy
    except ImportError as exc:
        raise BenchError("lmdeploy is not installed (pip install lmdeploy on a CUDA host)") from exc
    return lmdeploy


def build_engine_config(settings: OfflineSettings, lmdeploy_module: Any) -> Any:
    """``PytorchEngineConfig`` / ``TurbomindEngineConfig`` as profile_throughput builds them."""
    common = {
        "session_len": settings.session_len,
        "max_batch_size": settings.max_batch_size,
        "tp": settings.tp,
        "cache_max_entry_count": settings.cache_max_entry_count,
    }
    if settings.backend == "turbomind":
        return lmdeploy_module.TurbomindEngineConfig(**common, quant_policy=settings.quant_policy,
                                                     **settings.engine_options)
    if settings.backend == "pytorch":
        kw: dict[str, Any] = dict(common)
        if settings.quant_policy:
            kw["quant_policy"] = settings.quant_policy
        kw.update(settings.engine_options)
        try:
            return lmdeploy_module.PytorchEngineConfig(**kw)
        except TypeError as exc:
            opts = settings.engine_options
            raise BenchError(f"PytorchEngineConfig rejected the engine options {opts}: {exc}") from exc
    raise BenchError(f"unknown backend {settings.backend!r} (pytorch or turbomind)")


def build_gen_configs(
    requests: Sequence[Request], settings: OfflineSettings, lmdeploy_module: Any
) -> list[Any]:
    return [
        lmdeploy_module.GenerationConfig(
            max_new_tokens=r.output_len,
            ignore_eos=True,
            top_k=settings.top_k,
            top_p=settings.top_p,
            temperature=settings.temperature,
        )
        for r in requests
    ]


def _token_count(item: Any) -> int:
    n = getattr(item, "generate_token_len", None)
    if n is None:
        ids = getattr(item, "token_ids", None)
        n = len(ids) if ids is not None else 0
    return int(n)


def run_offline(
    model: str,
    requests: Sequence[Request],
    settings: OfflineSettings,
    lmdeploy_module: Any | None = None,
    pipe: Any | None = None,
) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Run the requests through an lmdeploy pipeline; returns (results, wall seconds, engine info)."""
    if settings.max_batch_size <= 0:
        raise BenchError("max batch size (concurrency) must be > 0")
    lm = lmdeploy_module if lmdeploy_module is not None else import_lmdeploy()
    backend_config = build_engine_config(settings, lm)
    if settings.driver == "engine":
        return run_engine_driver(model, requests, settings, lm, backend_config)
    if settings.driver != "pipeline":
        raise BenchError(f"unknown driver {settings.driver!r} (pipeline or engine)")
    own_pipe = pipe is None
    if pipe is None:
        pipe = lm.pipeline(model, backend_config=backend_config)
    try:
        return _drive(pipe, requests, settings, lm, backend_config)
    finally:
        if own_pipe:
            close_pipeline(pipe)


def close_pipeline(pipe: Any) -> None:
    """Free the engine (processes, GPU memory) so that the next sweep point can start its own."""
    close = getattr(pipe, "close", None)
    if callable(close):
        close()
    del pipe
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _drive(
    pipe: Any, requests: Sequence[Request], settings: OfflineSettings, lm: Any, backend_config: Any
) -> tuple[list[RequestResult], float, dict[str, Any]]:
    gen = build_gen_configs(requests, settings, lm)
    prompts = [r.prompt for r in requests]
    results = [
        RequestResult(index=i, prompt_len=r.prompt_len, requested_output_len=r.output_len)
        for i, r in enumerate(requests)
    ]
    engine = {
        "name": "lmdeploy",
        "version": str(getattr(lm, "__version__", "unknown")),
        "backend": settings.backend,
        "config": repr(backend_config),
        "api": "",
    }
    t0 = time.perf_counter()
    for rec in results:
        rec.start = t0
        rec.sent = t0
    if settings.stream and hasattr(pipe, "stream_infer"):
        engine["api"] = "pipeline.stream_infer"
        last: dict[int, float] = {}
        # Raw prompts, no chat template: what profile_throughput feeds the engine.
        for item in pipe.stream_infer(prompts, gen_config=gen, do_preprocess=settings.chat_template):
            now = time.perf_counter()
            i = int(getattr(item, "index", 0))
            rec = results[i]
            n = _token_count(item)
            if n > rec.output_tokens:
                if rec.first_token is None:
                    rec.first_token = now
                elif i in last:
                    rec.itl.append(now - last[i])
                last[i] = now
                rec.output_tokens = n
            rec.end = now
            if getattr(item, "finish_reason", None) is not None:
                rec.success = rec.output_tokens > 0
    else:
        engine["api"] = "pipeline.__call__ (batch; RPS and tok/s only)"
        outs = pipe(prompts, gen_config=gen, do_preprocess=settings.chat_template)
        now = time.perf_counter()
        for rec, out in zip(results, outs, strict=True):
            rec.output_tokens = _token_count(out)
            rec.end = now
            rec.success = rec.output_tokens > 0
    for rec in results:
        rec.output_tokens_source = "engine"
        if not rec.success:
            rec.error = rec.error or "no finished output"
            rec.end = rec.end or time.perf_counter()
    wall = max(r.end for r in results) - t0 if results else 0.0
    return results, wall, engine


def run_engine_driver(
    model: str,
    requests: Sequence[Request],
    settings: OfflineSettings,
    lm: Any,
    backend_config: Any,
    engine_factory: Any | None = None,
    tokenize: Any | None = None,
) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Drive the PyTorch engine directly, as ``benchmark/profile_throughput.py`` does.

    Prompts are tokenized before the clock starts; ``max_batch_size`` workers each own an engine
    instance and pull requests from one queue; tokens are counted from the engine's outputs, never
    detokenized. ``engine_factory(model, backend_config)`` and ``tokenize(model) -> (str -> ids)``
    default to lmdeploy's ``Engine.from_pretrained`` and its ``Tokenizer``.
    """
    import asyncio

    if settings.backend != "pytorch":
        raise BenchError("the engine driver supports the PyTorch engine only (backend pytorch)")
    if engine_factory is None:
        from lmdeploy.pytorch.engine import Engine

        engine_factory = Engine.from_pretrained
    if tokenize is None:
        from lmdeploy.tokenizer import Tokenizer

        tok = Tokenizer(model)
        encode = tok.encode
    else:
        encode = tokenize(model)
    ids = [list(encode(r.prompt)) for r in requests]
    gen = build_gen_configs(requests, settings, lm)
    results = [
        RequestResult(index=i, prompt_len=len(ids[i]), requested_output_len=r.output_len)
        for i, r in enumerate(requests)
    ]
    info: dict[str, Any] = {
        "name": "lmdeploy",
        "version": str(getattr(lm, "__version__", "unknown")),
        "backend": settings.backend,
        "config": repr(backend_config),
        "api": "pytorch Engine.create_instance().async_stream_infer (pre-tokenized, no detokenize)",
    }

    async def main() -> float:
        engine = engine_factory(model, engine_config=backend_config)
        try:
            engine.start_loop()
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(requests)):
                queue.put_nowait(i)

            async def worker(wid: int) -> None:
                inst = engine.create_instance()
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    rec = results[i]
                    rec.start = rec.sent = time.perf_counter()
                    n = 0
                    status = None
                    async for out in inst.async_stream_infer(i + 1, input_ids=ids[i], gen_config=gen[i]):
                        now = time.perf_counter()
                        status = getattr(out.status, "name", str(out.status))
                        if out.token_ids:
                            n += len(out.token_ids)
                            if rec.first_token is None:
                                rec.first_token = now
                            else:
                                rec.itl.append(now - (rec.end or now))
                            rec.end = now
                    rec.end = rec.end or time.perf_counter()
                    rec.output_tokens = n
                    rec.success = n > 0 and status in ("SUCCESS", "FINISH")
                    if not rec.success:
                        rec.error = f"engine status {status} after {n} tokens"

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(min(settings.max_batch_size, len(requests)))))
            return time.perf_counter() - t0
        finally:
            engine.close()

    wall = asyncio.run(main())
    for rec in results:
        rec.output_tokens_source = "engine"
    return results, wall, info
