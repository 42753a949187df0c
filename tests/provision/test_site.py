"""site.yml with the cpu profile on a fresh Debian host over real SSH, checked from outside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostlab import MODEL_DIR, STAMP, Provisioned

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.freshhost, pytest.mark.slow]


def test_first_run_changes_and_second_run_is_idempotent(provisioned: Provisioned) -> None:
    first, second = provisioned.runs
    assert first.counts()["failed"] == 0 and first.counts()["changed"] > 5
    assert second.counts()["changed"] == 0, second.tail(80)
    assert second.counts()["failed"] == 0


def test_system_packages_are_installed(provisioned: Provisioned) -> None:
    out = provisioned.sh("dpkg-query -W -f='${Package} ${db:Status-Status}\\n' git git-lfs tmux build-essential "
                         "python3-venv")
    status = dict(line.split() for line in out.splitlines())
    assert status == dict.fromkeys(["git", "git-lfs", "tmux", "build-essential", "python3-venv"], "installed")
    assert "filter.lfs.process" in provisioned.sh("git config --global --list")
    # systemd host: the course user lingers, so `fab serve`'s user units outlive the SSH session.
    assert provisioned.sh("loginctl show-user student -p Linger --value").strip() == "yes"


@pytest.mark.parametrize("env", ["llama3", "lmdeploy"])
def test_each_env_imports_cpu_torch_and_transformers(provisioned: Provisioned, env: str) -> None:
    out = provisioned.sh(f"~/envs/{env}/bin/python -c 'import torch, transformers; "
                         "print(torch.__version__, transformers.__version__, torch.cuda.is_available())'")
    torch_version, transformers_version, cuda = out.split()
    # The pins come from the profile: llama3 runs XTuner 0.2.0 (transformers 4.48.0), lmdeploy serves
    # with transformers 5.24.0.
    import yaml

    pins = dict(p.split("==", 1) for p in yaml.safe_load((ROOT / "profiles" / "cpu.yml").read_text())
                ["python_env"]["envs"][env]["packages"] if "==" in p)
    assert torch_version == pins["torch"] == "2.13.0+cpu"
    assert transformers_version == pins.get("transformers", pins.get("transformers[serving]"))
    assert cuda == "False"


def test_lmdeploy_env_has_the_openai_server(provisioned: Provisioned) -> None:
    assert "Run a FastAPI server" in provisioned.sh("~/envs/lmdeploy/bin/transformers serve --help")


def test_model_is_complete_stamped_and_loads(provisioned: Provisioned) -> None:
    stamp = json.loads(provisioned.sh(f"cat {STAMP}"))
    assert stamp["sha256_checked"] is True
    assert len(stamp["shards"]) == 3
    # Real weights, not LFS pointers, and transformers generates from them with the real tokenizer.
    out = provisioned.sh(
        "~/envs/llama3/bin/python - <<'EOF'\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained('{MODEL_DIR}')\n"
        f"m = AutoModelForCausalLM.from_pretrained('{MODEL_DIR}')\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=3, do_sample=False)\n"
        "print(m.config.vocab_size, m.config.num_key_value_heads, out.shape[1] - ids['input_ids'].shape[1])\n"
        "EOF"
    )
    assert out.split()[-3:] == ["128256", "1", "3"]


def test_files_belong_to_the_course_user(provisioned: Provisioned) -> None:
    foreign = provisioned.sh("find ~/envs ~/model ~/llama3-course ~/.cache/llama3-ops ! -user student | head")
    assert foreign.strip() == ""


def test_host_description_for_fabric(provisioned: Provisioned) -> None:
    host = json.loads(provisioned.sh("cat ~/llama3-course/host.json"))
    assert host["profile"] == "cpu"
    assert host["envs"] == {"llama3": "/home/student/envs/llama3/bin", "lmdeploy": "/home/student/envs/lmdeploy/bin"}
    assert host["service_manager"] == "systemd"
    env_sh = provisioned.sh("cat ~/llama3-course/env.sh")
    assert "LLAMA3_MODEL_DIR=/home/student/model/Meta-Llama-3-8B-Instruct" in env_sh


def test_symlink_source_links_the_shared_model(provisioned: Provisioned) -> None:
    extra = {"llama3_model_source": "symlink", "llama3_model_path": "/srv/share/Meta-Llama-3-8B-Instruct",
             "llama3_model_dir": "/home/student/model/shared-llama3", "tags": ["preflight", "model"]}
    run = provisioned.play("symlink-1", **extra)
    assert run.rc == 0, run.tail(60)
    assert provisioned.sh("readlink ~/model/shared-llama3").strip() == "/srv/share/Meta-Llama-3-8B-Instruct"
    assert provisioned.exists("~/model/.shared-llama3.llama3-ops.json")
    again = provisioned.play("symlink-2", **extra)
    assert again.rc == 0 and again.counts()["changed"] == 0, again.tail(60)
