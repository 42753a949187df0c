"""Nothing corrupt is stamped verified (issue #14 item 1), on a fresh Debian host over real SSH.

The host gets the real git-lfs fixture repository under /srv (a ``file://`` origin, so git-lfs
hard-links the clone's cached objects to the origin's) and only what the model role needs
(``--tags preflight,base,model``, apt installing git and git-lfs alone). Each test damages the
clone the way a disk or an interrupted download does, checks that the run fails without a stamp,
names the file and removes it, that the next run repairs and stamps, and that the origin's objects
still hash to the committed OIDs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostlab import FIXTURES, GOOD_URL, MODEL_DIR, STAMP, Provisioned, slot_name
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory
from llama3_ops.lab.lfsrepo import lfs_oids
from llama3_ops.provision.playbook import PlaybookRun

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]

ORIGIN = f"{FIXTURES}/Meta-Llama-3-8B-Instruct.git"
SHARD = "model-00001-of-00003.safetensors"
TAGS = ["preflight", "base", "model"]
FAILED = "failed verification and is NOT marked complete"


def obj(oid: str) -> str:
    return f"lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}"


@pytest.fixture(scope="module")
def oids(lfs_repo: Path) -> dict[str, str]:
    """The OIDs the fixture repository committed (read on the controller)."""
    return lfs_oids(f"file://{lfs_repo}")


@pytest.fixture(scope="module")
def host(lab: FreshHostLab, lfs_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """A fresh host with the fixture origin and a first, good install of the model only."""
    name, idx = slot_name("mflt", 7)
    logs = Path(tmp_path_factory.mktemp("model-faults-logs"))
    with lab.host(name, idx) as target:
        lab.put(name, idx, lfs_repo, ORIGIN)
        inventory = write_inventory(logs / "inventory.yml", [target],
                                    {"llama3_profile": "cpu", "llama3_model_git_url": GOOD_URL,
                                     "llama3_base_packages": ["git", "git-lfs"]})
        p = Provisioned(lab, name, idx, target, inventory, [], logs)
        first = p.play("install", tags=TAGS)
        p.runs.append(first)
        if first.rc != 0:
            pytest.fail(f"the first model install failed (rc={first.rc}):\n{first.tail(60)}")
        yield p


@pytest.fixture
def model(host: Provisioned, oids: dict[str, str], lfs_repo: Path) -> Provisioned:
    """The host with a verified model, re-installed if an earlier (failed) test left it broken."""
    if damaged_in_origin(host, oids):  # each test is judged on its own damage, not an earlier one's
        host.sh(f"rm -rf {MODEL_DIR} {STAMP}")
        host.lab.put(host.name, host.idx, lfs_repo, ORIGIN)
    if not host.exists(STAMP) or host.sh(f"git -C {MODEL_DIR} status --porcelain").strip():
        host.sh(f"rm -rf {MODEL_DIR} {STAMP}")
        run = play(host, "reinstall")
        assert run.rc == 0, run.tail(60)
    return host


def play(host: Provisioned, name: str, **extra: object) -> PlaybookRun:
    run = host.play(name, tags=TAGS, **extra)
    host.runs.append(run)
    return run


def sha256(host: Provisioned, path: str) -> str:
    return host.sh(f"sha256sum {path}").split()[0]


def corrupt(host: Provisioned, path: str, seek: int = 5000) -> None:
    """Flip bytes in place (conv=notrunc writes through any hard link, as a bad disk sector would)."""
    host.sh(f"printf 'XXXX' | dd of={path} bs=1 seek={seek} conv=notrunc status=none")


def damaged_in_origin(host: Provisioned, oids: dict[str, str]) -> list[str]:
    return [path for path, oid in oids.items() if sha256(host, f"{ORIGIN}/{obj(oid)}") != oid]


def assert_origin_untouched(host: Provisioned, oids: dict[str, str]) -> None:
    damaged = damaged_in_origin(host, oids)
    assert not damaged, f"the origin's objects for {damaged} were written through the clone's hard links"


def assert_failed_cleanly(run: PlaybookRun, host: Provisioned, *names: str) -> None:
    text = " ".join(run.output.split())
    assert run.rc != 0, f"the run should have failed:\n{run.tail(40)}"
    assert FAILED in text, run.tail(40)
    for n in names:
        assert n in text, f"{n} not named:\n{run.tail(40)}"
    assert not host.exists(STAMP), "a failed verification left the stamp"


def assert_repaired(host: Provisioned, oids: dict[str, str], name: str) -> PlaybookRun:
    run = play(host, name)
    assert run.rc == 0, run.tail(60)
    stamp = json.loads(host.sh(f"cat {STAMP}"))
    assert stamp["sha256_checked"] is True
    assert stamp["revision"] == host.sh(f"git -C {MODEL_DIR} rev-parse HEAD").strip()
    for path, oid in oids.items():
        assert sha256(host, f"{MODEL_DIR}/{path}") == oid
        assert sha256(host, f"{MODEL_DIR}/.git/{obj(oid)}") == oid
    assert host.sh(f"git -C {MODEL_DIR} status --porcelain").strip() == ""
    assert_origin_untouched(host, oids)
    return run


def test_cached_objects_are_not_hard_links_to_the_origin(model: Provisioned, oids: dict[str, str]) -> None:
    """git-lfs links objects from a file:// origin; the verify step replaces them with private copies."""
    for path, oid in oids.items():
        nlink, inode = model.sh(f"stat -c '%h %i' {MODEL_DIR}/.git/{obj(oid)}").split()
        origin_inode = model.sh(f"stat -c %i {ORIGIN}/{obj(oid)}").strip()
        assert nlink == "1" and inode != origin_inode, f"{path}'s cached object shares the origin's inode"


def test_corrupt_cached_object_fails_without_stamp_then_repairs(model: Provisioned, oids: dict[str, str]) -> None:
    cached = f"{MODEL_DIR}/.git/{obj(oids[SHARD])}"
    corrupt(model, cached)
    model.sh(f"rm {STAMP}")
    bad = play(model, "cached-object")
    assert_failed_cleanly(bad, model, f"cached LFS object .git/{obj(oids[SHARD])}", SHARD)
    assert not model.exists(cached), "the bad cached object should be removed for re-download"
    assert_origin_untouched(model, oids)
    assert_repaired(model, oids, "cached-object-repair")


def test_corrupt_shard_and_cached_object_without_stamp(model: Provisioned, oids: dict[str, str]) -> None:
    """The issue's report: the same byte flipped in the shard and its cached object, stamp removed."""
    corrupt(model, f"{MODEL_DIR}/{SHARD}")
    corrupt(model, f"{MODEL_DIR}/.git/{obj(oids[SHARD])}")
    model.sh(f"rm {STAMP}")
    bad = play(model, "shard-and-object")
    assert_failed_cleanly(bad, model, f"{SHARD}: sha256", f"expected {oids[SHARD]}")
    assert not model.exists(f"{MODEL_DIR}/{SHARD}")
    assert_origin_untouched(model, oids)
    assert_repaired(model, oids, "shard-and-object-repair")


def test_corrupt_stamped_shard_is_found_by_reverify(model: Provisioned, oids: dict[str, str]) -> None:
    shard = f"{MODEL_DIR}/model-00002-of-00003.safetensors"
    corrupt(model, shard, seek=9000)
    plain = play(model, "stamped-plain")
    assert plain.rc == 0 and plain.counts()["changed"] == 0, "a stamped model is not re-checked by default"
    bad = play(model, "reverify", llama3_model_reverify=True)
    assert_failed_cleanly(bad, model, "model-00002-of-00003.safetensors: sha256",
                          f"expected {oids['model-00002-of-00003.safetensors']}")
    assert not model.exists(shard)
    assert_repaired(model, oids, "reverify-repair")
    good = play(model, "reverify-good", llama3_model_reverify=True)
    assert good.rc == 0, good.tail(40)
    assert model.exists(STAMP)


def test_interrupted_download_fails_then_resumes(model: Provisioned, oids: dict[str, str]) -> None:
    """Power lost mid-download: the cached object has its full size but a zero tail (allocated, never
    written), the shard checked out from it is cut short. The run fails naming both, the next stamps."""
    cached = f"{MODEL_DIR}/.git/{obj(oids[SHARD])}"
    model.sh(f"size=$(stat -c %s {cached}) && truncate -s 1000000 {cached} && truncate -s $size {cached} && "
             f"truncate -s 1000000 {MODEL_DIR}/{SHARD} && rm {STAMP}")
    bad = play(model, "interrupted")
    assert_failed_cleanly(bad, model, SHARD, f"cached LFS object .git/{obj(oids[SHARD])}")
    assert not model.exists(cached)
    assert_origin_untouched(model, oids)
    fixed = assert_repaired(model, oids, "interrupted-repair")
    assert fixed.counts()["failed"] == 0
    again = play(model, "interrupted-again")
    assert again.rc == 0 and again.counts()["changed"] == 0, again.tail(60)
