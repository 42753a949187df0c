"""Fixtures shared by every test directory."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostlab import FIXTURES, GOOD_URL, Provisioned, slot_name
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory

ROOT = Path(__file__).resolve().parents[1]
_host_offset = itertools.count(8)

# The test tiers (`nox -s unit` runs `-m "not freshhost and not sshd and not slow and not network"`).
# A test that uses one of these fixtures, directly or through another fixture, must carry the
# markers, or collection stops: a forgotten marker would put a fresh-host boot or a real sshd
# into the unit tier, which must run without root in minutes.
FIXTURE_MARKERS = {
    "lab": ("freshhost",),
    "sshd_host": ("sshd",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, markers in FIXTURE_MARKERS.items():
            lacking = [m for m in markers if fixture in used and item.get_closest_marker(m) is None]
            if lacking:
                missing.append(f"{item.nodeid}: uses the {fixture!r} fixture but lacks "
                               + ", ".join(f"@pytest.mark.{m}" for m in lacking))
    if missing:
        raise pytest.UsageError("tests missing their tier markers (see tests/conftest.py FIXTURE_MARKERS):\n  "
                                + "\n  ".join(missing))


# Seconds (setup + call + teardown) and test counts per tier, printed at the end of every run, so a
# CI log gives the cost of each tier. A session fixture counts for the first test that needs it.
TIERS = ("freshhost", "sshd", "network", "slow")
_tier_time: dict[str, list[float]] = {}


def _tier(keywords: object) -> str:
    return next((t for t in TIERS if t in keywords), "unit")  # type: ignore[operator]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _tier_time.setdefault(_tier(report.keywords), [0.0, 0])
    entry[0] += report.duration
    if report.when == "call" or (report.when == "setup" and report.skipped):
        entry[1] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _tier_time:
        terminalreporter.write_line("time by tier: " + ", ".join(
            f"{t} {s:.0f} s ({int(n)} tests)" for t, (s, n) in sorted(_tier_time.items(), key=lambda kv: -kv[1][0])))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-3-shaped checkpoint (random weights, real tokenizer), built once per run."""
    from llama3_ops.lab.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "Meta-Llama-3-8B-Instruct", "tiny")


@pytest.fixture(scope="session")
def lfs_repo(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real git-lfs bare repository holding the tiny checkpoint."""
    from llama3_ops.lab.lfsrepo import publish

    bare = tmp_path_factory.mktemp("lfs") / "Meta-Llama-3-8B-Instruct.git"
    publish(tiny_model, bare)
    return bare


@pytest.fixture(scope="session")
def lab() -> Iterator[object]:
    """The fresh-host lab: a bookworm rootfs built once per test run (about 45 s)."""
    from llama3_ops.lab.freshhost import FreshHostLab

    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None or shutil.which("mmdebstrap") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the fresh-host tests: run as root with mmdebstrap and systemd-container")
        pytest.skip("fresh hosts need root, mmdebstrap and systemd-nspawn (see README)")
    base = Path(os.environ.get("LLAMA3_FRESH_HOSTS", ROOT / ".fresh-hosts"))
    # Hosts hand their apt and pip downloads on to the next host (FreshHostLab.package_cache): every
    # host still runs apt and pip for real, only the transfers are saved. LLAMA3_FRESH_HOSTS_CACHE=0: off.
    # A stopped host's files are deleted in the background (FreshHostLab.background_cleanup).
    lab = FreshHostLab(base, package_cache=os.environ.get("LLAMA3_FRESH_HOSTS_CACHE", "1") != "0",
                       background_cleanup=True)
    lab.build()
    yield lab


@pytest.fixture(scope="session")
def provisioned(lab: FreshHostLab, lfs_repo: Path, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """Boot a fresh host, put the model fixtures on it, and run site.yml twice with the cpu profile."""
    name, idx = slot_name("prov", 3)
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


@pytest.fixture
def fresh_host(lab: object, request: pytest.FixtureRequest) -> Iterator[object]:
    """A throwaway host booted for one test; yields an SSHTarget."""
    from llama3_ops.lab.freshhost import FreshHostLab

    assert isinstance(lab, FreshHostLab)
    offset = next(_host_offset)
    if offset >= 16:
        pytest.fail("more than 8 fresh_host tests in one run: widen the slot range in tests/hostlab.py")
    name, idx = slot_name("fh", offset)
    with lab.host(name, idx) as target:
        yield target
