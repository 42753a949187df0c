"""Offline mode: the cpu profile from a wheelhouse and a local model, on a fresh host cut off from
everything beyond the controller, plus the wheelhouse builder and the offline refusals."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gitpkg import tagged_package_repo
from hostlab import Provisioned, slot_name
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory
from llama3_ops.provision.playbook import PlaybookRun
from llama3_ops.provision.wheelhouse import MANIFEST, WheelhouseError, build, load_profile, plan

HOME = "/home/student"
MODEL_SRC = "/srv/model-src/Meta-Llama-3-8B-Instruct"
MODEL_DIR = f"{HOME}/model/Meta-Llama-3-8B-Instruct"
WHEELS_ON_HOST = f"{HOME}/.cache/llama3-ops/wheelhouse"


def rejected_packets(net: str) -> int:
    """Packets the lab's offline rule (FreshHostLab.set_egress) has rejected for this host's subnet."""
    out = subprocess.run(["iptables", "-L", "FORWARD", "-v", "-x", "-n"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if "llama3-ops-offline" in line and net in line:
            return int(line.split()[0])
    raise AssertionError(f"no offline rule for {net} in FORWARD:\n{out}")


@dataclass
class OfflineHost:
    host: Provisioned
    wheelhouse: Path
    envs: dict[str, Any]
    net: str
    apt_refusal: PlaybookRun
    envs_after_refusal: bool
    runs: list[PlaybookRun]
    rejected_during_runs: int


@pytest.fixture(scope="module")
def offline(lab: FreshHostLab, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OfflineHost]:
    tmp = tmp_path_factory.mktemp("offline")
    # Built on this (connected) machine, as `nox -s wheelhouse -- cpu` does, from the cpu profile's
    # envs. The same envs are handed to the playbook, so an edit of profiles/cpu.yml while this
    # module runs cannot ask the host for a package the wheelhouse was built without.
    envs: dict[str, Any] = load_profile("cpu")["python_env"]["envs"]
    wheelhouse = tmp / "wheelhouse-cpu"
    build("cpu", wheelhouse, envs=envs)
    name, idx = slot_name("off", 6)
    with lab.host(name, idx) as target:
        lab.put(name, idx, tiny_model, MODEL_SRC)
        inventory = write_inventory(tmp / "inventory.yml", [target], {
            "llama3_profile": "cpu", "llama3_offline": True, "llama3_python_env_wheelhouse": str(wheelhouse),
            "llama3_python_env_envs": envs,
            "llama3_model_source": "local", "llama3_model_path": MODEL_SRC})
        host = Provisioned(lab, name, idx, target, inventory, [], tmp)
        net = lab.instance(name, idx).net
        lab.set_egress(name, idx, allowed=False)
        try:
            # A fresh image lacks the system packages, and offline mode never runs apt.
            apt_refusal = host.play("offline-no-apt")
            envs_after_refusal = host.exists(f"{HOME}/envs")
            # The image the offline host is made from: its system packages installed while connected.
            lab.set_egress(name, idx, allowed=True)
            base = host.play("online-base", tags=["base"], llama3_offline=False)
            if base.rc != 0:
                pytest.fail(f"installing the system packages failed:\n{base.tail(40)}")
            lab.set_egress(name, idx, allowed=False)
            before = rejected_packets(net)
            runs = [host.play(f"offline-run{i}") for i in (1, 2)]
            rejected = rejected_packets(net) - before
            yield OfflineHost(host, wheelhouse, envs, net, apt_refusal, envs_after_refusal, runs, rejected)
        finally:
            lab.set_egress(name, idx, allowed=True)


@pytest.mark.freshhost
@pytest.mark.slow
def test_offline_mode_refuses_to_run_apt(offline: OfflineHost) -> None:
    run = offline.apt_refusal
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    text = " ".join(run.output.split())
    assert ("Offline mode (llama3_offline=true): task 'Install the system packages' would reach the network "
            "(apt-get update and install) for git, tmux") in text
    assert "git-lfs" not in text.split("would reach the network")[1].split(".")[0], "git-lfs asked for a local model"
    assert "TASK [llama3_base : Install the system packages]" not in run.output
    assert not offline.envs_after_refusal


@pytest.mark.freshhost
@pytest.mark.slow
def test_cpu_profile_provisions_offline_and_idempotently(offline: OfflineHost) -> None:
    first, second = offline.runs
    assert first.rc == 0, first.tail(80)
    assert first.counts()["changed"] > 5
    assert second.rc == 0 and second.counts()["changed"] == 0, second.tail(80)


@pytest.mark.freshhost
@pytest.mark.slow
def test_nothing_reached_the_network(offline: OfflineHost) -> None:
    assert offline.rejected_during_runs == 0, (
        f"{offline.rejected_during_runs} packets from the host were rejected during the offline runs")
    # ... and the block is real: the same rule stops what the host does try (here, resolving PyPI's name).
    before = rejected_packets(offline.net)
    probe = offline.host.lab.ssh(offline.host.target, "getent ahosts pypi.org", check=False)
    assert probe.returncode != 0
    assert rejected_packets(offline.net) > before


def pinned(packages: list[str], name: str) -> str:
    return next(p.split("==")[1] for p in packages if re.match(rf"{name}(\[[^]]*\])?==", p))


@pytest.mark.freshhost
@pytest.mark.slow
@pytest.mark.parametrize("env", ["llama3", "lmdeploy"])
def test_envs_import_torch_and_transformers(offline: OfflineHost, env: str) -> None:
    out = offline.host.sh(f"~/envs/{env}/bin/python -c 'import torch, transformers; "
                          "print(torch.__version__, transformers.__version__)'")
    packages = offline.envs[env]["packages"]
    assert out.split() == [pinned(packages, "torch"), pinned(packages, "transformers")]


@pytest.mark.freshhost
@pytest.mark.slow
def test_env_sh_pip_conf_and_model(offline: OfflineHost) -> None:
    env_sh = offline.host.sh("cat ~/llama3-course/env.sh")
    assert "export HF_HUB_OFFLINE=1" in env_sh and "export TRANSFORMERS_OFFLINE=1" in env_sh
    pip_conf = offline.host.sh("cat ~/.config/pip/pip.conf")
    assert "no-index = true" in pip_conf and f"find-links = {WHEELS_ON_HOST}" in pip_conf
    assert json.loads(offline.host.sh("cat ~/llama3-course/host.json"))["offline"] is True
    stamp = json.loads(offline.host.sh(f"cat {HOME}/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json"))
    assert stamp["sha256_checked"] is True
    # The model loads with the hub switched off, as a stage would run it.
    out = offline.host.sh(f". ~/llama3-course/env.sh && ~/envs/llama3/bin/python -c \"from transformers import "
                          f"AutoTokenizer; print(len(AutoTokenizer.from_pretrained('{MODEL_DIR}')))\"")
    assert int(out.strip()) > 128000


@pytest.mark.freshhost
@pytest.mark.slow
def test_network_model_source_fails_in_preflight(offline: OfflineHost) -> None:
    run = offline.host.play("offline-git-lfs", llama3_model_source="git_lfs",
                            llama3_model_git_url="https://code.openxlab.org.cn/MrCat/Llama-3-8B-Instruct.git",
                            llama3_model_dir=f"{HOME}/model/other")
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    assert ("Offline mode (llama3_offline=true) needs llama3_model_source=local or symlink (a model directory on "
            "the host, llama3_model_path), not llama3_model_source=git_lfs: task 'Fetch the model' would reach "
            "the network.") in " ".join(run.output.split()), run.tail(40)
    assert "TASK [llama3_python_env" not in run.output, "failed only after installing"
    assert not offline.host.exists(f"{HOME}/model/other")


@pytest.mark.freshhost
@pytest.mark.slow
def test_offline_without_a_wheelhouse_names_the_task(offline: OfflineHost) -> None:
    run = offline.host.play("offline-no-wheels", llama3_python_env_wheelhouse="",
                            llama3_python_env_wheelhouse_dest=f"{HOME}/no-wheels-here", tags=["python_env"])
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    assert ("Offline mode (llama3_offline=true): task 'Install the environments' would reach the network"
            in " ".join(run.output.split())), run.tail(40)


# -- the wheelhouse builder, without a host ------------------------------------------------------

@pytest.mark.freshhost
@pytest.mark.slow
def test_wheelhouse_manifest_lists_every_file(offline: OfflineHost) -> None:
    manifest = json.loads((offline.wheelhouse / MANIFEST).read_text())
    files = {p.name for p in offline.wheelhouse.iterdir() if p.name != MANIFEST}
    assert set(manifest["files"]) == files
    assert any(f.startswith("torch-2.13.0+cpu-cp311") for f in files)
    assert set(manifest["envs"]) == {"llama3", "lmdeploy"}


def test_wheelhouse_bad_input(tmp_path: Path) -> None:
    with pytest.raises(WheelhouseError, match="unknown profile 'gpu-fast': one of"):
        plan("gpu-fast")
    with pytest.raises(WheelhouseError, match="profile cpu has no env nope"):
        plan("cpu", only=["nope"])
    with pytest.raises(WheelhouseError, match=r"needs a 40-hex commit, got 'v0\.1\.18'"):
        plan("cpu", envs={"x": {"python": "3.10", "packages": [],
                                "git_packages": [{"name": "xtuner", "url_path": "InternLM/xtuner.git",
                                                  "commit": "v0.1.18"}]}})
    with pytest.raises(WheelhouseError, match="has no target Python"):
        plan("cpu", envs={"x": {"packages": ["six==1.17.0"]}})
    cli = subprocess.run([sys.executable, "-m", "llama3_ops.provision.wheelhouse", "gpu-fast",
                          "--out", str(tmp_path / "w")], capture_output=True, text=True, check=False)
    assert cli.returncode == 1 and "unknown profile 'gpu-fast'" in cli.stderr


@pytest.mark.slow
@pytest.mark.network
def test_wheelhouse_builds_git_packages_from_their_commit_and_locks_by_hash(tmp_path: Path) -> None:
    """A locked env with a git package: the lock's files by hash, the git package built into a wheel."""
    _, commit = tagged_package_repo(tmp_path / "src", tmp_path / "git" / "me" / "demo.git", "demo-pkg",
                                       "demo_pkg", "0.3.1")
    # A real hash lock for the env (one pure-Python wheel), as uv pip compile writes it.
    dl = tmp_path / "dl"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "--index-url", "https://pypi.org/simple", "-d", str(dl), "six==1.17.0"], check=True)
    sha = hashlib.sha256(next(dl.glob("six-*.whl")).read_bytes()).hexdigest()
    locks = tmp_path / "locks" / "demo"
    locks.mkdir(parents=True)
    (locks / "main.txt").write_text("# llama3-ops-spec: sha256=x python=3.10 platform=x86_64-manylinux_2_28\n"
                                    f"six==1.17.0 \\\n    --hash=sha256:{sha}\n")
    envs = {"main": {"python": "3.10", "packages": ["six==1.17.0"],
                     "git_packages": [{"name": "demo-pkg", "url_path": "me/demo.git", "tag": "v0.3.1",
                                       "commit": commit}]}}
    out = tmp_path / "wh"
    # A git host on loopback (dumb HTTP), standing in for GitHub.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "git"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = build("demo", out, envs=envs, git_base=f"http://127.0.0.1:{server.server_port}",
                         locks_dir=tmp_path / "locks")
    finally:
        server.shutdown()
    names = sorted(manifest["files"])
    assert names == ["demo_pkg-0.3.1-py3-none-any.whl", "six-1.17.0-py2.py3-none-any.whl"], names
    assert manifest["files"]["six-1.17.0-py2.py3-none-any.whl"] == sha
    assert manifest["envs"]["main"]["git_packages"] == ["demo-pkg"]
