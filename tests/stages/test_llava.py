"""``fab llava``: what runs without a GPU. Image checks and upload, the LLaVA format / env rules, the
``--no-deps`` install command, the GPU preflight, and the host script against lmdeploy 0.4.1's and
0.18's real API (``--dry-run``: loads the image and builds the engine configs, starts no engine).
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import llava
from llama3_ops.stages.gpu import GPUCheckError
from llama3_ops.stages.lm_models import LmdeployEnv

from .lm_support import RTX3060, base_path, env_bin, fake_host, lmdeploy_python, write_host_json

ENV18 = LmdeployEnv("/e/bin", "0.18.0", "/e/bin/python")
ENV041 = LmdeployEnv("/e/bin", "0.4.1", "/e/bin/python")
SCRIPT = Path(llava.__file__).parent / "lm_files" / "llava_describe.py"


def _png(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, (10, 120, 200)).save(path)
    return path


def _host(tmp_path: Path, arch: str | None, version: str = "0.18.0", bin_dir: Path | None = None,
          gpus: list[dict[str, object]] | None = None, layout: str = "venv") -> tuple[LocalRemote, Path, Path]:
    """A host as provisioning leaves it (host.json names the env); ``bin_dir``: a real lmdeploy env, placed
    where ``layout`` puts envs (the course profile's conda layout: ~/miniforge3/envs/lmdeploy)."""
    home = tmp_path / "home"
    home.mkdir(parents=True)
    if bin_dir is None:
        bin_dir = fake_host(home, layout, version=version, gpus=gpus)
    else:
        env_root = env_bin(home, "lmdeploy", layout).parent
        env_root.parent.mkdir(parents=True)
        env_root.symlink_to(bin_dir.parent)  # the venv itself, seen at the layout's path
        bin_dir = env_root / "bin"
        write_host_json(home, layout=layout)
    if arch:
        model = home / "model" / "llava-llama-3-8b-v1_1-hf"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llava"}))
    return LocalRemote(env={"HOME": str(home), "PATH": f"{bin_dir}:{base_path()}"}), home, bin_dir


def test_images_are_checked_locally(tmp_path: Path) -> None:
    data, ext = llava.read_local_image(_png(tmp_path / "a.png"))
    assert ext == ".png" and data.startswith(b"\x89PNG")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    (tmp_path / "b.jpeg").write_bytes(buf.getvalue())
    assert llava.read_local_image(tmp_path / "b.jpeg")[1] == ".jpg"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="WEBP")
    assert llava.image_kind(buf.getvalue()) == ".webp"
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(llava.LlavaError, match=r"notes.txt is not a PNG, JPEG, GIF, BMP or WebP image"):
        llava.read_local_image(tmp_path / "notes.txt")
    with pytest.raises(llava.LlavaError, match=r"nope.png does not exist \(give a local file or an http\(s\) URL\)"):
        llava.read_local_image(tmp_path / "nope.png")


def test_upload_keeps_the_bytes(tmp_path: Path) -> None:
    remote, home, _ = _host(tmp_path, None)
    data, ext = llava.read_local_image(_png(tmp_path / "a.png", (300, 200)))
    dest = llava.upload_image(remote, data, ext)
    assert dest.startswith(f"{home}/.cache/llama3-ops/llava/") and dest.endswith(".png")
    assert Path(dest).read_bytes() == data
    assert llava.upload_image(remote, data, ext) == dest  # same content, same name


def test_install_command_has_no_deps() -> None:
    assert llava.install_argv(ENV18) == ["/e/bin/python", "-m", "pip", "install", "--no-deps",
                                         "git+https://github.com/haotian-liu/LLaVA.git"]
    assert llava.install_argv(ENV18, "v1.2.2.post1")[-1].endswith("LLaVA.git@v1.2.2.post1")
    with pytest.raises(llava.LlavaError, match="bad LLaVA git ref"):
        llava.LlavaConfig(image="x.png", llava_ref="main; rm -rf /").validate()


def test_describe_command_per_version() -> None:
    cfg = llava.LlavaConfig(image="/i.png", cache_max_entry_count=0.2)
    old = llava.describe_argv(cfg, ENV041, "/h", "/h/model/llava", "/h/i.png")
    assert old[:4] == ["/e/bin/python", "/h/.local/share/llama3-ops/stages/llava_describe.py", "/h/model/llava",
                       "/h/i.png"]
    assert old[old.index("--chat-template") + 1] == "llama3"  # the course's template on 0.4.1
    new = llava.describe_argv(cfg, ENV18, "/h", "/h/model/llava", "https://example.org/cat.jpg")
    assert "--chat-template" not in new  # 0.18 has no 'llama3' template name: the model's own is used
    assert new[new.index("--cache-max-entry-count") + 1] == "0.2"


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"backend": "vllm"}, "unknown backend"),
        ({"prompt": " "}, "the prompt is empty"),
        ({"cache_max_entry_count": 2.0}, r"cache_max_entry_count must be in \(0, 1\]"),
        ({"session_len": 512}, "session_len >= 1024"),
    ],
)
def test_bad_settings(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(llava.LlavaError, match=msg):
        llava.LlavaConfig(image="a.png", **kw).validate()  # type: ignore[arg-type]


def test_original_llava_format_needs_the_llava_package(tmp_path: Path) -> None:
    remote, _, bin_dir = _host(tmp_path, "LlavaLlamaForCausalLM", version="0.4.1")
    img = _png(tmp_path / "a.png")
    with pytest.raises(llava.LlavaError) as err:
        llava.prepare(remote, llava.LlavaConfig(image=str(img), check_gpu=False))
    msg = str(err.value)
    assert "needs the LLaVA repo's llava package" in msg and "fab llava --install-llava" in msg
    assert f"{bin_dir}/python -m pip install --no-deps git+https://github.com/haotian-liu/LLaVA.git" in msg
    assert "transformers 4.31" in msg
    # once the package is importable in the env, the preflight passes and the image is on the host
    site = bin_dir.parent / "fake-site" / "llava"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    p = llava.prepare(remote, llava.LlavaConfig(image=str(img), check_gpu=False))
    assert Path(p.image).read_bytes() == img.read_bytes()
    assert p.argv[p.argv.index("--chat-template") + 1] == "llama3"


def test_transformers_format_needs_newer_lmdeploy(tmp_path: Path) -> None:
    remote, _, _ = _host(tmp_path, "LlavaForConditionalGeneration", version="0.4.1")
    with pytest.raises(llava.LlavaError, match=r"lmdeploy 0.4.1 runs LLaVA only in the original LLaVA format"):
        llava.prepare(remote, llava.LlavaConfig(image="https://example.org/cat.jpg", check_gpu=False))
    remote18, _, _ = _host(tmp_path / "b", "LlavaForConditionalGeneration", version="0.18.0")
    p = llava.prepare(remote18, llava.LlavaConfig(image="https://example.org/cat.jpg", check_gpu=False))
    assert p.image == "https://example.org/cat.jpg"  # URLs are fetched by the host


def test_wrong_or_missing_model_and_small_gpu(tmp_path: Path) -> None:
    remote, _, _ = _host(tmp_path, None)
    with pytest.raises(llava.LlavaError, match=r"model '~/model/llava-llama-3-8b-v1_1-hf' not found .* Download "
                                               r"LLaVA-Llama-3 there first"):
        llava.prepare(remote, llava.LlavaConfig(image="https://example.org/a.jpg"))
    remote, _, _ = _host(tmp_path / "b", "LlamaForCausalLM")
    with pytest.raises(llava.LlavaError, match="is not a LLaVA model"):
        llava.prepare(remote, llava.LlavaConfig(image="https://example.org/a.jpg"))
    remote, _, _ = _host(tmp_path / "c", "LlavaForConditionalGeneration", gpus=[dict(RTX3060)])
    small = r"stage llava needs ~18 GiB of GPU memory; GPU 0 \(NVIDIA GeForce RTX 3060\)"
    with pytest.raises(GPUCheckError, match=small):
        llava.prepare(remote, llava.LlavaConfig(image="https://example.org/a.jpg"))
    with pytest.raises(llava.LlavaError, match="only http"):
        llava.prepare(remote, llava.LlavaConfig(image="ftp://example.org/a.jpg"))


@pytest.mark.slow
def test_dry_run_against_real_lmdeploy_018(tmp_path: Path) -> None:
    """No --env: a course-profile host's host.json names a conda env (~/miniforge3/envs/lmdeploy)."""
    py = Path(lmdeploy_python("0.18.0"))
    remote, home, _ = _host(tmp_path, "LlavaForConditionalGeneration", bin_dir=py.parent, layout="conda")
    img = _png(tmp_path / "a.png", (336, 224))
    d = llava.describe(remote, llava.LlavaConfig(image=str(img), cache_max_entry_count=0.3), dry_run=True)
    assert f"{home}/miniforge3/envs/lmdeploy/bin/python " in d.command
    assert d.info["lmdeploy"] == "0.18.0" and d.info["image_size"] == [336, 224]
    assert d.info["image"].startswith(f"{home}/.cache/llama3-ops/llava/")
    assert "session_len=8192" in d.info["engine_config"] and "cache_max_entry_count=0.3" in d.info["engine_config"]
    assert d.info["engine_config"].startswith("TurbomindEngineConfig(")


@pytest.mark.slow
def test_dry_run_against_real_lmdeploy_041(tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png")
    res = subprocess.run([lmdeploy_python("0.4.1"), str(SCRIPT), "/m", str(img), "--backend", "pytorch",
                          "--chat-template", "llama3", "--dry-run"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["lmdeploy"] == "0.4.1" and info["engine_config"].startswith("PytorchEngineConfig(")


def test_tiny_llava_checkpoint_loads_in_transformers_and_takes_an_image(tmp_path: Path) -> None:
    """The random-weight LLaVA the GPU run uses: every tensor name and shape is one transformers reads
    (no missing or unexpected keys), the processor expands <image> to the vision tower's tokens, and
    the model generates with an image."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llama3_ops.lab import llava_checkpoint as lc

    out = lc.make_llava_checkpoint(tmp_path / "llava", "tiny")
    model, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    proc = AutoProcessor.from_pretrained(str(out))
    assert proc.image_token_id == lc.IMAGE_TOKEN_INDEX and proc.tokenizer.pad_token_id == lc.PAD_TOKEN_ID
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nDescribe this image."}],
                                              tokenize=False, add_generation_prompt=True)
    inputs = proc(images=Image.new("RGB", (80, 60), (200, 30, 30)), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == lc.IMAGE_TOKEN_INDEX).sum()) == (56 // 14) ** 2
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    eight = lc.llava_config("8b")
    assert eight["vision_config"]["image_size"] == 336 and eight["text_config"]["hidden_size"] == 4096
    # lmdeploy's PyTorch engine picks the language model's class from text_config.architectures
    assert eight["text_config"]["architectures"] == ["LlamaForCausalLM"]
    names = dict(lc.tensor_shapes("8b"))
    assert names["multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert names["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)


def test_local_main_reports_a_small_gpu_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m llama3_ops.stages.llava --local`` (the device run): model and env pass, the GPU check
    fails with one message, exit 1, and the JSON says why."""
    _, home, bin_dir = _host(tmp_path, "LlavaForConditionalGeneration", gpus=[dict(RTX3060)])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bin_dir}:{base_path()}")
    out = tmp_path / "llava.json"
    rc = llava.main(["--local", "--image", str(_png(tmp_path / "a.png")), "--backend", "pytorch",
                     "--env", str(bin_dir), "--json", str(out)])
    assert rc == 1
    assert "stage llava needs ~18 GiB of GPU memory" in json.loads(out.read_text())["error"]
    assert "error: stage llava needs ~18 GiB" in " ".join(capsys.readouterr().err.split())


PREPROCESS_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("llava_describe", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
patched = mod.pin_pil_image_processor()
from PIL import Image
from lmdeploy.vl.model.llava_hf import LlavaHfVisionModel
m = LlavaHfVisionModel(sys.argv[2])
m.build_preprocessor()
image = Image.new("RGB", (640, 480), (1, 2, 3))
out = m.preprocess([{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                                  {"type": "image", "data": image}]}])
p = out[-1]["content"][0]
print(json.dumps({"patched": patched, "processor": type(m.processor).__name__,
                  "shape": list(p["pixel_values"].shape), "image_tokens": p["image_tokens"]}))
"""


@pytest.mark.slow
def test_real_lmdeploy_018_preprocesses_an_image_for_a_transformers_format_llava(tmp_path: Path) -> None:
    """lmdeploy 0.18's own LLaVA preprocessing, with our host script's transformers-5 fix applied, on the
    tiny random-weight LLaVA: the PIL image processor is used and the image becomes 16 image tokens.
    (On the H200, the torchvision processor that transformers 5 picks failed this step:
    results/h200/2026-12-01/llava/before-fix-diag.log.)"""
    from llama3_ops.lab import llava_checkpoint as lc

    py = lmdeploy_python("0.18.0")
    model = lc.make_llava_checkpoint(tmp_path / "llava", "tiny")
    res = subprocess.run([py, "-c", PREPROCESS_SCRIPT, str(SCRIPT), str(model)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"patched": True, "processor": "CLIPImageProcessorPil", "shape": [1, 3, 56, 56],
                    "image_tokens": 16}


EMPTY_ANSWER_SCRIPT = """
import importlib.util, sys, types
spec = importlib.util.spec_from_file_location("llava_describe", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
import lmdeploy
class FakePipe:
    def __call__(self, prompt, gen_config=None):
        return types.SimpleNamespace(text="", generate_token_len=0, input_token_len=0, finish_reason="error")
lmdeploy.pipeline = lambda *a, **k: FakePipe()
sys.exit(mod.main(["/m", sys.argv[2], "--backend", "pytorch", "--json", sys.argv[3]]))
"""


@pytest.mark.slow
def test_an_empty_answer_is_a_failure_not_an_empty_success(tmp_path: Path) -> None:
    """What the H200 run returned before the fix (no tokens, finish_reason "error", exit 0) now exits 3
    with one message, and the JSON still records what lmdeploy said."""
    py = lmdeploy_python("0.18.0")
    out = tmp_path / "d.json"
    res = subprocess.run([py, "-c", EMPTY_ANSWER_SCRIPT, str(SCRIPT), str(_png(tmp_path / "a.png")), str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "lmdeploy returned no answer (finish_reason 'error', 0 tokens generated" in res.stderr
    assert json.loads(out.read_text())["finish_reason"] == "error"
