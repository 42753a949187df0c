"""fab serve's warm-up (llama3_ops.stages.warmup) against the stand-in server: waves at the max batch size,
staircase answer lengths, the API key on stdin, failures stop it with one line."""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlparse

import pytest

from llama3_ops.lab.standin import standin_process
from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import warmup


def _stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url + "/stats", timeout=10) as resp:
        out: dict[str, object] = json.loads(resp.read())
    return out


def test_waves_reach_the_max_batch_and_step_every_answer_length() -> None:
    plan = warmup.Plan(requests=48, waves=2, min_tokens=6, max_tokens=13)
    with standin_process(tokens_per_s=20) as url:  # the shortest answer takes 0.25 s: all 48 overlap
        port = urlparse(url).port
        assert port is not None
        seen: list[int] = []
        res = warmup.run(LocalRemote(), port, "standin", plan, api_key="k-123",
                         on_wave=lambda w, _: seen.append(w))
        st = _stats(url)
    assert st["requests"] == 96 and st["max_in_flight"] == 48 and st["failed"] == 0
    # the staircase: every length from 6 to 13 asked, 2 waves x 48 requests in all
    lengths = {int(k): v for k, v in st["max_tokens"].items()}  # type: ignore[attr-defined]
    assert sorted(lengths) == list(range(6, 14)) and sum(lengths.values()) == 96
    assert seen == [0, 1] and [w["ok"] for w in res.waves] == [48, 48]
    assert res.to_dict()["plan"]["requests"] == 48  # type: ignore[index]


def test_a_failing_server_is_not_ready_with_one_line() -> None:
    with standin_process(tokens_per_s=400, fail_every=5) as url:
        port = urlparse(url).port
        assert port is not None
        with pytest.raises(warmup.WarmupError) as exc:
            warmup.run(LocalRemote(), port, "standin", warmup.Plan(requests=10, waves=1, max_tokens=4))
    msg = str(exc.value)
    assert "warm-up wave 1: 2 of 10 requests failed" in msg and "HTTP 500" in msg and "\n" not in msg


def test_nothing_listening_is_a_clear_error() -> None:
    from llama3_ops.lab.standin import free_port

    with pytest.raises(warmup.WarmupError, match=r"1 of 1 requests failed .*ConnectionRefusedError"):
        warmup.run(LocalRemote(), free_port(), "m", warmup.Plan(requests=1, waves=1, min_tokens=1, max_tokens=1))


def test_plans_by_engine() -> None:
    lm = warmup.plan_for("lmdeploy", 512)
    assert (lm.requests, lm.waves, lm.ignore_eos) == (512, 2, True)
    assert [lm.tokens(0), lm.tokens(511)] == [lm.min_tokens, lm.max_tokens]
    cpu = warmup.plan_for("transformers", None)
    assert (cpu.requests, cpu.ignore_eos) == (1, False)  # transformers serve: one at a time, no ignore_eos
    with pytest.raises(ValueError, match="bad warm-up plan"):
        warmup.Plan(requests=0)
