"""The tunnel's ssh killed during an online bench, through the real loopback sshd.

The server is the SSE stand-in on this machine's 127.0.0.1 (the loopback host shares our network
stack); the load is the bench's own client (:func:`llama3_ops.bench.client.run_load`). What may fail:
only the streams in flight at the moment of a kill. Requests that arrive while ssh reconnects must
wait and then succeed, so the tunnel's local port has to keep accepting.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from llama3_ops.bench.client import ClientConfig, run_load
from llama3_ops.bench.metrics import RequestResult
from llama3_ops.bench.workload import Request
from llama3_ops.lab.standin import standin_process
from llama3_ops.remote.ports import find_free_port
from llama3_ops.remote.tunnel import Tunnel, TunnelSpec, make_tunnel

from .conftest import SSHHost

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

TOKENS = 25
RATE = 50.0  # tokens/s per stream: 0.5 s per request
GRACE_S = 0.05


@pytest.fixture(scope="module")
def standin_port(ssh_target: SSHHost) -> Iterator[int]:
    if not ssh_target.is_loopback:
        pytest.skip("the stand-in runs on this machine: needs the loopback host")
    with standin_process(tokens_per_s=RATE) as base:
        yield int(base.rsplit(":", 1)[1])


@pytest.fixture
def tun(ssh_target: SSHHost, standin_port: int) -> Iterator[Tunnel]:
    events: list[str] = []
    spec = TunnelSpec(
        target=ssh_target.target,
        remote_port=standin_port,
        local_port=find_free_port(28300 + os.getpid() % 300),
        name="kill-test",
    )
    t = make_tunnel(spec, on_event=events.append).start()
    yield t
    t.stop()


@dataclass
class KillRun:
    results: list[RequestResult]
    kills: list[float] = field(default_factory=list)  # perf_counter() of each SIGKILL

    def in_flight_at(self, t: float) -> list[RequestResult]:
        return [r for r in self.results if r.start <= t < r.end]

    @property
    def failed(self) -> list[RequestResult]:
        return [r for r in self.results if not r.success]

    @property
    def at_risk(self) -> set[int]:
        """In flight at a kill, or sent within ``GRACE_S`` after it: a keep-alive connection opened
        through the killed ssh can take one more request before the client sees it close."""
        return {r.index for t in self.kills for r in self.results if r.start <= t + GRACE_S and r.end > t}

    def summary(self) -> str:
        inflight = [len(self.in_flight_at(t)) for t in self.kills]
        errors = sorted({(r.error or "")[:60] for r in self.failed})
        return (f"failed {len(self.failed)}/{len(self.results)}, in flight at the kill(s): {inflight}; "
                f"errors: {errors}")


def _kill_ssh(tun: Tunnel, run: KillRun) -> None:
    pid = getattr(tun, "pid", None)
    assert pid, "tunnel has no ssh process"
    before = len(tun.reconnects)
    run.kills.append(time.perf_counter())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while len(tun.reconnects) == before and time.monotonic() < deadline:
        time.sleep(0.01)


def bench_with_kills(tun: Tunnel, concurrency: int, requests: int, kill_at: list[float]) -> KillRun:
    """Run the online bench through ``tun``; SIGKILL its ssh ``kill_at`` seconds after the start."""
    cfg = ClientConfig(base_url=tun.url, model="standin", endpoint="chat", progress=False,
                       request_timeout_s=60, total_timeout_s=120)
    run = KillRun([])

    def killer(t0: float) -> None:
        for at in kill_at:
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            _kill_ssh(tun, run)

    th = threading.Thread(target=killer, args=(time.perf_counter(),), daemon=True)
    th.start()
    res = asyncio.run(run_load([Request("hi", 1, TOKENS)] * requests, concurrency, cfg))
    th.join(timeout=30)
    run.results = res.results
    return run


def _check(tun: Tunnel, run: KillRun, kills: int, label: str) -> None:
    recs = [f"{r.seconds:.2f}s" for r in tun.reconnects]
    print(f"\n[kill] {label}: {run.summary()}; reconnects {recs}")
    assert len(tun.reconnects) == kills, tun.reconnects
    assert all(r.seconds <= 1.0 for r in tun.reconnects), recs
    failed = {r.index for r in run.failed}
    assert len(failed) <= sum(len(run.in_flight_at(t)) for t in run.kills), run.summary()
    late = sorted(min(r.start - t for t in run.kills) for r in run.failed if r.index not in run.at_risk)
    assert not late, f"failed though sent {late} s after a kill: {run.summary()}"


@pytest.mark.parametrize(("concurrency", "requests", "kill_at"), [(4, 48, [2.0]), (64, 256, [0.8])])
def test_kill_ssh_mid_bench(tun: Tunnel, concurrency: int, requests: int, kill_at: list[float]) -> None:
    run = bench_with_kills(tun, concurrency, requests, kill_at)
    _check(tun, run, 1, f"c={concurrency}")


def test_kill_ssh_twice_in_one_bench(tun: Tunnel) -> None:
    run = bench_with_kills(tun, 4, 64, [1.5, 4.5])
    _check(tun, run, 2, "c=4, two kills")


def test_kill_ssh_while_idle_then_use_it(tun: Tunnel) -> None:
    """Requests sent right after the kill, before the new ssh is up, wait for it and succeed."""
    pid = tun.pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    sent_at = time.monotonic()
    cfg = ClientConfig(base_url=tun.url, model="standin", endpoint="chat", progress=False, request_timeout_s=30)
    run = KillRun(asyncio.run(run_load([Request("hi", 1, 5)] * 8, 4, cfg)).results)
    deadline = time.monotonic() + 15
    while not tun.reconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"\n[kill] idle: {run.summary()}; reconnects {[round(r.seconds, 2) for r in tun.reconnects]}")
    assert len(tun.reconnects) == 1 and tun.reconnects[0].seconds <= 1.0
    assert sent_at < tun.reconnects[0].up_at, "the requests were meant to arrive during the reconnect"
    assert run.failed == [], run.summary()
    later = asyncio.run(run_load([Request("hi", 1, 5)] * 8, 4, cfg))
    assert all(r.success for r in later.results)
