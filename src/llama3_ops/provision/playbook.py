"""Run the bundle's playbooks from Python: used by the demo, the tests and the benchmarks.

Users run ``ansible-playbook -i INVENTORY site.yml`` themselves; this wrapper adds what the
automation needs: the recap parsed into numbers, the wall time, the full log kept on disk, and a
timeout: ansible-playbook runs in its own process group (it and the ssh and module processes it
starts), which is killed whole when the timeout passes (:class:`PlaybookTimeout`) or the caller is
interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llama3_ops.errors import Llama3OpsError

ROOT = Path(__file__).resolve().parents[3]
RECAP_RE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)
# After SIGTERM, how long the process group gets to exit before SIGKILL.
TERM_GRACE_S = 5.0


class PlaybookTimeout(Llama3OpsError):
    """ansible-playbook ran past its timeout and was killed, with every process it had started."""


@dataclass
class PlaybookRun:
    rc: int
    seconds: float
    output: str
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def counts(self, host: str | None = None) -> dict[str, int]:
        if host is None:
            if len(self.recap) != 1:
                raise ValueError(f"recap has {len(self.recap)} hosts; name one")
            return next(iter(self.recap.values()))
        return self.recap[host]

    @property
    def changed(self) -> int:
        return sum(c.get("changed", 0) for c in self.recap.values())

    @property
    def failed(self) -> int:
        return sum(c.get("failed", 0) + c.get("unreachable", 0) for c in self.recap.values())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    section = output.rsplit("PLAY RECAP", 1)
    if len(section) != 2:
        return recap
    for m in RECAP_RE.finditer(section[1]):
        recap[m.group("host")] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group("counts"))}
    return recap


def run_playbook(
    inventory: Path,
    playbook: str = "site.yml",
    extra_vars: dict[str, object] | None = None,
    tags: list[str] | None = None,
    check: bool = False,
    limit: str | None = None,
    log: Path | None = None,
    echo: bool = False,
    timeout: float = 1800,
) -> PlaybookRun:
    """Run ``ansible-playbook`` from the bundle root and return its parsed result."""
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / "ansible-playbook"
    argv = [str(exe) if exe.exists() else "ansible-playbook", "-i", str(inventory), playbook]
    if extra_vars:
        argv += ["-e", json.dumps(extra_vars)]
    if tags:
        argv += ["--tags", ",".join(tags)]
    if check:
        argv += ["--check", "--diff"]
    if limit:
        argv += ["--limit", limit]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_NOCOLOR": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    chunks: list[str] = []
    reader = _start_reader(proc, chunks.append, echo)
    try:
        rc = _wait(proc, reader, t0 + timeout)
    except BaseException:  # the timeout, or Ctrl-C: ansible is in its own session and would not see it
        kill_group(proc)
        reader.join(TERM_GRACE_S)
        out = "".join(chunks)
        _write_log(log, out)
        if time.monotonic() - t0 < timeout:
            raise
        last = out.strip().splitlines()[-1] if out.strip() else "(no output)"
        where = f"; log: {log}" if log else ""
        raise PlaybookTimeout(
            f"{playbook} did not finish within {timeout:.0f} s: killed ansible-playbook and the processes "
            f"it started; last line: {last}{where} (find the task that hangs, or pass a longer timeout)"
        ) from None
    out = "".join(chunks)
    _write_log(log, out)
    return PlaybookRun(rc=rc, seconds=time.monotonic() - t0, output=out, recap=parse_recap(out))


def _start_reader(proc: subprocess.Popen[str], sink: Callable[[str], None], echo: bool) -> threading.Thread:
    """Read the playbook's output in a thread, so the wait for it can time out."""

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sink(line)
            if echo:
                sys.stdout.write(line)

    t = threading.Thread(target=read, name="ansible-playbook-output", daemon=True)
    t.start()
    return t


def _wait(proc: subprocess.Popen[str], reader: threading.Thread, deadline: float) -> int:
    """The exit status once the process has exited and its output is read; TimeoutExpired at ``deadline``."""
    rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    reader.join(max(0.0, deadline - time.monotonic()))  # a child may hold the pipe open after it exits
    if reader.is_alive():
        raise subprocess.TimeoutExpired(proc.args, 0)
    return rc


def kill_group(proc: subprocess.Popen[str], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the process group of ``proc`` (its own session), SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM and not _group_alive(proc.pid):
            break
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _write_log(log: Path | None, text: str) -> None:
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
