"""The device scripts (scripts/gpu/*-run.sh) in --dry-run: they parse, print the project's own entry
points with the arguments the committed runs used, and every ``python -m llama3_ops...`` they name
exists with a ``--local`` entry point where they pass one."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "scripts" / "gpu"


def dry_run(script: str, *phases: str, env: dict[str, str] | None = None, tmp: Path) -> str:
    res = subprocess.run(["bash", str(GPU / script), "--dry-run", *phases], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False, env={**os.environ, "OUT": str(tmp / "out"), **(env or {})})
    assert res.returncode == 0, res.stderr
    assert not (tmp / "out").exists(), "a dry run writes nothing"
    return res.stdout


@pytest.mark.parametrize("script, phases, expected", [
    ("finetune-run.sh", ("setup", "finetune", "serve", "webdemo", "agentft"), [
        "-m llama3_ops.lab.checkpoint",
        "-m llama3_ops.stages.finetune --local --device gpu --count 2000 --max-iters 32",
        "-m llama3_ops.stages.serve --local up --engine lmdeploy --backend pytorch --model merged",
        "-m llama3_ops.stages.agent_finetune --local --device gpu", "--max-iters 8 --until train",
    ]),
    ("stages-run.sh", ("setup", "chat", "quantize", "chat4bit", "llava"), [
        "-m llama3_ops.stages.chat --local", "-m llama3_ops.stages.quantize --local --model",
        "--calib-samples 128 --calib-seqlen 1024", "-m llama3_ops.lab.llava_checkpoint",
        "-m llama3_ops.stages.llava --local", "--backend pytorch --max-new-tokens 64",
    ]),
])
def test_dry_run_prints_the_project_entry_points(tmp_path: Path, script: str, phases: tuple[str, ...],
                                                 expected: list[str]) -> None:
    out = dry_run(script, *phases, tmp=tmp_path)
    flat = out.replace("\\ ", " ")
    for needle in expected:
        assert needle in flat, f"{needle!r} not in:\n{out}"


def test_unknown_phase_is_refused(tmp_path: Path) -> None:
    for script in ("finetune-run.sh", "stages-run.sh"):
        res = subprocess.run(["bash", str(GPU / script), "--dry-run", "bogus"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=False, env={**os.environ, "OUT": str(tmp_path / "o")})
        assert res.returncode == 2 and "unknown phase bogus" in res.stderr


def test_every_module_the_scripts_run_exists() -> None:
    text = "".join(p.read_text() for p in GPU.glob("*.sh"))
    modules = set(re.findall(r"-m (llama3_ops(?:\.\w+)+)", text))
    assert {"llama3_ops.stages.finetune", "llama3_ops.stages.llava", "llama3_ops.lab.llava_checkpoint"} <= modules
    for mod in modules:
        assert importlib.util.find_spec(mod) is not None, mod


def test_front_door_dry_run_lists_its_phases_with_limits(tmp_path: Path) -> None:
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    res = subprocess.run(["bash", str(GPU / "front-door.sh")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False, env=env)
    assert res.returncode == 0, res.stderr
    phases = re.findall(r"phase (\w+) \(limit (\d+) s\)", res.stdout)
    assert [p for p, _ in phases] == ["sshd", "checkpoint", "provision", "serve", "bench", "down"]
    assert all(int(s) <= 420 for _, s in phases)  # each fits a 10-minute device call with the others split off
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists(), "a dry run writes nothing"
    bad = subprocess.run(["bash", str(GPU / "front-door.sh"), "bogus"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False, env=env)
    assert bad.returncode == 2 and "unknown phase bogus" in bad.stderr
