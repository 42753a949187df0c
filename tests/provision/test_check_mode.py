"""--check --diff on a fresh host runs without error and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostlab import slot_name
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory
from llama3_ops.provision.playbook import run_playbook

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]


def test_check_mode_on_a_fresh_host(lab: FreshHostLab, lfs_repo: Path, tmp_path: Path) -> None:
    name, idx = slot_name("chk", 4)
    with lab.host(name, idx) as target:
        lab.put(name, idx, lfs_repo, "/srv/llama3-fixtures/Meta-Llama-3-8B-Instruct.git")
        inv = write_inventory(tmp_path / "inv.yml", [target], {
            "llama3_profile": "cpu",
            "llama3_model_git_url": "file:///srv/llama3-fixtures/Meta-Llama-3-8B-Instruct.git"})
        run = run_playbook(inv, check=True, log=tmp_path / "check.log")
        assert run.rc == 0, run.tail(60)
        assert run.counts()["changed"] > 0
        assert "Would install: git, git-lfs" in run.output
        # Nothing happened for real.
        probe = lab.ssh(target, "command -v git-lfs; ls ~/envs ~/model 2>&1 | head -3", check=False).stdout
        assert "/git-lfs" not in probe
        assert "No such file or directory" in probe
