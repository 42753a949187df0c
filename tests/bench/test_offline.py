"""lmdeploy offline mode: config construction and metric collection with a fake lmdeploy module."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.metrics import aggregate
from llama3_ops.bench.offline import OfflineSettings, build_engine_config, build_gen_configs, run_offline
from llama3_ops.bench.workload import Request

HAVE_LMDEPLOY = importlib.util.find_spec("lmdeploy") is not None


@dataclass
class _Cfg:
    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _fake_lmdeploy(pipe: Any) -> SimpleNamespace:
    made: list[tuple[str, Any]] = []

    def pipeline(model: str, backend_config: Any) -> Any:
        made.append((model, backend_config))
        return pipe

    return SimpleNamespace(
        __version__="0.18.0-fake",
        PytorchEngineConfig=lambda **kw: _Cfg("pytorch", kw),
        TurbomindEngineConfig=lambda **kw: _Cfg("turbomind", kw),
        GenerationConfig=lambda **kw: SimpleNamespace(**kw),
        pipeline=pipeline,
        made=made,
    )


def test_engine_configs_as_profile_throughput() -> None:
    lm = _fake_lmdeploy(None)
    pt = build_engine_config(OfflineSettings(max_batch_size=512, cache_max_entry_count=0.9, tp=2), lm)
    assert pt.kind == "pytorch"
    assert pt.kwargs == {"session_len": 4096, "max_batch_size": 512, "tp": 2, "cache_max_entry_count": 0.9}
    tm = build_engine_config(OfflineSettings(backend="turbomind", max_batch_size=256, quant_policy=8), lm)
    assert tm.kind == "turbomind"
    assert tm.kwargs["quant_policy"] == 8 and tm.kwargs["max_batch_size"] == 256
    with pytest.raises(BenchError):
        build_engine_config(OfflineSettings(backend="vllm"), lm)
    gens = build_gen_configs([Request("a", 4, 7), Request("b", 4, 9)], OfflineSettings(), lm)
    assert [(g.max_new_tokens, g.ignore_eos, g.top_k) for g in gens] == [(7, True, 1), (9, True, 1)]


class _StreamPipe:
    """Yields cumulative token counts for each request, interleaved, like pipeline.stream_infer."""

    def stream_infer(self, prompts: list[str], gen_config: list[Any], do_preprocess: bool = True) -> Any:
        assert do_preprocess is False, "raw prompts, as profile_throughput feeds the engine"
        remaining = {i: g.max_new_tokens for i, g in enumerate(gen_config)}
        done = dict.fromkeys(remaining, 0)
        while remaining:
            for i in list(remaining):
                done[i] += 1
                fin = "length" if done[i] == gen_config[i].max_new_tokens else None
                yield SimpleNamespace(index=i, generate_token_len=done[i], finish_reason=fin, text="x")
                if fin:
                    del remaining[i]


class _BatchPipe:
    def __call__(self, prompts: list[str], gen_config: list[Any], do_preprocess: bool = True) -> list[Any]:
        assert do_preprocess is False
        return [SimpleNamespace(generate_token_len=g.max_new_tokens) for g in gen_config]


def test_run_offline_streaming_metrics() -> None:
    reqs = [Request("p", 10, 3), Request("q", 20, 5)]
    lm = _fake_lmdeploy(_StreamPipe())
    results, wall, engine = run_offline("/models/llama3", reqs, OfflineSettings(max_batch_size=2), lm)
    assert lm.made[0][0] == "/models/llama3"
    assert engine["api"] == "pipeline.stream_infer" and engine["version"] == "0.18.0-fake"
    assert [r.output_tokens for r in results] == [3, 5]
    assert all(r.success and r.first_token is not None for r in results)
    assert [len(r.itl) for r in results] == [2, 4]
    m = aggregate(results, wall)
    assert m["output_tokens"] == 8 and m["prompt_tokens"] == 30 and m["successful"] == 2


def test_run_offline_batch_fallback() -> None:
    reqs = [Request("p", 10, 3), Request("q", 20, 5)]
    results, wall, engine = run_offline(
        "m", reqs, OfflineSettings(stream=False), _fake_lmdeploy(_BatchPipe())
    )
    assert "batch" in engine["api"]
    assert [r.output_tokens for r in results] == [3, 5]
    assert aggregate(results, wall)["ttft_s"]["p50"] is None


@pytest.mark.skipif(
    not HAVE_LMDEPLOY, reason="lmdeploy is not installed (it needs CUDA; pip install lmdeploy)"
)
def test_real_lmdeploy_configs() -> None:
    import lmdeploy

    cfg = build_engine_config(OfflineSettings(max_batch_size=8, cache_max_entry_count=0.5), lmdeploy)
    assert cfg.max_batch_size == 8
    assert cfg.cache_max_entry_count == 0.5


class _FakeInstance:
    """The interface of lmdeploy's EngineInstance: async_stream_infer yields new token ids per step."""

    def __init__(self, engine: _FakeEngine) -> None:
        self.engine = engine

    async def async_stream_infer(self, session_id: int, *, input_ids: list[int], gen_config: Any) -> Any:
        import asyncio

        self.engine.in_flight += 1
        self.engine.peak = max(self.engine.peak, self.engine.in_flight)
        try:
            for k in range(gen_config.max_new_tokens):
                await asyncio.sleep(0.001)
                last = k == gen_config.max_new_tokens - 1
                yield SimpleNamespace(status=SimpleNamespace(name="FINISH" if last else "SUCCESS"),
                                      token_ids=[7])
        finally:
            self.engine.in_flight -= 1


class _FakeEngine:
    def __init__(self) -> None:
        self.in_flight = self.peak = 0
        self.started = self.closed = False

    def start_loop(self) -> None:
        self.started = True

    def create_instance(self) -> _FakeInstance:
        return _FakeInstance(self)

    def close(self) -> None:
        self.closed = True


def test_engine_driver_counts_tokens_caps_concurrency_and_closes() -> None:
    from llama3_ops.bench.offline import run_engine_driver

    eng = _FakeEngine()
    reqs = [Request(f"p{i}", 3, 4 + i % 3) for i in range(10)]
    st = OfflineSettings(max_batch_size=4, driver="engine")
    seen: list[tuple[str, object]] = []

    def factory(model: str, engine_config: object) -> _FakeEngine:
        seen.append((model, engine_config))
        return eng

    results, wall, info = run_engine_driver("/m", reqs, st, _fake_lmdeploy(None), "CFG", engine_factory=factory,
                                            tokenize=lambda _m: (lambda s: [1, 2, len(s)]))
    assert seen == [("/m", "CFG")] and eng.started and eng.closed
    assert eng.peak == 4, "max_batch_size workers, never more in flight"
    assert [r.output_tokens for r in results] == [4 + i % 3 for i in range(10)]
    assert all(r.success and r.first_token is not None for r in results)
    assert [r.prompt_len for r in results] == [3] * 10  # from the engine's tokenizer, not the workload
    assert all(len(r.itl) == r.output_tokens - 1 for r in results)
    assert wall > 0 and "no detokenize" in info["api"]
