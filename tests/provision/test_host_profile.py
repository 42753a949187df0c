"""The host profile on a fresh host whose system Python already has torch, as GPU cloud images ship it.

The stand-in for the image's CUDA torch is the CPU torch 2.13.0 wheel (PIP_FIND_LINKS), installed into
the guest's system Python with ``pip install --break-system-packages``. lmdeploy 0.18.0 allows torch
<= 2.12.1, so the profile's own range rejects it (the realistic negative case); the positive runs widen
the range to include 2.13 (llama3_preflight_host_torch_spec) and turn off the GPU requirement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostlab import Provisioned, slot_name
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory
from llama3_ops.provision.playbook import PlaybookRun

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]

HOME = "/home/student"
MODEL_SRC = "/srv/model-src/Meta-Llama-3-8B-Instruct"
WHEELS = "/srv/image-wheels"
SYSTEM_TORCH = "/usr/local/lib/python3.11/dist-packages/torch"
NO_GPU = {"llama3_require_gpu": False, "llama3_preflight_host_torch_require_cuda": False}
WIDE = ">=2.0.0,<2.14"


def torch_wheel() -> Path:
    for d in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split():
        found = sorted(Path(d).glob("torch-2.13.0+cpu-cp311-*.whl"))
        if found:
            return found[0]
    pytest.skip("no torch-2.13.0+cpu cp311 wheel in PIP_FIND_LINKS")


@dataclass
class HostTorch:
    host: Provisioned
    out_of_range: PlaybookRun
    envs_after_refusal: bool
    runs: list[PlaybookRun]


@pytest.fixture(scope="module")
def hosttorch(lab: FreshHostLab, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostTorch]:
    tmp = tmp_path_factory.mktemp("hosttorch")
    wheel = torch_wheel()
    name, idx = slot_name("htorch", 2)
    with lab.host(name, idx) as target:
        lab.put(name, idx, tiny_model, MODEL_SRC)
        lab.put(name, idx, wheel, f"{WHEELS}/{wheel.name}")
        # The image: pip and torch in the system Python (torch's own requirements from PyPI).
        lab.ssh(target, "sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "
                        "python3-pip >/dev/null", timeout=600)
        lab.ssh(target, f"sudo python3 -m pip install -q --break-system-packages {WHEELS}/{wheel.name}", timeout=600)
        inventory = write_inventory(tmp / "inventory.yml", [target], {
            "llama3_profile": "host", **NO_GPU,
            "llama3_model_source": "local", "llama3_model_path": MODEL_SRC})
        host = Provisioned(lab, name, idx, target, inventory, [], tmp)
        refusal = host.play("host-default-range")
        envs_after_refusal = host.exists(f"{HOME}/envs")
        runs = [host.play(f"host-run{i}", llama3_preflight_host_torch_spec=WIDE) for i in (1, 2)]
        yield HostTorch(host, refusal, envs_after_refusal, runs)


def one_line(run: PlaybookRun) -> str:
    return " ".join(run.output.split())


def test_default_range_refuses_torch_2_13_before_installing(hosttorch: HostTorch) -> None:
    run = hosttorch.out_of_range
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(40)
    assert (f"The host's torch 2.13.0+cpu ({SYSTEM_TORCH}) on htorch{hosttorch.host.idx} is outside "
            "torch>=2.0.0,<=2.12.1, the range profile 'host' allows (host_torch.spec: lmdeploy 0.18.0's "
            "requirement): use an image whose torch is in that range, or a profile that installs its own torch "
            "(-e llama3_profile=current).") in one_line(run), run.tail(40)
    assert "TASK [llama3_python_env" not in run.output
    assert not hosttorch.envs_after_refusal


def test_preflight_reports_the_host_torch(hosttorch: HostTorch) -> None:
    text = one_line(hosttorch.runs[0])
    assert (f"host torch: torch 2.13.0+cpu (CUDA none, a CPU build) at {SYSTEM_TORCH}; GPU: none visible "
            "(torch.cuda.is_available() is False); Python 3.11.") in text, hosttorch.runs[0].tail(60)


def test_host_profile_provisions_idempotently(hosttorch: HostTorch) -> None:
    first, second = hosttorch.runs
    assert first.rc == 0, first.tail(80)
    assert second.rc == 0 and second.counts()["changed"] == 0, second.tail(80)
    # No apt: the profile asks for no system packages, and a local model needs no git-lfs.
    assert "TASK [llama3_base : Install the system packages]" in first.output
    assert "Would install" not in first.output
    assert hosttorch.host.sh("command -v git-lfs || echo none").strip() == "none"


@pytest.mark.parametrize("env", ["llama3", "lmdeploy"])
def test_envs_import_the_hosts_torch_not_a_copy(hosttorch: HostTorch, env: str) -> None:
    h = hosttorch.host
    out = h.sh(f"~/envs/{env}/bin/python -c 'import torch, transformers; print(torch.__file__); "
               "print(torch.__version__, transformers.__version__, transformers.__file__)'").splitlines()
    assert out[0] == f"{SYSTEM_TORCH}/__init__.py"
    version, tf_version, tf_file = out[1].split()
    assert version == "2.13.0+cpu"
    # The host has no transformers: the env's own 5.24.0 (the profile's pin), inside the venv.
    assert tf_version == "5.24.0" and tf_file.startswith(f"{HOME}/envs/{env}/")
    site = h.sh(f"ls ~/envs/{env}/lib/python3.11/site-packages").split()
    assert not [d for d in site if d.lower().startswith(("torch", "nvidia", "triton"))], site
    cfg = h.sh(f"cat ~/envs/{env}/pyvenv.cfg")
    assert "include-system-site-packages = true" in cfg


def test_lmdeploy_installed_without_its_torch_requirement(hosttorch: HostTorch) -> None:
    h = hosttorch.host
    py = "~/envs/lmdeploy/bin/python"
    assert h.sh(f"{py} -c 'import importlib.metadata as m; print(m.version(\"lmdeploy\"))'").strip() == "0.18.0"
    # lmdeploy's own CLI parsers (what the stages drive) import and parse an api_server command line.
    script = ("import json; from lmdeploy.cli.cli import CLI; from lmdeploy.cli.serve import SubCliServe; "
              "CLI.add_parsers(); SubCliServe.add_parsers(); "
              "ns = CLI.parser.parse_args(['serve', 'api_server', '/m', '--backend', 'pytorch', "
              "'--server-port', '23333']); "
              "print(json.dumps({'backend': ns.backend, 'port': ns.server_port}))")
    assert json.loads(h.sh(f"{py} -c \"{script}\"").splitlines()[-1]) == {"backend": "pytorch", "port": 23333}
    assert "serve" in h.sh("~/envs/lmdeploy/bin/lmdeploy --help")
    assert h.sh(f"{py} -c 'import xgrammar, fastapi, uvicorn, openai, mmengine; print(1)'").strip() == "1"


def test_constraints_pin_the_hosts_torch_for_pip_by_hand(hosttorch: HostTorch) -> None:
    h = hosttorch.host
    pins = h.sh("grep -v '^#' ~/.cache/llama3-ops/requirements/host-constraints.txt").split()
    assert pins == ["torch==2.13.0+cpu"], pins
    assert "constraint = " in h.sh("cat ~/.config/pip/pip.conf")
    # The venv's pip is the host's, and it refuses to replace torch.
    assert "/usr/lib/python3/dist-packages/pip" in h.sh("~/envs/lmdeploy/bin/pip --version")
    res = h.lab.ssh(h.target, "~/envs/lmdeploy/bin/pip install --dry-run --no-deps 'torch==2.12.0' 2>&1", check=False)
    assert res.returncode != 0 and "torch==2.13.0+cpu" in res.stdout, res.stdout[-2000:]


def test_torch_that_does_not_import_fails_in_preflight(hosttorch: HostTorch) -> None:
    h = hosttorch.host
    # A Python without site-packages (-S) stands in for an image without torch.
    h.sh("printf '#!/bin/sh\\nexec /usr/bin/python3 -S \"$@\"\\n' > ~/py-nosite && chmod +x ~/py-nosite")
    run = h.play("host-no-torch", llama3_preflight_host_python=f"{HOME}/py-nosite", tags=["preflight"])
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(30)
    assert (f"torch does not import in {HOME}/py-nosite on htorch{h.idx} (ModuleNotFoundError: No module named "
            "'torch'), and profile 'host' adopts the host's own torch: use an image with torch installed in that "
            "Python, or a profile that installs its own (-e llama3_profile=current).") in one_line(run), run.tail(30)


def test_only_names_envs_of_the_profile(hosttorch: HostTorch) -> None:
    run = hosttorch.host.play("host-only-bad", llama3_python_env_only=["lmdeploy", "vllm"], tags=["python_env"])
    assert run.rc != 0 and run.counts()["failed"] == 1, run.tail(30)
    assert ("llama3_python_env_only names vllm, but profile 'host' has the envs llama3, lmdeploy: name some of those, "
            "or leave it empty for all.") in one_line(run), run.tail(30)
