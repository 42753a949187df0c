"""run_playbook's timeout, with a fake ``ansible-playbook`` on PATH: one that prints a line, starts a
child and sleeps (a hung task), and one that prints a recap and exits."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llama3_ops.provision.playbook import PlaybookRun, PlaybookTimeout, run_playbook


def _fake_ansible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "ansible-playbook"
    exe.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # run_playbook prefers the ansible-playbook next to this interpreter: let it find none there.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-venv" / "python"))
    return exe


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_bounded(seconds: float, **kwargs: object) -> PlaybookRun | BaseException:
    """run_playbook in a thread; what it returned or raised, or a failure when it is still running."""
    result: list[PlaybookRun | BaseException] = []

    def target() -> None:
        try:
            result.append(run_playbook(**kwargs))  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the test
            result.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"run_playbook was still running {seconds} s after a timeout of {kwargs.get('timeout')} s")
    return result[0]


def test_a_hung_playbook_is_killed_with_its_children_at_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = tmp_path / "child.pid"
    _fake_ansible(tmp_path, monkeypatch, f"""\
        sleep 120 &
        echo $! > {child}
        echo "TASK [llama3_model : fetch the model] ****"
        sleep 120
        """)
    t0 = time.monotonic()
    out = _run_bounded(20, inventory=tmp_path / "inv.yml", timeout=2, log=tmp_path / "run.log")
    assert isinstance(out, PlaybookTimeout), out
    assert time.monotonic() - t0 < 12
    msg = str(out)
    assert "site.yml did not finish within 2 s" in msg
    assert "last line: TASK [llama3_model : fetch the model] ****" in msg and str(tmp_path / "run.log") in msg
    assert "fetch the model" in (tmp_path / "run.log").read_text()
    pid = int(child.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the playbook's child outlived the timeout"


def test_a_playbook_that_finishes_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_ansible(tmp_path, monkeypatch, """\
        echo "ran with: $*"
        echo "PLAY RECAP ****"
        echo "host1 : ok=5 changed=1 unreachable=0 failed=0 skipped=2"
        exit 2
        """)
    run = run_playbook(tmp_path / "inv.yml", tags=["model"], timeout=30)
    assert run.rc == 2
    assert f"ran with: -i {tmp_path / 'inv.yml'} site.yml --tags model" in run.output
    assert run.counts() == {"ok": 5, "changed": 1, "unreachable": 0, "failed": 0, "skipped": 2}
