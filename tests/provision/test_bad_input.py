"""Every bad input fails with one clear message and leaves nothing marked complete."""

from __future__ import annotations

import json

import pytest

from hostlab import Provisioned

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]

NEW_DIR = "/home/student/model/other"
NEW_STAMP = "/home/student/model/.other.llama3-ops.json"


def assert_fails_cleanly(provisioned: Provisioned, name: str, message: str, **extra: object) -> None:
    run = provisioned.play(name, **{"llama3_model_dir": NEW_DIR, **extra})
    assert run.rc != 0, f"{name} should have failed:\n{run.tail(40)}"
    assert message in " ".join(run.output.split()), run.tail(40)
    assert run.counts()["failed"] == 1
    assert not provisioned.exists(NEW_STAMP), f"{name} left a completion stamp"


def test_unknown_profile(provisioned: Provisioned) -> None:
    assert_fails_cleanly(provisioned, "bad-profile",
                         "Unknown profile 'gpu-fast'. Set llama3_profile to one of course, cpu, current",
                         llama3_profile="gpu-fast")


def test_a_string_for_a_list_variable_fails_before_any_change(provisioned: Provisioned) -> None:
    """Argument specs turn "vim" into ["vim"] and let it through; the tasks then add a list to a string."""
    run = provisioned.play("str-for-list", llama3_base_extra_packages="vim", llama3_model_dir=NEW_DIR)
    assert run.rc != 0 and run.counts()["changed"] == 0 and run.counts()["failed"] == 1, run.tail(40)
    assert "llama3_base_extra_packages must be a list, not the str \"vim\"" in " ".join(run.output.split())
    assert "Check that every list and dict variable is one" in run.output


def test_missing_required_variable(provisioned: Provisioned) -> None:
    assert_fails_cleanly(provisioned, "missing-url",
                         "llama3_model_source=git_lfs needs llama3_model_git_url, which is empty",
                         llama3_model_git_url="")


def test_model_source_that_does_not_exist(provisioned: Provisioned) -> None:
    assert_fails_cleanly(provisioned, "no-source", "The model source /srv/nowhere.git does not exist",
                         llama3_model_git_url="file:///srv/nowhere.git")
    assert not provisioned.exists(NEW_DIR)


def test_disk_requirement_fails_before_any_download(provisioned: Provisioned) -> None:
    assert_fails_cleanly(provisioned, "no-disk",
                         "needs 100000.1 GiB (model 0.1, environments and caches 100000.0, stages 0.0)",
                         llama3_preflight_envs_gb=100000)
    assert not provisioned.exists(NEW_DIR)


def test_gpu_required_without_nvidia_smi(provisioned: Provisioned) -> None:
    assert_fails_cleanly(provisioned, "no-gpu", "nvidia-smi is missing or failing", llama3_require_gpu=True)


def test_corrupt_shard_fails_without_stamp_and_a_good_source_repairs(provisioned: Provisioned) -> None:
    shard = "model-00001-of-00003.safetensors"
    provisioned.sh("rm -rf /tmp/corrupt && cp -r /srv/share/Meta-Llama-3-8B-Instruct /tmp/corrupt && "
                   f"printf 'XXXX' | dd of=/tmp/corrupt/{shard} bs=1 seek=5000 conv=notrunc status=none")
    good = provisioned.sh(f"sha256sum /srv/share/Meta-Llama-3-8B-Instruct/{shard}").split()[0]
    manifest = {shard: good}
    local = {"llama3_model_source": "local", "llama3_model_manifest": manifest, "tags": ["preflight", "model"]}

    assert_fails_cleanly(provisioned, "corrupt", f"{shard}: sha256", llama3_model_path="/tmp/corrupt", **local)
    assert not provisioned.exists(f"{NEW_DIR}/{shard}"), "the bad shard should be removed for re-download"

    run = provisioned.play("repair", llama3_model_dir=NEW_DIR, llama3_model_path="/srv/share/Meta-Llama-3-8B-Instruct",
                           **local)
    assert run.rc == 0, run.tail(40)
    assert provisioned.sh(f"sha256sum {NEW_DIR}/{shard}").split()[0] == good
    assert json.loads(provisioned.sh(f"cat {NEW_STAMP}"))["sha256_checked"] is True
    provisioned.sh(f"rm -rf {NEW_DIR} {NEW_STAMP}")


def test_damaged_lfs_checkout_is_repaired_in_place(provisioned: Provisioned) -> None:
    """A shard damaged in the working tree (stamp gone): the next run restores it from git-lfs
    (git-lfs re-checks the object on checkout, so this heals within one run)."""
    shard = "/home/student/model/Meta-Llama-3-8B-Instruct/model-00002-of-00003.safetensors"
    stamp = "/home/student/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json"
    good = provisioned.sh(f"sha256sum {shard}").split()[0]
    provisioned.sh(f"printf 'XXXX' | dd of={shard} bs=1 seek=9000 conv=notrunc status=none && rm {stamp}")
    run = provisioned.play("lfs-worktree", tags=["model"])
    assert run.rc == 0, run.tail(40)
    assert provisioned.sh(f"sha256sum {shard}").split()[0] == good
    assert provisioned.exists(stamp)


def test_mirror_not_matching_the_manifest_fails_then_repairs(provisioned: Provisioned) -> None:
    """A git-lfs mirror whose shard differs from the pinned manifest: fail, no stamp, shard removed;
    the next run with the right manifest downloads it again and stamps."""
    repo = "/home/student/model/Meta-Llama-3-8B-Instruct"
    name = "model-00002-of-00003.safetensors"
    stamp = "/home/student/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json"
    good = provisioned.sh(f"sha256sum {repo}/{name}").split()[0]
    pinned = {name: "0" * 64}  # e.g. the official release's hash, which this mirror does not serve
    bad = provisioned.play("lfs-manifest", tags=["model"], llama3_model_manifest=pinned)
    assert bad.rc != 0, bad.tail(40)
    assert "failed verification and is NOT marked complete" in " ".join(bad.output.split())
    assert f"{name}: sha256 {good}, expected {'0' * 64}" in bad.output
    assert not provisioned.exists(stamp)
    assert not provisioned.exists(f"{repo}/{name}")
    fixed = provisioned.play("lfs-manifest-repair", tags=["model"], llama3_model_manifest={name: good})
    assert fixed.rc == 0, fixed.tail(40)
    assert provisioned.sh(f"sha256sum {repo}/{name}").split()[0] == good
    assert provisioned.exists(stamp)
    # Back to the manifest-less source of the other tests: a new fingerprint, verified again.
    assert provisioned.play("lfs-manifest-reset", tags=["model"]).rc == 0
