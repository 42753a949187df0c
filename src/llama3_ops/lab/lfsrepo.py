"""Publish a model directory as a real git-lfs repository with a ``file://`` remote.

Tests and the demo point ``llama3_model_git_url`` at such a repository: the clone, the LFS
download (git-lfs's standalone file transfer) and the OID checks are then the real ones, with
no network. Usage: ``python -m llama3_ops.lab.lfsrepo MODEL_DIR BARE_REPO.git``
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "tokenizer.json", "tokenizer.model")


def _git(*args: str, cwd: Path) -> str:
    env_args = ["-c", "user.name=llama3-ops", "-c", "user.email=llama3-ops@localhost",
                "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *env_args, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def publish(model_dir: Path, bare: Path) -> str:
    """Create ``bare`` holding ``model_dir`` with weights in LFS; return its ``file://`` URL."""
    if shutil.which("git-lfs") is None:
        raise SystemExit("git-lfs is not installed: apt-get install git-lfs")
    bare = bare.resolve()
    if bare.exists():
        shutil.rmtree(bare)
    bare.mkdir(parents=True)
    _git("init", "--bare", "--quiet", cwd=bare)
    with tempfile.TemporaryDirectory(prefix="lfsrepo-") as tmp:
        work = Path(tmp)
        _git("init", "--quiet", cwd=work)
        _git("lfs", "install", "--local", cwd=work)
        _git("lfs", "track", *LFS_PATTERNS, cwd=work)
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, work / f.name)
        _git("add", "-A", cwd=work)
        _git("commit", "--quiet", "-m", "Add model", cwd=work)
        url = f"file://{bare}"
        _git("remote", "add", "origin", url, cwd=work)
        _git("push", "--quiet", "origin", "main", cwd=work)
    return url


def lfs_oids(repo_url: str) -> dict[str, str]:
    """The LFS OIDs (sha256) per path at the tip of ``repo_url``'s main branch."""
    with tempfile.TemporaryDirectory(prefix="lfsls-") as tmp:
        subprocess.run(["git", "clone", "--quiet", repo_url, tmp], check=True, capture_output=True,
                       env={"GIT_LFS_SKIP_SMUDGE": "1", "PATH": "/usr/bin:/bin"})
        out = _git("lfs", "ls-files", "-l", cwd=Path(tmp))
    return {line.split(" ", 2)[2]: line.split(" ", 2)[0] for line in out.splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("bare", type=Path)
    args = ap.parse_args(argv)
    print(publish(args.model_dir, args.bare))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
