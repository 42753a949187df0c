"""Percentiles, aggregation and achieved concurrency on hand-computed examples."""

from __future__ import annotations

import pytest

from llama3_ops.bench.metrics import (
    RequestResult,
    achieved_concurrency,
    aggregate,
    distribution,
    percentile,
)


def test_percentile_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4; rank position = 3 * q / 100
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_distribution_of_ten_values() -> None:
    d = distribution([float(i) for i in range(1, 11)])
    assert d["mean"] == pytest.approx(5.5)
    assert d["p50"] == pytest.approx(5.5)
    assert d["p90"] == pytest.approx(9.1)
    assert d["p99"] == pytest.approx(9.91)
    assert (d["min"], d["max"]) == (1.0, 10.0)
    assert distribution([])["p50"] is None


def test_achieved_concurrency_max_and_time_weighted_mean() -> None:
    # [0,4) [1,3) [2,6): overlaps 1,2,3,2,1 over 0-1-2-3-4-6 -> max 3; mean = (4+2+4)/6
    peak, mean = achieved_concurrency([(0, 4), (1, 3), (2, 6)])
    assert peak == 3
    assert mean == pytest.approx(10 / 6)


def test_touching_intervals_do_not_overlap() -> None:
    peak, mean = achieved_concurrency([(0, 1), (1, 2), (2, 3)])
    assert peak == 1
    assert mean == pytest.approx(1.0)
    assert achieved_concurrency([]) == (0, 0.0)


def test_256_simultaneous_intervals() -> None:
    peak, mean = achieved_concurrency([(0.001 * i, 10.0) for i in range(256)])
    assert peak == 256
    assert 250 < mean <= 256


def _req(i: int, start: float, first: float, end: float, out: int, prompt: int = 10) -> RequestResult:
    r = RequestResult(
        index=i,
        prompt_len=prompt,
        requested_output_len=out,
        start=start,
        sent=start,
        first_token=first,
        end=end,
        output_tokens=out,
        output_tokens_source="usage",
        success=True,
    )
    # out tokens evenly spaced between first and end
    if out > 1:
        step = (end - first) / (out - 1)
        r.itl = [step] * (out - 1)
    return r


def test_aggregate_hand_computed() -> None:
    reqs = [
        _req(0, 0.0, 0.5, 2.5, 5),  # ttft .5, e2e 2.5, tpot (2.5-.5)/4 = .5
        _req(1, 0.0, 1.0, 4.0, 4),  # ttft 1, e2e 4, tpot 3/3 = 1
        _req(2, 2.5, 3.0, 5.0, 3),  # ttft .5, e2e 2.5, tpot 2/2 = 1
    ]
    failed = RequestResult(
        index=3, prompt_len=10, requested_output_len=9, start=4.0, sent=4.0, end=4.5, error="HTTP 500"
    )
    m = aggregate([*reqs, failed])
    assert m["wall_s"] == pytest.approx(5.0)
    assert (m["successful"], m["failed"]) == (3, 1)
    assert m["rps"] == pytest.approx(3 / 5)
    assert m["output_tok_s"] == pytest.approx(12 / 5)
    assert m["total_tok_s"] == pytest.approx((12 + 30) / 5)
    assert m["ttft_s"]["mean"] == pytest.approx(2 / 3)
    assert m["ttft_s"]["p50"] == pytest.approx(0.5)
    assert m["e2e_s"]["p50"] == pytest.approx(2.5)
    assert m["e2e_s"]["max"] == pytest.approx(4.0)
    assert m["tpot_s"]["mean"] == pytest.approx(2.5 / 3)
    assert m["itl_s"]["p50"] == pytest.approx(1.0)  # ITLs: .5 x4, 1 x3, 1 x2
    assert m["itl_s"]["mean"] == pytest.approx((0.5 * 4 + 1 * 3 + 1 * 2) / 9)
    # In flight: [0,2.5) [0,4) [2.5,5) [4,4.5): two in flight until 4.5 s, then one
    assert m["achieved_concurrency_max"] == 2
    assert m["achieved_concurrency_mean"] == pytest.approx((2.5 + 4 + 2.5 + 0.5) / 5)
    assert m["errors"] == ["HTTP 500"]


def test_concurrency_uses_send_time_not_queue_time() -> None:
    # Two requests created together, the second waits 1 s for a connection: never both at the server.
    a = RequestResult(
        index=0, prompt_len=1, requested_output_len=1, start=0.0, sent=0.0, end=1.0, success=True
    )
    b = RequestResult(
        index=1, prompt_len=1, requested_output_len=1, start=0.0, sent=1.0, end=2.0, success=True
    )
    m = aggregate([a, b])
    assert m["achieved_concurrency_max"] == 1
    assert m["client_queue_s"]["max"] == pytest.approx(1.0)
