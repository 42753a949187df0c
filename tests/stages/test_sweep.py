"""The settings sweep (llama3_ops.lab.sweep) on a fake GPU host: each point served with its flags, warmed,
benchmarked, sampled on the host; the default's share of the best; bad points are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama3_ops.lab import sweep
from llama3_ops.lab.standin import free_port
from llama3_ops.remote import services
from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import serve as srv

from .lm_support import base_path, fake_host

RTX4090 = {"name": "NVIDIA GeForce RTX 4090", "total": 24564, "used": 0}


def test_sweep_serves_each_point_and_says_what_bounds_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    bin_dir = fake_host(home, gpus=[dict(RTX4090, util=95)])
    model = home / "model" / "Meta-Llama-3-8B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    remote = LocalRemote(env={"HOME": str(home), "PATH": f"{bin_dir}:{base_path()}"})
    base = srv.ServeConfig(backend="pytorch", port=free_port(), name="llm")
    points = [sweep.parse_point("max_batch_size=16,cache_max_entry_count=0.3"), sweep.parse_point("top_k=1")]
    bench = ["--dataset", "synthetic:8:4", "--num-prompts", "16", "--concurrency", "4", "--no-progress"]
    rec = sweep.sweep(remote, base, points, bench, tmp_path / "out", interval=0.3)
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    names = [p["name"] for p in rec["points"]]
    assert names == ["default", "max_batch_size=16,cache_max_entry_count=0.3", "top_k=1"]
    default, small, greedy = rec["points"]
    # the default is the GPU table's choice for a 24 GiB card; the point's flags win over it
    assert default["settings"]["max_batch_size"] == 128 and "not in the table" in default["tuning_source"]
    assert (small["settings"]["max_batch_size"], small["settings"]["cache_max_entry_count"]) == (16, 0.3)
    assert greedy["top_k"] == 1
    assert json.loads(Path(greedy["json"]).read_text())["settings"]["top_k"] == 1
    for p in rec["points"]:
        assert p["rps"] > 0 and p["failed"] == 0 and p["path"] == "direct" and p["warmup_s"] is not None
        host = p["host"]
        assert host["samples"] >= 1 and host["gpu_busy_mean"] == 95.0
        assert host["bound"] == "GPU busy (95% mean)"
        assert any("llama3_ops.lab.standin" in q["cmd"] for q in host["processes"])  # the server's process
        bench_json = json.loads(Path(p["json"]).read_text())
        assert bench_json["warm"] is True and bench_json["warmup"]["server_warmed"] is True
    assert rec["best"] in names and 0 < rec["default_share_of_best"] <= 1
    assert not services.status(remote, "llm", log_lines=0).running  # stopped at the end


@pytest.mark.parametrize(("text", "message"), [
    ("max_batch_size", "each setting is KEY=VALUE"),
    ("batch=3", "unknown setting 'batch'"),
    ("max_batch_size=x", "--max-batch-size takes a int, not 'x'"),
    ("quant_policy=3", "--quant-policy must be one of 0, 4, 8, 16"),
    ("top_k=greedy", "top_k takes a whole number"),
])
def test_bad_points_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(Exception, match=message) as exc:
        sweep.parse_point(text)
    assert "\n" not in str(exc.value)


def test_summary_names_a_cpu_bound_process() -> None:
    samples = [{"gpus": [[40.0, 1000.0]], "procs": {"7": {"cores": 0.98, "cmd": "python engine"},
                                                     "8": {"cores": 0.3, "cmd": "python api"}}}] * 3
    s = sweep.summarize(samples)
    assert s["bound"].startswith("one server process's CPU (0.98 cores: python engine")
    assert s["gpu_mem_peak_mib"] == 1000.0 and [p["pid"] for p in s["processes"]] == [7, 8]
    idle = sweep.summarize([{"gpus": [[10.0, 5.0]], "procs": {"7": {"cores": 0.2, "cmd": "x"}}}])
    assert idle["bound"].startswith("neither the GPU (10.0% mean) nor one process (0.2 cores)")
