"""Build a wheelhouse for a profile on a connected machine, for provisioning with ``llama3_offline``.

A wheelhouse is one directory of distribution files that installs every environment of a profile
with ``pip install --no-index --find-links DIR``, for the target host's Python and platform (not
this machine's):

- an env with a hash lock (``locks/<profile>/<env>.txt``) gets exactly the locked files
  (``pip download --require-hashes --no-deps -r LOCK``), so the offline install checks the same
  hashes; sdists in a lock bring the build backends (setuptools, wheel) along;
- an env without one (the ``cpu`` profile) gets its ``packages`` and their dependencies, and its
  ``no_deps_packages`` alone, as wheels for the target (``pip download --only-binary``, resolved for
  Python X.Y.0, so every X.Y interpreter accepts them); a package with no wheel there (an sdist) is
  built into one here; the CPU torch wheel comes from ``PIP_FIND_LINKS`` (pip reads it) or
  ``--find-links``;
- the env's ``git_packages`` (XTuner from its tag) are built into wheels with ``pip wheel`` from
  ``<git base>/<url_path>@<commit>``.

Then every env is resolved against the directory alone (``pip install --dry-run --no-index``), so
a missing file fails here, not on the offline host. ``llama3-ops-wheelhouse.json`` in the directory
records what it holds.

    python -m llama3_ops.provision.wheelhouse cpu --out build/wheelhouse-cpu
    ansible-playbook site.yml -e llama3_offline=true -e llama3_python_env_wheelhouse=$PWD/build/wheelhouse-cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from llama3_ops.errors import Llama3OpsError
from llama3_ops.provision.locks import GitPackage, LockError, parse_git_package, parse_header

ROOT = Path(__file__).resolve().parents[3]
PROFILES_DIR = ROOT / "profiles"
LOCKS_DIR = ROOT / "locks"
MANIFEST = "llama3-ops-wheelhouse.json"
DEFAULT_GIT_BASE = "https://github.com"
# The oldest glibc among the supported hosts (Ubuntu 22.04: 2.35; Debian 12: 2.36; Ubuntu 24.04: 2.39).
DEFAULT_GLIBC = "2.35"
_GIT_BASE_RE = re.compile(r"\{\{\s*llama3_git_base_url\b[^}]*\}\}")
_SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tgz")


class WheelhouseError(Llama3OpsError):
    """The profile cannot be turned into a wheelhouse, or pip failed."""


@dataclass
class EnvPlan:
    """What one environment needs in the wheelhouse."""

    name: str
    python: str
    packages: list[str]
    lock: Path | None = None
    no_deps: list[str] = field(default_factory=list)
    git_packages: list[GitPackage] = field(default_factory=list)


def platform_tags(arch: str = "x86_64", glibc: str = DEFAULT_GLIBC) -> list[str]:
    """Every manylinux tag a host with this glibc accepts, newest first (pip does not expand them)."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2:
        raise WheelhouseError(f"glibc {glibc}: only 2.x is known")
    oldest = 5 if arch == "x86_64" else 17  # aarch64 wheels start at manylinux2014 (glibc 2.17)
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, oldest - 1, -1)]
    legacy = [(17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1")]
    tags += [f"{name}_{arch}" for m, name in legacy if oldest <= m <= minor]
    return tags


def load_profile(profile: str, profiles_dir: Path = PROFILES_DIR) -> dict[str, Any]:
    path = profiles_dir / f"{profile}.yml"
    if not path.is_file():
        known = sorted(p.stem for p in profiles_dir.glob("*.yml"))
        raise WheelhouseError(f"unknown profile {profile!r}: one of {', '.join(known)}")
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _render(spec: str, git_base: str, where: str) -> str:
    out = _GIT_BASE_RE.sub(git_base.rstrip("/"), spec)
    if "{{" in out or "{%" in out:
        raise WheelhouseError(f"{where}: cannot render the template in {spec!r} outside Ansible")
    return out


def _git_packages(items: Sequence[Any], where: str) -> list[GitPackage]:
    """The env's git packages, as the locks read them (a tag is optional here: it only pins the version)."""
    try:
        return [parse_git_package(item, where, require_tag=False) for item in items]
    except LockError as exc:
        raise WheelhouseError(str(exc)) from exc


def _lock_python(lock: Path) -> str | None:
    """The Python version the lock's header names."""
    header = parse_header(lock.read_text())
    return header.fields.get("python") if header else None


def plan(profile: str, envs: dict[str, Any] | None = None, only: Sequence[str] = (),
         git_base: str = DEFAULT_GIT_BASE, locks_dir: Path = LOCKS_DIR,
         profiles_dir: Path = PROFILES_DIR) -> list[EnvPlan]:
    """The envs of ``profile`` (or ``envs``, the same shape as the profile's python_env.envs)."""
    if envs is None:
        envs = load_profile(profile, profiles_dir)["python_env"]["envs"]
    unknown = set(only) - set(envs)
    if unknown:
        raise WheelhouseError(f"profile {profile} has no env {', '.join(sorted(unknown))} (it has {', '.join(envs)})")
    plans = []
    for name, env in envs.items():
        if only and name not in only:
            continue
        where = f"{profile}/{name}"
        lock = locks_dir / profile / f"{name}.txt"
        python = str(env.get("python", ""))
        if lock.is_file():
            locked = _lock_python(lock)
            if locked and python and locked != python:
                raise WheelhouseError(f"{lock} is for Python {locked} but env {where} uses {python}")
            python = python or locked or ""
        if not re.fullmatch(r"3\.\d+", python):
            raise WheelhouseError(f"env {where} has no target Python (python: \"3.10\") and no lock header naming one")
        plans.append(EnvPlan(
            name=name, python=python,
            packages=[_render(str(p), git_base, where) for p in env.get("packages") or []],
            lock=lock if lock.is_file() else None,
            no_deps=[_render(str(p), git_base, where) for p in env.get("no_deps_packages") or []],
            git_packages=_git_packages(env.get("git_packages") or [], where)))
    return plans


class _Pip:
    """Runs pip with this interpreter, logging everything to one file; raises with the tail on failure."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def __call__(self, *args: str, check: bool = True) -> tuple[int, str]:
        argv = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--progress-bar", "off"]
        start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("a") as fh:
            fh.write(f"\n$ {' '.join(argv)}\n")
            fh.flush()
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False,
                                  env={**os.environ, "PIP_NO_INPUT": "1", "GIT_TERMINAL_PROMPT": "0"})
        with self.log.open("rb") as fh:
            fh.seek(start)
            output = fh.read().decode(errors="replace")
        if check and proc.returncode != 0:
            tail = "\n".join(output.splitlines()[-25:])
            raise WheelhouseError(f"pip {args[0]} failed ({proc.returncode}); log {self.log}:\n{tail}")
        return proc.returncode, output


_NO_MATCH_RE = re.compile(r"No matching distribution found for (?P<spec>[A-Za-z0-9][A-Za-z0-9._\-\[\],]*"
                          r"(?:[=<>!~]=?[^\s;]+)?)")


def _download(pip: _Pip, out: Path, python: str, platforms: Sequence[str], links: Sequence[str],
              reqs: Sequence[str], no_deps: bool = False) -> None:
    """Binary-only download for the target; a requirement with no wheel there (an sdist-only package
    such as transformers-stream-generator) is built into a wheel here, then the download is retried."""
    built: set[str] = set()
    while True:
        rc, output = pip("download", *(["--no-deps"] if no_deps else []), "--only-binary", ":all:", "--dest",
                         str(out), *_target(python, platforms), "--find-links", str(out), *links, *reqs, check=False)
        if rc == 0:
            return
        m = _NO_MATCH_RE.search(output)
        if not m or m.group("spec") in built or len(built) >= 20:
            tail = "\n".join(output.splitlines()[-25:])
            raise WheelhouseError(f"pip download failed ({rc}); log {pip.log}:\n{tail}")
        built.add(m.group("spec"))
        pip("wheel", "--no-deps", "--wheel-dir", str(out), *links, m.group("spec"))


def _target(python: str, platforms: Sequence[str]) -> list[str]:
    args = ["--python-version", python, "--implementation", "cp"]
    for p in platforms:
        args += ["--platform", p]
    return args


def _sdists(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.endswith(_SDIST_SUFFIXES))


def build(profile: str, out: Path, envs: dict[str, Any] | None = None, only: Sequence[str] = (),
          git_base: str = DEFAULT_GIT_BASE, platforms: Sequence[str] | None = None,
          find_links: Sequence[str] = (), locks_dir: Path = LOCKS_DIR, profiles_dir: Path = PROFILES_DIR,
          console: Console | None = None) -> dict[str, Any]:
    """Fill ``out`` with what every env of ``profile`` needs offline; return the manifest written there."""
    console = console or Console(stderr=True)
    plans = plan(profile, envs, only, git_base, locks_dir, profiles_dir)
    platforms = list(platforms or platform_tags())
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pip = _Pip(out.parent / f"{out.name}.log")
    pip.log.write_text(f"wheelhouse for profile {profile} -> {out}\n")
    links: list[str] = []
    for f in find_links:
        links += ["--find-links", f]
    t0 = time.monotonic()
    steps: list[tuple[str, EnvPlan, str]] = []
    for p in plans:
        if p.git_packages:
            steps.append((f"{p.name}: build {len(p.git_packages)} git package(s)", p, "git"))
        steps.append((f"{p.name}: download {'the lock' if p.lock else str(len(p.packages)) + ' package(s) + deps'}"
                      f" for Python {p.python}", p, "download"))
        steps.append((f"{p.name}: check it installs from the wheelhouse alone", p, "check"))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=False) as progress:
        overall = progress.add_task(f"wheelhouse {profile}", total=len(steps))
        for label, p, kind in steps:
            task = progress.add_task(label, total=None)
            if kind == "git":
                for g in p.git_packages:
                    pip("wheel", "--no-deps", "--wheel-dir", str(out), f"{g.name} @ {g.url(git_base)}")
            elif kind == "download" and p.lock:
                pip("download", "--no-deps", "--require-hashes", "-r", str(p.lock), "--dest", str(out),
                    *_target(p.python, platforms), *links)
                if _sdists(out):  # building them offline needs the build backends
                    pip("download", "--only-binary", ":all:", "--dest", str(out), "setuptools", "wheel",
                        *_target(p.python, platforms), *links)
            elif kind == "download":
                reqs = p.packages + [f"{g.name}=={g.version}" for g in p.git_packages if g.tag]
                _download(pip, out, p.python, platforms, links, reqs)
                if p.no_deps:
                    _download(pip, out, p.python, platforms, links, p.no_deps, no_deps=True)
            else:
                _check(pip, p, out, platforms)
            progress.update(task, total=1, completed=1)
            progress.advance(overall)
    files = sorted(f for f in out.iterdir() if f.is_file() and f.name != MANIFEST)
    manifest = {
        "profile": profile,
        "platforms": platforms,
        "git_base_url": git_base,
        "envs": {p.name: {"python": p.python, "lock": _show(p.lock), "packages": p.packages,
                          "no_deps_packages": p.no_deps, "git_packages": [g.name for g in p.git_packages]}
                 for p in plans},
        "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
        "seconds": round(time.monotonic() - t0, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(f.stat().st_size for f in files)
    console.print(Text.assemble(("wheelhouse", "green"), f" {out}: {len(files)} files, {size / 2**20:.0f} MiB, "
                                f"{manifest['seconds']} s (log {pip.log})"))
    return manifest


def _show(path: Path | None) -> str | None:
    if path is None:
        return None
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _check(pip: _Pip, p: EnvPlan, out: Path, platforms: Sequence[str]) -> None:
    """Resolve the env against the wheelhouse alone, for the target Python and platform."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse-check-") as tmp:
        common = ["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(out),
                  "--target", tmp, *_target(p.python, platforms)]
        if p.lock:
            pip(*common, "--no-deps", "--require-hashes", "-r", str(p.lock))
            if p.git_packages:
                pip(*common, "--no-deps", *[f"{g.name}=={g.version}" if g.tag else g.name
                                            for g in p.git_packages])
        else:
            reqs = p.packages + [f"{g.name}=={g.version}" if g.tag else g.name for g in p.git_packages]
            pip(*common, "--only-binary", ":all:", *reqs)
        if p.no_deps:
            pip(*common, "--no-deps", "--only-binary", ":all:", *p.no_deps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama3_ops.provision.wheelhouse", description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="a profile name (profiles/NAME.yml)")
    ap.add_argument("--out", type=Path, required=True, help="the wheelhouse directory (created; re-runs reuse it)")
    ap.add_argument("--env", action="append", default=[], help="only this env (repeatable; default all)")
    ap.add_argument("--git-base-url", default=os.environ.get("LLAMA3_GIT_BASE_URL", DEFAULT_GIT_BASE),
                    help="base URL of git-hosted packages, as llama3_git_base_url (default %(default)s)")
    ap.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"], help="the host's architecture")
    ap.add_argument("--glibc", default=DEFAULT_GLIBC, help="the host's glibc (default %(default)s)")
    ap.add_argument("--platform", action="append", default=[], help="exact pip platform tags (overrides arch/glibc)")
    ap.add_argument("--find-links", action="append", default=[],
                    help="extra wheel directories (PIP_FIND_LINKS is read by pip as well)")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    try:
        build(args.profile, args.out, only=args.env, git_base=args.git_base_url,
              platforms=args.platform or platform_tags(args.arch, args.glibc), find_links=args.find_links,
              console=console)
    except WheelhouseError as exc:
        console.print(Text.assemble(("wheelhouse failed:", "red"), " ", str(exc)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
