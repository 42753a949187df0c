"""Long-running services on the course host, supervised over SSH (or locally).

A service is ``name + argv + env + cwd`` plus secrets; its *fingerprint* is a hash of all of that.
It survives the SSH session and the ``fab`` process:

* ``systemd`` mode: a user unit ``~/.config/systemd/user/llama3-<name>.service`` (linger enabled when
  allowed), output appended to the log file;
* ``setsid`` mode (no systemd, e.g. containers and this CI box): ``setsid nohup sh -c ...`` with every
  fd redirected, the wrapper writes its own pid (= process group id) and, when the server exits by
  itself, its exit status.

State on the host, under ``~/.local/state/llama3-ops/``::

    run/<name>.sh    launcher (cd, source the 0600 env file, exec argv); no secrets in it
    run/<name>.env   secrets as shell exports, mode 0600
    run/<name>.fp    fingerprint           run/<name>.json  display command, port, mode, start time
    run/<name>.pid   wrapper pid = pgid    run/<name>.exit  exit status (or "stopped")
    logs/<name>.log  stdout+stderr (previous run in <name>.log.1)

Every remote call goes through :mod:`llama3_ops.remote.transport`; secrets travel on stdin only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Literal

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.transport import Remote, RemoteCommandError, remote_home

STATE_REL = ".local/state/llama3-ops"
UNIT_PREFIX = "llama3-"
Mode = Literal["auto", "systemd", "setsid"]


# --------------------------------------------------------------------------- service spec


@dataclass(frozen=True)
class Secret:
    """An argv element taken from a secret env var at launch: ``"$NAME"`` to the shell, ``***`` in print."""

    name: str

    def __str__(self) -> str:
        return "***"


Arg = str | Secret


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: tuple[Arg, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "~"
    port: int | None = None
    # What the caller chose that the argv may not show (an engine that ignores a setting): fingerprinted,
    # so a changed setting is never silently reused, and not passed to the process.
    settings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"service name must be [A-Za-z0-9_-]+, got {self.name!r}")
        for arg in self.argv:
            if isinstance(arg, Secret) and arg.name not in self.secrets:
                raise ValueError(f"argv references secret {arg.name} that is not in secrets")

    def fingerprint(self) -> str:
        """sha256 over argv, env, cwd, port, settings and the secrets (a new API key means a restart)."""
        blob = json.dumps(
            {
                "argv": [a if isinstance(a, str) else {"secret": a.name} for a in self.argv],
                "env": sorted(self.env.items()),
                "cwd": self.cwd,
                "port": self.port,
                **({"settings": sorted(self.settings.items())} if self.settings else {}),
                "secrets": sorted(
                    (k, hashlib.sha256(v.encode()).hexdigest()) for k, v in self.secrets.items()
                ),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def display(self) -> str:
        """The command as it may be printed or logged: secrets are ``***``."""
        return " ".join(shlex.quote(a) if isinstance(a, str) else "'***'" for a in self.argv)

    def shell_exec(self) -> str:
        return "exec " + " ".join(shlex.quote(a) if isinstance(a, str) else f'"${a.name}"' for a in self.argv)

    def launcher(self) -> str:
        cwd = self.cwd
        cd = (
            '"$HOME"' + (shlex.quote(cwd[1:]) if len(cwd) > 1 else "")
            if cwd.startswith("~")
            else shlex.quote(cwd)
        )
        lines = [
            "#!/bin/sh",
            f"# llama3-ops service {self.name} fingerprint {self.fingerprint()}",
            f"cd {cd} || exit 97",
            f'[ -f "$HOME/{STATE_REL}/run/{self.name}.env" ] && . "$HOME/{STATE_REL}/run/{self.name}.env"',
        ]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        lines.append(self.shell_exec())
        return "\n".join(lines) + "\n"

    def env_file(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(self.secrets.items()))


# --------------------------------------------------------------------------- status


@dataclass
class ServiceStatus:
    name: str
    state: Literal["running", "dead", "absent"]
    mode: str = ""
    pid: int | None = None
    exit_status: str | None = None
    fingerprint: str = ""
    port: int | None = None
    listening: bool = False
    command: str = ""
    started: str = ""
    settings: dict[str, str] = field(default_factory=dict)  # what the caller chose (ServiceSpec.settings)
    log_path: str = ""
    log_tail: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.state == "running"


class ServiceError(Llama3OpsError):
    def __init__(self, message: str, log_tail: Sequence[str] = ()) -> None:
        tail = "\n".join(f"    {line}" for line in log_tail)
        super().__init__(message + (f"\n  last log lines:\n{tail}" if log_tail else ""))
        self.log_tail = list(log_tail)


class FingerprintMismatchError(ServiceError):
    pass


_PRELUDE = f"""
S="$HOME/{STATE_REL}"; R="$S/run"; L="$S/logs"
[ -n "${{XDG_RUNTIME_DIR:-}}" ] || export XDG_RUNTIME_DIR="/run/user/$(id -u)"
# does anything listen on TCP port $1? (/proc/net/tcp*: minimal hosts lack ss and netstat)
port_listening() {{
  awk -v p="$(printf '%04X' "$1")" '$4 == "0A" {{ split($2, a, ":"); if (toupper(a[2]) == p) f=1 }}
    END {{ exit !f }}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}}
# is any non-zombie process left in process group $1? (/proc only: minimal hosts may lack procps)
# (cat, not awk's own file list: mawk exits 2 without running END when a process vanishes
# between the glob and the read, which made a live group look dead)
grp_alive() {{
  cat /proc/[0-9]*/stat 2>/dev/null |
    awk -v g="$1" '{{ sub(/.*\\) /, ""); if ($3 == g && $1 != "Z") found=1 }} END {{ exit !found }}'
}}
"""

_STATUS_ONE = r"""
st_one() {
  N="$1"; echo "@@SERVICE $N"
  mode=$(cat "$R/$N.mode" 2>/dev/null || echo setsid); echo "mode=$mode"
  echo "fp=$(cat "$R/$N.fp" 2>/dev/null)"
  echo "meta=$(cat "$R/$N.json" 2>/dev/null | tr -d '\n')"
  pid=""; alive=0
  if [ "$mode" = systemd ]; then
    echo "exit=$(cat "$R/$N.exit" 2>/dev/null)"
    act=$(systemctl --user show -p ActiveState --value "llama3-$N.service" 2>/dev/null)
    pid=$(systemctl --user show -p MainPID --value "llama3-$N.service" 2>/dev/null)
    [ "$act" = active ] || [ "$act" = activating ] || [ "$act" = reloading ] && alive=1
    [ "$alive" = 1 ] || echo "exit=$(systemctl --user show -p ExecMainStatus --value "llama3-$N.service")"
    [ "$pid" = 0 ] && pid=""
  else
    pid=$(cat "$R/$N.pid" 2>/dev/null)
    [ -n "$pid" ] && grp_alive "$pid" && alive=1
    # read after the liveness check: the wrapper writes its exit file just before its group is gone,
    # so a read before the check could miss it and report a dead service with no exit status
    echo "exit=$(cat "$R/$N.exit" 2>/dev/null)"
  fi
  echo "pid=$pid"; echo "alive=$alive"
  port=$(sed -n 's/.*"port": *\([0-9][0-9]*\).*/\1/p' "$R/$N.json" 2>/dev/null)
  lis=0
  if [ -n "$port" ]; then
    port_listening "$port" && lis=1
  fi
  echo "listening=$lis"
  echo "log=$L/$N.log"
  echo "@@LOG"
  # awk 1 ends the last line: a log ending in a progress bar has no final newline, which would
  # glue @@END onto it.
  [ "$2" -gt 0 ] && tail -n "$2" "$L/$N.log" 2>/dev/null | awk 1
  echo "@@END"
}
"""


def _set_meta(st: ServiceStatus, val: str) -> None:
    if not val:
        return
    with contextlib.suppress(ValueError):
        meta = json.loads(val)
        st.command = str(meta.get("command", ""))
        st.port = meta.get("port")
        st.started = str(meta.get("started", ""))
        st.settings = {str(k): str(v) for k, v in (meta.get("settings") or {}).items()}


# key=value lines of the status script -> what they set on the ServiceStatus being read
_FIELDS: dict[str, Callable[[ServiceStatus, str], None]] = {
    "mode": lambda st, v: setattr(st, "mode", v),
    "fp": lambda st, v: setattr(st, "fingerprint", v),
    "meta": _set_meta,
    "exit": lambda st, v: setattr(st, "exit_status", v or st.exit_status or None),
    "pid": lambda st, v: setattr(st, "pid", int(v) if v.isdigit() else None),
    "listening": lambda st, v: setattr(st, "listening", v == "1"),
    "log": lambda st, v: setattr(st, "log_path", v),
}


def _parse_status(text: str) -> list[ServiceStatus]:
    """The status script's output: ``@@SERVICE name``, ``key=value`` lines, ``@@LOG`` + log lines, ``@@END``."""
    out: list[ServiceStatus] = []
    cur: ServiceStatus | None = None
    in_log = alive = False
    for line in text.splitlines():
        if line.startswith("@@SERVICE "):
            cur, in_log, alive = ServiceStatus(name=line.split(" ", 1)[1], state="absent"), False, False
        elif cur is None:
            continue
        elif line == "@@END":
            cur.state = "running" if alive else "dead" if cur.fingerprint else "absent"
            out.append(cur)
            cur = None
        elif in_log:
            cur.log_tail.append(line)
        elif line == "@@LOG":
            in_log = True
        else:
            key, _, val = line.partition("=")
            if key == "alive":
                alive = val == "1"
            elif key in _FIELDS:
                _FIELDS[key](cur, val)
    return out


def status(remote: Remote, name: str, log_lines: int = 20) -> ServiceStatus:
    script = _PRELUDE + _STATUS_ONE + f"st_one {shlex.quote(name)} {int(log_lines)}\n"
    res = remote.run(script, timeout=30)
    parsed = _parse_status(res.stdout)
    if not parsed:
        raise RemoteCommandError(remote.label, "status", res)
    return parsed[0]


def list_services(remote: Remote, log_lines: int = 0) -> list[ServiceStatus]:
    script = (
        _PRELUDE
        + _STATUS_ONE
        + f"""
for f in "$R"/*.fp; do [ -e "$f" ] || continue; n=$(basename "$f" .fp); st_one "$n" {int(log_lines)}; done
"""
    )
    return _parse_status(remote.run(script, timeout=60).stdout)


def logs(remote: Remote, name: str, lines: int = 100) -> str:
    script = _PRELUDE + f'tail -n {int(lines)} "$L/{name}.log" 2>/dev/null || true'
    return remote.run(script, timeout=60).stdout


def follow_logs(remote: Remote, name: str, lines: int = 50, out: IO[str] | None = None) -> int:
    """``tail -F`` the log until Ctrl-C (or the connection ends); returns the tail's exit code."""
    proc = remote.popen(_PRELUDE + f'exec tail -n {int(lines)} -F "$L/{name}.log"', stdout=out)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return 0


# --------------------------------------------------------------------------- start / stop


def detect_mode(remote: Remote) -> Literal["systemd", "setsid"]:
    """``systemd`` when ``systemctl --user`` answers and linger is (or can be) on, else ``setsid``."""
    script = (
        _PRELUDE
        + """
command -v systemctl >/dev/null || { echo setsid; exit 0; }
[ -d /run/systemd/system ] || { echo setsid; exit 0; }
systemctl --user show-environment >/dev/null 2>&1 || { echo setsid; exit 0; }
u=$(id -un)
if [ "$(loginctl show-user "$u" -p Linger --value 2>/dev/null)" != yes ]; then
  loginctl enable-linger "$u" >/dev/null 2>&1 || { echo setsid; exit 0; }
fi
echo systemd
"""
    )
    out = remote.run(script, timeout=30, check=False).stdout.strip().splitlines()
    return "systemd" if out and out[-1] == "systemd" else "setsid"


def _unit(spec: ServiceSpec, home: str) -> str:
    log = f"{home}/{STATE_REL}/logs/{spec.name}.log"
    return f"""[Unit]
Description=llama3-ops service {spec.name} ({spec.fingerprint()})

[Service]
Type=exec
ExecStart=/bin/sh {home}/{STATE_REL}/run/{spec.name}.sh
StandardOutput=append:{log}
StandardError=append:{log}
KillMode=control-group
TimeoutStopSec=30
Restart=no

[Install]
WantedBy=default.target
"""


def start(
    remote: Remote,
    spec: ServiceSpec,
    *,
    restart: bool = False,
    mode: Mode = "auto",
    stop_timeout: float = 20.0,
    current: ServiceStatus | None = None,
) -> tuple[ServiceStatus, bool]:
    """Start ``spec`` (or reuse it). Returns ``(status, started_now)``.

    Already running with the same fingerprint: reused, nothing restarted. Running with a different
    fingerprint: :class:`FingerprintMismatchError` unless ``restart=True`` (then stop + start).
    ``current``: the service's status, when the caller has just read it (saves a round trip).
    """
    cur = current if current is not None else status(remote, spec.name, log_lines=0)
    fp = spec.fingerprint()
    if cur.running:
        if cur.fingerprint == fp and not restart:
            return cur, False
        if not restart:
            raise FingerprintMismatchError(
                f"service {spec.name} on {remote.label} is running with other settings "
                f"(fingerprint {cur.fingerprint}, wanted {fp}; running: {cur.command}). "
                "Pass restart=True (fab serve --restart) to replace it, or stop it first."
            )
        stop(remote, spec.name, timeout=stop_timeout)
    real_mode = detect_mode(remote) if mode == "auto" else mode
    home = remote_home(remote)
    meta = json.dumps(
        {
            "command": spec.display(),
            "port": spec.port,
            "mode": real_mode,
            "fingerprint": fp,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cwd": spec.cwd,
            "settings": dict(spec.settings),
        }
    )
    n = spec.name
    common = (
        _PRELUDE
        + f"""
set -e
umask 077
mkdir -p "$R" "$L"
cat > "$R/{n}.env"
chmod 600 "$R/{n}.env"
printf '%s' {shlex.quote(spec.launcher())} > "$R/{n}.sh"
printf '%s\\n' {shlex.quote(fp)} > "$R/{n}.fp"
printf '%s\\n' {shlex.quote(meta)} > "$R/{n}.json"
printf '%s\\n' {real_mode} > "$R/{n}.mode"
rm -f "$R/{n}.exit" "$R/{n}.pid"
[ -f "$L/{n}.log" ] && mv -f "$L/{n}.log" "$L/{n}.log.1"
printf '=== llama3-ops start %s fp=%s: %s\\n' "$(date -Is)" {shlex.quote(fp)} {shlex.quote(spec.display())} \
  > "$L/{n}.log"
"""
    )
    if real_mode == "systemd":
        unit = _unit(spec, home)
        script = (
            common
            + f"""
mkdir -p "$HOME/.config/systemd/user"
printf '%s' {shlex.quote(unit)} > "$HOME/.config/systemd/user/llama3-{n}.service"
systemctl --user daemon-reload
systemctl --user reset-failed "llama3-{n}.service" 2>/dev/null || true
systemctl --user start "llama3-{n}.service"
"""
        )
    else:
        # `;` not `&&` before the background job, every fd redirected, so the ssh channel closes.
        script = (
            common
            + f"""
cd "$HOME"; setsid nohup sh -c 'echo $$ > "$0.pid"; sh "$0.sh"; echo $? > "$0.exit"' "$R/{n}" \
  >>"$L/{n}.log" 2>&1 </dev/null &
i=0; while [ ! -s "$R/{n}.pid" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
cat "$R/{n}.pid"
"""
        )
    remote.run(script, timeout=60, stdin=spec.env_file())
    return status(remote, n, log_lines=0), True


def stop(remote: Remote, name: str, *, timeout: float = 20.0, check_port: bool = True) -> ServiceStatus:
    """Stop the whole process group (or the unit), wait, and verify nothing listens on its port.

    Raises :class:`ServiceError` when a listener is still there afterwards.
    """
    n = shlex.quote(name)
    ticks = max(1, int(timeout * 10))
    script = (
        _PRELUDE
        + f"""
N={n}
mode=$(cat "$R/$N.mode" 2>/dev/null || echo setsid)
if [ "$mode" = systemd ]; then
  systemctl --user stop "llama3-$N.service" 2>/dev/null || true
else
  pid=$(cat "$R/$N.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && grp_alive "$pid"; then
    kill -TERM -"$pid" 2>/dev/null || true
    i=0; while grp_alive "$pid" && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done
    if grp_alive "$pid"; then
      echo "killing process group $pid with SIGKILL" >> "$L/$N.log"; kill -KILL -"$pid" 2>/dev/null || true
      sleep 0.3
    fi
    [ -s "$R/$N.exit" ] || echo stopped > "$R/$N.exit"
  fi
fi
printf '=== llama3-ops stop %s\\n' "$(date -Is)" >> "$L/$N.log" 2>/dev/null || true
"""
    )
    remote.run(script, timeout=timeout + 30)
    st = status(remote, name, log_lines=20)
    if st.running:
        raise ServiceError(f"service {name} on {remote.label} is still running (pid {st.pid})", st.log_tail)
    port = st.port
    if check_port and port:
        deadline = time.monotonic() + 5
        while st.listening and time.monotonic() < deadline:
            time.sleep(0.3)
            st = status(remote, name, log_lines=20)
        if st.listening:
            who = remote.run(f"ss -ltnpH 'sport = :{int(port)}' 2>/dev/null || echo '(ss not installed)'",
                             timeout=30, check=False).stdout
            raise ServiceError(
                f"service {name} stopped but something still listens on port {st.port} on {remote.label}: "
                f"{who.strip()}",
                st.log_tail,
            )
    return st


@contextlib.contextmanager
def stopped_on_failure(remote: Remote, name: str, started_now: bool,
                       on_cleanup_error: Callable[[ServiceError], None]) -> Iterator[None]:
    """Around a start-up wait: if it fails (or is interrupted) and this call started the service, stop it
    (no process, no listener left), then re-raise; a failed stop goes to ``on_cleanup_error``."""
    try:
        yield
    except BaseException:
        if started_now:
            try:
                stop(remote, name)
            except ServiceError as stop_exc:
                on_cleanup_error(stop_exc)
        raise
