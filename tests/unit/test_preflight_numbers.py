"""Preflight's per-stage GPU and disk arithmetic, run by the real role against localhost.

Each fake host is localhost (connection=local) with made-up GPU and disk facts; one
ansible-playbook run checks them all. Expected numbers are computed here from the same files the
role reads: the profile and src/llama3_ops/data/stage_requirements.yml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES: dict[str, dict[str, Any]] = yaml.safe_load(
    (ROOT / "src/llama3_ops/data/stage_requirements.yml").read_text())["stages"]
CORE = ["webdemo", "finetune", "chat", "chat_4bit", "quantize", "serve", "llava", "agent"]

RESULT_RE = re.compile(r"^(?P<status>ok|fatal|changed|skipping): \[(?P<host>[\w.]+)\](?:: FAILED!)? => (?P<rest>.*)$")

PLAYBOOK = """
- name: Preflight numbers on fake hosts
  hosts: all
  gather_facts: true
  gather_subset: [min]
  roles:
    - role: llama3
  tasks:
    - name: Run the preflight checks on the fake facts
      ansible.builtin.include_role:
        name: llama3_preflight
        tasks_from: preflight
"""


def profile(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "profiles" / f"{name}.yml").read_text())
    return data


def facts(gpu_gib: float, disk_gib: float, driver: str = "550.54.15", gpus: int = 1,
          verified: bool = False) -> dict[str, Any]:
    return {"os": "Debian 12", "arch": "x86_64", "has_nvidia_smi": gpus > 0, "gpu_count": gpus,
            "gpu_names": ["Fake GPU"] * gpus, "driver": driver if gpus else "", "cuda_supported": "12.4",
            "gpu_mem_min_total_gib": gpu_gib, "gpu_mem_min_free_gib": gpu_gib, "disk_free_gib": disk_gib,
            "disk_mount": "/data", "model_verified": verified}


def disk_need(prof: str, stages: list[str], verified: bool = False) -> float:
    p = profile(prof)
    envs = float(p.get("envs_gb", float(p.get("disk_gb", 0)) - float(p.get("model_gb", 0))))
    model = 0.0 if verified else float(p.get("model_gb", 0))
    return round(model + envs + sum(float(STAGES[s].get("disk_gb", 0)) for s in stages), 1)


HOSTS: dict[str, dict[str, Any]] = {
    # A 24 GiB card runs every core stage of the course profile; 500 GiB of disk is plenty.
    "fits24": {"llama3_profile": "course", "llama3_preflight_facts": facts(23.6, 500)},
    # A 12 GiB card: the fp16 stages do not fit, and they are asked for by default.
    "small12": {"llama3_profile": "course", "llama3_preflight_facts": facts(12.0, 500)},
    # The same card, asking only for what fits it (4-bit chat, QLoRA).
    "small12_asked": {"llama3_profile": "course", "llama3_preflight_facts": facts(12.0, 500),
                      "llama3_preflight_stages": ["chat_4bit", "finetune"]},
    # Too little disk for model + envs + the default stages' outputs.
    "nodisk": {"llama3_profile": "course", "llama3_preflight_facts": facts(80.0, 50.0)},
    # Enough disk once the model is verified and only chat is asked for.
    "disk_verified": {"llama3_profile": "course", "llama3_preflight_stages": ["chat"],
                      "llama3_preflight_facts": facts(80.0, disk_need("course", ["chat"], verified=True) + 0.5,
                                                      verified=True)},
    # A driver below the profile's CUDA build floor.
    "olddriver": {"llama3_profile": "course", "llama3_preflight_facts": facts(80.0, 500, driver="470.82.01")},
    # The current profile's floor (CUDA 12.8) is higher than the course's.
    "current_old": {"llama3_profile": "current", "llama3_preflight_facts": facts(80.0, 500, driver="550.54.15")},
    # An unknown stage name.
    "typo": {"llama3_profile": "course", "llama3_preflight_facts": facts(80.0, 500),
             "llama3_preflight_stages": ["chat", "finetuning"]},
    # The cpu profile asks for no stage and needs no GPU.
    "cpu": {"llama3_profile": "cpu", "llama3_preflight_facts": facts(0.0, 20.0, gpus=0)},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Run the playbook once over all fake hosts; return each host's output lines joined."""
    tmp = tmp_path_factory.mktemp("preflight-numbers")
    inv = {"all": {"hosts": {name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                                    "llama3_model_source": "git_lfs", **hv} for name, hv in HOSTS.items()}}}
    (tmp / "inventory.yml").write_text(yaml.safe_dump(inv))
    (tmp / "play.yml").write_text(PLAYBOOK)
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORKS": "4"}
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(tmp / "inventory.yml"),
                           str(tmp / "play.yml")], env=env, capture_output=True, text=True, check=False, timeout=600)
    (tmp / "play.log").write_text(proc.stdout + proc.stderr)
    if "PLAY RECAP" not in proc.stdout:
        pytest.fail(f"ansible-playbook did not finish (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr}")
    results: dict[str, dict[str, Any]] = {h: {"failed": None, "table": None} for h in HOSTS}
    task = ""
    lines = proc.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("TASK ["):
            task = line[6:].split("]", 1)[0].split(" : ", 1)[-1]
            continue
        m = RESULT_RE.match(line)
        if not m or not m.group("rest").startswith("{"):
            continue
        text = m.group("rest")
        if text != "{":  # one-line JSON; else indented JSON up to a closing brace in column 0
            res = json.loads(text)
        else:
            end = next(j for j in range(i + 1, len(lines)) if lines[j] == "}")
            res = json.loads("\n".join(lines[i:end + 1])[len(line) - 1:])
        if task == "Show which course stages fit this host":
            results[m.group("host")]["table"] = res["msg"]
        if m.group("status") == "fatal":
            results[m.group("host")]["failed"] = (task, " ".join(str(res.get("msg", "")).split()))
    (tmp / "results.json").write_text(json.dumps(results, indent=2))
    return results


def row(table: list[str], stage: str) -> list[str]:
    return next(line.split() for line in table if line.split()[0] == stage)


def test_a_24_gib_card_fits_every_core_stage(run: dict[str, Any]) -> None:
    assert run["fits24"]["failed"] is None, run["fits24"]
    table = run["fits24"]["table"]
    for stage, req in STAGES.items():
        cells = row(table, stage)
        assert float(cells[1]) == pytest.approx(float(req["gpu_mem_gb"]))
        assert cells[3] == ("yes" if float(req["gpu_mem_gb"]) <= 23.6 else "NO")
        assert cells[4] == ("yes" if stage in CORE else "-")
    # 22 GiB (measured): fits a 24 GiB card, shown but not asked for by default
    assert row(table, "agent_finetune")[3:5] == ["yes", "-"]


def test_a_12_gib_card_fails_naming_stage_need_and_have(run: dict[str, Any]) -> None:
    task, msg = run["small12"]["failed"]
    assert task == "Check GPU memory for the asked-for stages"
    too_big = [s for s in CORE if float(STAGES[s]["gpu_mem_gb"]) > 12.0]
    assert too_big and "finetune" not in too_big
    for stage in too_big:
        assert f"stage '{stage}' needs {float(STAGES[stage]['gpu_mem_gb']):.1f} GiB" in msg
    assert "stage 'chat_4bit'" not in msg and "stage 'finetune'" not in msg
    assert "the smallest GPU on small12 has 12.0 GiB" in msg


def test_asking_only_for_stages_that_fit_passes(run: dict[str, Any]) -> None:
    assert run["small12_asked"]["failed"] is None, run["small12_asked"]
    table = run["small12_asked"]["table"]
    assert row(table, "chat")[3:] == ["NO", "-"]
    assert row(table, "chat_4bit")[3:] == ["yes", "yes"]
    assert f"{disk_need('course', ['chat_4bit', 'finetune']):.1f} needed" in table[-1]


def test_disk_need_is_model_envs_and_stage_outputs(run: dict[str, Any]) -> None:
    task, msg = run["nodisk"]["failed"]
    assert task == "Check free disk before any download"
    need = disk_need("course", CORE)
    stages = sum(float(STAGES[s]["disk_gb"]) for s in CORE)
    assert "Only 50.0 GiB free on /data" in msg
    assert f"needs {need} GiB (model 16.0," in msg
    assert f"stages {stages:.1f})" in msg


def test_a_verified_model_is_not_counted_again(run: dict[str, Any]) -> None:
    assert run["disk_verified"]["failed"] is None, run["disk_verified"]
    assert "model 0.0" in run["disk_verified"]["table"][-1]


@pytest.mark.parametrize(("host", "prof"), [("olddriver", "course"), ("current_old", "current")])
def test_driver_floor_of_the_cuda_build(run: dict[str, Any], host: str, prof: str) -> None:
    task, msg = run[host]["failed"]
    p = profile(prof)
    assert task == "Check the driver version for the profile's CUDA build"
    assert f"older than {p['driver_min']}, the lowest that runs the CUDA {p['cuda']} build" in msg


def test_unknown_stage_is_named(run: dict[str, Any]) -> None:
    task, msg = run["typo"]["failed"]
    assert task == "Check the asked-for stages exist"
    assert re.search(r"unknown stage\(s\) finetuning;", msg), msg


def test_cpu_profile_needs_no_gpu_stage(run: dict[str, Any]) -> None:
    assert run["cpu"]["failed"] is None, run["cpu"]
    assert all(line.split()[4] == "-" for line in run["cpu"]["table"][1:-1])
