"""`fab finetune` refuses bad input with one clear message before anything runs (real shell, LocalRemote).

The host is a temporary $HOME with the files provisioning writes (``~/llama3-course/host.json``);
``nvidia-smi`` is the fake one of lm_support (nvidia-smi's real output format) or absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import finetune
from llama3_ops.stages.finetune import FinetuneError
from llama3_ops.stages.host import HostContractError

from .lm_support import H100, base_path, smi_dir, write_host_json

RTX3070 = {"name": "NVIDIA GeForce RTX 3070", "total": 8192, "used": 0}


def host_home(tmp: Path, profile: str) -> Path:
    """A home as provisioning leaves it: the course profile's conda layout, venvs for the others."""
    home = tmp / "home"
    write_host_json(home, layout="conda" if profile == "course" else "venv", profile=profile)
    return home


def remote(home: Path, smi: Path | None) -> LocalRemote:
    return LocalRemote(env={"HOME": str(home), "PATH": f"{smi}:{base_path()}" if smi else base_path()})


def test_unprovisioned_host_is_refused(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    with pytest.raises(HostContractError, match=r"no ~/llama3-course/host.json: it was not provisioned\. "
                                                 r"Provision it first: ansible-playbook -i INVENTORY site\.yml"):
        finetune.run_finetune(remote(tmp_path / "home", None), count=5)


def test_gpu_too_small_names_the_stage_numbers(tmp_path: Path) -> None:
    home = host_home(tmp_path, "course")
    smi = smi_dir(tmp_path / "smi", [dict(RTX3070, used=300)])
    with pytest.raises(FinetuneError) as err:
        finetune.run_finetune(remote(home, smi), count=5)
    msg = str(err.value)
    assert "stage finetune needs ~10 GiB of GPU memory" in msg
    assert "NVIDIA GeForce RTX 3070" in msg and "QLoRA" in msg


def test_gpu_that_fits_passes_to_the_model_check(tmp_path: Path) -> None:
    home = host_home(tmp_path, "course")
    smi = smi_dir(tmp_path / "smi", [dict(H100)])
    with pytest.raises(FinetuneError, match=r"base model .*/Meta-Llama-3-8B-Instruct on localhost does not exist"):
        finetune.run_finetune(remote(home, smi), count=5)


def test_cpu_profile_skips_the_gpu_check(tmp_path: Path) -> None:
    home = host_home(tmp_path, "cpu")
    smi = smi_dir(tmp_path / "smi", [dict(RTX3070)])
    with pytest.raises(FinetuneError, match=r"base model .* does not exist"):
        finetune.run_finetune(remote(home, smi), count=5)


def test_no_gpu_on_a_gpu_profile_host_runs_on_cpu_only_when_asked(tmp_path: Path) -> None:
    home = host_home(tmp_path, "course")
    with pytest.raises(FinetuneError, match="stage finetune needs an NVIDIA GPU"):
        finetune.run_finetune(remote(home, None), count=5, device="gpu")
    with pytest.raises(FinetuneError, match="base model"):
        finetune.run_finetune(remote(home, None), count=5, device="cpu")


def test_base_model_without_weights_is_refused(tmp_path: Path) -> None:
    home = host_home(tmp_path, "cpu")
    model = home / "model" / "Meta-Llama-3-8B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(FinetuneError, match=r"has no \*\.safetensors or \*\.bin weights"):
        finetune.run_finetune(remote(home, None), count=5)
    with pytest.raises(FinetuneError, match=r"/nope on localhost does not exist.*--base-model"):
        finetune.run_finetune(remote(home, None), count=5, base_model="/nope")


def test_missing_env_is_refused(tmp_path: Path) -> None:
    home = host_home(tmp_path, "cpu")
    model = home / "model" / "Meta-Llama-3-8B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"envs/llama3/bin/python does not exist on localhost"):
        finetune.run_finetune(remote(home, None), count=5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"count": 0}, "count must be between 1"),
    ({"name": "  "}, "name must not be empty"),
    ({"device": "tpu"}, "device must be auto, gpu or cpu"),
    ({"until": "deploy"}, "until must be one of train, convert, merge"),
    ({"max_iters": 1}, "a short run needs max_iters >= 2"),
    ({"max_iters": -3}, "a short run needs max_iters >= 2"),
])
def test_bad_dataset_parameters(tmp_path: Path, kwargs: dict[str, object], needle: str) -> None:
    home = host_home(tmp_path, "cpu")
    with pytest.raises(FinetuneError, match=needle):
        finetune.run_finetune(remote(home, None), **kwargs)  # type: ignore[arg-type]


def test_local_main_reports_the_error_and_writes_it_to_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m llama3_ops.stages.finetune --local`` (the device run): one message, exit 1, the JSON says why."""
    home = host_home(tmp_path, "course")
    smi = smi_dir(tmp_path / "smi", [dict(H100)])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{smi}:{base_path()}")
    out = tmp_path / "ft.json"
    rc = finetune.main(["--local", "--count", "5", "--max-iters", "8", "--json", str(out)])
    assert rc == 1
    assert "base model" in capsys.readouterr().err
    assert "does not exist" in json.loads(out.read_text())["error"]
