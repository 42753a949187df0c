"""Failed requests: a run with them ends ``complete_with_failures``, says how many and why, and exits
non-zero unless ``--max-failures`` allows them; the same for the cross-check. Real stand-in servers:
one that answers every third request with HTTP 500, one that goes away mid-run."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llama3_ops.bench.cli import EXIT_FAILED_REQUESTS, main
from llama3_ops.lab.standin import FAILURE_BODY, standin_process

HTTP_500 = f"HTTP 500: {json.dumps(FAILURE_BODY)}"


def _online(base: str, out: Path, *extra: str) -> list[str]:
    # --warmup 0: the failure counts below are the measured requests' own (test_warmup_... covers the default)
    return ["online", "--base-url", base, "--model", "standin", "--dataset", "synthetic:8:4", "--num-prompts",
            "9", "--concurrency", "2", "--out", str(out), "--no-progress", "--warmup", "0", *extra]  # fmt: skip


def test_warmup_requests_are_sent_first_recorded_and_not_counted(tmp_path: Path) -> None:
    with standin_process(tokens_per_s=400.0) as base:
        argv = [a for a in _online(base, tmp_path / "w") if a not in ("--warmup", "0")]
        assert main([*argv, "--warmup", "5"]) == 0
        with urllib.request.urlopen(base + "/stats", timeout=10) as resp:
            stats = json.loads(resp.read())
        point = json.loads((tmp_path / "w" / "online-c0002.json").read_text())
        assert main(argv) == 0  # the default: one wave at the point's concurrency
    assert point["warm"] is True and point["warmup"]["requests"] == 5 and point["warmup"]["failed"] == 0
    assert point["metrics"]["successful"] == 9  # the 5 warm-up requests are not in the figures
    assert stats["requests"] == 1 + 5 + 9  # the ignore_eos probe, the warm-up, the run
    default = json.loads((tmp_path / "w" / "online-c0002.json").read_text())
    assert default["warmup"]["requests"] == 2
    cold = tmp_path / "cold"
    with standin_process(tokens_per_s=400.0) as base:
        assert main(_online(base, cold)) == 0
        assert json.loads((cold / "online-c0002.json").read_text())["warm"] is False
        assert main(_online(base, cold, "--server-warmed")) == 0  # fab serve warmed it: no bench warm-up needed
    told = json.loads((cold / "online-c0002.json").read_text())
    assert told["warm"] is True and told["warmup"] == {"requests": 0, "failed": 0, "wall_s": 0.0,
                                                       "server_warmed": True}


def test_a_bad_warmup_count_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["online", "--base-url", "http://127.0.0.1:9", "--model", "m", "--warmup", "-2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--warmup must be -1" in err and len(err.splitlines()) == 1


def test_failed_requests_make_a_run_fail_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Completion 1 is the ignore_eos probe; the run's 9 requests are completions 2..10: 3, 6 and 9 fail.
    with standin_process(tokens_per_s=400.0, fail_every=3) as base:
        assert main(_online(base, tmp_path / "strict")) == EXIT_FAILED_REQUESTS
        strict = capsys.readouterr().out
        assert main(_online(base, tmp_path / "lenient", "--max-failures", "3")) == 0
        lenient = capsys.readouterr().out
    point = json.loads((tmp_path / "strict" / "online-c0002.json").read_text())
    assert point["status"] == "complete_with_failures"
    assert point["failures"] == {"failed": 3, "allowed": 0, "reasons": [{"reason": HTTP_500, "count": 3}]}
    assert (point["metrics"]["successful"], point["metrics"]["failed"]) == (6, 3)
    assert json.loads((tmp_path / "strict" / "summary.json").read_text())["status"] == "complete_with_failures"
    assert "online c=2: 3 of 9 requests failed (0 allowed)" in strict
    assert f"3 x {HTTP_500}" in " ".join(strict.split())
    allowed = json.loads((tmp_path / "lenient" / "online-c0002.json").read_text())
    assert allowed["status"] == "complete_with_failures" and allowed["settings"]["max_failures"] == 3
    assert "3 of 9 requests failed (3 allowed): within --max-failures" in lenient
    # check reads both and holds each to the allowance it was run with.
    assert main(["check", str(tmp_path / "strict" / "online-c0002.json")]) == EXIT_FAILED_REQUESTS
    assert main(["check", str(tmp_path / "lenient" / "online-c0002.json")]) == 0


def test_a_run_without_failures_is_complete(tmp_path: Path) -> None:
    with standin_process(tokens_per_s=400.0) as base:
        assert main(_online(base, tmp_path)) == 0
    point = json.loads((tmp_path / "online-c0002.json").read_text())
    assert point["status"] == "complete" and point["failures"] == {"failed": 0, "allowed": 0, "reasons": []}


def _kill_after(base: Any, requests: int) -> threading.Thread:
    """Kill the server once it has seen ``requests`` requests (probe included)."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(base + "/stats", timeout=5) as r:
                if json.load(r)["requests"] >= requests:
                    os.kill(base.pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_server_that_goes_away_mid_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 40 tokens at 40 tok/s: each request streams for a second; the server dies during the third pair.
    with standin_process(tokens_per_s=40.0) as base:
        watcher = _kill_after(base, 6)
        argv = ["online", "--base-url", base, "--model", "standin", "--dataset", "synthetic:8:40",
                "--num-prompts", "12", "--concurrency", "2", "--out", str(tmp_path), "--no-progress"]
        assert main(argv) == EXIT_FAILED_REQUESTS
        watcher.join()
    out = " ".join(capsys.readouterr().out.split())
    point = json.loads((tmp_path / "online-c0002.json").read_text())
    m = point["metrics"]
    assert point["status"] == "complete_with_failures"
    assert m["successful"] >= 2 and m["failed"] >= 7 and m["successful"] + m["failed"] == 12
    assert sum(r["count"] for r in point["failures"]["reasons"]) == m["failed"]
    assert f"{m['failed']} of 12 requests failed (0 allowed)" in out
    for r in point["failures"]["reasons"][:5]:
        assert f"{r['count']} x {' '.join(r['reason'].split())}" in out
    # The requests the server never finished, and those it could not take, are told apart.
    reasons = " ".join(r["reason"] for r in point["failures"]["reasons"])
    assert "Cannot connect" in reasons or "Connect call failed" in reasons


class _HalfFinishingPipe:
    """An lmdeploy pipeline whose every third request never finishes (as an engine that dropped it)."""

    def stream_infer(self, prompts: list[str], gen_config: list[Any], do_preprocess: bool = True) -> Any:
        for i, g in enumerate(gen_config):
            if i % 3 == 2:
                continue
            for k in range(g.max_new_tokens):
                fin = "length" if k == g.max_new_tokens - 1 else None
                yield SimpleNamespace(index=i, generate_token_len=k + 1, finish_reason=fin)


def test_offline_failed_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    fake = SimpleNamespace(__version__="0.18.0-fake", PytorchEngineConfig=lambda **kw: kw,
                           GenerationConfig=lambda **kw: SimpleNamespace(**kw),
                           pipeline=lambda model, backend_config: _HalfFinishingPipe())  # fmt: skip
    monkeypatch.setitem(sys.modules, "lmdeploy", fake)
    argv = ["offline", "--model", str(tmp_path), "--dataset", "synthetic:8:4", "--num-prompts", "6",
            "--concurrency", "2", "--out", str(tmp_path / "res")]
    assert main(argv) == EXIT_FAILED_REQUESTS
    assert "offline c=2: 2 of 6 requests failed (0 allowed)" in capsys.readouterr().out
    assert main([*argv, "--max-failures", "2"]) == 0
    point = json.loads((tmp_path / "res" / "offline-c0002.json").read_text())
    assert point["status"] == "complete_with_failures"
    assert point["failures"]["reasons"] == [{"reason": "no finished output", "count": 2}]


class _FinishingPipe(_HalfFinishingPipe):
    def stream_infer(self, prompts: list[str], gen_config: list[Any], do_preprocess: bool = True) -> Any:
        for i, g in enumerate(gen_config):
            for k in range(g.max_new_tokens):
                yield SimpleNamespace(index=i, generate_token_len=k + 1,
                                      finish_reason="length" if k == g.max_new_tokens - 1 else None)


def test_offline_takes_the_gpu_tables_settings_unless_flags_say_otherwise(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    configs: list[dict[str, Any]] = []
    fake = SimpleNamespace(__version__="0.18.0-fake", PytorchEngineConfig=lambda **kw: configs.append(kw) or kw,
                           GenerationConfig=lambda **kw: SimpleNamespace(**kw),
                           pipeline=lambda model, backend_config: _FinishingPipe())  # fmt: skip
    monkeypatch.setitem(sys.modules, "lmdeploy", fake)
    argv = ["offline", "--model", str(tmp_path), "--dataset", "synthetic:8:4", "--num-prompts", "6"]
    assert main([*argv, "--out", str(tmp_path / "table")]) == 0
    assert (configs[-1]["max_batch_size"], configs[-1]["cache_max_entry_count"]) == (512, 0.9)
    point = json.loads((tmp_path / "table" / "offline-c0512.json").read_text())
    assert point["settings"]["tuning_source"] == "table row H200"
    assert main([*argv, "--cache-max-entry-count", "0.5", "--concurrency", "4", "--out", str(tmp_path / "f")]) == 0
    assert (configs[-1]["max_batch_size"], configs[-1]["cache_max_entry_count"]) == (4, 0.5)
    point = json.loads((tmp_path / "f" / "offline-c0004.json").read_text())
    assert point["settings"]["tuning_source"] == (
        "table row H200; --max-batch-size, --cache-max-entry-count from the command line")


def test_user_text_is_never_read_as_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ":abc:" is a rich emoji code and "[bold]" a markup tag: both must come back as typed.
    assert main(["offline", "--model", str(tmp_path), "--dataset", "synthetic:abc:1"]) == 2
    err = capsys.readouterr().err
    assert "synthetic:abc:1" in err and "\N{INPUT SYMBOL FOR LATIN LETTERS}" not in err
    weird = tmp_path / "[bold]data:abc:.json"
    assert main(["offline", "--model", str(tmp_path), "--dataset", str(weird)]) == 2
    assert str(weird) in " ".join(capsys.readouterr().err.split())


def _never_run_aiperf(tmp_path: Path) -> Path:
    exe = tmp_path / "aiperf"
    exe.write_text(f"#!/bin/sh\ntouch {tmp_path / 'aiperf-ran'}\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_crosscheck_with_failed_requests_is_not_a_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llama3_ops.bench.crosscheck import FAILED_REQUESTS, crosscheck
    from llama3_ops.lab.crosscheck import case_lines, client_validated, with_ideal

    aiperf = _never_run_aiperf(tmp_path)
    with standin_process(tokens_per_s=400.0, fail_every=4) as base:
        res = crosscheck(base_url=base, model="standin", tokenizer_dir=tmp_path, concurrency=2, num_prompts=8,
                         input_len=16, output_len=4, aiperf=str(aiperf), out=tmp_path / "cc")  # fmt: skip
        rc = main(["crosscheck", "--base-url", base, "--model", "standin", "--tokenizer-dir", str(tmp_path),
                   "--concurrency", "2", "--num-prompts", "8", "--input-len", "16", "--output-len", "4",
                   "--aiperf", str(aiperf), "--out", str(tmp_path / "cli")])  # fmt: skip
    assert res["verdict"] == FAILED_REQUESTS and res["within_tolerance"] is False
    assert res["status"] == "complete_with_failures"
    assert res["failed_requests"]["tool"] == "ours" and res["failed_requests"]["failed"] == 2
    assert res["failed_requests"]["reasons"] == [{"reason": HTTP_500, "count": 2}]
    assert not (tmp_path / "aiperf-ran").exists(), "AIPerf runs only after ours ran clean"
    assert rc == EXIT_FAILED_REQUESTS
    assert "ours's run 1 had 2 of 8 requests failed: not a pass" in capsys.readouterr().out
    case = {"server": "standin"} | with_ideal(res, 400.0, 4, 2)
    assert case["outcome"] == FAILED_REQUESTS and not client_validated([case])
    assert any("2 of 8 requests failed" in line for line in case_lines(case))
