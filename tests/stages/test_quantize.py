"""``fab quantize``: the offline calibration loader with the real Llama 3 tokenizer, the wrapper against
lmdeploy 0.4.1's and 0.18's real ``calibrate``/``auto_awq`` (run on CPU on a small Llama-3-shaped
checkpoint), the equivalent CLI checked by their own parsers, atomic output and error paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from llama3_ops.lab import checkpoint
from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import chat, quantize
from llama3_ops.stages.lm_files import awq_offline
from llama3_ops.stages.lm_models import LmdeployEnv, ModelError

from .lm_support import base_path, env_bin, fake_env, lmdeploy_python, parse_with_lmdeploy, write_host_json

WRAPPER = Path(awq_offline.__file__)
ENV18 = LmdeployEnv("/e/bin", "0.18.0", "/e/bin/python")
ENV041 = LmdeployEnv("/e/bin", "0.4.1", "/e/bin/python")


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_model: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))  # the real Llama 3 tokenizer.json


# --------------------------------------------------------------------------- calibration data


def test_pydoc_text_gives_128_samples_of_1024_real_llama3_tokens(llama3_tokenizer: object) -> None:
    import torch

    text = awq_offline.pydoc_text()
    stats: dict[str, object] = {}
    loader = awq_offline.make_loader(text, tuple_form=False, stats=stats)
    samples = loader("wikitext2", llama3_tokenizer, nsamples=128, seed=0, seqlen=1024)
    assert len(samples) == 128
    assert all(s.shape == (1, 1024) and s.dtype == torch.int64 for s in samples)
    assert int(stats["tokens"]) > 100_000  # type: ignore[call-overload]
    assert int(torch.cat(samples).max()) < 128256
    # real text, not ids of nothing: windows decode to the Python reference
    decoded = llama3_tokenizer.decode(samples[0][0])  # type: ignore[attr-defined]
    assert len(decoded) > 2000 and decoded in text.replace("\r", "")
    # same seed, same windows (lmdeploy's rule: random.seed(seed); randint(0, N - seqlen))
    again = loader("wikitext2", llama3_tokenizer, nsamples=128, seed=0, seqlen=1024)
    assert all(torch.equal(a, b) for a, b in zip(samples, again, strict=True))
    distinct = {int(s[0, 0]) * 1_000_003 + int(s[0, 1]) for s in samples}
    assert len(distinct) > 100


def test_tuple_form_for_lmdeploy_041(llama3_tokenizer: object) -> None:
    loader = awq_offline.make_loader("hello world " * 2000, tuple_form=True, stats={})
    pairs, test_enc = loader("wikitext2", llama3_tokenizer, nsamples=4, seed=1, seqlen=64)
    assert test_enc is None and len(pairs) == 4
    inp, tar = pairs[0]
    assert inp.shape == tar.shape == (1, 64)
    assert (tar[0, :-1] == -100).all() and tar[0, -1] == inp[0, -1]


def test_short_text_is_a_clear_error(llama3_tokenizer: object) -> None:
    loader = awq_offline.make_loader("too short", tuple_form=False, stats={})
    with pytest.raises(awq_offline.CalibrationError, match=r"the calibration text is \d+ tokens long, shorter than "
                                                           r"one sample of --calib-seqlen 1024"):
        loader("wikitext2", llama3_tokenizer, nsamples=2, seqlen=1024)


def test_text_sources(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("Über calibration\n")
    assert awq_offline.load_text(f"file:{f}") == ("Über calibration\n", str(f))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(awq_offline.CalibrationError, match="is not UTF-8 text"):
        awq_offline.load_text(f"file:{tmp_path / 'bin'}")
    with pytest.raises(awq_offline.CalibrationError, match="does not exist"):
        awq_offline.load_text(f"file:{tmp_path / 'nope'}")
    with pytest.raises(awq_offline.CalibrationError, match="unknown calibration source 'ptb'"):
        awq_offline.load_text("ptb")


def test_dataset_names_per_version() -> None:
    awq_offline.check_dataset_name("ptb", "0.4.1")
    with pytest.raises(awq_offline.CalibrationError, match=r"lmdeploy 0.18.0 accepts .*not 'ptb' \(ptb needs the Hub"):
        awq_offline.check_dataset_name("ptb", "0.18.0")
    msg = r"lmdeploy 0.4.1 accepts the calibration sets c4, ptb, wikitext2, pileval, not .gsm8k."
    with pytest.raises(awq_offline.CalibrationError, match=msg):
        awq_offline.check_dataset_name("gsm8k", "0.4.1")


@pytest.mark.slow
@pytest.mark.parametrize(("version", "tuple_form"), [("0.4.1", True), ("0.18.0", False)])
def test_loader_shape_detected_from_real_calibrate(version: str, tuple_form: bool) -> None:
    py = lmdeploy_python(version)
    code = (f"import sys; sys.path.insert(0, {str(WRAPPER.parent)!r}); import awq_offline, inspect; "
            "import lmdeploy.lite.apis.calibrate as c, lmdeploy.lite.apis.auto_awq as a; "
            "print(awq_offline.loader_returns_tuple(c.calibrate)); "
            "print(sorted(inspect.signature(a.auto_awq).parameters)); "
            "print(hasattr(c, 'get_calib_loaders'), hasattr(a, 'quant_weights'), hasattr(a, 'smooth_layers'))")
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-3] == str(tuple_form)
    params = set(json.loads(lines[-2].replace("'", '"')))
    assert {"model", "work_dir", "calib_dataset", "calib_samples", "calib_seqlen", "w_bits", "w_group_size",
            "device"} <= params
    assert ("batch_size" in params) is (version == "0.18.0")
    assert lines[-1] == "True True True"  # the names the wrapper patches exist in that version


# --------------------------------------------------------------------------- commands


def test_cli_equivalent_per_version() -> None:
    cfg = quantize.QuantizeConfig()
    old = quantize.cli_equivalent(cfg, ENV041, "/m", "/m_4bit")
    assert old[1:] == ["lite", "auto_awq", "/m", "--calib-dataset", "ptb", "--calib-samples", "128", "--calib-seqlen",
                       "1024", "--w-bits", "4", "--w-group-size", "128", "--work-dir", "/m_4bit"]
    new = quantize.cli_equivalent(cfg, ENV18, "/m", "/m_4bit")
    assert new[5] == "wikitext2" and new[-4:] == ["--batch-size", "1", "--dtype", "float16"]


@pytest.mark.slow
def test_commands_against_lmdeploys_own_parsers() -> None:
    cfg = quantize.QuantizeConfig()
    course = ["lite", "auto_awq", "/m", "--calib-dataset", "ptb", "--calib-samples", "128", "--calib-seqlen", "1024",
              "--w-bits", "4", "--w-group-size", "128", "--work-dir", "/m_4bit"]
    old = parse_with_lmdeploy("0.4.1", [quantize.cli_equivalent(cfg, ENV041, "/m", "/m_4bit")[1:],
                                        [*course, "--batch-size", "1"]])
    assert old[0]["ok"] and old[0]["ns"]["calib_dataset"] == "ptb" and old[0]["ns"]["w_group_size"] == 128
    assert not old[1]["ok"] and "unrecognized arguments: --batch-size 1" in old[1]["error"]
    new = parse_with_lmdeploy("0.18.0", [quantize.cli_equivalent(cfg, ENV18, "/m", "/m_4bit")[1:], course])
    assert new[0]["ok"] and new[0]["ns"]["batch_size"] == 1 and new[0]["ns"]["dtype"] == "float16"
    assert not new[1]["ok"] and "argument --calib-dataset: invalid choice: 'ptb'" in new[1]["error"]


@pytest.mark.parametrize(
    ("kw", "env", "msg"),
    [
        ({"w_bits": 8}, ENV18, "4-bit weights only"),
        ({"w_group_size": 100}, ENV18, "must be 32, 64 or 128"),
        ({"calib_samples": 0}, ENV18, "at least 1"),
        ({"calib_seqlen": 8}, ENV18, "within 16..8192"),
        ({"calib_file": Path("/x"), "calib_dataset": "c4"}, ENV18, "not both"),
        ({"w_group_size": 64}, ENV041, r"TurboMind loads AWQ models with group size 128 only"),
        ({"batch_size": 4}, ENV041, "has no --batch-size"),
        ({"calib_dataset": "ptb"}, ENV18, "lmdeploy 0.18.0 has no ptb calibration set"),
    ],
)
def test_bad_settings(kw: dict[str, object], env: LmdeployEnv, msg: str) -> None:
    cfg = quantize.QuantizeConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(quantize.QuantizeError, match=msg):
        cfg.validate()
        cfg.check_version(env)


def test_log_progress_parsing() -> None:
    st = quantize.LogState()
    st.feed(['@@llama3-ops {"phase": "load", "model": "/m"}',
             '@@llama3-ops {"phase": "calibration-data", "samples": 128, "seqlen": 1024, "tokens": 105674}',
             '@@llama3-ops {"linears": 224, "phase": "quantize"}',
             "model.layers.0.self_attn.q_proj weight packed.", "model.layers.0.mlp.up_proj weight skipped."])
    assert (st.phase, st.linears, st.packed, st.tokens, st.done) == ("quantize", 224, 2, 105674, False)
    st.feed(['@@llama3-ops {"phase": "error", "message": "boom"}'])
    assert st.error == "boom"


# --------------------------------------------------------------------------- on a "host" (LocalRemote)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3 architecture and tokenizer with hidden 128, so the course's group size 128 applies."""
    checkpoint.SHAPES.setdefault("small128", checkpoint.Shape(128, 256, 2, 4, 1, "10MB"))
    return checkpoint.make_checkpoint(tmp_path_factory.mktemp("small") / "Meta-Llama-3-8B-Instruct", "small128")


def _host(tmp_path: Path, model: Path | None, bin_dir: str, layout: str = "venv") -> tuple[LocalRemote, Path]:
    """A host whose host.json names ``bin_dir``'s env as its lmdeploy env, seen where ``layout`` puts envs."""
    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)
    if model is not None:
        shutil.copytree(model, home / "model" / "Meta-Llama-3-8B-Instruct")
    env_root = env_bin(home, "lmdeploy", layout).parent
    env_root.parent.mkdir(parents=True)
    env_root.symlink_to(Path(bin_dir).parent)
    write_host_json(home, layout=layout)
    return LocalRemote(env={"HOME": str(home), "PATH": f"{bin_dir}:{base_path()}"}), home


def test_missing_model_and_env(tmp_path: Path, small_model: Path) -> None:
    remote, home = _host(tmp_path, None, str(fake_env(tmp_path / "env" / "bin")))
    with pytest.raises(ModelError, match="model 'base' not found"):
        quantize.plan(remote, quantize.QuantizeConfig())
    shutil.copytree(small_model, home / "model" / "Meta-Llama-3-8B-Instruct")
    with pytest.raises(ModelError, match="no lmdeploy environment"):
        quantize.plan(remote, quantize.QuantizeConfig(env_bin_dir="~/none"))
    with pytest.raises(quantize.QuantizeError, match=r"calibration file .* is not UTF-8 text"):
        (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
        quantize.plan(remote, quantize.QuantizeConfig(env_bin_dir=str(tmp_path / "env" / "bin"), check_gpu=False,
                                                      calib_file=tmp_path / "b.txt"))


def test_plan_uploads_wrapper_and_calibration_text(tmp_path: Path, small_model: Path) -> None:
    remote, home = _host(tmp_path, small_model, str(fake_env(tmp_path / "env" / "bin")))
    text = tmp_path / "my calib.txt"
    text.write_text("Some calibration prose.\n" * 10)
    p = quantize.plan(remote, quantize.QuantizeConfig(env_bin_dir=str(tmp_path / "env" / "bin"), calib_file=text))
    assert p.out == str(home / "model" / "Meta-Llama-3-8B-Instruct_4bit")
    argv = list(p.spec.argv)
    assert argv[:4] == [str(tmp_path / "env/bin/python"), str(home / ".local/share/llama3-ops/stages/awq_offline.py"),
                        str(home / "model/Meta-Llama-3-8B-Instruct"), p.out]
    calib = argv[argv.index("--calib") + 1]
    assert calib.startswith(f"file:{home}/.cache/llama3-ops/calib/") and calib.endswith("-my_calib.txt")
    assert Path(calib[5:]).read_text() == text.read_text()
    assert (home / ".local/share/llama3-ops/stages/awq_offline.py").read_text() == WRAPPER.read_text()
    assert p.spec.env["HF_DATASETS_OFFLINE"] == "1"
    assert p.already is None


def _run(tmp_path: Path, small_model: Path, version: str, **kw: object) -> tuple[LocalRemote, Path, object]:
    """No --env: the env comes from host.json, a conda env (course profile) for 0.18.0, a venv for 0.4.1."""
    py = Path(lmdeploy_python(version))
    remote, home = _host(tmp_path, small_model, str(py.parent), layout="conda" if version == "0.18.0" else "venv")
    cfg = quantize.QuantizeConfig(device="cpu", check_gpu=False, calib_samples=8, calib_seqlen=256,
                                  **kw)  # type: ignore[arg-type]
    return remote, home, quantize.quantize(remote, cfg, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.4.1", "0.18.0"])
def test_real_auto_awq_on_cpu_offline(tmp_path: Path, small_model: Path, version: str) -> None:
    remote, home, res = _run(tmp_path, small_model, version)
    out = home / "model" / "Meta-Llama-3-8B-Instruct_4bit"
    assert res.out == str(out) and res.started_now  # type: ignore[attr-defined]
    marker = json.loads((out / ".llama3-ops-awq.json").read_text())
    assert marker["lmdeploy"] == version and marker["calibration"]["source"] == "pydoc"
    assert marker["calibration"]["tokens"] > 100_000 and marker["calibration"]["samples"] == 8
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}
    assert not (out.parent / (out.name + ".partial")).exists()
    assert marker["weights"]  # safetensors (0.18) or pytorch_model.bin (0.4.1)
    # fab chat / fab serve find it as the 4bit model
    from llama3_ops.stages.host import read_host
    from llama3_ops.stages.lm_models import check_model

    m = check_model(remote, "4bit", read_host(remote))
    assert m.model_format == "awq" and m.quantization == qcfg
    # again: nothing to do
    again = quantize.quantize(remote, quantize.QuantizeConfig(device="cpu", check_gpu=False), timeout=60)
    assert not again.started_now and again.info["finished"] == marker["finished"]


@pytest.mark.slow
def test_failed_run_leaves_no_model_marked_ready(tmp_path: Path, small_model: Path) -> None:
    py = Path(lmdeploy_python("0.18.0"))
    remote, home = _host(tmp_path, small_model, str(py.parent))
    # a weight shard cut short: lmdeploy fails while loading, after the wrapper started
    shard = sorted((home / "model/Meta-Llama-3-8B-Instruct").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    cfg = quantize.QuantizeConfig(env_bin_dir=str(py.parent), device="cpu", check_gpu=False, calib_samples=4,
                                  calib_seqlen=128)
    with pytest.raises(quantize.QuantizeError, match=r"quantization failed on localhost .*was not written"):
        quantize.quantize(remote, cfg, timeout=600)
    out = home / "model" / "Meta-Llama-3-8B-Instruct_4bit"
    assert not out.exists()
    with pytest.raises(ModelError, match="it is made by fab quantize"):
        chat.prepare(remote, chat.ChatConfig(model="4bit", env_bin_dir=str(py.parent), check_gpu=False))
    # a calibration text shorter than one sample fails with the wrapper's own message
    shutil.rmtree(home / "model/Meta-Llama-3-8B-Instruct")
    shutil.copytree(small_model, home / "model/Meta-Llama-3-8B-Instruct")
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(quantize.QuantizeError, match=r"shorter than one sample of --calib-seqlen 128"):
        quantize.quantize(remote, quantize.QuantizeConfig(env_bin_dir=str(py.parent), device="cpu", check_gpu=False,
                                                          calib_samples=4, calib_seqlen=128, calib_file=short),
                          timeout=600)
    assert not out.exists()


# --------------------------------------------------------------------------- the GPU device run


@pytest.mark.slow
def test_quantize_main_is_the_device_code_path(tmp_path: Path, small_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m llama3_ops.stages.quantize --local`` as stages-run.sh calls it (here: CPU, lmdeploy 0.18)."""
    py = Path(lmdeploy_python("0.18.0"))
    home = tmp_path / "home"
    model = home / "work" / "Meta-Llama-3-8B-Instruct"
    shutil.copytree(small_model, model)
    write_host_json(home, envs={"lmdeploy": py.parent})  # the device script provisions first
    monkeypatch.setenv("HOME", str(home))
    out_json = tmp_path / "q.json"
    rc = quantize.main(["--local", "--model", str(model), "--calib-samples", "4", "--calib-seqlen", "128",
                        "--env", str(py.parent), "--setenv", "OMP_NUM_THREADS=1", "--device", "cpu",
                        "--no-gpu-check", "--force", "--timeout", "600", "--json", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert res["out"] == f"{model}_4bit" and res["info"]["calibration"]["samples"] == 4
    assert (Path(res["out"]) / ".llama3-ops-awq.json").is_file()
    launcher = (home / ".local/state/llama3-ops/run/quantize.sh").read_text()
    assert "export OMP_NUM_THREADS=1" in launcher and "--force" in launcher


ROOT = Path(__file__).resolve().parents[2]
STAGES_RUN = ROOT / "scripts" / "gpu" / "stages-run.sh"


def _dry_run(tmp_path: Path, *phases: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    import os
    import shlex

    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": ".gpu-work-dryrun-test"}
    res = subprocess.run(["bash", str(STAGES_RUN), "--dry-run", *phases], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    cmds = [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")]
    return res, cmds


def test_stages_run_dry_run_prints_the_commands(tmp_path: Path) -> None:
    from llama3_ops.stages import chat as chat_stage

    res, cmds = _dry_run(tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists() and not (ROOT / ".gpu-work-dryrun-test").exists()  # nothing ran
    mods = [c[c.index("-m") + 1] for c in cmds if "-m" in c]
    assert mods == ["pip", "llama3_ops.lab.checkpoint", "llama3_ops.stages.chat", "llama3_ops.stages.quantize",
                    "llama3_ops.stages.chat"]
    chats = [chat_stage.build_parser().parse_args(c[c.index("-m") + 2:]) for c in cmds if "llama3_ops.stages.chat" in c]
    model = str(ROOT / ".gpu-work-dryrun-test" / "Meta-Llama-3-8B-Instruct")
    assert [a.model for a in chats] == [model, model + "_4bit"]
    for a in chats:
        assert (a.backend, a.cache_max_entry_count, a.session_len, a.env) == ("pytorch", 0.01, 512, "/tmp/site/bin")
        assert a.setenv == [f"PYTHONPATH=/tmp/site:{ROOT}/src"] and a.question == ["Please introduce yourself."]
    [q] = [quantize.build_parser().parse_args(c[c.index("-m") + 2:]) for c in cmds if "llama3_ops.stages.quantize" in c]
    assert (q.model, q.calib_samples, q.calib_seqlen, q.w_group_size, q.force) == (model, 128, 1024, 128, True)
    assert any(c[:2] == ["nvidia-smi", "--query-gpu=name,driver_version,memory.total"] for c in cmds)
    # knobs and phase selection
    import os

    env = {**os.environ, "CALIB_SAMPLES": "32", "OUT": str(tmp_path / "o2")}
    res2 = subprocess.run(["bash", str(STAGES_RUN), "--dry-run", "quantize"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert res2.returncode == 0 and "--calib-samples 32" in res2.stdout and "stages.chat" not in res2.stdout
    bad, _ = _dry_run(tmp_path, "train")
    assert bad.returncode == 2 and "unknown phase train" in bad.stderr
