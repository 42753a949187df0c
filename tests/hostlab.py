"""The host provisioned with the cpu profile that the provisioning and serving tests share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama3_ops.connection import SSHTarget
from llama3_ops.freshhost import FreshHostLab
from llama3_ops.provision import PlaybookRun, run_playbook

FIXTURES = "/srv/llama3-fixtures"
GOOD_URL = f"file://{FIXTURES}/Meta-Llama-3-8B-Instruct.git"
MODEL_DIR = "/home/student/model/Meta-Llama-3-8B-Instruct"
STAMP = "/home/student/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json"


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
