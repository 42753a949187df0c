"""The GPU settings table: rows backed by committed runs, rules by memory, flags over both, in fab serve's argv."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama3_ops import engine_settings as tuning
from llama3_ops.stages.gpu import GPU
from llama3_ops.stages.host import Host
from llama3_ops.stages.serve import ServeConfig, ServeConfigError, build_spec, tuned

ROOT = Path(__file__).resolve().parents[2]
H200 = GPU(0, "NVIDIA H200", 143771, 0)
H100 = GPU(0, "NVIDIA H100 80GB HBM3", 81559, 0)
HOST = Host(label="h", home="/home/u", profile="host", user="u", course_dir="/home/u/llama3-course",
            model_dir="/home/u/model/Meta-Llama-3-8B-Instruct", model_stamp="/home/u/model/.stamp",
            envs={"lmdeploy": "/home/u/envs/lmdeploy/bin"})


def _argv(cfg: ServeConfig) -> list[str]:
    return [str(a) for a in build_spec(cfg, HOST).argv]


def test_every_row_names_committed_runs_that_hold_its_figures() -> None:
    for row in tuning.table()["gpus"]:
        assert row["evidence"], row["name"]
        for rel in row["evidence"]:
            path = ROOT / rel
            assert path.is_file(), f"{row['name']}: {rel} is not in the repository"
            if path.suffix == ".json":
                json.loads(path.read_text())
        # every RPS figure the row quotes (but those it says are not committed) is in one of its files
        texts = " ".join((ROOT / rel).read_text() for rel in row["evidence"])
        numbers = {round(float(n), 1) for n in re.findall(r"\d+\.\d+", texts)}
        quoted = re.sub(r"\([^)]*not committed[^)]*\)", "", row["measured"])
        for rps in re.findall(r"(\d+\.\d)(?:-(\d+\.\d))? RPS", quoted):
            for value in filter(None, rps):
                assert float(value) in numbers, (row["name"], value)


def test_h200_gets_its_measured_row_and_fab_serve_passes_it() -> None:
    t = tuning.choose(H200.name, H200.memory_total_mib, "pytorch")
    assert (t.max_batch_size, t.cache_max_entry_count, t.quant_policy, t.source) == (512, 0.9, 0, "table row H200")
    cfg, _ = tuned(ServeConfig(backend="pytorch"), H200)
    argv = _argv(cfg)
    assert argv[argv.index("--max-batch-size") + 1] == "512"
    assert argv[argv.index("--cache-max-entry-count") + 1] == "0.9"
    assert argv[argv.index("--quant-policy") + 1] == "0"
    assert "--max-prefill-token-num" not in argv  # the row keeps the engine's default
    assert cfg.settings()["max_batch_size"] == "512"  # in the reuse fingerprint


def test_fp8_kv_only_on_the_pytorch_engine() -> None:
    assert tuning.choose(H100.name, H100.memory_total_mib, "pytorch").quant_policy == 16
    tm = tuning.choose(H100.name, H100.memory_total_mib, "turbomind")
    assert tm.quant_policy == 0 and "KV fp16/bf16 on turbomind" in tm.source
    with pytest.raises(ServeConfigError, match="needs --backend pytorch"):
        ServeConfig(backend="turbomind", quant_policy=16).validate()


@pytest.mark.parametrize(("name", "mib", "batch", "cache"), [
    ("NVIDIA A100-SXM4-80GB", 81920, 512, 0.9),
    ("NVIDIA L40S", 46068, 256, 0.85),
    ("NVIDIA GeForce RTX 4090", 24564, 128, 0.8),
    ("NVIDIA GeForce RTX 3060", 12288, 64, 0.5),
    ("NVIDIA H200 NVL", 100000, 512, 0.9),  # an H200 name below the row's memory: the rule, not the row
])
def test_gpus_not_in_the_table_get_the_rule_for_their_memory(name: str, mib: int, batch: int, cache: float) -> None:
    t = tuning.choose(name, mib)
    assert (t.max_batch_size, t.cache_max_entry_count) == (batch, cache)
    assert "not in the table" in t.source and name in t.source


def test_no_gpu_memory_reported_gets_the_smallest_rule() -> None:
    assert tuning.choose(None).max_batch_size == 64
    assert tuning.choose("MIG 1g.10gb", -1).max_batch_size == 64


def test_flags_win_over_the_table_one_by_one() -> None:
    cfg, t = tuned(ServeConfig(backend="pytorch", max_batch_size=64), H200)
    assert (cfg.max_batch_size, cfg.cache_max_entry_count) == (64, 0.9)
    assert t.source == "table row H200; --max-batch-size from the command line"
    cfg, t = tuned(ServeConfig(backend="pytorch", max_batch_size=8, cache_max_entry_count=0.2, quant_policy=8,
                               max_prefill_token_num=4096), H200)
    argv = _argv(cfg)
    assert t.source == "flags" and argv[argv.index("--max-prefill-token-num") + 1] == "4096"
    assert t.line() == "max batch 8, cache 0.2, KV int8, prefill 4096 (flags)"


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_batch_size": 0}, "--max-batch-size must be at least 1"),
    ({"cache_max_entry_count": 1.5}, r"--cache-max-entry-count must be in \(0, 1\]"),
    ({"quant_policy": 3}, "quant_policy must be 0, 4"),
])
def test_bad_tuning_flags_are_one_line_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ServeConfigError, match=message):
        tuned(ServeConfig(backend="pytorch", **kw), H200)  # type: ignore[arg-type]
