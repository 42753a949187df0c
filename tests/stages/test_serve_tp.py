"""`fab serve --tp N`: the GPU-count preflight runs before anything starts, on a host with a fake nvidia-smi."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama3_ops.remote import services, transport
from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import gpu
from llama3_ops.stages import serve as srv
from llama3_ops.stages.host import Host

from .lm_support import H100, base_path, fake_host

HOST = Host(label="h", home="/home/u", profile="course", user="u", course_dir="/home/u/llama3-course",
            model_dir="/home/u/model/Meta-Llama-3-8B-Instruct", model_stamp="/home/u/model/.s",
            envs={"lmdeploy": "/home/u/miniforge3/envs/lmdeploy/bin"})


def _host(tmp_path: Path, gpus: list[dict[str, object]]) -> tuple[LocalRemote, Path]:
    home = tmp_path / "home"
    bin_dir = fake_host(home, gpus=gpus)
    model = home / "model" / "Meta-Llama-3-8B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return LocalRemote(env={"HOME": str(home), "PATH": f"{bin_dir}:{base_path()}"}), home


@pytest.mark.parametrize("tp", [3, 6, -2])
def test_tp_must_be_a_power_of_two(tp: int) -> None:
    with pytest.raises(srv.ServeConfigError, match=rf"--tp must be a power of two \(1, 2, 4, 8\).*got {tp}"):
        srv.build_spec(srv.ServeConfig(tp=tp), HOST)


def test_fp8_kv_cache_is_passed_through() -> None:
    argv = [str(a) for a in srv.build_spec(srv.ServeConfig(quant_policy=16, tp=2), HOST).argv]
    assert argv[argv.index("--quant-policy") + 1] == "16" and argv[argv.index("--tp") + 1] == "2"
    with pytest.raises(srv.ServeConfigError, match="quant_policy must be 0, 4"):
        srv.build_spec(srv.ServeConfig(quant_policy=2), HOST)  # type: ignore[arg-type]


def test_tp2_on_a_one_gpu_host_starts_nothing(tmp_path: Path) -> None:
    remote, home = _host(tmp_path, [dict(H100)])
    cfg = srv.ServeConfig(tp=2, backend="pytorch", name="tp-test")
    with pytest.raises(gpu.GPUCheckError, match="stage serve with --tp 2 needs 2 GPUs; localhost has 1"):
        srv.serve(remote, cfg, timeout=5)
    st = services.status(remote, "tp-test", log_lines=0)
    assert not st.running and st.state == "absent"
    assert not (home / ".local" / "state" / "llama3-ops" / "run" / "tp-test.sh").exists()


def test_serve_cli_reports_the_gpu_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    remote, _ = _host(tmp_path, [dict(H100), dict(H100, used=80000)])
    monkeypatch.setattr(transport, "LocalRemote", lambda: remote)
    rc = srv.main(["--local", "up", "--tp", "2", "--backend", "pytorch", "--name", "tp-cli"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "needs ~8.1 GiB free on each of GPUs 0-1" in " ".join(err.split())
    assert "GPU 1 (NVIDIA H100 80GB HBM3) has 1.5 GiB free" in " ".join(err.split())
