"""``fab webdemo``: the course's Streamlit chat on the host, supervised, reached through an SSH tunnel.

Replaces the course's ``streamlit run ~/Llama3-Tutorial/tools/internstudio_web_demo.py MODEL`` in a
foreground terminal plus a hand-typed ``ssh -L``. Steps:

1. resolve ``--model`` like ``fab serve`` (``base``, ``merged``, ``4bit`` or a path on the host) and
   check on the host, before anything starts: the model directory, the env's ``streamlit``, that the
   env imports what the app needs and loads the model's tokenizer, and (``--backend api``) that the
   ``fab serve`` server answers; then that the host port is free;
2. upload the app (:mod:`llama3_ops.stages.webapp`, shipped in this package) to
   ``~/llama3-course/webdemo/``;
3. start ``streamlit run ... --server.address 127.0.0.1 --server.port 8501 --server.headless true``
   as the supervised service ``webdemo`` (:mod:`llama3_ops.remote.services`), wait for Streamlit's
   ``/_stcore/health`` on the host (a failed start is stopped again, with the last log lines);
4. open the tunnel to local 8501, or the next free port (it says so), and print the URL.

The same machinery runs the agent demo (:mod:`llama3_ops.stages.agent`): a :class:`StreamlitApp`
names the files, the remote directory and the app's own arguments.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

from rich.console import Console

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote import health, services, transport, tunnel
from llama3_ops.remote.connection import SSHError, SSHTarget
from llama3_ops.remote.files import put_package_file
from llama3_ops.remote.ports import NoFreePortError
from llama3_ops.remote.services import ServiceSpec, ServiceStatus
from llama3_ops.remote.transport import Remote
from llama3_ops.stages.host import Host, read_host
from llama3_ops.stages.options import Opt
from llama3_ops.stages.serve import API_KEY_ENV

PACKAGE = "llama3_ops.stages"
HEALTH_PATH = "/_stcore/health"
APP_ENV = "llama3"  # host.json's env with streamlit (and lagent for the agent)
BIND = "127.0.0.1"

# Where each model name comes from, for the message when it is missing.


class StageError(Llama3OpsError, RuntimeError):
    """A bad input or host state, reported as one clear message; nothing was left running."""


@dataclass(frozen=True)
class StreamlitApp:
    """A Streamlit app shipped in this package: files (the first is the script), where they go."""

    name: str  # the service name, and the tunnel's
    files: tuple[str, ...]  # paths relative to the llama3_ops.stages package
    remote_dir: str
    title: str
    imports: tuple[str, ...] = ("streamlit", "transformers", "torch")

    @property
    def script(self) -> str:
        return f"{self.remote_dir}/{PurePosixPath(self.files[0]).name}"

    def write_to(self, directory: Path) -> Path:
        """Write the app's files into ``directory`` as they are laid out on the host; the script's path."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.files:
            (directory / PurePosixPath(name).name).write_bytes(resources.files(PACKAGE).joinpath(name).read_bytes())
        return directory / PurePosixPath(self.files[0]).name

    def digest(self) -> str:
        """sha256 of the app's files: part of the service fingerprint, so new code means a restart."""
        h = hashlib.sha256()
        for name in self.files:
            h.update(name.encode() + b"\0" + resources.files(PACKAGE).joinpath(name).read_bytes())
        return h.hexdigest()[:16]


WEBDEMO_APP = StreamlitApp(
    name="webdemo",
    files=("webapp/llama3_webdemo.py", "webapp/llama3_chat.py"),
    remote_dir="~/llama3-course/webdemo",
    title="Llama3-Instruct",
)


def app_options(port: int, backend_help: str) -> tuple[Opt, ...]:
    """What fab webdemo and fab agent take (llama3_ops.stages.options)."""
    return (
        Opt("model", "base", "base | merged | 4bit | a path on the host (api backend: the served model's tokenizer)"),
        Opt("backend", "local", backend_help, choices=("local", "api")),
        Opt("port", port, "the app's port on the host's 127.0.0.1"),
        Opt("local_port", port, "the tunnel's local end (the next free port when busy, said so)"),
        Opt("api_port", 23333, "the fab serve server's port on the host (api backend)"),
        Opt("env", None, "bin directory of the env with streamlit (default: host.json's llama3 env)"),
        Opt("restart", False, "replace a running app that has other settings"),
        Opt("detach", False, "leave a background tunnel and return"),
    )


OPTIONS: tuple[Opt, ...] = (
    *app_options(8501, "local: the app loads the model; api: it talks to fab serve's server"),
    Opt("max_length", 8192, "the max-length slider's top (tokens)"),
)


@dataclass(frozen=True)
class StreamlitConfig:
    """What the user chose: the model, the backend, ports and the env holding streamlit."""

    model: str = "base"
    backend: Literal["local", "api"] = "local"
    port: int = 8501
    api_port: int = 23333  # the `fab serve` server, for --backend api
    api_key: str | None = None
    api_model: str = ""
    env_bin_dir: str | None = None  # None: host.json's llama3 env
    max_length: int = 8192
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.backend not in ("local", "api"):
            raise StageError(f"unknown backend {self.backend!r}: local (load the model) or api (the fab serve server)")
        for what, port in (("port", self.port), ("api_port", self.api_port)):
            if not 0 < port < 65536:
                raise StageError(f"bad {what} {port}")
        if self.max_length < 8:
            raise StageError(f"max_length {self.max_length} is below the slider's minimum 8")


def build_spec(app: StreamlitApp, cfg: StreamlitConfig, host: Host) -> ServiceSpec:
    """``streamlit run`` bound to the host's 127.0.0.1, with the app's arguments after ``--``."""
    cfg.validate()
    model_path, _ = host.model(cfg.model)
    bin_dir = host.env_bin(APP_ENV, cfg.env_bin_dir)
    app_args = ["--backend", cfg.backend, "--model", model_path, "--max-length", str(cfg.max_length)]
    if cfg.backend == "api":
        app_args += ["--api-url", f"http://127.0.0.1:{cfg.api_port}"]
        if cfg.api_model:
            app_args += ["--api-model", cfg.api_model]
    argv = [
        f"{bin_dir}/streamlit",
        "run",
        host.expand(app.script),
        "--server.address",
        BIND,
        "--server.port",
        str(cfg.port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button: this app is private to the tunnel
        "--",
        *app_args,
        *cfg.extra_args,
    ]
    env = {
        "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "LLAMA3_OPS_APP_DIGEST": app.digest(),
        **cfg.env,
    }
    secrets = {API_KEY_ENV: cfg.api_key} if cfg.api_key and cfg.backend == "api" else {}
    return ServiceSpec(name=app.name, argv=tuple(argv), env=env, secrets=secrets, cwd=app.remote_dir, port=cfg.port)


def _model_message(cfg: StreamlitConfig, path: str, host: Host, problem: str) -> str:
    return f"model directory {path} {problem} on {host.label}" + host.model_hint(cfg.model)


def _check_script(app: StreamlitApp, model_path: str, exe: str) -> str:
    py = str(PurePosixPath(exe).parent / "python")
    probe = (
        "import sys\n"
        f"for m in {list(app.imports)!r}:\n"
        "    try:\n"
        "        __import__(m)\n"
        "    except Exception as e:\n"
        "        print(f'{m}: {type(e).__name__}: {e}'); sys.exit(6)\n"
        "from transformers import AutoTokenizer\n"
        "try:\n"
        "    t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "except Exception as e:\n"
        "    print(f'{type(e).__name__}: {e}'); sys.exit(7)\n"
        "if not getattr(t, 'chat_template', None):\n"
        "    print('its tokenizer has no chat_template'); sys.exit(7)\n"
    )
    return (
        f"m={shlex.quote(model_path)}; e={shlex.quote(exe)}; py={shlex.quote(py)}\n"
        'if [ ! -d "$m" ]; then exit 3; fi\n'
        'if [ ! -f "$m/config.json" ]; then exit 4; fi\n'
        'if [ ! -x "$e" ]; then exit 5; fi\n'
        f'HF_HUB_OFFLINE=1 "$py" -c {shlex.quote(probe)} "$m" 2>/dev/null\n'
    )


def check_host(remote: Remote, app: StreamlitApp, cfg: StreamlitConfig, spec: ServiceSpec, host: Host) -> None:
    """Clear errors before anything starts: model, env, the model server (api backend)."""
    model_path, _ = host.model(cfg.model)
    exe = str(spec.argv[0])
    res = remote.run(_check_script(app, model_path, exe), timeout=180, check=False)
    out = res.stdout.strip().splitlines()[-1:] or [res.stderr.strip()[-300:]]
    env_dir = str(PurePosixPath(exe).parent.parent)
    if res.rc == 3:
        raise StageError(_model_message(cfg, model_path, host, "does not exist"))
    if res.rc == 4:
        raise StageError(_model_message(cfg, model_path, host, "has no config.json (not a Hugging Face model)"))
    if res.rc == 5:
        raise StageError(
            f"{exe} not found on {remote.label}: the env {env_dir} has no streamlit "
            "(provision with a profile whose llama3 env has it, or pass --env)"
        )
    if res.rc == 6:
        raise StageError(f"the env {env_dir} on {remote.label} cannot import what the app needs: {out[0]}")
    if res.rc == 7:
        raise StageError(_model_message(cfg, model_path, host, f"has no usable tokenizer ({out[0]})"))
    if res.rc != 0:
        raise StageError(f"checking the host {remote.label} failed (rc={res.rc}): {out[0]}")
    if cfg.backend == "api":
        probe = health.RemoteHttpProbe(remote, cfg.api_port, cfg.api_key)
        r = probe.request("GET", "/v1/models", timeout=10)
        if r.status != 200:
            detail = f"HTTP {r.status}" if r.status != -1 else r.body[:200]
            raise StageError(
                f"no model server answers on {remote.label} 127.0.0.1:{cfg.api_port} ({detail}): "
                "start it first with `fab serve` (or pass --api-port)"
            )


_WHO_LISTENS = r"""
p=$(printf '%04X' "$1")
ino=$(awk -v p="$p" '$4 == "0A" { split($2, a, ":"); if (toupper(a[2]) == p) { print $10; exit } }' \
  /proc/net/tcp /proc/net/tcp6 2>/dev/null)
[ -n "$ino" ] || exit 0
for d in /proc/[0-9]*; do
  if ls -l "$d/fd" 2>/dev/null | grep -q "socket:\[$ino\]"; then
    echo "pid ${d#/proc/}: $(tr '\0' ' ' < "$d/cmdline" 2>/dev/null | cut -c1-200 | sed 's/ *$//')"; exit 1
  fi
done
echo "a process of another user"; exit 1
"""


def port_user(remote: Remote, port: int) -> str | None:
    """Who listens on ``port`` on the host (``None``: nobody); /proc only, no ss needed."""
    res = remote.run(f"sh -c {shlex.quote(_WHO_LISTENS)} who {int(port)}", timeout=30, check=False)
    if res.rc == 1:
        return res.stdout.strip() or "unknown"
    return None


@dataclass
class AppResult:
    status: ServiceStatus
    started_now: bool
    command: str
    seconds: float


def wait_healthy(remote: Remote, name: str, port: int, timeout: float, console: Console) -> float:
    """Poll Streamlit's ``/_stcore/health`` on the host until it says ok; the service must stay up."""
    probe = health.RemoteHttpProbe(remote, port)
    t0 = time.monotonic()
    last = ""
    with console.status(f"waiting for Streamlit on {remote.label} 127.0.0.1:{port}{HEALTH_PATH}") as spin:
        while True:
            st = services.status(remote, name, log_lines=30)
            if not st.running:
                raise health.ServiceDiedError(
                    f"{name} exited during start-up (exit status {st.exit_status or 'unknown'})", st.log_tail
                )
            r = probe.request("GET", HEALTH_PATH, timeout=5)
            if r.status == 200:
                return time.monotonic() - t0
            last = f"HTTP {r.status}" if r.status != -1 else r.body[:120]
            spin.update(f"waiting for Streamlit on {remote.label} 127.0.0.1:{port}{HEALTH_PATH} ({last})")
            if time.monotonic() - t0 > timeout:
                raise health.NotReadyError(f"{name} not healthy after {timeout:.0f}s (last: {last})", st.log_tail)
            time.sleep(1.0)


def start_app(
    remote: Remote,
    app: StreamlitApp,
    cfg: StreamlitConfig,
    *,
    restart: bool = False,
    timeout: float = 180.0,
    console: Console | None = None,
    mode: services.Mode = "auto",
) -> AppResult:
    """Check, upload, start (or reuse) and wait for the app; a failed start leaves nothing running."""
    console = console or Console(stderr=True)
    host = read_host(remote)
    spec = build_spec(app, cfg, host)
    with console.status(f"checking {remote.label}: model, env, ports"):
        check_host(remote, app, cfg, spec, host)
        cur = services.status(remote, app.name, log_lines=0)
        same = cur.running and cur.fingerprint == spec.fingerprint()
        if cur.running and not same and not restart:
            raise services.FingerprintMismatchError(
                f"{app.name} already runs on {remote.label} with other settings ({cur.command}); "
                "pass --restart to replace it, or stop it first (fab stop --service "
                f"{app.name})"
            )
        if not cur.running:
            who = port_user(remote, cfg.port)
            if who:
                raise StageError(
                    f"port {cfg.port} on {remote.label} is already in use ({who}): stop that process or "
                    "choose another port (--port)"
                )
    console.print(f"[bold]{app.name}[/] on {remote.label}: {spec.display()}")
    if not same:
        for name in app.files:
            put_package_file(remote, PACKAGE, name, f"{app.remote_dir}/{PurePosixPath(name).name}")
    st, started_now = services.start(remote, spec, restart=restart, mode=mode)
    console.print(
        f"{'started' if started_now else 'already running with the same settings, reused'}: "
        f"pid {st.pid} ({st.mode}), log {st.log_path}"
    )
    with services.stopped_on_failure(remote, app.name, started_now, lambda e: console.print(
            f"cleanup after the failed start also failed: {e}", style="red", markup=False)):
        seconds = wait_healthy(remote, app.name, cfg.port, timeout, console)
    console.print(f"[green]healthy[/] after {seconds:.1f}s")
    return AppResult(st, started_now, spec.display(), seconds)


ERRORS: tuple[type[BaseException], ...] = (
    StageError,
    NoFreePortError,
    subprocess.TimeoutExpired,
    services.ServiceError,
    transport.RemoteCommandError,
    health.NotReadyError,
    tunnel.TunnelError,
    SSHError,
)


def tunnel_spec(app: StreamlitApp, target: SSHTarget, cfg: StreamlitConfig, local_port: int) -> tunnel.TunnelSpec:
    # Streamlit has no /health (it answers any path with its page): no post-reconnect probe.
    return tunnel.TunnelSpec(target=target, remote_port=cfg.port, local_port=local_port, name=app.name,
                             health_path=None)


def open_tunnel(
    spec: tunnel.TunnelSpec,
    *,
    detach: bool,
    console: Console,
    host: str,
    title: str,
) -> int:
    """Open the tunnel and print the URL: detached (returns), or in the foreground until Ctrl-C."""
    if detach:
        state = tunnel.up(spec)
        for notice in state.notices:
            console.print(f"tunnel: {notice}", style="yellow", markup=False)
        console.print(f"[green]{title}[/]: open {state.url}  (stop: fab -H {host} stop --service {spec.name}; "
                      f"fab -H {host} down)")
        return 0
    return tunnel.run_foreground(spec, console, ready=f"[green]{title}[/]: open {{url}}  (Ctrl-C closes the tunnel; "
                                 f"the app keeps running: fab -H {host} stop --service {spec.name})")


def run_stage(
    remote: transport.SSHRemote,
    app: StreamlitApp,
    cfg: StreamlitConfig,
    *,
    local_port: int,
    detach: bool = False,
    restart: bool = False,
    host: str = "",
    console: Console | None = None,
) -> int:
    """What ``fab webdemo`` / ``fab agent`` do: start the app, open the tunnel, print the URL (exit code)."""
    console = console or Console()
    try:
        start_app(remote, app, cfg, restart=restart, console=console)
        return open_tunnel(tunnel_spec(app, remote.target, cfg, local_port), detach=detach, console=console,
                           host=host or remote.label, title=app.title)
    except ERRORS as exc:
        console.print(f"error: {exc}", style="red", markup=False, highlight=False)
        return 1


def webdemo(
    remote: transport.SSHRemote,
    cfg: StreamlitConfig,
    *,
    local_port: int = 8501,
    detach: bool = False,
    restart: bool = False,
    host: str = "",
    console: Console | None = None,
) -> int:
    """``fab webdemo``: the chat app with ``cfg.model`` (local) or the ``fab serve`` server (api)."""
    return run_stage(remote, WEBDEMO_APP, cfg, local_port=local_port, detach=detach, restart=restart, host=host,
                     console=console)
