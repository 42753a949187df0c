"""Run the bundle's playbooks from Python: used by the demo, the tests and the benchmarks.

Users run ``ansible-playbook -i INVENTORY site.yml`` themselves; this wrapper adds what the
automation needs: the recap parsed into numbers, the wall time, and the full log kept on disk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RECAP_RE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)


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
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chunks: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        chunks.append(line)
        if echo:
            sys.stdout.write(line)
    rc = proc.wait(timeout=timeout)
    out = "".join(chunks)
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    return PlaybookRun(rc=rc, seconds=time.monotonic() - t0, output=out, recap=parse_recap(out))
