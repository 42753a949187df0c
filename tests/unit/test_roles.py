"""Role hygiene: defaults mirrored in argument specs, role-prefixed names, FQCN, docs in sync."""

from __future__ import annotations

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
        for key in ("description", "require_gpu", "disk_gb", "gpu_mem_gb", "python_env", "model"):
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
