"""The conda backend on a fresh host, as far as it can run without a conda channel.

No conda channel or GitHub release is reachable from this machine, so:

- the installer checksum path is real: a fake "Miniforge" installer served over file:// fails its
  pinned sha256, and the play stops with nothing downloaded kept, run or installed;
- the unpinned and offline refusals are real;
- the idempotence guards run against a pre-existing conda prefix whose ``bin/conda`` is a STUB
  (it records its calls; ``create --prefix P`` makes a plain venv at P, ``init bash`` appends the
  hook markers). This stub serves only the guard test: it shows which conda commands the role
  issues on a first and a second run, never what real conda does with them. Everything after
  env creation is real: pip inside the env installs a hash lock (real PyPI files) and a git package
  pinned to a commit from a real git repository.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gitpkg import tagged_package_repo
from hostlab import Provisioned, slot_name
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]

HOME = "/home/student"
PREFIX = f"{HOME}/miniforge3"
MIRROR = "/srv/miniforge-mirror"
VERSION = "26.3.2-3"
PINNED_X86 = "848194851a98903134187fbb4ab50efe87b003e0c0f808f97644b7524a62bf2c"
TUNA = "https://mirrors.tuna.tsinghua.edu.cn/anaconda/cloud"

FAKE_INSTALLER = """#!/bin/bash
# Not Miniforge: if this ever runs, it leaves a mark.
echo ran > /tmp/fake-miniforge-ran
mkdir -p "$4/bin" && touch "$4/bin/conda"
"""

STUB_CONDA = """#!/bin/bash
# TEST STUB, not conda (tests/provision/test_conda.py, guard test only): records every call;
# `create --prefix P ...` makes a plain venv at P, `init bash` appends conda's hook markers.
echo "$*" >> "$HOME/conda-calls.log"
case "$1" in
  create)
    prefix=""
    while [ $# -gt 0 ]; do [ "$1" = --prefix ] && prefix=$2; shift; done
    python3 -m venv "$prefix" ;;
  init)
    printf '\\n# >>> conda initialize >>>\\n# (stub)\\n# <<< conda initialize <<<\\n' >> "$HOME/.bashrc"
    echo "modified $HOME/.bashrc" ;;
  *)
    echo "stub conda: unexpected call: $*" >&2; exit 2 ;;
esac
"""


def _pip_hash(spec: str, dest: Path) -> str:
    """Download ``spec``'s wheel from PyPI (as the host will) and return its pinned lock entry."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "--index-url", "https://pypi.org/simple", "-d", str(dest), spec], check=True)
    name = spec.split("==")[0].lower()
    wheel = next(p for p in dest.iterdir() if p.name.lower().startswith(name + "-"))
    return f"{spec} \\\n    --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}"


def _git_repo(root: Path) -> tuple[Path, str]:
    """A bare git repository of a tiny package, tagged v0.1.0; returns it and the tag's commit."""
    return tagged_package_repo(root / "demo-src", root / "demo-pkg.git", "llama3-ops-demo-pkg",
                               "llama3_ops_demo_pkg", "0.1.0", init='VERSION = "0.1.0"\n')


@pytest.fixture(scope="module")
def conda_host(lab: FreshHostLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    tmp = tmp_path_factory.mktemp("conda")
    name, idx = slot_name("conda", 5)
    with lab.host(name, idx) as target:
        installer = tmp / f"Miniforge3-{VERSION}-Linux-x86_64.sh"
        installer.write_text(FAKE_INSTALLER)
        lab.put(name, idx, installer, f"{MIRROR}/{VERSION}/{installer.name}")
        inventory = write_inventory(tmp / "inventory.yml", [target], {
            "llama3_profile": "cpu",
            "llama3_python_env_backend": "conda",
            "llama3_python_env_wheelhouse": "",
            "llama3_python_env_miniforge_base_url": f"file://{MIRROR}",
            "llama3_python_env_conda_custom_channels": {"conda-forge": TUNA},
        })
        yield Provisioned(lab, name, idx, target, inventory, [], tmp)


def _nothing_installed(host: Provisioned) -> None:
    assert not host.exists(PREFIX), "a Miniforge prefix was created"
    assert not host.exists("/tmp/fake-miniforge-ran"), "the unverified installer was run"
    assert host.sh(f"ls {HOME}/.cache/llama3-ops/ 2>/dev/null | grep -c Miniforge || true").strip() == "0", \
        "the installer was kept"
    assert not host.exists(f"{HOME}/.condarc")


def test_installer_that_does_not_match_its_pin_is_never_run(conda_host: Provisioned) -> None:
    run = conda_host.play("conda-bad-sha", tags=["python_env"])
    assert run.rc != 0, run.tail(40)
    assert run.counts()["failed"] == 1
    text = " ".join(run.output.split())
    assert (f"The Miniforge installer from file://{MIRROR}/{VERSION}/Miniforge3-{VERSION}-Linux-x86_64.sh "
            f"does not match its pinned sha256 {PINNED_X86} (llama3_python_env_miniforge_sha256.x86_64): "
            "it was discarded, NOT run, and nothing was installed.") in text, run.tail(40)
    _nothing_installed(conda_host)


def test_unpinned_installer_is_refused_before_download(conda_host: Provisioned) -> None:
    run = conda_host.play("conda-unpinned", tags=["python_env"],
                          llama3_python_env_miniforge_sha256={"x86_64": "", "aarch64": PINNED_X86})
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    assert (f"Set llama3_python_env_miniforge_sha256.x86_64 to the sha256 of Miniforge3-{VERSION}-Linux-x86_64.sh"
            in " ".join(run.output.split())), run.tail(40)
    _nothing_installed(conda_host)


def test_offline_mode_refuses_to_download_miniforge(conda_host: Provisioned, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _pip_hash("six==1.17.0", wheels)
    run = conda_host.play("conda-offline", tags=["python_env"], llama3_offline=True,
                          llama3_python_env_wheelhouse=str(wheels))
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    assert "Offline mode (llama3_offline=true): task 'Install Miniforge' would reach the network" in \
        " ".join(run.output.split()), run.tail(40)
    _nothing_installed(conda_host)


def test_condarc_env_creation_and_lock_install_are_idempotent(conda_host: Provisioned, tmp_path: Path) -> None:
    """Guard test with the STUB conda (see the module docstring): what the role asks of conda, once."""
    host = conda_host
    # A short list for speed: python3-venv for the stub's envs, python3-packaging for Ansible's pip
    # module (the default list's python3-pip brings it), git for the git package, git-lfs because
    # the base role sets up its filters.
    base = host.play("conda-base", tags=["base"],
                     llama3_base_packages=["python3-venv", "python3-packaging", "git", "git-lfs"])
    assert base.rc == 0, base.tail(40)
    stub = tmp_path / "miniforge3" / "bin" / "conda"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB_CONDA)
    stub.chmod(0o755)
    host.lab.put(host.name, host.idx, tmp_path / "miniforge3", PREFIX)
    bare, commit = _git_repo(tmp_path)
    host.lab.put(host.name, host.idx, bare, "/srv/git/demo-pkg.git")
    # A git host on the guest's loopback (pip's PEP 508 URLs need a host part, so not file://).
    host.sh("setsid nohup python3 -m http.server --directory /srv/git --bind 127.0.0.1 8765 >/dev/null 2>&1 "
            "< /dev/null & echo $! > /tmp/git-http.pid")
    locks = tmp_path / "locks"
    locks.mkdir()
    header = "# llama3-ops-spec: sha256=test python=3.11 platform=x86_64-manylinux_2_28\n"
    six = _pip_hash("six==1.17.0", tmp_path / "dl")
    (locks / "llama3.txt").write_text(header + six + "\n")
    git_pkg = {"name": "llama3-ops-demo-pkg", "url_path": "demo-pkg.git", "tag": "v0.1.0", "commit": commit}
    extra = {"tags": ["python_env"], "llama3_python_env_lock_dir": str(locks),
             "llama3_git_base_url": "http://127.0.0.1:8765",
             "llama3_python_env_index_url": "https://pypi.org/simple",
             "llama3_python_env_envs": {"llama3": {"python": "3.11", "packages": ["six==1.17.0"],
                                                   "git_packages": [git_pkg]}}}

    first = host.play("conda-guard-1", **extra)
    assert first.rc == 0, first.tail(60)
    calls = host.sh(f"cat {HOME}/conda-calls.log").splitlines()
    assert calls == ["init bash", f"create --yes --quiet --prefix {PREFIX}/envs/llama3 python=3.11 pip"], calls
    condarc = yaml.safe_load(host.sh(f"cat {HOME}/.condarc"))
    assert condarc == {"channels": ["conda-forge"], "custom_channels": {"conda-forge": TUNA},
                       "show_channel_urls": True, "channel_priority": "strict", "auto_update_conda": False}
    py = f"{PREFIX}/envs/llama3/bin/python"
    assert host.sh(f"{py} -c 'import six, llama3_ops_demo_pkg as d; print(six.__version__, d.VERSION)'").split() \
        == ["1.17.0", "0.1.0"]
    freeze = host.sh(f"{py} -m pip freeze")
    assert f"llama3-ops-demo-pkg @ git+http://127.0.0.1:8765/demo-pkg.git@{commit}" in freeze, freeze
    assert "index-url = https://pypi.org/simple" in host.sh(f"cat {HOME}/.config/pip/pip.conf")
    assert ">>> conda initialize >>>" in host.sh(f"cat {HOME}/.bashrc")

    second = host.play("conda-guard-2", **extra)
    assert second.rc == 0, second.tail(40)
    assert second.counts()["changed"] == 0, second.tail(80)
    assert host.sh(f"cat {HOME}/conda-calls.log").splitlines() == calls, "conda was called again"

    # A changed lock (one more package) re-runs pip, and only pip.
    (locks / "llama3.txt").write_text(header + six + "\n" + _pip_hash("idna==3.10", tmp_path / "dl") + "\n")
    third = host.play("conda-guard-3", **extra)
    assert third.rc == 0 and third.counts()["changed"] > 0, third.tail(40)
    assert host.sh(f"{py} -c 'import idna; print(idna.__version__)'").strip() == "3.10"
    assert host.sh(f"cat {HOME}/conda-calls.log").splitlines() == calls
    assert "update" not in " ".join(calls)
    host.sh("kill $(cat /tmp/git-http.pid)")


def test_lock_for_another_python_is_refused(conda_host: Provisioned, tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "llama3.txt").write_text("# llama3-ops-spec: sha256=x python=3.10 platform=x86_64-manylinux_2_28\n"
                                      "six==1.17.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    run = conda_host.play("conda-lock-python", tags=["python_env"], llama3_python_env_lock_dir=str(locks),
                          llama3_python_env_envs={"llama3": {"python": "3.11", "packages": ["six==1.17.0"]}})
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    assert (f"{locks}/llama3.txt was compiled for Python 3.10, but env llama3 of profile cpu uses Python 3.11"
            in " ".join(run.output.split())), run.tail(40)
