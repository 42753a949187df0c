"""One SSH connection per host: the transport shares it (ControlMaster), counted at the real sshd."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from llama3_ops.remote import transport
from llama3_ops.remote.ports import find_free_port
from llama3_ops.remote.transport import SSHRemote
from llama3_ops.stages import serve

from .conftest import SSHHost

pytestmark = pytest.mark.sshd


def _count(host: SSHHost, call: object) -> tuple[int, float]:
    before = host.connections()
    t0 = time.monotonic()
    call()  # type: ignore[operator]
    seconds = time.monotonic() - t0
    time.sleep(0.3)  # sshd logs the accept before the session; let the last line land
    return host.connections() - before, seconds


def test_status_and_serve_reuse_open_one_connection(ssh_target: SSHHost, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(transport.CONTROL_DIR_ENV, tempfile.mkdtemp(prefix="l3ctl", dir="/tmp"))
    cfg = serve.ServeConfig(engine="transformers", port=find_free_port(26700), name="share")
    serve.serve(ssh_target.remote, cfg, timeout=300)  # started once; what follows is the reuse path
    figures = {}
    try:
        for share in (False, True):
            transport.close_shared(ssh_target.target)
            remote = SSHRemote(ssh_target.target, share=share)
            figures[f"status share={share}"] = _count(ssh_target, lambda r=remote: serve.report_status(r))
            figures[f"serve reuse share={share}"] = _count(ssh_target, lambda r=remote: serve.serve(r, cfg))
    finally:
        serve.stop(ssh_target.remote, "share")
        transport.close_shared(ssh_target.target)
    print(json.dumps({k: {"connections": n, "seconds": round(s, 3)} for k, (n, s) in figures.items()}))
    assert figures["status share=True"][0] == 1 and figures["serve reuse share=True"][0] <= 1
    # without sharing every remote call is a connection of its own: the count the sharing removes
    assert figures["status share=False"][0] > 1 and figures["serve reuse share=False"][0] > 3


def test_a_wrong_host_key_is_refused_on_a_shared_connection(ssh_target: SSHHost, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharing keeps strict host-key checking: the master is checked, and no socket is left to reuse."""
    from dataclasses import replace

    from llama3_ops.remote.connection import HostKeyMismatchError

    ctl = Path(tempfile.mkdtemp(prefix="l3ctl", dir="/tmp"))
    monkeypatch.setenv(transport.CONTROL_DIR_ENV, str(ctl))
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{ssh_target.target.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    good = SSHRemote(ssh_target.target)
    good.run("true")  # a shared connection is up for this user, host and port...
    bad = SSHRemote(replace(ssh_target.target, known_hosts=wrong))
    with pytest.raises(HostKeyMismatchError, match="does not match known_hosts"):
        bad.run("true")  # ...and a call that names another known_hosts file does not ride on it
    assert [p.name for p in ctl.iterdir()] == [transport.control_path(ssh_target.target).name]
    transport.close_shared(ssh_target.target)


def test_a_long_home_falls_back_to_a_private_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(transport.CONTROL_DIR_ENV, str(tmp_path / ("x" * 60)))
    d = transport.control_dir()
    assert str(d) == f"/tmp/llama3-ops-{__import__('os').getuid()}" and d.stat().st_mode & 0o077 == 0
