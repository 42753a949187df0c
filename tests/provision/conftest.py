"""A host provisioned with the cpu profile, shared by the provisioning tests of this directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama3_ops.connection import SSHTarget
from llama3_ops.freshhost import FreshHostLab, write_inventory
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


@pytest.fixture(scope="session")
def provisioned(lab: FreshHostLab, lfs_repo: Path, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """Boot a fresh host, put the model fixtures on it, and run site.yml twice with the cpu profile."""
    name, idx = "prov", 3
    logs = Path(tmp_path_factory.mktemp("provision-logs"))
    with lab.host(name, idx) as target:
        lab.put(name, idx, lfs_repo, f"{FIXTURES}/Meta-Llama-3-8B-Instruct.git")
        # InternStudio-style shared model: read-only, owned by root.
        lab.put(name, idx, tiny_model, "/srv/share/Meta-Llama-3-8B-Instruct", owner="root")
        inventory = write_inventory(logs / "inventory.yml", [target],
                                    {"llama3_profile": "cpu", "llama3_model_git_url": GOOD_URL})
        p = Provisioned(lab, name, idx, target, inventory, [], logs)
        for i in (1, 2):
            run = p.play(f"site-run{i}")
            p.runs.append(run)
            if run.rc != 0:
                pytest.fail(f"site.yml run {i} failed (rc={run.rc}):\n{run.tail(60)}")
        (logs / "timings.json").write_text(json.dumps([{"seconds": r.seconds, **r.counts()} for r in p.runs]))
        yield p
