"""The host-side model verifier (roles/llama3_model/files/llama3_model_tool.py) on a real tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "roles" / "llama3_model" / "files" / "llama3_model_tool.py"
SHARD = "model-00001-of-00003.safetensors"


def run(*args: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, check=False)
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "m"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_complete_model_passes_and_stamps(model: Path, tmp_path: Path) -> None:
    stamp = tmp_path / "stamp.json"
    rc, out = run("verify", "--dir", str(model), "--manifest", json.dumps({SHARD: sha(model / SHARD)}),
                  "--stamp", str(stamp), "--fingerprint", "fp1")
    assert rc == 0 and out["ok"] is True and out["shards"] == 3
    assert json.loads(stamp.read_text())["fingerprint"] == "fp1"


def test_truncated_shard_is_a_size_mismatch_and_no_stamp(model: Path, tmp_path: Path) -> None:
    with (model / SHARD).open("r+b") as fh:
        fh.truncate(1000)
    stamp = tmp_path / "stamp.json"
    rc, out = run("verify", "--dir", str(model), "--stamp", str(stamp))
    assert rc == 1
    assert out["problems"]["size_mismatch"][0].startswith(f"{SHARD}: 1000 bytes")  # type: ignore[index]
    assert not stamp.exists()


def test_sha_mismatch_removes_only_with_remove_bad(model: Path) -> None:
    manifest = json.dumps({SHARD: "0" * 64})
    rc, out = run("verify", "--dir", str(model), "--manifest", manifest)
    assert rc == 1 and out["problems"]["sha_mismatch"] and (model / SHARD).exists()  # type: ignore[index]
    rc, out = run("verify", "--dir", str(model), "--manifest", manifest, "--remove-bad")
    assert rc == 1 and out["removed"] == [SHARD] and not (model / SHARD).exists()


def test_missing_tokenizer_and_shard(model: Path) -> None:
    (model / "tokenizer.json").unlink()
    (model / "model-00003-of-00003.safetensors").unlink()
    rc, out = run("verify", "--dir", str(model))
    assert rc == 1
    assert set(out["problems"]["missing"]) == {"tokenizer.json or tokenizer.model",  # type: ignore[index]
                                               "model-00003-of-00003.safetensors"}


def test_lfs_pointer_is_not_downloaded(model: Path) -> None:
    (model / SHARD).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    rc, out = run("verify", "--dir", str(model))
    assert rc == 1 and out["problems"]["not_downloaded"] == [SHARD]  # type: ignore[index]


def test_copy_resumes_and_keeps_complete_files(tiny_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    rc, out = run("copy", "--src", str(tiny_model), "--dir", str(dst))
    assert rc == 0 and len(out["copied"]) == len(list(tiny_model.iterdir()))  # type: ignore[arg-type]
    (dst / SHARD).unlink()
    rc, out = run("copy", "--src", str(tiny_model), "--dir", str(dst))
    assert out["copied"] == [SHARD]
    rc, out = run("copy", "--src", str(tiny_model), "--dir", str(dst))
    assert out["copied"] == [] and out["changed"] is False
    assert not list(dst.glob("*.partial"))
