"""Cold and warm provisioning time of the cpu profile on a fresh host: ``nox -s bench_provision``.

Boots a fresh host, runs site.yml cold, then warm (must report changed=0), and writes JSON with
the wall times, the recap counts and the machine it ran on. Not a timed test: a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from llama3_ops.lab.checkpoint import make_checkpoint
from llama3_ops.lab.freshhost import FreshHostLab, write_inventory
from llama3_ops.lab.lfsrepo import publish
from llama3_ops.provision.playbook import ROOT, run_playbook

FIXTURE = "/srv/llama3-fixtures/Meta-Llama-3-8B-Instruct.git"
NAME, IDX = "pbench", 2


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warm-runs", type=int, default=2)
    args = ap.parse_args(argv)
    work = ROOT / ".fresh-hosts" / "bench-work"
    work.mkdir(parents=True, exist_ok=True)
    lab = FreshHostLab(ROOT / ".fresh-hosts")
    lab.build()
    model = work / "tiny-model"
    if not (model / "config.json").exists():
        make_checkpoint(model, "tiny")
    repo = work / "model.git"
    publish(model, repo)
    runs: list[dict[str, object]] = []
    with lab.host(NAME, IDX) as target:
        lab.put(NAME, IDX, repo, FIXTURE)
        inv = write_inventory(work / "inventory.yml", [target],
                              {"llama3_profile": "cpu", "llama3_model_git_url": f"file://{FIXTURE}"})
        for i in range(1 + args.warm_runs):
            kind = "cold" if i == 0 else "warm"
            run = run_playbook(inv, log=work / f"run{i}.log")
            print(f"{kind}: {run.seconds:.1f}s {run.counts()}", flush=True)
            if run.rc != 0:
                print(run.tail(40), file=sys.stderr)
                return 1
            runs.append({"kind": kind, "seconds": round(run.seconds, 2), **run.counts()})
    result = {
        "benchmark": "provision cpu profile on a fresh host",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "controller": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "host": "fresh Debian bookworm (mmdebstrap rootfs, systemd-nspawn --boot, own netns, real SSH)",
        "commit": _git_commit(),
        "runs": runs,
        "warm_target": "changed=0 within 30 s",
        "warm_met": all(r["changed"] == 0 and float(str(r["seconds"])) <= 30 for r in runs[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["warm_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
