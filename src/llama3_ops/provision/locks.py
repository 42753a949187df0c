"""Hash locks for the profiles' Python environments: `locks/<profile>/<env>.txt`.

A profile (profiles/<name>.yml) that has a ``python_env.lock`` section gets one lock per environment,
compiled with ``uv pip compile --generate-hashes`` for the env's Python and the target platform,
without installing anything. Resolution is pinned to a date (``exclude_newer``): nothing uploaded to
the index after it is considered, so compiling again gives the same lock.

Each lock starts with a line that records what it was compiled from::

    # llama3-ops-spec: sha256=<hex> python=3.10 platform=x86_64-manylinux_2_28 exclude-newer=<date> uv=<ver>

The digest covers the normalised requirement list, the git packages, the Python version, the
platform, the resolution date and the index, so ``check`` needs no network to tell whether each
lock still matches its profile (CI runs it through tests/unit/test_locks.py).

The roles install a lock with ``pip install --require-hashes --no-deps -r <lock>``, then each of the
env's ``git_packages`` with ``--no-deps`` from ``{llama3_git_base_url}/<url_path>@<commit>``; the
dependencies of a git package are listed in the env's ``packages`` so that the lock holds them.

    python -m llama3_ops.provision.locks compile [PROFILE ...]   # all locked profiles when none is named
    python -m llama3_ops.provision.locks check                   # exit 1 and say what is stale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from llama3_ops.errors import Llama3OpsError

# The index the locks are resolved against. A faithful mirror (TUNA) serves the same files with the
# same hashes, so a lock compiled here installs from a mirror unchanged.
PYPI_INDEX = "https://pypi.org/simple"
DEFAULT_PLATFORM = "x86_64-manylinux_2_28"
# The uv that compiled the committed locks (pyproject's dev extra pins the same).
UV_VERSION = "0.13.9"
HEADER_KEY = "llama3-ops-spec:"

ROOT = Path(__file__).resolve().parents[3]
PROFILES_DIR = ROOT / "profiles"
LOCKS_DIR = ROOT / "locks"

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_PYTHON_RE = re.compile(r"^3\.\d+$")
_PLATFORM_RE = re.compile(r"^[a-z0-9_]+-[a-z0-9_.]+$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}Z)?$")
_URL_PATH_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(\.git)?$")
_ENTRY_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)")
_FORBIDDEN_LINE_RE = re.compile(r"^\s*(-e\b|--editable\b|-i\b|--index-url\b|--extra-index-url\b|-f\b|--find-links\b)")


class LockError(Llama3OpsError):
    """A profile's lock spec is invalid, or compiling a lock failed."""


@dataclass(frozen=True)
class GitPackage:
    """A package only a git host has (a profile env's ``git_packages`` entry): installed after the
    lock with --no-deps, built into a wheel for a wheelhouse."""

    name: str
    url_path: str
    tag: str
    commit: str
    extras: tuple[str, ...] = ()

    def url(self, base_url: str) -> str:
        """``git+BASE/URL_PATH@COMMIT``."""
        return f"git+{base_url.rstrip('/')}/{self.url_path}@{self.commit}"

    def pip_spec(self, base_url: str) -> str:
        """The pip requirement that installs this package from ``base_url`` (llama3_git_base_url)."""
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{extras} @ {self.url(base_url)}"

    @property
    def version(self) -> str:
        """The version its tag names (``v0.1.18`` -> ``0.1.18``); empty without a tag."""
        return self.tag[1:] if self.tag.startswith("v") else self.tag

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url_path": self.url_path,
            "tag": self.tag,
            "commit": self.commit,
            "extras": list(self.extras),
        }


@dataclass(frozen=True)
class EnvSpec:
    """What one environment's lock is compiled from."""

    profile: str
    env: str
    python: str
    platform: str
    exclude_newer: str
    packages: tuple[str, ...]
    git_packages: tuple[GitPackage, ...] = ()
    index: str = PYPI_INDEX

    @property
    def label(self) -> str:
        return f"{self.profile}/{self.env}"

    def normalised_requirements(self) -> list[str]:
        return sorted(normalise_requirement(p, where=self.label) for p in self.packages)

    def digest(self) -> str:
        payload = {
            "requirements": self.normalised_requirements(),
            "git_packages": sorted((g.as_dict() for g in self.git_packages), key=lambda g: str(g["name"])),
            "python": self.python,
            "platform": self.platform,
            "exclude_newer": self.exclude_newer,
            "index": self.index,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def header_line(self, uv_version: str) -> str:
        return (
            f"# {HEADER_KEY} sha256={self.digest()} python={self.python} platform={self.platform}"
            f" exclude-newer={self.exclude_newer} uv={uv_version}"
        )


@dataclass(frozen=True)
class LockHeader:
    digest: str
    fields: dict[str, str]


def normalise_requirement(text: str, *, where: str = "") -> str:
    """One canonical spelling of a requirement: name case and separators, extras and specifier order."""
    prefix = f"{where}: " if where else ""
    if not isinstance(text, str) or not text.strip():
        raise LockError(f"{prefix}empty or non-string package entry {text!r}")
    if "{{" in text or "{%" in text:
        raise LockError(
            f"{prefix}package {text!r} contains a template; lock specs must be plain requirements "
            "(put git sources in git_packages)"
        )
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise LockError(f"{prefix}invalid requirement {text!r}: {exc}") from exc
    if req.url:
        raise LockError(
            f"{prefix}{text!r} is a URL requirement; locks hold index packages only. "
            "List git sources under git_packages (name, url_path, tag, commit, extras)."
        )
    out: str = canonicalize_name(req.name)
    if req.extras:
        out += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    spec = ",".join(sorted(str(s) for s in req.specifier))
    out += spec
    if req.marker is not None:
        out += f"; {req.marker}"
    return out


def parse_git_package(raw: Any, where: str, *, require_tag: bool = True) -> GitPackage:
    """One ``git_packages`` entry of a profile env (name, url_path, tag, 40-hex commit, extras)."""
    if not isinstance(raw, dict):
        raise LockError(f"{where}: each git_packages entry must be a mapping, got {raw!r}")
    required = ("name", "url_path", "tag", "commit") if require_tag else ("name", "url_path", "commit")
    missing = [k for k in required if not raw.get(k)]
    if missing:
        raise LockError(f"{where}: git package {raw!r} lacks {', '.join(missing)}")
    name, url_path, commit = (str(raw[k]) for k in ("name", "url_path", "commit"))
    tag = str(raw.get("tag") or "")
    if not _COMMIT_RE.match(commit):
        raise LockError(
            f"{where}: git package {name} needs a 40-hex commit, got {commit!r} "
            f"(tags move; pin the commit {f'that tag {tag} points at' if tag else 'to build'})"
        )
    if not _URL_PATH_RE.match(url_path):
        raise LockError(f"{where}: git package {name}: url_path {url_path!r} is not OWNER/REPO[.git]")
    extras_raw = raw.get("extras", [])
    if not isinstance(extras_raw, list) or not all(isinstance(e, str) for e in extras_raw):
        raise LockError(f"{where}: git package {name}: extras must be a list of strings")
    return GitPackage(name=name, url_path=url_path, tag=tag, commit=commit, extras=tuple(extras_raw))


def _exclude_newer(raw: Any, what: str) -> str:
    value = "" if raw is None else str(raw)
    if not _DATE_RE.match(value):
        raise LockError(
            f"{what} must be a date like 2024-05-15T00:00:00Z (got {value!r}); "
            "it is what makes a re-compile give the same versions"
        )
    return value


def load_env_specs(profile_path: Path) -> list[EnvSpec]:
    """The lock specs of one profile file; empty when the profile has no python_env.lock section."""
    profile = profile_path.stem
    try:
        data = yaml.safe_load(profile_path.read_text())
    except FileNotFoundError as exc:
        raise LockError(f"profile {profile!r}: {profile_path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise LockError(f"profile {profile!r}: {profile_path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LockError(f"profile {profile!r}: {profile_path} is not a mapping")
    python_env = data.get("python_env")
    if not isinstance(python_env, dict):
        raise LockError(f"profile {profile!r}: python_env is missing or not a mapping")
    lock = python_env.get("lock")
    if lock is None:
        return []
    if not isinstance(lock, dict):
        raise LockError(f"profile {profile!r}: python_env.lock must be a mapping")
    platform = str(lock.get("platform", DEFAULT_PLATFORM))
    if not _PLATFORM_RE.match(platform):
        raise LockError(f"profile {profile!r}: lock platform {platform!r} is not a uv --python-platform name")
    default_date = _exclude_newer(lock.get("exclude_newer"), f"profile {profile!r}: python_env.lock.exclude_newer")
    envs = python_env.get("envs")
    if not isinstance(envs, dict) or not envs:
        raise LockError(f"profile {profile!r}: python_env.envs is missing or empty")
    return [_env_spec(profile, str(env), body, platform, default_date) for env, body in envs.items()]


def _env_spec(profile: str, env: str, body: Any, platform: str, default_date: str) -> EnvSpec:
    """One env of a profile's python_env.envs, checked (:class:`LockError` names the env and the fix)."""
    where = f"{profile}/{env}"
    if not isinstance(body, dict):
        raise LockError(f"{where}: env must be a mapping with python and packages")
    exclude_newer = (
        _exclude_newer(body["exclude_newer"], f"{where}: exclude_newer") if "exclude_newer" in body else default_date
    )
    raw_python = body.get("python", "")
    python = raw_python if isinstance(raw_python, str) else repr(raw_python)
    if not isinstance(raw_python, str) or not _PYTHON_RE.match(python):
        raise LockError(f'{where}: python must be a version like "3.10" (quoted), got {python!r}')
    packages = body.get("packages")
    if not isinstance(packages, list) or not packages:
        raise LockError(f"{where}: packages must be a non-empty list")
    names = [canonicalize_name(Requirement(normalise_requirement(p, where=where)).name) for p in packages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LockError(f"{where}: packages list {', '.join(dupes)} more than once; merge the specifiers")
    git_raw = body.get("git_packages") or []
    if not isinstance(git_raw, list):
        raise LockError(f"{where}: git_packages must be a list")
    git = tuple(parse_git_package(g, where) for g in git_raw)
    clash = sorted({canonicalize_name(g.name) for g in git} & set(names))
    if clash:
        raise LockError(f"{where}: {', '.join(clash)} is both in packages and git_packages; keep one")
    return EnvSpec(profile=profile, env=env, python=python, platform=platform, exclude_newer=exclude_newer,
                   packages=tuple(str(p) for p in packages), git_packages=git)


def profile_paths(profiles_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """The profile files to work on: the named ones (each must exist), or every profile."""
    if not profiles_dir.is_dir():
        raise LockError(f"no profiles directory at {profiles_dir}")
    known = sorted(profiles_dir.glob("*.yml"))
    if not names:
        return known
    out = []
    for name in names:
        path = profiles_dir / f"{name}.yml"
        if not path.is_file():
            raise LockError(f"unknown profile {name!r}; known: {', '.join(p.stem for p in known)}")
        out.append(path)
    return out


def lock_path(locks_dir: Path, profile: str, env: str) -> Path:
    return locks_dir / profile / f"{env}.txt"


def parse_header(text: str) -> LockHeader | None:
    """The llama3-ops-spec line of a lock (among its leading comment lines), or None when it has none."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith(HEADER_KEY):
            fields = dict(item.split("=", 1) for item in body[len(HEADER_KEY) :].split() if "=" in item)
            if "sha256" in fields:
                return LockHeader(digest=fields["sha256"], fields=fields)
    return None


def lock_entries(text: str) -> dict[str, tuple[str, bool]]:
    """name -> (version, has a sha256 hash) for each requirement of a lock."""
    entries: dict[str, tuple[str, bool]] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if current and "--hash=sha256:" in line:
                entries[current] = (entries[current][0], True)
            continue
        m = _ENTRY_RE.match(line)
        if not m:
            current = None
            continue
        current = canonicalize_name(m.group("name"))
        entries[current] = (m.group("version"), "--hash=sha256:" in line)
    return entries


def check_lock_text(spec: EnvSpec, text: str) -> list[str]:
    """What is wrong with one lock's text against its spec (empty when it matches)."""
    where = spec.label
    fix = f"run `nox -s lock -- {spec.profile}` (python -m llama3_ops.provision.locks compile {spec.profile})"
    header = parse_header(text)
    if header is None:
        return [f"{where}: the lock has no '# {HEADER_KEY}' header line; {fix}"]
    problems: list[str] = []
    if header.digest != spec.digest():
        changed = [
            k
            for k, want in (("python", spec.python), ("platform", spec.platform), ("exclude-newer", spec.exclude_newer))
            if header.fields.get(k) != want
        ]
        what = f" ({', '.join(changed)} changed)" if changed else " (packages or git_packages changed)"
        problems.append(f"{where}: the lock was compiled from another spec than the profile's{what}; {fix}")
    for lineno, line in enumerate(text.splitlines(), 1):
        if _FORBIDDEN_LINE_RE.match(line):
            problems.append(f"{where}: line {lineno} {line.strip()!r} is not allowed with --require-hashes locks")
        elif not line.lstrip().startswith("#") and " @ " in line:
            problems.append(f"{where}: line {lineno} is a URL requirement; locks hold index packages only")
    entries = lock_entries(text)
    if not entries:
        problems.append(f"{where}: the lock pins no packages")
    for name, (version, hashed) in sorted(entries.items()):
        if not hashed:
            problems.append(f"{where}: {name}=={version} has no --hash=sha256: (pip --require-hashes refuses it)")
    for raw in spec.packages:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name not in entries:
            problems.append(f"{where}: {raw!r} is in the profile but {name} is not in the lock")
            continue
        try:
            ok = req.specifier.contains(Version(entries[name][0]), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(f"{where}: the lock pins {name}=={entries[name][0]}, outside the profile's {raw!r}")
    for git in spec.git_packages:
        if canonicalize_name(git.name) in entries:
            problems.append(f"{where}: git package {git.name} is also in the lock; it must come only from its commit")
    return problems


def check_locks(profiles_dir: Path = PROFILES_DIR, locks_dir: Path = LOCKS_DIR) -> list[str]:
    """Every problem with the committed locks: missing, stale, unhashed, or without a profile env."""
    problems: list[str] = []
    expected: set[Path] = set()
    for path in profile_paths(profiles_dir):
        try:
            specs = load_env_specs(path)
        except LockError as exc:
            problems.append(str(exc))
            continue
        for spec in specs:
            lock = lock_path(locks_dir, spec.profile, spec.env)
            expected.add(lock.resolve())
            if not lock.is_file():
                problems.append(f"{spec.label}: no lock at {lock}; run `nox -s lock -- {spec.profile}`")
                continue
            problems.extend(check_lock_text(spec, lock.read_text()))
    if locks_dir.is_dir():
        for lock in sorted(locks_dir.glob("*/*.txt")):
            if lock.resolve() not in expected:
                problems.append(
                    f"{lock.parent.name}/{lock.stem}: {lock} has no locked env in profiles/; delete it "
                    "or add the env (with python_env.lock) to the profile"
                )
    return problems


def find_uv() -> str:
    """The uv binary: the `uv` Python package's, else uv on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found:
        return found
    raise LockError(f"uv is not installed; `pip install uv=={UV_VERSION}` (nox -s lock installs it)")


def uv_version(uv: str) -> str:
    out = subprocess.run([uv, "--version"], capture_output=True, text=True, check=False, timeout=60)
    m = re.search(r"\buv (\d+\.\d+\.\d+\S*)", out.stdout)
    if out.returncode != 0 or not m:
        raise LockError(f"`{uv} --version` failed: {out.stderr.strip() or out.stdout.strip()}")
    return m.group(1)


def uv_command(spec: EnvSpec, uv: str, index: str) -> list[str]:
    return [
        uv,
        "pip",
        "compile",
        "-",
        "--no-config",
        "--no-python-downloads",
        "--python-version",
        spec.python,
        "--python-platform",
        spec.platform,
        "--generate-hashes",
        "--exclude-newer",
        spec.exclude_newer,
        "--default-index",
        index,
        "--custom-compile-command",
        f"python -m llama3_ops.provision.locks compile {spec.profile}",
    ]


def render_lock(spec: EnvSpec, uv_output: str, uv_ver: str) -> str:
    lines = [
        f"# Lock of env {spec.env!r} of profile {spec.profile!r} (profiles/{spec.profile}.yml). Do not edit:",
        f"# regenerate with `nox -s lock -- {spec.profile}`. Install without resolving, every file hash-checked:",
        f"#   pip install --require-hashes --no-deps -r locks/{spec.profile}/{spec.env}.txt",
    ]
    for git in spec.git_packages:
        lines.append(f"# then, with --no-deps: {git.pip_spec('{llama3_git_base_url}')}  (tag {git.tag})")
    lines.append(spec.header_line(uv_ver))
    return "\n".join(lines) + "\n" + uv_output


def compile_spec(
    spec: EnvSpec,
    locks_dir: Path = LOCKS_DIR,
    *,
    uv: str | None = None,
    index: str = PYPI_INDEX,
    timeout: float = 1800,
) -> Path:
    """Run uv for one env and write its lock (atomically, only when the result checks out)."""
    uv_bin = uv or find_uv()
    ver = uv_version(uv_bin)
    requirements = "\n".join(spec.packages) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    try:
        proc = subprocess.run(
            uv_command(spec, uv_bin, index),
            input=requirements,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise LockError(f"{spec.label}: uv pip compile took longer than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise LockError(f"{spec.label}: uv pip compile failed (exit {proc.returncode}):\n{tail}")
    text = render_lock(spec, proc.stdout, ver)
    problems = check_lock_text(spec, text)
    if problems:
        raise LockError(f"{spec.label}: uv's output does not make a valid lock:\n  " + "\n  ".join(problems))
    target = lock_path(locks_dir, spec.profile, spec.env)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.env}.", suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    Path(tmp).chmod(0o644)
    Path(tmp).replace(target)
    return target


def compile_lock(
    profile: str,
    env: str,
    *,
    profiles_dir: Path = PROFILES_DIR,
    locks_dir: Path = LOCKS_DIR,
    uv: str | None = None,
    index: str = PYPI_INDEX,
) -> Path:
    """Compile locks/<profile>/<env>.txt from profiles/<profile>.yml."""
    (path,) = profile_paths(profiles_dir, [profile])
    specs = {s.env: s for s in load_env_specs(path)}
    if not specs:
        raise LockError(f"profile {profile!r} has no python_env.lock section, so it has no locks")
    if env not in specs:
        raise LockError(f"profile {profile!r} has no env {env!r}; envs: {', '.join(sorted(specs))}")
    return compile_spec(specs[env], locks_dir, uv=uv, index=index)


def _specs_for(profiles_dir: Path, names: Sequence[str]) -> list[EnvSpec]:
    specs: list[EnvSpec] = []
    for path in profile_paths(profiles_dir, names):
        found = load_env_specs(path)
        if names and not found:
            raise LockError(f"profile {path.stem!r} has no python_env.lock section, so it has no locks")
        specs.extend(found)
    return specs


def compile_all(
    names: Sequence[str],
    *,
    profiles_dir: Path = PROFILES_DIR,
    locks_dir: Path = LOCKS_DIR,
    console: Console | None = None,
    index: str = PYPI_INDEX,
) -> list[Path]:
    """Compile every env of the named profiles (all locked profiles when none), with a progress display."""
    console = console or Console(stderr=True, soft_wrap=True)
    specs = _specs_for(profiles_dir, names)
    if not specs:
        raise LockError(f"no profile in {profiles_dir} has a python_env.lock section")
    uv = find_uv()
    ver = uv_version(uv)
    if ver != UV_VERSION:
        console.print(
            f"[yellow]uv {ver} is not the pinned uv {UV_VERSION}; resolution may differ from the committed locks"
        )
    written: list[Path] = []
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:
        overall = progress.add_task(f"compiling {len(specs)} lock(s) with uv {ver}", total=len(specs))
        for spec in specs:
            task = progress.add_task(
                f"{spec.label}: Python {spec.python}, {spec.platform}, up to {spec.exclude_newer}", total=None
            )
            path = compile_spec(spec, locks_dir, uv=uv, index=index)
            pins = len(lock_entries(path.read_text()))
            progress.update(task, total=1, completed=1, description=f"{spec.label}: {pins} pins -> {path}")
            progress.advance(overall)
            written.append(path)
    return written


def _print_problems(console: Console, problems: Iterable[str]) -> None:
    for p in problems:
        console.print(Text.assemble(("✗", "red"), " ", p))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama3_ops.provision.locks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles-dir", type=Path, default=PROFILES_DIR)
    parser.add_argument("--locks-dir", type=Path, default=LOCKS_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile the locks of PROFILE (all locked profiles when none)")
    comp.add_argument("profiles", nargs="*", metavar="PROFILE")
    comp.add_argument(
        "--index-url", default=PYPI_INDEX, help="resolve against this index (a mirror of PyPI); default PyPI"
    )
    sub.add_parser("check", help="check that every lock matches its profile spec (no network)")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        if args.command == "compile":
            written = compile_all(
                args.profiles,
                profiles_dir=args.profiles_dir,
                locks_dir=args.locks_dir,
                console=console,
                index=args.index_url,
            )
            console.print(f"wrote {len(written)} lock(s)")
            others = check_locks(args.profiles_dir, args.locks_dir)
            if others:
                console.print("[yellow]other locks need attention:")
                _print_problems(console, others)
            return 0
        problems = check_locks(args.profiles_dir, args.locks_dir)
    except LockError as exc:
        console.print(Text.assemble(("error:", "red"), " ", str(exc)))
        return 2
    if problems:
        _print_problems(console, problems)
        return 1
    console.print("[green]✓[/green] every lock matches its profile spec", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
