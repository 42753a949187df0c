"""Local port forward to the model server on the host: ``127.0.0.1:LP -> host 127.0.0.1:RP``.

Two implementations with one interface (:class:`Tunnel`):

* :class:`OpenSSHTunnel` (default): ``ssh -N -L 127.0.0.1:LP:127.0.0.1:RP -o ExitOnForwardFailure=yes
  -o ServerAliveInterval=... -o ServerAliveCountMax=...`` supervised by a watchdog thread that restarts
  it when it exits (network drop, sshd restart, killed).
* :class:`ParamikoTunnel`: we bind the local socket ourselves *before* connecting (so a busy port fails
  at once, unlike Fabric's ``forward_local`` which binds in a thread and only raises at block exit) and
  open one ``direct-tcpip`` channel per accepted connection; a heartbeat detects dead peers.

Both bind 127.0.0.1 only, move to the next free port when the wanted one is busy (and say so), declare
ready only once the local listener accepts, check host keys strictly (no silent accept) and reconnect.

Detached mode runs ``python -m llama3_ops.remote.tunnel supervise STATE`` in its own session; its state file and
log live in ``~/.local/state/llama3-ops/tunnels/`` (``LLAMA3_OPS_STATE_DIR`` overrides the root) so
``tunnel_status()``/``down()`` find it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.connection import HostKeyMismatchError, SSHError, SSHTarget, classify_ssh_failure
from llama3_ops.remote.ports import DEFAULT_PORT, find_free_port, is_port_free, port_accepts
from llama3_ops.remote.procs import stop_process

Impl = Literal["openssh", "paramiko"]
EventSink = Callable[[str], None]


def state_root() -> Path:
    env = os.environ.get("LLAMA3_OPS_STATE_DIR")
    return Path(env) if env else Path.home() / ".local" / "state" / "llama3-ops"


def tunnels_dir(root: Path | None = None) -> Path:
    return (root or state_root()) / "tunnels"


class TunnelError(Llama3OpsError, RuntimeError):
    pass


@dataclass
class TunnelSpec:
    target: SSHTarget
    remote_port: int = DEFAULT_PORT
    local_port: int = DEFAULT_PORT
    remote_host: str = "127.0.0.1"
    impl: Impl = "openssh"
    name: str = "llm"
    auto_port: bool = True  # busy local port -> next free one (said via the event sink)
    keepalive_interval: int = 2
    keepalive_count: int = 2
    connect_timeout: int = 5
    # Reconnect attempts give up sooner and retry: a TCP connect started while the network was
    # down waits for SYN retransmits (1 s, 3 s, 7 s), so a short timeout + a new attempt gets back
    # within ~1-2 s of the network returning instead of up to connect_timeout.
    reconnect_timeout: int = 2
    # AES-GCM first: hardware AES (x86 AES-NI, ARMv8 crypto) makes it cheaper per byte than
    # OpenSSH's default chacha20-poly1305; chacha20 stays as the fallback for hosts without it.
    ciphers: str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"
    health_path: str | None = "/health"  # re-checked after each reconnect; None: don't

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TunnelSpec:
        d = dict(d)
        d["target"] = SSHTarget.from_dict(d["target"])
        return cls(**d)


@dataclass
class Reconnect:
    down_at: float
    up_at: float
    attempts: int
    health: str = ""

    @property
    def seconds(self) -> float:
        return self.up_at - self.down_at


def _pick_port(spec: TunnelSpec, say: EventSink) -> int:
    if is_port_free(spec.local_port):
        return spec.local_port
    if not spec.auto_port:
        raise TunnelError(f"local port 127.0.0.1:{spec.local_port} is busy (auto_port is off)")
    port = find_free_port(spec.local_port + 1)
    say(f"local port {spec.local_port} is busy; using 127.0.0.1:{port} instead")
    return port


class Tunnel:
    """Common supervision: start -> ready; watchdog -> reconnect + health re-check; stop."""

    def __init__(self, spec: TunnelSpec, on_event: EventSink | None = None) -> None:
        self.spec = spec
        self.local_port = spec.local_port
        self.say: EventSink = on_event or (lambda msg: print(f"[tunnel] {msg}", file=sys.stderr))
        self.reconnects: list[Reconnect] = []
        self.fatal: BaseException | None = None
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.on_reconnect: Callable[[Reconnect], None] | None = None

    # subclass API
    def _connect(self, first: bool) -> None:
        raise NotImplementedError

    def _wait_dead(self) -> str:
        """Block until the current connection is gone (or stopping); return a reason."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def start(self, timeout: float = 30.0) -> Tunnel:
        self.local_port = _pick_port(self.spec, self.say)
        self._connect(first=True)
        self._watchdog = threading.Thread(target=self._supervise, name="tunnel-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def _health(self) -> str:
        if not self.spec.health_path:
            return ""
        from llama3_ops.remote.health import LocalHttpProbe, check_once

        ok, detail = check_once(LocalHttpProbe(self.url), timeout=5)
        return "healthy" if ok else f"unhealthy ({detail})"

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            reason = self._wait_dead()
            if self._stopping.is_set():
                return
            down_at = time.monotonic()
            self.say(f"connection lost ({reason}); reconnecting")
            delay, attempts = 0.1, 0
            while not self._stopping.is_set():
                attempts += 1
                try:
                    self._connect(first=False)
                except HostKeyMismatchError as exc:
                    self.fatal = exc
                    self.say(f"giving up: {exc}")
                    return
                except (TunnelError, SSHError, OSError) as exc:
                    if attempts in (1, 5) or attempts % 20 == 0:
                        self.say(f"reconnect attempt {attempts} failed: {str(exc).splitlines()[0][:200]}")
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                rec = Reconnect(down_at, time.monotonic(), attempts)
                rec.health = self._health()
                self.reconnects.append(rec)
                self.say(f"reconnected after {rec.seconds:.2f}s ({attempts} attempt(s)); server {rec.health}")
                if self.on_reconnect:
                    self.on_reconnect(rec)
                break

    def stop(self) -> None:
        self._stopping.set()
        self._close()
        if self._watchdog and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=10)
        deadline = time.monotonic() + 5
        while port_accepts(self.local_port, timeout=0.2) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Tunnel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- OpenSSH


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: the ssh child gets SIGTERM when its supervisor dies (no orphaned forwards)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class OpenSSHTunnel(Tunnel):
    def __init__(self, spec: TunnelSpec, on_event: EventSink | None = None) -> None:
        super().__init__(spec, on_event)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=50)

    def argv(self, connect_timeout: int | None = None) -> list[str]:
        s = self.spec
        return [
            "ssh",
            *s.target.ssh_options(),
            "-N",
            "-T",
            "-o", "ExitOnForwardFailure=yes",
            "-o", f"ServerAliveInterval={s.keepalive_interval}",
            "-o", f"ServerAliveCountMax={s.keepalive_count}",
            "-o", f"ConnectTimeout={connect_timeout or s.connect_timeout}",
            "-o", "TCPKeepAlive=yes",
            *(["-o", f"Ciphers={s.ciphers}"] if s.ciphers else []),
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-o", "ClearAllForwardings=no",
            "-L", f"127.0.0.1:{self.local_port}:{s.remote_host}:{s.remote_port}",
            s.target.destination,
        ]  # fmt: skip

    def _reader(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line)

    def _connect(self, first: bool) -> None:
        self._stderr.clear()
        timeout = self.spec.connect_timeout if first else self.spec.reconnect_timeout
        proc = subprocess.Popen(
            self.argv(timeout),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
        )
        threading.Thread(target=self._reader, args=(proc,), daemon=True).start()
        deadline = time.monotonic() + timeout + 5
        while True:
            rc = proc.poll()
            if rc is not None:
                time.sleep(0.05)  # let the reader drain stderr
                err = "\n".join(self._stderr)
                if "Address already in use" in err or "cannot listen to port" in err:
                    raise TunnelError(f"local port 127.0.0.1:{self.local_port} is busy: {err[-300:]}")
                raise classify_ssh_failure(self.spec.target, err or f"ssh exited with {rc}")
            if port_accepts(self.local_port, timeout=0.2):
                break
            if time.monotonic() > deadline or self._stopping.is_set():
                proc.kill()
                proc.wait()
                raise TunnelError(f"ssh -L did not open 127.0.0.1:{self.local_port} in time")
            time.sleep(0.03)
        self.proc = proc

    def _wait_dead(self) -> str:
        proc = self.proc
        if proc is None:
            return "no process"
        rc = proc.wait()
        return f"ssh exited rc={rc}: {' | '.join(list(self._stderr)[-2:])}"

    def _close(self) -> None:
        proc = self.proc
        if proc and proc.poll() is None:
            stop_process(proc, timeout=5)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


# --------------------------------------------------------------------------- Paramiko


class ParamikoTunnel(Tunnel):
    """Own accept loop + one ``direct-tcpip`` channel per connection over one Paramiko transport."""

    def __init__(self, spec: TunnelSpec, on_event: EventSink | None = None) -> None:
        super().__init__(spec, on_event)
        self.client: Any = None
        self._listener: socket.socket | None = None
        self._up = threading.Event()
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()

    def start(self, timeout: float = 30.0) -> Tunnel:
        port = _pick_port(self.spec, self.say)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))  # bound now: a busy port raises here, not later
        except OSError as exc:
            sock.close()
            raise TunnelError(f"cannot bind 127.0.0.1:{port}: {exc}") from exc
        sock.listen(1024)
        self._listener = sock
        self.local_port = port
        try:
            self._connect(first=True)
        except BaseException:
            sock.close()
            raise
        threading.Thread(target=self._accept_loop, name="tunnel-accept", daemon=True).start()
        self._watchdog = threading.Thread(target=self._supervise, name="tunnel-watchdog", daemon=True)
        self._watchdog.start()
        if not port_accepts(self.local_port, timeout=2):
            raise TunnelError(f"listener on 127.0.0.1:{self.local_port} does not accept")
        return self

    def _connect(self, first: bool) -> None:
        import paramiko

        t = self.spec.target
        if t.jump:
            raise TunnelError("the paramiko tunnel does not support jump hosts; use impl='openssh'")
        client = paramiko.SSHClient()
        for kh in t.known_hosts_files():
            client.load_host_keys(str(kh))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        hostport = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
        kh_label = str(t.known_hosts or "~/.ssh/known_hosts")
        try:
            client.connect(
                t.host,
                port=t.port,
                username=t.user,
                key_filename=str(t.key_file) if t.key_file else None,
                look_for_keys=t.key_file is None,
                allow_agent=t.key_file is None,
                timeout=self.spec.connect_timeout,
                banner_timeout=self.spec.connect_timeout,
                auth_timeout=self.spec.connect_timeout,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatchError(
                f"host key for {hostport} does not match known_hosts {kh_label}: refusing to connect"
            ) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyMismatchError(
                    f"host key for {hostport} is not in known_hosts {kh_label}: refusing to connect"
                ) from exc
            raise SSHError(f"ssh to {t.label} failed: {exc}") from exc
        except OSError as exc:
            client.close()
            raise SSHError(f"ssh to {t.label} failed: {exc}") from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(self.spec.keepalive_interval)
        with self._lock:
            old, self.client = self.client, client
            self._last_beat = time.monotonic()
        if old is not None:
            old.close()
        self._up.set()
        threading.Thread(target=self._heartbeat, args=(client,), daemon=True).start()

    def _heartbeat(self, client: Any) -> None:
        """Answered keepalives; the watchdog closes a transport whose peer stopped answering."""
        transport = client.get_transport()
        while transport is not None and transport.is_active() and not self._stopping.is_set():
            with contextlib.suppress(Exception):
                # returns on any reply (OpenSSH answers "failure") or when the transport dies
                transport.global_request("keepalive@openssh.com", wait=True)
                if transport.is_active():
                    self._last_beat = time.monotonic()
            self._stopping.wait(self.spec.keepalive_interval)

    def _wait_dead(self) -> str:
        limit = self.spec.keepalive_interval * (self.spec.keepalive_count + 1)
        while not self._stopping.is_set():
            client = self.client
            transport = client.get_transport() if client else None
            if transport is None or not transport.is_active():
                self._up.clear()
                return "transport closed"
            if time.monotonic() - self._last_beat > limit:
                self._up.clear()
                client.close()
                return f"no keepalive answer for {limit}s"
            self._stopping.wait(0.05)
        return "stopping"

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, addr), daemon=True).start()

    def _handle(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        chan = None
        try:
            # during a reconnect, new connections wait (up to 15 s) instead of being refused
            for _ in range(3):
                if not self._up.wait(15) or self._stopping.is_set():
                    return
                client = self.client
                transport = client.get_transport() if client else None
                try:
                    if transport is None:
                        raise EOFError
                    chan = transport.open_channel(
                        "direct-tcpip", (self.spec.remote_host, self.spec.remote_port), addr, timeout=10
                    )
                    break
                except Exception:
                    self._up.clear() if transport is None or not transport.is_active() else None
                    time.sleep(0.1)
            if chan is None:
                return
            while True:
                r, _, _ = select.select([conn, chan], [], [], 1.0)
                if self._stopping.is_set():
                    return
                if conn in r:
                    data = conn.recv(65536)
                    if not data:
                        chan.shutdown_write()
                        # drain the rest of the answer
                        while True:
                            d = chan.recv(65536)
                            if not d:
                                return
                            conn.sendall(d)
                    chan.sendall(data)
                if chan in r:
                    data = chan.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
        except OSError:
            return
        except Exception:
            return
        finally:
            if chan is not None:
                chan.close()
            conn.close()

    def _close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        self._up.set()  # release waiters
        if self.client is not None:
            self.client.close()


def make_tunnel(spec: TunnelSpec, on_event: EventSink | None = None) -> Tunnel:
    return (OpenSSHTunnel if spec.impl == "openssh" else ParamikoTunnel)(spec, on_event)


# --------------------------------------------------------------------------- foreground


def run_foreground(spec: TunnelSpec, console: Any = None) -> int:
    """Hold the tunnel until Ctrl-C, printing events. Returns 0, or 1 when it gave up."""
    from rich.console import Console

    con = console or Console(stderr=True)
    tun = make_tunnel(spec, on_event=lambda m: con.print(f"[yellow]tunnel:[/] {m}"))
    tun.start()
    con.print(
        f"[green]tunnel up[/]: {tun.url}/v1 -> {spec.target.label} {spec.remote_host}:{spec.remote_port} "
        f"({spec.impl}); Ctrl-C to close"
    )
    try:
        while tun.fatal is None:
            time.sleep(0.5)
        con.print(f"[red]tunnel failed:[/] {tun.fatal}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        tun.stop()
        con.print("tunnel closed")


# --------------------------------------------------------------------------- detached


@dataclass
class TunnelState:
    name: str
    pid: int
    status: str  # starting | ready | failed | stopped
    local_port: int | None = None
    remote_port: int | None = None
    target: str = ""
    impl: str = ""
    error: str = ""
    events: list[str] = field(default_factory=list)
    reconnects: int = 0
    last_reconnect_s: float | None = None
    started: float = 0.0
    alive: bool = False
    accepting: bool = False
    state_file: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"


def _write_state(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _is_our_supervisor(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    return b"llama3_ops.remote.tunnel" in cmd and b"supervise" in cmd


def _supervise_main(state_path: Path) -> int:
    data = json.loads(state_path.read_text())
    spec = TunnelSpec.from_dict(data["spec"])
    events: deque[str] = deque(maxlen=20)
    state: dict[str, Any] = {**data, "pid": os.getpid(), "status": "starting", "events": []}

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        events.append(line)
        state["events"] = list(events)
        with contextlib.suppress(OSError):
            _write_state(state_path, state)

    tun = make_tunnel(spec, on_event=say)
    stop_evt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_evt.set())
    signal.signal(signal.SIGINT, lambda *_: stop_evt.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def on_reconnect(rec: Reconnect) -> None:
        state["reconnects"] = len(tun.reconnects)
        state["last_reconnect_s"] = round(rec.seconds, 3)
        _write_state(state_path, state)

    tun.on_reconnect = on_reconnect
    try:
        tun.start()
    except Exception as exc:
        state.update(status="failed", error=str(exc))
        _write_state(state_path, state)
        return 1
    state.update(status="ready", local_port=tun.local_port, started=time.time())
    _write_state(state_path, state)
    say(f"ready: {tun.url} -> {spec.target.label} {spec.remote_host}:{spec.remote_port} ({spec.impl})")
    while not stop_evt.wait(0.5):
        if tun.fatal is not None:
            state.update(status="failed", error=str(tun.fatal))
            _write_state(state_path, state)
            tun.stop()
            return 1
    tun.stop()
    state.update(status="stopped")
    _write_state(state_path, state)
    return 0


def up(spec: TunnelSpec, *, root: Path | None = None, timeout: float = 30.0) -> TunnelState:
    """Start a detached supervisor (survives this process); wait until its forward is ready."""
    d = tunnels_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    state_path = d / f"{spec.name}.json"
    existing = _read(state_path)
    if existing and existing.alive:
        if existing.status == "ready" and existing.remote_port == spec.remote_port:
            return existing
        raise TunnelError(f"tunnel {spec.name} already running (pid {existing.pid}); `down` it first")
    _write_state(state_path, {"spec": spec.to_dict(), "name": spec.name, "status": "starting", "pid": 0})
    log = (d / f"{spec.name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama3_ops.remote.tunnel", "supervise", str(state_path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _read(state_path)
        if st and st.status == "ready" and st.accepting:
            return st
        if (st and st.status == "failed") or proc.poll() is not None:
            proc.wait(timeout=5)
            st = _read(state_path)
            msg = st.error if st else "supervisor exited"
            tail = (d / f"{spec.name}.log").read_text(errors="replace").splitlines()[-10:]
            state_path.unlink(missing_ok=True)
            raise (HostKeyMismatchError if "host key" in msg else TunnelError)(
                msg + ("\n" + "\n".join(tail) if tail and not msg else "")
            )
        time.sleep(0.05)
    _kill_supervisor(proc.pid)
    state_path.unlink(missing_ok=True)
    raise TunnelError(f"tunnel {spec.name} not ready after {timeout}s; see {d / f'{spec.name}.log'}")


def _read(path: Path) -> TunnelState | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    spec = data.get("spec", {})
    pid = int(data.get("pid") or 0)
    st = TunnelState(
        name=str(data.get("name", path.stem)),
        pid=pid,
        status=str(data.get("status", "?")),
        local_port=data.get("local_port"),
        remote_port=spec.get("remote_port"),
        target=SSHTarget.from_dict(spec["target"]).label if spec.get("target") else "",
        impl=str(spec.get("impl", "")),
        error=str(data.get("error", "")),
        events=list(data.get("events", [])),
        reconnects=int(data.get("reconnects", 0)),
        last_reconnect_s=data.get("last_reconnect_s"),
        started=float(data.get("started") or 0),
        state_file=str(path),
    )
    st.alive = pid > 0 and _is_our_supervisor(pid)
    st.accepting = bool(st.local_port) and port_accepts(int(st.local_port or 0), timeout=0.3)
    return st


def tunnel_status(root: Path | None = None) -> list[TunnelState]:
    d = tunnels_dir(root)
    out = []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        st = _read(path)
        if st:
            out.append(st)
    return out


def _kill_supervisor(pid: int, timeout: float = 8.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_our_supervisor(pid):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    # the supervisor leads its own session: take the whole group (ssh child included)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(name: str | None = None, *, root: Path | None = None) -> list[str]:
    """Stop detached tunnel(s) (all when ``name`` is None); verify their local ports are closed."""
    msgs = []
    for st in tunnel_status(root):
        if name and st.name != name:
            continue
        if st.alive:
            _kill_supervisor(st.pid)
        port = st.local_port
        if port:
            deadline = time.monotonic() + 5
            while port_accepts(int(port), timeout=0.2) and time.monotonic() < deadline:
                time.sleep(0.05)
            if port_accepts(int(port), timeout=0.2):
                raise TunnelError(f"tunnel {st.name} stopped but 127.0.0.1:{port} still accepts connections")
        Path(st.state_file).unlink(missing_ok=True)
        msgs.append(f"tunnel {st.name} (pid {st.pid}, 127.0.0.1:{port}) down")
    return msgs


def print_tunnels(states: list[TunnelState], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tunnels on this machine")
    for col in ("name", "state", "local", "remote", "impl", "pid", "reconnects", "note"):
        table.add_column(col)
    for st in states:
        ok = st.alive and st.accepting
        state = "[green]up[/]" if ok else ("[red]dead[/]" if not st.alive else "[yellow]not accepting[/]")
        table.add_row(
            st.name,
            state,
            st.url if st.local_port else "",
            f"{st.target}:{st.remote_port}",
            st.impl,
            str(st.pid),
            str(st.reconnects),
            (st.error or (st.events[-1] if st.events else ""))[:80],
        )
    (console or Console()).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama3_ops.remote.tunnel")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("supervise", help="internal: run a detached tunnel from its state file")
    sp.add_argument("state_file", type=Path)
    sub.add_parser("status")
    dp = sub.add_parser("down")
    dp.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    if args.cmd == "supervise":
        return _supervise_main(args.state_file)
    if args.cmd == "status":
        print_tunnels(tunnel_status())
        return 0
    for msg in down(args.name):
        print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
