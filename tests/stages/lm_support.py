"""Test support for the chat / quantize / LLaVA stages (lmdeploy and nvidia-smi are GPU-host binaries).

* :func:`fake_env`: a bin directory laid out like the host's lmdeploy env (``python``, ``lmdeploy``,
  ``nvidia-smi``) where ``lmdeploy serve api_server`` records its argv and becomes the stand-in server
  (:mod:`llama3_ops.lab.standin`), and ``lmdeploy chat`` speaks its terminal protocol (the prompt
  ``double enter to end input >>>``, a message ends with an empty line, ``exit`` quits, Ctrl-C
  quits) and ``nvidia-smi`` answers ``--query-gpu=... --format=csv,noheader,nounits [-lms N]`` in
  the driver's own format from a JSON state file (the values below are real readings: the device
  machine's H100 and a 12 GiB consumer card). The fake chat adds its "engine" memory to GPU 0 while
  it runs, so the memory report has something to find.
* :func:`lmdeploy_python`: the interpreter of a venv with a REAL lmdeploy (0.4.1 or 0.18.0, CPU
  torch) for tests that check our commands against lmdeploy's own argparse parsers and run its real
  ``auto_awq`` on the tiny model. ``nox -s tests`` builds them (see the report's noxfile snippet);
  locally they are skipped when missing, in CI they must exist.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hostlab import env_bin, write_host_json

H100 = {"name": "NVIDIA H100 80GB HBM3", "total": 81559, "used": 0}  # the device machine, 2026-11
RTX3060 = {"name": "NVIDIA GeForce RTX 3060", "total": 12288, "used": 0}
COURSE_MIB = 16176  # what the course's nvidia-smi showed for lmdeploy chat with --cache-max-entry-count 0.01
# What the fake engine holds: drawn anew each run and never the course's figure, so a report that
# printed the course's number instead of the measured one fails.
ENGINE_MIB = random.Random().choice([m for m in range(9000, 30000, 7) if m != COURSE_MIB])

FAKE_SMI = r'''#!/usr/bin/env python3
"""nvidia-smi stand-in: the query interface only, output in nvidia-smi's csv,noheader,nounits format."""
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
state_path = os.environ.get("FAKE_NVIDIA_SMI_STATE") or os.path.join(here, "gpu-state.json")
args = sys.argv[1:]
def state():
    with open(state_path) as fh:
        return json.load(fh)
st = state()
if st.get("fail"):
    print(st["fail"]["message"]); sys.exit(st["fail"]["rc"])
query = [a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")]
fmt = [a.split("=", 1)[1] for a in args if a.startswith("--format=")]
if not query or fmt != ["csv,noheader,nounits"]:
    print("fake nvidia-smi: only --query-gpu=... --format=csv,noheader,nounits is implemented", file=sys.stderr)
    sys.exit(2)
loop_ms = int(args[args.index("-lms") + 1]) if "-lms" in args else 0
fields = query[0].split(",")
def row(i, g):
    val = {"index": str(i), "name": g["name"], "memory.total": str(g["total"]), "memory.used": str(g["used"]),
           "memory.free": str(g["total"] - g["used"]), "driver_version": "580.159.04",
           "utilization.gpu": str(g.get("util", 0))}
    return ", ".join(val[f] for f in fields)
while True:
    for i, g in enumerate(state()["gpus"]):
        print(row(i, g), flush=True)
    if not loop_ms:
        break
    time.sleep(loop_ms / 1000)
'''

FAKE_LMDEPLOY = r'''#!/usr/bin/env python3
"""`lmdeploy chat` stand-in: its terminal protocol; holds ENGINE_MIB on fake GPU 0 while it runs."""
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
state_path = os.environ.get("FAKE_NVIDIA_SMI_STATE") or os.path.join(here, "gpu-state.json")
def bump(delta):
    with open(state_path) as fh:
        st = json.load(fh)
    st["gpus"][0]["used"] += delta
    tmp = state_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(st, fh)
    os.replace(tmp, state_path)
argv = sys.argv[1:]
if argv[:2] == ["serve", "api_server"]:  # record the command line, then become the stand-in server
    with open(os.path.join(here, "api_server-argv.json"), "w") as fh:
        json.dump(argv, fh)
    opt = lambda flag: argv[argv.index(flag) + 1]
    os.execv(STANDIN_PY, [STANDIN_PY, "-m", "llama3_ops.lab.standin", "--host", opt("--server-name"),
                          "--port", opt("--server-port"), "--tokens-per-s", "2000"])
if argv[:1] != ["chat"]:
    print("fake lmdeploy: only `chat` and `serve api_server` are implemented", file=sys.stderr); sys.exit(2)
print("fake-lmdeploy argv=" + json.dumps(argv), flush=True)
print("fake-lmdeploy tty=%s" % sys.stdin.isatty(), flush=True)
bump(ENGINE_MIB)
time.sleep(1.2)  # an engine takes seconds to load: let the 500 ms sampler see it
rc = 0
try:
    while True:
        print("\ndouble enter to end input >>> ", end="", flush=True)
        try:
            prompt = "\n".join(iter(input, ""))
        except EOFError:
            break
        if prompt == "exit":
            break
        print("fake-lmdeploy answer to %r" % prompt, flush=True)
except KeyboardInterrupt:
    print("\nfake-lmdeploy interrupted", flush=True)
    rc = 130
finally:
    bump(-ENGINE_MIB)
sys.exit(rc)
'''.replace("ENGINE_MIB", str(ENGINE_MIB)).replace("STANDIN_PY", repr(sys.executable))


def write_gpus(state: Path, gpus: list[dict[str, object]] | None = None, fail: dict[str, object] | None = None) -> None:
    state.write_text(json.dumps({"gpus": gpus or [], **({"fail": fail} if fail else {})}))


def fake_env(bin_dir: Path, *, version: str = "0.18.0", gpus: list[dict[str, object]] | None = None,
             with_smi: bool = True) -> Path:
    """A host env bin dir: ``python`` (sees a ``lmdeploy-VERSION`` distribution), ``lmdeploy``, ``nvidia-smi``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    site = bin_dir.parent / "fake-site"
    dist = site / f"lmdeploy-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lmdeploy\nVersion: {version}\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nPYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}} exec python3 "$@"\n')
    (bin_dir / "lmdeploy").write_text(FAKE_LMDEPLOY)
    if with_smi:
        (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    write_gpus(bin_dir / "gpu-state.json", gpus if gpus is not None else [dict(H100)])
    return bin_dir


def fake_host(home: Path, layout: str = "venv", **kw: Any) -> Path:
    """A provisioned-looking host: the fake lmdeploy env where ``layout`` puts it, and host.json naming it."""
    bin_dir = fake_env(env_bin(home, "lmdeploy", layout), **kw)
    write_host_json(home, layout=layout)
    return bin_dir


def smi_dir(tmp: Path, gpus: list[dict[str, object]] | None = None, fail: dict[str, object] | None = None) -> Path:
    """A directory holding only the fake ``nvidia-smi`` (and its state), to put on PATH."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "nvidia-smi").write_text(FAKE_SMI)
    (tmp / "nvidia-smi").chmod(0o755)
    write_gpus(tmp / "gpu-state.json", gpus, fail)
    return tmp


def base_path() -> str:
    """A PATH with the system tools but no nvidia-smi (this machine has none anyway)."""
    return "/usr/local/bin:/usr/bin:/bin"


LMDEPLOY_VERSIONS = ("0.4.1", "0.18.0")


def lmdeploy_python(version: str) -> str:
    """The python of a venv with the real lmdeploy ``version``: ``$LLAMA3_OPS_LMDEPLOY_<0_4_1>`` or .nox/_lmdeploy-V."""
    var = "LLAMA3_OPS_LMDEPLOY_" + version.replace(".", "_")
    root = Path(__file__).resolve().parents[2]
    py = os.environ.get(var) or str(root / ".nox" / f"_lmdeploy-{version}" / "bin" / "python")
    if not Path(py).exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the lmdeploy {version} tests: nox -s tests builds {py} (or set {var})")
        pytest.skip(f"no venv with lmdeploy {version} at {py} (set {var}; nox -s tests builds it)")
    out = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('lmdeploy'))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == version, f"{py} has lmdeploy {out}, wanted {version}"
    return py


PARSE_SCRIPT = """
import contextlib, io, json, sys, warnings
warnings.simplefilter("ignore")
from lmdeploy.cli.cli import CLI
from lmdeploy.cli.lite import SubCliLite
CLI.add_parsers()
if "chat" not in CLI.subparsers.choices:  # 0.4.1 adds chat in its entry point
    CLI.add_parser_chat()
SubCliLite.add_parsers()
from lmdeploy.cli.serve import SubCliServe  # `lmdeploy serve api_server|proxy`
SubCliServe.add_parsers()
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = CLI.parser.parse_args(argv)
        out.append({"ok": True, "ns": {k: v for k, v in vars(ns).items() if k != "run"}})
    except SystemExit:
        out.append({"ok": False, "error": err.getvalue().strip().splitlines()[-1]})
print(json.dumps(out, default=str))
"""


def parse_with_lmdeploy(version: str, argvs: list[list[str]]) -> list[dict[str, Any]]:
    """Parse each ``lmdeploy ARGV`` with that version's own argparse parser (nothing runs).

    Each result is ``{"ok": True, "ns": {...}}`` or ``{"ok": False, "error": "lmdeploy: error: ..."}``.
    """
    res = subprocess.run([lmdeploy_python(version), "-c", PARSE_SCRIPT, json.dumps(argvs)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out: list[dict[str, Any]] = json.loads(res.stdout.strip().splitlines()[-1])
    return out
