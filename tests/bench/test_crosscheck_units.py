"""Cross-check verdicts, the foreign-load probe, token events and the prompt-length convention."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from llama3_ops.bench.client import _is_token_event
from llama3_ops.bench.crosscheck import (
    added_special_tokens,
    at_median_server_speed,
    busy_cores,
    combine,
    process_cpu_s,
    spread,
    verdict,
)


def test_medians_within_tolerance_and_steady_runs_agree() -> None:
    v, diff, s_o, s_t = verdict([10.0, 10.2, 10.1], [10.4, 10.3, 10.5], 0.05)
    assert v == "agree"
    assert diff == pytest.approx(abs(10.1 - 10.4) / 10.4)
    assert s_o == pytest.approx(0.2 / 10.1) and s_t == pytest.approx(0.2 / 10.4)


def test_steady_runs_that_differ_disagree() -> None:
    assert verdict([10.0, 10.1, 10.0], [11.0, 11.1, 11.0], 0.05)[0] == "disagree"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ([10.0, 12.0, 11.0], [11.0, 11.1, 11.0]),  # our runs spread 18 %: close medians prove nothing
        ([10.0, 10.1, 10.0], [11.0, 13.0, 12.0]),  # theirs spread 17 %: neither does a gap
    ],
)
def test_a_tool_that_spreads_beyond_the_tolerance_is_inconclusive(ours: list[float], theirs: list[float]) -> None:
    assert verdict(ours, theirs, 0.05)[0] == "inconclusive"


def test_one_round_has_no_spread() -> None:
    assert verdict([10.0], [10.3], 0.05)[:2] == ("agree", pytest.approx(0.3 / 10.3))
    assert spread([3.0]) == 0.0
    assert math.isinf(spread([0.0, 0.0]))


def test_a_zero_reference_is_inconclusive() -> None:
    assert verdict([1.0], [0.0], 0.05)[0] == "inconclusive"


def test_combined_verdict() -> None:
    assert combine(["agree", "agree"], busy=False) == "agree"
    assert combine(["agree", "disagree"], busy=False) == "disagree"
    assert combine(["disagree", "inconclusive"], busy=False) == "inconclusive"
    assert combine(["agree", "agree"], busy=True) == "inconclusive"


def test_busy_cores_sees_a_busy_loop() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<4: pass"])
    try:
        cores = busy_cores(1.5)
    finally:
        spin.kill()
        spin.wait()
    assert cores is not None and cores >= 0.8


# transformers serve 5.x ends every completion stream with this chunk (captured from a real server).
TSERVE_CLOSING = {
    "id": "f7453067",
    "choices": [{"finish_reason": "length", "index": 0, "text": ""}],
    "object": "text_completion",
    "usage": {"completion_tokens": 4, "prompt_tokens": 4, "total_tokens": 8},
}


@pytest.mark.parametrize(
    ("chunk", "is_token"),
    [
        ({"choices": [{"index": 0, "text": ".invoke"}]}, True),
        ({"choices": [{"index": 0, "text": "", "finish_reason": None}]}, True),  # lmdeploy: mid-UTF-8 token
        ({"choices": [{"index": 0, "text": " end", "finish_reason": "length"}]}, True),  # last token + finish
        (TSERVE_CLOSING, False),
        ({"choices": [], "usage": {"completion_tokens": 3}}, False),  # usage-only chunk
        ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, False),  # chat preamble
        ({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, True),
        ({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}, True),
        ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, False),
        ({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]}, False),
    ],
)
def test_token_events(chunk: dict[str, object], is_token: bool) -> None:
    assert _is_token_event(chunk) is is_token


def test_the_real_llama3_tokenizer_adds_one_bos() -> None:
    assert added_special_tokens() == 1


def test_throughput_at_median_server_speed_removes_the_servers_drift() -> None:
    # A saturated server got 25 % faster between runs; both tools kept it fully busy.
    runs = [
        {"rps": 3.45, "server_cpu_s_per_request": 0.2899},
        {"rps": 4.23, "server_cpu_s_per_request": 0.2364},
        {"rps": 4.43, "server_cpu_s_per_request": 0.2257},
    ]
    scaled = at_median_server_speed(runs, "rps")
    assert scaled is not None
    assert max(scaled) / min(scaled) == pytest.approx(1.0, abs=0.01)
    assert scaled[1] == pytest.approx(4.23)  # the median-speed run is unchanged
    # A tool that left the server idle a fifth of the time is 20 % below, whatever the drift.
    runs.append({"rps": 0.8 / 0.2364, "server_cpu_s_per_request": 0.2364})
    assert at_median_server_speed(runs, "rps")[-1] == pytest.approx(0.8 * 4.23, rel=0.01)  # type: ignore[index]
    assert at_median_server_speed([{"rps": 1.0, "server_cpu_s_per_request": None}], "rps") is None


def test_process_cpu_s_counts_a_busy_child() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<9: pass"])
    try:
        a = process_cpu_s(spin.pid)
        time.sleep(1.0)
        b = process_cpu_s(spin.pid)
    finally:
        spin.kill()
        spin.wait()
    assert a is not None and b is not None and b - a >= 0.5
    assert process_cpu_s(None) is None
    assert process_cpu_s(2**22 + 7) is None  # no such process


def test_the_known_ideal_says_which_tool_is_off() -> None:
    from llama3_ops.bench.crosscheck import AIPERF_OFF_IDEAL, ideal_outcome

    assert ideal_outcome("disagree", 0.994, 0.926, 0.05) == AIPERF_OFF_IDEAL
    assert ideal_outcome("disagree", 0.90, 0.99, 0.05).startswith("disagree: ours is off")
    assert ideal_outcome("disagree", 0.90, 0.80, 0.05) == "disagree"  # both off: no excuse for ours
    assert ideal_outcome("agree", 0.99, 0.97, 0.05) == "agree"
    assert ideal_outcome("inconclusive", 0.99, 0.90, 0.05) == "inconclusive"
