"""Fixtures for the serve/tunnel tests: a real sshd on 127.0.0.1 with a throwaway user.

``ssh_target`` yields an :class:`SSHHost`: the :class:`SSHTarget`, an ``SSHRemote`` for it, a way to
run commands as root *on the host* (``root``), and where the engine and the tiny model live there.
The fresh-host fixture (systemd-nspawn guests) can later provide the same object under the same name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostlab import write_host_json
from llama3_ops.remote.connection import SSHTarget
from llama3_ops.remote.ports import find_free_port
from llama3_ops.remote.procs import stop_process
from llama3_ops.remote.transport import SSHRemote
from llama3_ops.stages import client as chat_client

VENV_BIN = str(Path(sys.executable).parent)


@dataclass
class SSHHost:
    target: SSHTarget
    remote: SSHRemote
    root: Callable[[str], subprocess.CompletedProcess[str]]  # run a shell command as root on the host
    home: str
    env_bin_dir: str  # where `transformers` lives on the host
    model_dir: str  # the tiny model on the host (= the "base" model path)
    host_key_pub: str
    sshd_pid: int
    is_loopback: bool = True  # the host shares this machine's network stack
    sshd_log: Path | None = None  # LogLevel INFO: one 'Accepted publickey' line per SSH connection

    def connections(self) -> int:
        """SSH connections the host's sshd accepted so far."""
        return self.sshd_log.read_text().count("Accepted publickey") if self.sshd_log else 0


def _root_local(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60, check=False)


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.3)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"sshd did not listen on {port}")


def _user_env(home: str, user: str) -> str:
    """A venv the throwaway user can run: the test venv's interpreter lives under /root (0700 here),
    so build one on /usr/bin/python3 (same minor version) that sees the test venv's site-packages."""
    venv = Path(home) / "miniforge3" / "envs" / "lmdeploy"  # where the course profile's conda env is
    site = next(Path(VENV_BIN).parent.glob("lib/python3.*/site-packages"))
    py = f"/usr/bin/python{site.parent.name.removeprefix('python')}"
    if not Path(py).exists():
        pytest.skip(f"{py} needed for the throwaway user's venv")
    subprocess.run([py, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    [user_site] = venv.glob("lib/python3.*/site-packages")
    (user_site / "test-venv.pth").write_text(f"{site}\n")
    exe = venv / "bin" / "transformers"
    exe.write_text(
        f"#!{venv}/bin/python\nimport sys\nfrom transformers.cli.transformers import main\nsys.exit(main())\n"
    )
    exe.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user}:{user}", str(venv.parent)], check=True)
    return str(venv / "bin")


def _kill_uid(uid: int) -> None:
    for _ in range(3):
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if p.stat().st_uid == uid:
                        pids.append(int(p.name))
                except OSError:
                    continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        time.sleep(0.3)


@pytest.fixture(scope="session")
def sshd_host(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SSHHost]:
    if os.geteuid() != 0 or (not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists()):
        pytest.skip("needs root and openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    d.chmod(0o755)
    user = "l3t" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "-m", "-p", "*", "-s", "/bin/sh", user], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(user)
        home = pw.pw_dir
        for name in ("host_key", "client_key", "other_host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        # sshd reads authorized_keys as the user: keep it in the user's home
        ssh_dir = Path(home) / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = ssh_dir / "authorized_keys"
        auth.write_text((d / "client_key.pub").read_text())
        auth.chmod(0o600)
        subprocess.run(["chown", "-R", f"{user}:{user}", str(ssh_dir)], check=True)
        port = find_free_port(22200 + os.getpid() % 500)
        config = d / "sshd_config"
        config.write_text(
            f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile .ssh/authorized_keys
StrictModes yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
AllowUsers {user}
AllowTcpForwarding yes
MaxStartups 200:30:400
MaxSessions 200
ClientAliveInterval 0
LogLevel INFO
"""
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = (d / "sshd.log").open("w")
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        _wait_port(port)
        host_pub = (d / "host_key.pub").read_text().split()
        known = d / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        # the tiny model where the course keeps the base model
        model_dir = f"{home}/model/Meta-Llama-3-8B-Instruct"
        shutil.copytree(tiny_model, model_dir)
        env_bin = _user_env(home, user)
        # what provisioning leaves: host.json naming the env (it holds `transformers serve`)
        write_host_json(Path(home), envs={"lmdeploy": env_bin, "llama3": env_bin})
        subprocess.run(["chown", "-R", f"{user}:{user}", f"{home}/model", f"{home}/llama3-course"], check=True)
        target = SSHTarget(
            host="127.0.0.1",
            user=user,
            port=port,
            key_file=d / "client_key",
            known_hosts=known,
            name="loopback-sshd",
        )
        host = SSHHost(
            target=target,
            remote=SSHRemote(target),
            root=_root_local,
            home=home,
            env_bin_dir=env_bin,
            model_dir=model_dir,
            host_key_pub=" ".join(host_pub[:2]),
            sshd_pid=proc.pid,
            sshd_log=d / "sshd.log",
        )
        yield host
    finally:
        if "proc" in locals():
            stop_process(proc, timeout=10)
        # every process left running as the throwaway user, by pid (servers, sshd session children)
        if "pw" in locals():
            _kill_uid(pw.pw_uid)
        subprocess.run(["userdel", "-r", "-f", user], capture_output=True, check=False)


@pytest.fixture(scope="session")
def ssh_target(sshd_host: SSHHost) -> SSHHost:
    """The host the serve/tunnel tests run against (loopback sshd here; fresh hosts later)."""
    return sshd_host


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Controller-side state (detached tunnels) in a temp dir instead of ~/.local/state."""
    root = tmp_path / "state"
    monkeypatch.setenv("LLAMA3_OPS_STATE_DIR", str(root))
    return root


def stream_worker(url: str, model: str, max_tokens: int, out: dict[str, object]) -> None:
    """Stream one chat completion through ``url``; record tokens seen and ok/error in ``out``."""
    n = 0
    try:
        for _ in chat_client.stream_chat(
            url, [{"role": "user", "content": "go"}], model, max_tokens=max_tokens
        ):
            n += 1
            out["tokens"] = n
        out["ok"] = n >= max_tokens - 1
    except Exception as exc:
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"


@dataclass
class KilledMidStream:
    """What :func:`kill_ssh_mid_stream` saw: the reconnect, and each in-flight stream's outcome."""

    old_pid: int
    reconnect: Any  # llama3_ops.remote.tunnel.Reconnect
    results: list[dict[str, object]]

    @property
    def lost(self) -> int:
        return sum(1 for r in self.results if not r.get("ok"))


def kill_ssh_mid_stream(tun: Any, model_id: str, events: list[str], streams: int = 3,
                        max_tokens: int = 40, reconnect_within: float = 15.0) -> KilledMidStream:
    """Start ``streams`` streamed chats through ``tun``, SIGKILL its ssh once the first has tokens,
    wait for the tunnel's reconnect and for every stream to end. Asserts that both happen."""
    results: list[dict[str, object]] = [{} for _ in range(streams)]
    threads = [threading.Thread(target=stream_worker, args=(tun.url, model_id, max_tokens, r)) for r in results]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not results[0].get("tokens") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert results[0].get("tokens"), "first stream never started"
    old = tun.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)  # the tunnel's ssh process dies mid-stream
    killed_at = time.monotonic()
    while not tun.reconnects and time.monotonic() - killed_at < reconnect_within:
        time.sleep(0.02)
    assert tun.reconnects, f"no reconnect: {events}"
    for t in threads:
        t.join(timeout=120)
    return KilledMidStream(old, tun.reconnects[0], results)
