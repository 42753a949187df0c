"""The host contract: host.json as the llama3_course role writes it, read once by every stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages.host import HostContractError, parse_host, read_host

GOOD = {"profile": "course", "user": "root", "course_dir": "/root/llama3-course",
        "model_dir": "/root/autodl-tmp/model/Meta-Llama-3-8B-Instruct",
        "model_stamp": "/root/autodl-tmp/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json",
        "envs": {"llama3": "/root/miniforge3/envs/llama3/bin", "lmdeploy": "/root/miniforge3/envs/lmdeploy/bin/"},
        "offline": True, "service_manager": "systemd"}


def test_a_course_host_names_its_conda_envs_and_models() -> None:
    h = parse_host("gpu1", "/root", json.dumps(GOOD))
    assert h.env_bin("lmdeploy") == "/root/miniforge3/envs/lmdeploy/bin"
    assert h.env_bin("llama3", "~/other/bin") == "/root/other/bin"  # --env wins
    assert h.model("base") == ("/root/autodl-tmp/model/Meta-Llama-3-8B-Instruct", None)
    assert h.model("merged") == ("/root/autodl-tmp/model/llama3_hf_merged", None)
    assert h.model("4bit") == ("/root/autodl-tmp/model/Meta-Llama-3-8B-Instruct_4bit", "awq")
    assert h.model("~/m") == ("/root/m", None) and h.offline and h.service_manager == "systemd"


@pytest.mark.parametrize("text, msg", [
    ("", r"gpu1 has no ~/llama3-course/host.json: it was not provisioned\. Provision it first: ansible-playbook"),
    ("{not json", r"host.json is not JSON .*provisioning rewrites it"),
    ("[1, 2]", r"is not a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k not in ("envs", "model_stamp")}),
     r"lacks model_stamp, envs \(written by an older bundle, or edited\)"),
    (json.dumps({**GOOD, "envs": ["llama3"]}), r"envs must map names to bin directories"),
    (json.dumps({**GOOD, "model_dir": ""}), r"model_dir must be a path"),
])
def test_a_stale_or_edited_host_json_is_one_clear_error(text: str, msg: str) -> None:
    with pytest.raises(HostContractError, match=msg) as err:
        parse_host("gpu1", "/root", text)
    assert "\n" not in str(err.value).split(": ", 1)[0]


def test_an_env_the_profile_lacks_names_what_it_has() -> None:
    h = parse_host("gpu1", "/root", json.dumps({**GOOD, "envs": {"llama3": "/e/bin"}}))
    with pytest.raises(HostContractError, match=r"names no 'lmdeploy' environment \(it has: llama3\).*--env"):
        h.env_bin("lmdeploy")


def test_read_host_prefers_the_config_link(tmp_path: Path) -> None:
    """The role links ~/.config/llama3-ops/host.json to the course dir's, wherever llama3_course_dir put it."""
    remote = LocalRemote(env={"HOME": str(tmp_path)})
    with pytest.raises(HostContractError, match="not provisioned"):
        read_host(remote)
    moved = tmp_path / "elsewhere" / "host.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps({**GOOD, "profile": "moved"}))
    (tmp_path / ".config" / "llama3-ops").mkdir(parents=True)
    os.symlink(moved, tmp_path / ".config" / "llama3-ops" / "host.json")
    (tmp_path / "llama3-course").mkdir()
    (tmp_path / "llama3-course" / "host.json").write_text(json.dumps(GOOD))
    h = read_host(remote)
    assert (h.profile, h.home, h.label) == ("moved", str(tmp_path), "localhost")


def test_the_lab_says_what_apt_will_install_and_upgrade() -> None:
    from llama3_ops.lab.freshhost import apt_plan

    sim = ("NOTE: This is only a simulation!\n"
           "Inst systemd [252.30-1~deb12u2] (252.38-1~deb12u1 Debian:12.15/oldstable [amd64])\n"
           "Inst mmdebstrap (1.3.5-7 Debian:12.15/oldstable [all])\n"
           "Conf mmdebstrap (1.3.5-7 Debian:12.15/oldstable [all])\n")
    assert apt_plan(sim) == (["mmdebstrap"], ["systemd 252.30-1~deb12u2 -> 252.38-1~deb12u1"])
