"""Online bench end to end: a real ``transformers serve`` on CPU, and the fixed-rate SSE stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama3_ops.bench.cli import main
from llama3_ops.bench.client import ClientConfig, run_load
from llama3_ops.bench.metrics import aggregate
from llama3_ops.bench.workload import Request
from llama3_ops.lab.standin import ServerURL, standin_process, transformers_serve_process

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(base: str) -> dict[str, int]:
    with urllib.request.urlopen(base + "/stats", timeout=5) as r:
        data: dict[str, int] = json.load(r)
    return data


def _reset(base: str) -> None:
    req = urllib.request.Request(base + "/stats/reset", method="POST")
    urllib.request.urlopen(req, timeout=5).close()


@pytest.fixture(scope="module")
def standin() -> Iterator[str]:
    # 40 tokens/s per request, first token after 200 ms.
    with standin_process(tokens_per_s=40.0, ttft_ms=200.0) as base:
        yield base


def test_standin_ttft_and_itl_measured_within_tolerance(standin: str) -> None:
    cfg = ClientConfig(base_url=standin, model="standin", progress=False)
    reqs = [Request("hello world", 2, 12)] * 4
    lr = asyncio.run(run_load(reqs, 4, cfg))
    m = aggregate(lr.results, lr.wall_s)
    assert m["successful"] == 4
    assert m["output_tokens"] == 48
    assert m["ttft_s"]["p50"] == pytest.approx(0.200, abs=0.05)
    assert m["itl_s"]["p50"] == pytest.approx(0.025, abs=0.005)
    assert m["tpot_s"]["mean"] == pytest.approx(0.025, abs=0.005)
    assert m["e2e_s"]["p50"] == pytest.approx(0.200 + 11 * 0.025, abs=0.08)


@pytest.mark.parametrize("empty", [3, 12])
def test_tokens_with_empty_text_are_not_failures(empty: int) -> None:
    # lmdeploy streams tokens that end inside a UTF-8 sequence as empty text; a request whose
    # tokens all decode to "" still generated them (usage says so) and must not count as failed.
    with standin_process(tokens_per_s=40.0, ttft_ms=200.0, empty_tokens=empty) as base:
        cfg = ClientConfig(base_url=base, model="standin", progress=False)
        lr = asyncio.run(run_load([Request("hello world", 2, 12)] * 2, 2, cfg))
    m = aggregate(lr.results, lr.wall_s)
    assert (m["successful"], m["failed"]) == (2, 0)
    assert m["output_tokens"] == 24
    # TTFT is the first token event (empty or not), not the first non-empty text.
    assert m["ttft_s"]["p50"] == pytest.approx(0.200, abs=0.05)


@pytest.mark.parametrize(("limit", "expect"), [(0, 256), (100, 100)])
def test_achieved_concurrency_reaches_256_only_without_the_connector_cap(
    standin: str, limit: int, expect: int
) -> None:
    # Each request streams 40 tokens (~1.2 s), far longer than it takes to open 256 connections.
    _reset(standin)
    cfg = ClientConfig(base_url=standin, model="standin", progress=False, connector_limit=limit)
    lr = asyncio.run(run_load([Request("hi", 1, 40)] * 256, 256, cfg))
    m = aggregate(lr.results, lr.wall_s)
    assert m["successful"] == 256
    assert m["achieved_concurrency_max"] == expect  # measured client-side from headers-sent time
    assert _stats(standin)["max_in_flight"] == expect  # and what the server saw


def test_default_client_is_not_capped_at_100(standin: str) -> None:
    assert ClientConfig(base_url=standin, model="x").connector_limit == 0


@pytest.fixture(scope="module")
def tserve(tiny_model: Path) -> Iterator[ServerURL]:
    try:
        with transformers_serve_process(str(tiny_model)) as base:
            yield base
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_online_bench_against_transformers_serve(tserve: str, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    rc = main(
        [
            "online",
            "--base-url",
            tserve,
            "--model",
            str(tiny_model),
            "--concurrency",
            "1,4",
            "--num-prompts",
            "8",
            "--max-output-len",
            "6",
            "--out",
            str(out),
            "--no-progress",
            "--check",
            "--tp",
            "1",
        ]
    )
    assert rc == 0
    for c in (1, 4):
        d = json.loads((out / f"online-c{c:04d}.json").read_text())
        assert d["status"] == "complete"
        m = d["metrics"]
        assert (m["successful"], m["failed"]) == (8, 0)
        assert d["concurrency"]["achieved_max"] == c
        assert d["settings"]["max_output_len"] == 6
        assert d["warm"] is True and d["warmup"]["requests"] == c  # the default: one wave, not counted
        assert d["engine"]["settings"] == {"tp": "1"} and d["settings_key"].endswith("|tp=1")
        assert d["dataset"]["complete_records"] == 17_671 and d["dataset"]["sampled"] == 8
        # transformers serve rejects ignore_eos; the probe notices and says so in the record.
        assert "rejected ignore_eos" in d["settings"]["ignore_eos_note"]
        assert 0 < m["output_tokens"] <= 8 * 6
        assert m["output_tokens_source"] == ["usage"]
        assert m["rps"] > 0 and m["ttft_s"]["p50"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert [p["concurrency"]["requested"] for p in summary["points"]] == [1, 4]
    assert "no comparable baseline" in summary["check"][0]["message"]
    for png in ("throughput_vs_concurrency.png", "latency_cdf.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_chat_endpoint_against_transformers_serve(tserve: str, tiny_model: Path) -> None:
    cfg = ClientConfig(
        base_url=tserve, model=str(tiny_model), endpoint="chat", ignore_eos=False, progress=False
    )
    lr = asyncio.run(run_load([Request("Say hi", 3, 4)] * 2, 2, cfg))
    m = aggregate(lr.results, lr.wall_s)
    assert m["successful"] == 2 and m["output_tokens"] > 0


AIPERF = os.environ.get("LLAMA3_OPS_AIPERF", "/tmp/aiperf-venv/bin/aiperf")


def test_crosscheck_with_aiperf(tiny_model: Path, tmp_path: Path) -> None:
    if not Path(AIPERF).exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the aiperf cross-check: nox -s tests installs aiperf at {AIPERF}")
        pytest.skip(f"aiperf not installed at {AIPERF} (LLAMA3_OPS_AIPERF; nox -s tests installs it)")
    from llama3_ops.bench.crosscheck import crosscheck

    with standin_process(tokens_per_s=100.0) as base:
        res = crosscheck(
            base_url=base,
            model="standin",
            tokenizer_dir=tiny_model,
            concurrency=8,
            num_prompts=48,
            input_len=64,
            output_len=100,
            aiperf=AIPERF,
            out=tmp_path,
        )
    assert res["aiperf"]["requests"] == 48
    assert res["rel_diff_rps"] is not None and res["rel_diff_rps"] <= 0.05, res
    assert res["rel_diff_output_tok_s"] <= 0.05, res
    assert res["verdict"] == ("inconclusive" if res["busy_machine"] else "agree"), res


def test_crosscheck_rounds_send_the_prompt_length_aiperf_sends(
    tserve: ServerURL, tiny_model: Path, tmp_path: Path
) -> None:
    # Alternating rounds on the real server; both tools' prompts must reach the server as the same
    # number of tokens (AIPerf's 24 include BOS, so our text is 23 tokens), as its usage counts them.
    if not Path(AIPERF).exists():
        pytest.skip(f"aiperf not installed at {AIPERF}")
    from llama3_ops.bench.crosscheck import crosscheck

    res = crosscheck(base_url=tserve, model=str(tiny_model), tokenizer_dir=tiny_model, concurrency=2,
                     num_prompts=6, input_len=24, output_len=4, aiperf=AIPERF, out=tmp_path, rounds=2,
                     server_pid=tserve.pid)  # fmt: skip
    assert res["prompt_tokens"]["ours_text_tokens"] == 23
    assert [r["server_prompt_tokens_p50"] for r in res["ours_runs"]] == [24, 24]
    assert [r["server_prompt_tokens_avg"] for r in res["aiperf_runs"]] == [24, 24]
    assert [r["requests"] for r in res["aiperf_runs"]] == [6, 6]
    assert [r["failed"] for r in res["ours_runs"]] == [0, 0]
    assert (tmp_path / "aiperf" / "round1" / "profile_export_aiperf.json").is_file()
    runs = res["ours_runs"] + res["aiperf_runs"]
    assert all(r["load_before"]["busy_cores"] is not None for r in runs)
    # The server's own CPU time per request, and each tool's CPU cost, are measured for every run.
    assert all(r["server_cpu_s_per_request"] > 0 and r["tool_cpu_s"] > 0 for r in runs), runs
    assert res["judged_on"] == ["rps_at_median_server_speed", "output_tok_s_at_median_server_speed"]
