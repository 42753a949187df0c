"""The host-side model verifier (roles/llama3_model/files/llama3_model_tool.py) on a real tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
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


# --- git_lfs sources: the expectation is what the repository committed -------------------------

def git(repo: Path, *args: str, **env: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **env}).stdout


def lfs_object(repo: Path, oid: str) -> Path:
    """A cached object in a clone, or (for a bare repository) the origin's object."""
    base = repo if repo.suffix == ".git" else repo / ".git"
    return base / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


@pytest.fixture
def clone(lfs_repo: Path, tmp_path: Path) -> Path:
    """What the role's git_lfs source makes: a pointer-only clone of the file:// origin, then git lfs pull."""
    d = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", f"file://{lfs_repo}", str(d)], check=True, capture_output=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    git(d, "lfs", "install", "--local")
    git(d, "lfs", "pull")
    return d


def committed_oids(repo: Path) -> dict[str, str]:
    out = git(repo, "lfs", "ls-files", "-l", "HEAD")
    return {line.split(" ", 2)[2]: line.split(" ", 2)[0] for line in out.splitlines()}


def refetch(repo: Path) -> None:
    """The role's fetch steps: restore the checkout (pointers only), then git lfs pull."""
    git(repo, "checkout", "--quiet", "--force", "HEAD", "--", ".", GIT_LFS_SKIP_SMUDGE="1")
    git(repo, "lfs", "pull")


def flip(path: Path, at: int = 5000) -> None:
    with path.open("r+b") as fh:
        fh.seek(at)
        fh.write(b"XXXX")


def test_damaged_shard_and_cached_object_fail_against_the_committed_pointer(clone: Path, lfs_repo: Path,
                                                                          tmp_path: Path) -> None:
    """The issue: the same bytes flipped in the shard and its cached object. git-lfs checks the
    object out again and re-adds the damaged file to the index, so `git lfs ls-files` (the old
    expectation) agrees with the damage; the pointer committed at HEAD does not."""
    oid = committed_oids(clone)[SHARD]
    cached = lfs_object(clone, oid)
    cached.unlink()  # a private copy, so the flip stays out of the origin (git-lfs hard-linked it)
    shutil.copyfile(lfs_object(lfs_repo, oid), cached)
    flip(cached)
    flip(clone / SHARD)
    refetch(clone)
    bad = sha(clone / SHARD)
    assert bad != oid and f"{bad} * {SHARD}" in git(clone, "lfs", "ls-files", "-l")  # the index was rewritten
    stamp = tmp_path / "stamp.json"
    stamp.write_text("{}")  # e.g. a re-verification of a stamped model
    rc, out = run("verify", "--dir", str(clone), "--lfs", "--remove-bad", "--stamp", str(stamp))
    assert rc == 1
    problems = out["problems"]
    assert problems["sha_mismatch"] == [f"{SHARD}: sha256 {bad}, expected {oid}"]  # type: ignore[index]
    assert problems["lfs_object_mismatch"] == [  # type: ignore[index]
        f"{SHARD}: cached LFS object .git/lfs/objects/{oid[:2]}/{oid[2:4]}/{oid} has sha256 {bad}, not its OID"]
    assert not stamp.exists()
    assert not (clone / SHARD).exists() and not cached.exists()
    assert not lfs_object(clone, bad).exists(), "the clean filter's copy of the damaged shard is garbage"
    refetch(clone)
    rc, out = run("verify", "--dir", str(clone), "--lfs", "--stamp", str(stamp), "--fingerprint", "fp")
    assert rc == 0, out
    assert json.loads(stamp.read_text())["revision"] == git(clone, "rev-parse", "HEAD").strip()


def test_hard_linked_cached_objects_are_unshared_before_anything_else(clone: Path, lfs_repo: Path) -> None:
    oids = committed_oids(clone)
    origin = {f: lfs_object(lfs_repo, oid).stat() for f, oid in oids.items()}
    cached = {f: lfs_object(clone, oid) for f, oid in oids.items()}
    assert all(cached[f].stat().st_ino == origin[f].st_ino for f in oids), "git-lfs no longer hard-links file://"
    rc, _ = run("verify", "--dir", str(clone), "--lfs", "--no-sha")
    assert rc == 0
    for f, oid in oids.items():
        assert cached[f].stat().st_nlink == 1 and cached[f].stat().st_ino != origin[f].st_ino
        assert lfs_object(lfs_repo, oid).stat().st_ino == origin[f].st_ino
        flip(cached[f])  # now a damaged clone cannot reach the origin
        assert sha(lfs_object(lfs_repo, oid)) == oid


def test_cached_object_with_a_zero_tail_is_found_and_removed(clone: Path) -> None:
    """An interrupted download: the object has its full size but was never completely written."""
    oid = committed_oids(clone)[SHARD]
    cached = lfs_object(clone, oid)
    size = cached.stat().st_size
    cached.unlink()
    with cached.open("wb") as fh:
        fh.write((clone / SHARD).read_bytes()[:1000])
        fh.truncate(size)
    rc, out = run("verify", "--dir", str(clone), "--lfs", "--remove-bad")
    assert rc == 1 and out["problems"]["sha_mismatch"] == []  # type: ignore[index]
    assert out["problems"]["lfs_object_mismatch"][0].startswith(f"{SHARD}: cached LFS object")  # type: ignore[index]
    assert out["removed"] == [f".git/lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}"]
    assert (clone / SHARD).exists() and not cached.exists()


def test_lfs_file_sizes_are_checked_against_the_pointer_even_without_sha(clone: Path) -> None:
    size = (clone / "tokenizer.json").stat().st_size
    with (clone / "tokenizer.json").open("r+b") as fh:
        fh.truncate(1000)
    rc, out = run("verify", "--dir", str(clone), "--lfs", "--no-sha", "--remove-bad")
    assert rc == 1
    assert out["problems"]["size_mismatch"] == [  # type: ignore[index]
        f"tokenizer.json: 1000 bytes, committed pointer says {size}"]
    assert out["removed"] == ["tokenizer.json"]


def test_committed_non_lfs_file_that_changed_is_a_mismatch(clone: Path) -> None:
    config = json.loads((clone / "config.json").read_text())
    (clone / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 99}))
    rc, out = run("verify", "--dir", str(clone), "--lfs")
    head = git(clone, "rev-parse", "HEAD").strip()
    assert rc == 1
    assert out["problems"]["sha_mismatch"] == [  # type: ignore[index]
        f"config.json: differs from the file committed at {head[:12]}"]


def test_unknown_revision_is_one_problem(clone: Path) -> None:
    rc, out = run("verify", "--dir", str(clone), "--lfs", "--rev", "no-such-branch")
    assert rc == 1
    (line,) = out["problems"]["bad_repo"]  # type: ignore[index]
    assert line.startswith(f"{clone}: cannot read the committed files of no-such-branch: ")
