"""Role hygiene: defaults mirrored in argument specs, role-prefixed names, FQCN, docs in sync."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())


def _norm(value: object) -> object:
    return " ".join(value.split()) if isinstance(value, str) else value


def test_the_expected_roles_exist() -> None:
    assert ROLES == ["llama3", "llama3_base", "llama3_course", "llama3_model", "llama3_preflight", "llama3_python_env"]


@pytest.mark.parametrize("role", ROLES)
def test_defaults_are_mirrored_in_argument_specs(role: str) -> None:
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options), "defaults/main.yml and meta/argument_specs.yml list different variables"
    for name, value in defaults.items():
        assert _norm(options[name].get("default")) == _norm(value), f"{name}: spec default differs from defaults"
        assert options[name].get("description"), f"{name} has no description in the argument spec"


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_documented_with_a_comment(role: str) -> None:
    """Each variable sits in a paragraph (lines between blank lines) that has a comment."""
    commented = False
    for line in (ROOT / "roles" / role / "defaults" / "main.yml").read_text().splitlines():
        if not line.strip():
            commented = False
        elif line.startswith("#"):
            commented = True
        elif re.match(r"^[a-z0-9_]+:", line):
            assert commented, f"{line.split(':')[0]} has no comment above it"


@pytest.mark.parametrize("role", ROLES)
def test_variables_carry_the_role_prefix(role: str) -> None:
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
    assert all(name.startswith(role + "_") for name in defaults), f"unprefixed variables in {role}"
    tasks = "\n".join(p.read_text() for p in (ROOT / "roles" / role / "tasks").glob("*.yml"))
    for name in re.findall(r"^\s+register: (\w+)", tasks, re.MULTILINE):
        assert name.startswith(role + "_"), f"register {name} in {role} lacks the role prefix"


def test_only_fqcn_builtin_modules() -> None:
    for path in (ROOT / "roles").glob("*/tasks/*.yml"):
        for task in yaml.safe_load(path.read_text()) or []:
            stack = [task]
            while stack:
                t = stack.pop()
                stack += t.get("block", []) + t.get("rescue", []) + t.get("always", [])
                modules = [k for k in t if "." in k or k in {"command", "shell", "copy", "file", "apt", "pip"}]
                for m in modules:
                    assert m.startswith("ansible.builtin."), f"{path.name}: {m} is not an ansible.builtin FQCN"


def test_profiles_have_the_keys_the_roles_read() -> None:
    for path in (ROOT / "profiles").glob("*.yml"):
        data = yaml.safe_load(path.read_text())
        for key in ("description", "require_gpu", "disk_gb", "python_env", "model"):
            assert key in data, f"{path.name} lacks {key}"
        assert {"llama3", "lmdeploy"} <= set(data["python_env"]["envs"]), path.name
        for env in data["python_env"]["envs"].values():
            assert all("==" in p or " @ " in p or "<" in p for p in env["packages"]), f"unpinned package in {path.name}"


def test_readme_variables_table_is_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_variables.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_site_yml_passes_syntax_check() -> None:
    exe = Path(sys.executable).parent / "ansible-playbook"
    proc = subprocess.run([str(exe), "--syntax-check", "-i", "inventory/example.yml", "site.yml"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def _tasks(path: Path) -> list[dict[str, object]]:
    """Every task of a task file, blocks flattened (the block itself included)."""
    out: list[dict[str, object]] = []
    stack = list(reversed(yaml.safe_load(path.read_text()) or []))
    while stack:
        t = stack.pop()
        out.append(t)
        for key in ("always", "rescue", "block"):
            stack += list(reversed(t.get(key, [])))
    return out


NETWORK_COMMANDS = ("git clone", "git fetch", "lfs pull", "conda create", "snapshot_download", "download")
# Every task that can reach the network -> the task name its offline guard names in its message.
NETWORK_TASKS = {
    ("llama3_base", "Install the system packages"): "Install the system packages",
    ("llama3_python_env", "Download the Miniforge installer (checked against its pinned sha256)"): "Install Miniforge",
    ("llama3_python_env", "Create conda env {{ llama3_python_env_item.key }}"):
        "Create conda env {{ llama3_python_env_item.key }}",
    ("llama3_python_env", "Install the packages of env {{ llama3_python_env_item.key }}"): "Install the environments",
    ("llama3_python_env", "Install the git packages of env {{ llama3_python_env_item.key }}"):
        "Install the environments",
    ("llama3_python_env", "Install the no-deps packages of env {{ llama3_python_env_item.key }}"):
        "Install the environments",
    ("llama3_model", "Check the git remote answers"): "Fetch the model",
    ("llama3_model", "Clone the repository (pointers only; weights come next, resumably)"): "Fetch the model",
    ("llama3_model", "Check out the requested revision and restore missing or damaged files"): "Fetch the model",
    ("llama3_model", "Download the weights with git-lfs (resumes an interrupted download)"): "Fetch the model",
    ("llama3_model", "Download from the Hugging Face Hub (resumes an interrupted download)"): "Fetch the model",
    ("llama3_model", "Install the ModelScope client into the llama3 env"): "Fetch the model",
    ("llama3_model", "Download from ModelScope (resumes an interrupted download)"): "Fetch the model",
}


def test_every_network_task_has_an_offline_guard_that_names_it() -> None:
    found: set[tuple[str, str]] = set()
    guards: dict[str, str] = {}
    for path in (ROOT / "roles").glob("*/tasks/*.yml"):
        role = path.parts[-3]
        for t in _tasks(path):
            name = str(t.get("name", ""))
            module = next((k for k in t if k.startswith("ansible.builtin.")), "")
            text = yaml.safe_dump({k: v for k, v in t.items() if k.startswith("ansible.builtin.")})
            args = t.get(module)
            if isinstance(args, dict) and args.get("argv"):
                text += " ".join([Path(str(args["argv"][0])).name, *map(str, args["argv"][1:])])
            remote = module in ("ansible.builtin.get_url", "ansible.builtin.uri", "ansible.builtin.apt",
                                "ansible.builtin.pip") or (
                module in ("ansible.builtin.command", "ansible.builtin.shell")
                and any(c in text for c in NETWORK_COMMANDS))
            if remote:
                found.add((role, name))
            if module in ("ansible.builtin.assert", "ansible.builtin.fail"):
                msg = " ".join(str(t[module].get("fail_msg", t[module].get("msg", ""))).split())  # type: ignore[attr-defined]
                cond = yaml.safe_dump(t.get("when", "")) + yaml.safe_dump(t[module].get("that", ""))  # type: ignore[attr-defined]
                if msg.startswith("Offline mode") and ("llama3_offline" in cond):
                    for guarded in set(NETWORK_TASKS.values()):
                        if f"task '{guarded}'" in msg:
                            guards[guarded] = f"{role}: {name}"
    assert found == set(NETWORK_TASKS), (
        f"network tasks without a listed offline guard: {sorted(found - set(NETWORK_TASKS))}; "
        f"listed but gone: {sorted(set(NETWORK_TASKS) - found)}")
    missing = set(NETWORK_TASKS.values()) - set(guards)
    assert not missing, f"no offline assert names these tasks: {sorted(missing)}"


def test_conda_is_never_updated_and_envs_are_created_once() -> None:
    tasks = [t for p in (ROOT / "roles").glob("*/tasks/*.yml") for t in _tasks(p)]
    text = "\n".join(yaml.safe_dump(t) for t in tasks)
    assert "conda update" not in text and "update --all" not in text and "'update'" not in text
    def argv(t: dict[str, object]) -> list[str]:
        cmd = t.get("ansible.builtin.command")
        return [str(a) for a in cmd.get("argv", [])] if isinstance(cmd, dict) else []

    creates = [t for t in tasks if argv(t)[:2] and argv(t)[0].endswith("/bin/conda") and argv(t)[1] == "create"]
    assert creates, "no conda create task found"
    for t in creates:
        assert str(t["ansible.builtin.command"]["creates"]).endswith("/bin/python"), t["name"]  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["course", "current"])
def test_locked_profiles_install_their_hash_locks(profile: str, tmp_path: Path) -> None:
    """The python_env role in check mode on localhost: every env of a GPU profile installs its committed
    lock with hash checking (a conda prefix exists, so nothing is downloaded; check mode runs nothing)."""
    envs = yaml.safe_load((ROOT / "profiles" / f"{profile}.yml").read_text())["python_env"]["envs"]
    home = tmp_path / "home"
    (home / "miniforge3" / "bin").mkdir(parents=True)
    (home / "miniforge3" / "bin" / "conda").touch()
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"name": "python_env", "hosts": "localhost", "connection": "local",
                                     "gather_facts": True, "gather_subset": ["min"],
                                     "roles": ["llama3", "llama3_python_env"]}]))
    extra = {"llama3_profile": profile, "llama3_user_home": str(home), "llama3_python_env_pip_conf": False,
             "ansible_python_interpreter": sys.executable}
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "--check",
                           "-e", json.dumps(extra), str(play)], env=env, capture_output=True,
                          text=True, check=False, timeout=300)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:]
    for name in envs:
        assert (f"Would install into {home}/miniforge3/envs/{name}: the lock "
                f"{ROOT}/roles/llama3_python_env/../../locks/{profile}/{name}.txt (hash-checked)") in out, out[-3000:]
