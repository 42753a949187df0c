"""Running scripts on a host: over SSH (one shared connection per host) or on this machine.

Every remote call is one ``sh -c`` script with a timeout; secrets travel on stdin only.

:class:`SSHRemote` uses OpenSSH connection sharing, as Ansible does (``ansible.cfg``): the first
call opens a master connection (``ControlMaster=auto``) that stays up ``ControlPersist`` seconds
after the last call, and every later call to the same host runs as a new session on it, without a
TCP connect, key exchange or authentication. Host keys are still checked strictly when the master
connects. The sockets live in :func:`control_dir` (mode 0700).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.connection import SSHTarget, classify_ssh_failure

CONTROL_DIR_ENV = "LLAMA3_OPS_SSH_CONTROL_DIR"
CONTROL_PERSIST = "60s"


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str


class RemoteCommandError(Llama3OpsError):
    def __init__(self, label: str, script: str, result: CommandResult) -> None:
        first = script.strip().splitlines()[0] if script.strip() else ""
        super().__init__(
            f"command on {label} failed (rc={result.rc}): {first[:120]}\n{result.stderr.strip()[-2000:]}"
        )
        self.result = result


class Remote(Protocol):
    """Where services run: a host over SSH, or this machine ("local", for the GPU device run)."""

    label: str

    def run(
        self, script: str, *, timeout: float = 60.0, check: bool = True, stdin: str | None = None
    ) -> CommandResult: ...

    def popen(self, script: str, *, stdout: IO[str] | None = None) -> subprocess.Popen[str]: ...


class LocalRemote:
    """Run scripts with ``sh -c`` on this machine."""

    label = "localhost"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else None

    def _env(self) -> dict[str, str] | None:
        if self.env is None:
            return None
        return {**os.environ, **self.env}

    def run(
        self, script: str, *, timeout: float = 60.0, check: bool = True, stdin: str | None = None
    ) -> CommandResult:
        proc = subprocess.run(
            ["sh", "-c", script],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(),
            check=False,
        )
        res = CommandResult(proc.returncode, proc.stdout, proc.stderr)
        if check and res.rc != 0:
            raise RemoteCommandError(self.label, script, res)
        return res

    def popen(self, script: str, *, stdout: IO[str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["sh", "-c", script], stdout=stdout, stdin=subprocess.DEVNULL, text=True, env=self._env()
        )


# A unix socket path holds at most 107 bytes; the name is "/" + 24 hex, and ssh adds "." + 16 random characters.
_SOCKET_ROOM = 107 - 42


def control_dir() -> Path:
    """Where the shared connections' sockets live (``$LLAMA3_OPS_SSH_CONTROL_DIR``, default
    ``~/.cache/llama3-ops/ssh``), created with mode 0700. Where that path is too long for a unix
    socket, ``/tmp/llama3-ops-UID`` (refused unless it is ours and private)."""
    d = Path(os.environ.get(CONTROL_DIR_ENV) or Path.home() / ".cache" / "llama3-ops" / "ssh")
    if len(os.fsencode(d)) > _SOCKET_ROOM:
        d = Path(f"/tmp/llama3-ops-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise Llama3OpsError(f"{d} (the SSH connection sockets' folder) must be yours and private (chmod 700 {d})")
    return d


def control_path(target: SSHTarget) -> Path:
    """The shared connection's socket for ``target``: one per everything that decides whom ssh talks to and
    how it checks them (user, host, port, jump, key, known_hosts, options), so a connection opened with
    one known_hosts file is never reused by a call that names another (its host key is checked anew)."""
    key = json.dumps({**target.to_dict(), "name": ""}, sort_keys=True)
    return control_dir() / hashlib.sha256(key.encode()).hexdigest()[:24]


def control_options(target: SSHTarget, persist: str = CONTROL_PERSIST) -> list[str]:
    """OpenSSH options that share one connection per :func:`control_path`."""
    return [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={control_path(target)}",
        "-o", f"ControlPersist={persist}",
    ]  # fmt: skip


def close_shared(target: SSHTarget) -> None:
    """Close the shared connection to ``target`` (``ssh -O exit``); nothing when there is none."""
    subprocess.run(
        ["ssh", *target.ssh_options(), *control_options(target), "-O", "exit", target.destination],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip


class SSHRemote:
    """Run scripts on an :class:`SSHTarget` with the system ``ssh`` (strict host keys, BatchMode),
    sharing one connection per host (``share=False``: a new connection per call)."""

    def __init__(self, target: SSHTarget, connect_timeout: int = 10, share: bool = True) -> None:
        self.target = target
        self.label = target.label
        self.connect_timeout = connect_timeout
        self.share = share

    def argv(self, script: str) -> list[str]:
        return [
            "ssh",
            *self.target.ssh_options(),
            *(control_options(self.target) if self.share else []),
            "-o",
            f"ConnectTimeout={self.connect_timeout}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-T",
            self.target.destination,
            "sh -c " + shlex.quote(script),
        ]

    def run(
        self, script: str, *, timeout: float = 60.0, check: bool = True, stdin: str | None = None
    ) -> CommandResult:
        proc = subprocess.run(
            self.argv(script),
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        res = CommandResult(proc.returncode, proc.stdout, proc.stderr)
        if res.rc == 255:
            raise classify_ssh_failure(self.target, proc.stderr)
        if check and res.rc != 0:
            raise RemoteCommandError(self.label, script, res)
        return res

    def popen(self, script: str, *, stdout: IO[str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(script), stdout=stdout, stdin=subprocess.DEVNULL, text=True)


def remote_home(remote: Remote) -> str:
    return remote.run('printf %s "$HOME"', timeout=30).stdout.strip()
