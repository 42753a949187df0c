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
    argv = [str(a) for a in srv.build_spec(srv.ServeConfig(quant_policy=16, tp=2, backend="pytorch"), HOST).argv]
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


H200 = {"name": "NVIDIA H200", "total": 143771, "used": 0}  # the device machine, 2026-12


def test_no_flag_serve_takes_the_gpus_row_warms_the_engine_then_says_ready(tmp_path: Path) -> None:
    """The lmdeploy path of fab serve end to end on a fake H200 (the fake engine is the stand-in server)."""
    import io
    from dataclasses import replace

    from rich.console import Console

    from llama3_ops.lab.standin import free_port

    from .lm_support import parse_with_lmdeploy

    remote, home = _host(tmp_path, [dict(H200)])
    bin_dir = home / "envs" / "lmdeploy" / "bin"
    cfg = srv.ServeConfig(backend="pytorch", port=free_port(), name="tuned")
    out = io.StringIO()
    console = Console(file=out, width=300)
    try:
        res = srv.serve(remote, cfg, timeout=60, console=console)
        argv = json.loads((bin_dir / "api_server-argv.json").read_text())
        assert argv[argv.index("--max-batch-size") + 1] == "512"
        assert argv[argv.index("--cache-max-entry-count") + 1] == "0.9"
        assert argv[argv.index("--quant-policy") + 1] == "0" and "--max-prefill-token-num" not in argv
        text = " ".join(out.getvalue().split())
        assert ("engine settings for NVIDIA H200: max batch 512, cache 0.9, KV fp16/bf16, prefill engine default "
                "(table row H200)") in text
        # warmed at the max batch size before "ready", and ready comes after the warm-up line
        assert res.warmup is not None and [w["ok"] for w in res.warmup.waves] == [512, 512]
        assert text.index("warm-up: 2 wave(s) of 512 requests at once") < text.index("ready after")
        st = services.status(remote, "tuned", log_lines=0)
        assert st.settings["max_batch_size"] == "512" and st.settings["cache_max_entry_count"] == "0.9"
        # the same call again reuses the warm server; a flag that changes a setting needs --restart
        again = srv.serve(remote, cfg, timeout=60, console=console)
        assert not again.started_now and again.warmup is None
        with pytest.raises(services.FingerprintMismatchError, match="running with other settings"):
            srv.serve(remote, replace(cfg, max_batch_size=64), timeout=60, console=console)
    finally:
        services.stop(remote, "tuned")
    # lmdeploy 0.18's own parser takes the command line as fab serve built it
    parsed = parse_with_lmdeploy("0.18.0", [argv])[0]
    assert parsed["ok"], parsed
    assert (parsed["ns"]["max_batch_size"], parsed["ns"]["cache_max_entry_count"]) == (512, 0.9)


def test_no_warmup_says_ready_at_the_first_token(tmp_path: Path) -> None:
    from llama3_ops.lab.standin import free_port

    remote, _ = _host(tmp_path, [dict(H100)])
    cfg = srv.ServeConfig(backend="pytorch", port=free_port(), name="cold", warmup=False, max_batch_size=8)
    try:
        res = srv.serve(remote, cfg, timeout=60)
        assert res.started_now and res.warmup is None and res.tuning is not None
        assert res.tuning.source == "table row H100 80GB; --max-batch-size from the command line"
        assert res.tuning.quant_policy == 16  # the H100 row: fp8 KV on the PyTorch engine
    finally:
        services.stop(remote, "cold")
