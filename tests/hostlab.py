"""The host provisioned with the cpu profile that the provisioning and serving tests share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llama3_ops.lab.freshhost import FreshHostLab
from llama3_ops.provision.playbook import PlaybookRun, run_playbook
from llama3_ops.remote.connection import SSHTarget

FIXTURES = "/srv/llama3-fixtures"
GOOD_URL = f"file://{FIXTURES}/Meta-Llama-3-8B-Instruct.git"
MODEL_DIR = "/home/student/model/Meta-Llama-3-8B-Instruct"
STAMP = "/home/student/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json"

# Fresh-host slots (address 169.254.213.(4*idx+2), idx < 64). Test runs that share this machine
# at the same time (two checkouts, two people) must set different LLAMA3_TEST_HOST_BASE values
# (0, 16, 32, 48): slot = base + offset, and the machine name carries the slot.
HOST_BASE = int(__import__("os").environ.get("LLAMA3_TEST_HOST_BASE", "0"))


def slot(offset: int) -> int:
    """The fresh-host index for this run's ``offset`` (0..15)."""
    if not 0 <= offset < 16 or not 0 <= HOST_BASE <= 48:
        raise ValueError(f"host slot {HOST_BASE}+{offset} out of range")
    return HOST_BASE + offset


def slot_name(prefix: str, offset: int) -> tuple[str, int]:
    idx = slot(offset)
    return f"{prefix}{idx}", idx


@dataclass
class Provisioned:
    lab: FreshHostLab
    name: str
    idx: int
    target: SSHTarget
    inventory: Path
    runs: list[PlaybookRun]
    logs: Path

    def sh(self, command: str, check: bool = True) -> str:
        return self.lab.ssh(self.target, command, check=check).stdout

    def exists(self, path: str) -> bool:
        return self.lab.ssh(self.target, f"test -e {path}", check=False).returncode == 0

    def play(self, name: str, **extra: object) -> PlaybookRun:
        tags = extra.pop("tags", None)
        check = bool(extra.pop("check", False))
        return run_playbook(self.inventory, extra_vars=extra or None, tags=tags, check=check,  # type: ignore[arg-type]
                            log=self.logs / f"{name}.log")


# Where each profile's provisioning puts the envs (host.json's "envs"): venvs (cpu) or conda (course).
LAYOUTS = {"venv": "envs/{name}/bin", "conda": "miniforge3/envs/{name}/bin"}


def env_bin(home: Path, name: str = "lmdeploy", layout: str = "venv") -> Path:
    return home / LAYOUTS[layout].format(name=name)


def write_host_json(home: Path, envs: dict[str, Path | str] | None = None, layout: str = "venv",
                    profile: str | None = None, model_dir: Path | None = None) -> Path:
    """``~/llama3-course/host.json`` as the llama3_course role writes it, for a host laid out as ``layout``."""
    envs = envs or {name: env_bin(home, name, layout) for name in ("llama3", "lmdeploy")}
    model = model_dir or home / "model" / "Meta-Llama-3-8B-Instruct"
    data = {"profile": profile or ("course" if layout == "conda" else "cpu"), "user": home.name,
            "course_dir": str(home / "llama3-course"), "model_dir": str(model),
            "model_stamp": str(model.parent / f".{model.name}.llama3-ops.json"),
            "envs": {k: str(v) for k, v in envs.items()}, "offline": False, "service_manager": "none"}
    path = home / "llama3-course" / "host.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
