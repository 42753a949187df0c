"""A tiny Python package in a tagged git repository, cloned bare (served over file:// or dumb HTTP):
the stand-in for a package that only comes from a git tag, as XTuner 0.1.18 does."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path


def tagged_package_repo(src: Path, bare: Path, dist: str, module: str, version: str,
                        init: str = "") -> tuple[Path, str]:
    """Make package ``dist`` (import name ``module``) at ``src``, commit and tag it ``v<version>``,
    clone it bare to ``bare``; returns the bare repository and the tag's commit."""
    (src / module).mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "{version}"
        """))
    (src / module / "__init__.py").write_text(init)
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(src)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", f"v{version}"], check=True)
    subprocess.run([*git, "tag", f"v{version}"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)  # served over dumb HTTP
    return bare, commit
