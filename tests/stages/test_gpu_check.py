"""GPU query and the stage preflight (stage_requirements.yml) against nvidia-smi's real output format."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import gpu

from .lm_support import H100, RTX3060, base_path, smi_dir, write_gpus

YML = Path(gpu.__file__).resolve().parents[1] / "data" / "stage_requirements.yml"


def _remote(d: Path | None) -> LocalRemote:
    return LocalRemote(env={"PATH": f"{d}:{base_path()}" if d else base_path()})


def test_requirements_come_from_the_yaml() -> None:
    raw = yaml.safe_load(YML.read_text())["stages"]
    reqs = gpu.requirements()
    assert set(reqs) == set(raw)
    for name, body in raw.items():
        assert reqs[name].gpu_mem_gb == float(body["gpu_mem_gb"])
        assert reqs[name].disk_gb == float(body["disk_gb"])
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        gpu.requirement("nope")


def test_parse_real_nvidia_smi_lines() -> None:
    text = "0, NVIDIA H100 80GB HBM3, 81559, 0\n1, NVIDIA A100-SXM4-80GB, 81920, 16176\n"
    gpus = gpu.parse_query(text)
    assert gpus == [gpu.GPU(0, "NVIDIA H100 80GB HBM3", 81559, 0), gpu.GPU(1, "NVIDIA A100-SXM4-80GB", 81920, 16176)]
    assert gpus[1].memory_free_mib == 81920 - 16176
    mig = gpu.parse_query("0, NVIDIA A100-SXM4-40GB MIG 1g.5gb, [N/A], [N/A]\n")
    assert mig[0].memory_total_mib == -1


def test_query_through_local_remote(tmp_path: Path) -> None:
    d = smi_dir(tmp_path / "smi", [dict(H100, used=1200)])
    gpus = gpu.query_gpus(_remote(d))
    assert gpus == [gpu.GPU(0, "NVIDIA H100 80GB HBM3", 81559, 1200)]
    assert gpu.memory_line(gpus) == "GPU 0 (NVIDIA H100 80GB HBM3): 1200 / 81559 MiB in use"


def test_stage_fits_on_h100(tmp_path: Path) -> None:
    d = smi_dir(tmp_path / "smi", [dict(H100)])
    for stage in ("chat", "chat_4bit", "quantize", "llava", "serve"):
        g = gpu.check_stage(_remote(d), stage)
        assert g is not None and g.name == "NVIDIA H100 80GB HBM3"


def test_gpu_too_small_names_the_numbers_and_the_4bit_route(tmp_path: Path) -> None:
    d = smi_dir(tmp_path / "smi", [dict(RTX3060, used=700)])
    with pytest.raises(gpu.GPUCheckError) as err:
        gpu.check_stage(_remote(d), "chat")
    msg = str(err.value)
    need = gpu.requirement("chat").gpu_mem_gb
    assert msg.startswith(f"stage chat needs ~{need:g} GiB of GPU memory; GPU 0 (NVIDIA GeForce RTX 3060) has "
                          f"{(12288 - 700) / 1024:.1f} GiB free of 12.0 GiB.")
    assert "fab chat --model 4bit" in msg and f"~{gpu.requirement('chat_4bit').gpu_mem_gb:g} GiB" in msg
    # the 4-bit model fits on the same card
    assert gpu.check_stage(_remote(d), "chat_4bit") is not None
    with pytest.raises(gpu.GPUCheckError, match="stage llava needs ~18 GiB"):
        gpu.check_stage(_remote(d), "llava")


def test_memory_held_by_others_says_stop_them(tmp_path: Path) -> None:
    d = smi_dir(tmp_path / "smi", [dict(H100, used=70000)])
    with pytest.raises(gpu.GPUCheckError, match=r"in use by other processes: stop them first \(fab status / fab down"):
        gpu.check_stage(_remote(d), "quantize")


def test_another_gpu_with_room_is_named(tmp_path: Path) -> None:
    d = smi_dir(tmp_path / "smi", [dict(RTX3060), dict(H100)])
    room = r"GPU 1 \(NVIDIA H100 80GB HBM3\) has 79.6 GiB free.*CUDA_VISIBLE_DEVICES=1"
    with pytest.raises(gpu.GPUCheckError, match=room):
        gpu.check_stage(_remote(d), "chat")
    assert gpu.check_stage(_remote(d), "chat", gpu_index=1) is not None
    with pytest.raises(gpu.GPUCheckError, match=r"has no GPU 2; it has 0 .*, 1 "):
        gpu.check_stage(_remote(d), "chat", gpu_index=2)


def test_no_nvidia_smi_is_clear_for_gpu_stages(tmp_path: Path) -> None:
    msg = r"stage quantize needs an NVIDIA GPU with ~16.5 GiB: localhost has no nvidia-smi"
    with pytest.raises(gpu.NoGPUError, match=msg):
        gpu.check_stage(_remote(None), "quantize")


def test_driver_not_answering(tmp_path: Path) -> None:
    msg = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
           "Make sure that the latest NVIDIA driver is installed and running.")
    d = smi_dir(tmp_path / "smi", fail={"message": msg, "rc": 9})
    with pytest.raises(gpu.NoGPUError, match="nvidia-smi on localhost failed: NVIDIA-SMI has failed because"):
        gpu.query_gpus(_remote(d))
    write_gpus(d / "gpu-state.json", [])
    with pytest.raises(gpu.NoGPUError, match="lists no GPU"):
        gpu.query_gpus(_remote(d))


def test_cpu_stage_passes_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = dict(gpu.requirements())
    reqs["cpu_demo"] = gpu.StageRequirement("cpu_demo", 16, 0, "test", gpu=False)
    monkeypatch.setattr(gpu, "requirements", lambda: reqs)
    assert gpu.check_stage(_remote(None), "cpu_demo") is None


def test_disk_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = gpu.free_disk_gib(_remote(None), str(tmp_path / "not" / "yet"))
    assert free > 0
    assert gpu.check_disk(_remote(None), "chat", str(tmp_path)) == pytest.approx(free, rel=0.05)
    reqs = dict(gpu.requirements())
    reqs["quantize"] = gpu.StageRequirement("quantize", 16.5, 1e6, "test")
    monkeypatch.setattr(gpu, "requirements", lambda: reqs)
    with pytest.raises(gpu.GPUCheckError, match=r"stage quantize writes ~1e\+06 GiB under .* only [0-9.]+ GiB is free"):
        gpu.check_disk(_remote(None), "quantize", str(tmp_path))


H200 = {"name": "NVIDIA H200", "total": 143771, "used": 0}


def test_tp_counts_gpus_and_names_the_fix(tmp_path: Path) -> None:
    d = smi_dir(tmp_path / "smi", [dict(H100)])
    msg = (r"stage serve with --tp 2 needs 2 GPUs; localhost has 1: 0 \(NVIDIA H100 80GB HBM3\)\. "
           r"Use --tp 1 or fewer, or a host with more GPUs\.")
    with pytest.raises(gpu.GPUCheckError, match=msg):
        gpu.check_tp(_remote(d), "serve", 2)
    assert [g.index for g in gpu.check_tp(_remote(d), "serve", 1)] == [0]
    with pytest.raises(gpu.GPUCheckError, match="at least 1"):
        gpu.check_tp(_remote(d), "serve", 0)


def test_tp_splits_the_need_over_the_first_n_gpus(tmp_path: Path) -> None:
    need = gpu.requirement("serve").gpu_mem_gb
    # 10 GiB free on each of two 12 GiB cards: too little for tp 1, enough for half the weights each.
    two_small = [dict(RTX3060, used=2048), dict(RTX3060, used=2048)]
    d = smi_dir(tmp_path / "smi", two_small)
    with pytest.raises(gpu.GPUCheckError, match="stage serve needs"):
        gpu.check_tp(_remote(d), "serve", 1)
    assert [g.index for g in gpu.check_tp(_remote(d), "serve", 2)] == [0, 1]
    # GPU 1 busy: the message names it, the share and the basis.
    write_gpus(d / "gpu-state.json", [dict(H200), dict(H200, used=140000), dict(H200)])
    with pytest.raises(gpu.GPUCheckError) as err:
        gpu.check_tp(_remote(d), "serve", 2)
    msg = str(err.value)
    assert f"needs ~{need / 2:.1f} GiB free on each of GPUs 0-1 (~{need:g} GiB split 2 ways)" in msg
    assert "GPU 1 (NVIDIA H200) has 3.7 GiB free of 140.4 GiB" in msg and "GPU 0" not in msg.split(":", 1)[1]
    assert len(gpu.check_tp(_remote(d), "serve", 1)) == 1


def test_tp_without_nvidia_smi(tmp_path: Path) -> None:
    msg = "stage serve with --tp 2 needs 2 NVIDIA GPUs: localhost has no nvidia-smi"
    with pytest.raises(gpu.NoGPUError, match=msg):
        gpu.check_tp(_remote(None), "serve", 2)
