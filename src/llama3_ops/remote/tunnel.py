"""Local port forward to a service on the host: ``127.0.0.1:LP -> host 127.0.0.1:RP``.

The local port belongs to this process, not to ssh: a listener thread accepts each connection and
hands it to one OpenSSH master connection of the tunnel's own (``ssh -M -N`` with a private control
socket, independent of the shared connection :mod:`llama3_ops.remote.transport` uses) as a *stdio
forward*: what ``ssh -W host:port`` asks a master for (OpenSSH's PROTOCOL.mux, ``MUX_C_NEW_STDIO_FWD``).
The accepted socket's file descriptor itself is passed over the control socket, so ssh reads and
writes it directly: no byte of the stream goes through Python.

A watchdog restarts the master when it exits (network drop, sshd restart, killed). Meanwhile the local
port keeps accepting: new connections wait for the new master (up to ``TunnelSpec.queue_timeout``) and
then go through; only streams in flight when the master died are lost.

Binds 127.0.0.1 only, moves to the next free port when the wanted one is busy (and says so), checks
host keys strictly (no silent accept) and declares ready only once the master is up.

Detached mode runs ``python -m llama3_ops.remote.tunnel supervise STATE`` in its own session; its state
file and log live in ``~/.local/state/llama3-ops/tunnels/`` (``LLAMA3_OPS_STATE_DIR`` overrides the
root) so ``tunnel_status()``/``down()``/``live_tunnel()`` find it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.connection import HostKeyMismatchError, SSHError, SSHTarget, classify_ssh_failure
from llama3_ops.remote.ports import DEFAULT_PORT, find_free_port, port_accepts
from llama3_ops.remote.procs import stop_process
from llama3_ops.remote.transport import control_dir

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
    queue_timeout: float = 30.0  # how long a connection accepted while ssh reconnects waits for it

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TunnelSpec:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # state files of older versions had "impl"
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


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    return sock


def bind_listener(spec: TunnelSpec, say: EventSink) -> socket.socket:
    """The tunnel's local listener, bound now (a busy port is known at once, not when ssh starts)."""
    try:
        return _bind(spec.local_port)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise TunnelError(f"cannot listen on 127.0.0.1:{spec.local_port}: {exc.strerror}") from exc
    if not spec.auto_port:
        raise TunnelError(f"local port 127.0.0.1:{spec.local_port} is busy (auto_port is off)")
    port = find_free_port(spec.local_port + 1)
    say(f"local port {spec.local_port} is busy; using 127.0.0.1:{port} instead")
    return _bind(port)


# --------------------------------------------------------------------------- OpenSSH mux protocol
# PROTOCOL.mux in OpenSSH: packets are uint32 length + body; strings are uint32 length + bytes.

MUX_VERSION = 4
MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_S_SESSION_OPENED = 0x80000006


class NoMaster(OSError):
    """No master took the connection: gone, dying, or its accept backlog full. Retry soon."""


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _string(b: bytes) -> bytes:
    return _u32(len(b)) + b


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NoMaster("control socket closed")
        buf += chunk
    return buf


def _recv_packet(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    return _recv_exact(sock, length)


def _hello(ctl: socket.socket) -> None:
    ctl.sendall(_string(_u32(MUX_MSG_HELLO) + _u32(MUX_VERSION)))
    kind, version = struct.unpack(">II", _recv_packet(ctl)[:8])
    if kind != MUX_MSG_HELLO or version != MUX_VERSION:
        raise TunnelError(f"unexpected ssh mux hello (type {kind:#x}, version {version})")


def mux_connect(control_path: str, timeout: float = 5.0) -> socket.socket:
    """A control connection to the master at ``control_path``, hello exchanged."""
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.settimeout(timeout)
    try:
        ctl.connect(control_path)
        _hello(ctl)
    except (FileNotFoundError, ConnectionError, BlockingIOError) as exc:  # BlockingIOError: backlog full
        ctl.close()
        raise NoMaster(str(exc)) from exc
    except BaseException:
        ctl.close()
        raise
    return ctl


def open_stdio_forward(control_path: str, conn: socket.socket, host: str, port: int) -> socket.socket:
    """Hand ``conn`` to the master as a stdio forward to ``host:port`` (``ssh -W``).

    Returns the control connection: the forward lives as long as it stays open (the master closes it
    when the stream ends). Raises :class:`NoMaster` when no master took it (retry: soon there is one),
    :class:`TunnelError` when the master refused it (e.g. nothing listens on ``host:port``).
    """
    ctl = mux_connect(control_path)
    try:
        ctl.sendall(_string(_u32(MUX_C_NEW_STDIO_FWD) + _u32(1) + _string(b"") + _string(host.encode())
                            + _u32(port)))
        for _ in range(2):  # its stdin, then its stdout: the same socket
            socket.send_fds(ctl, [b"\0"], [conn.fileno()])
        ctl.settimeout(30)
        reply = _recv_packet(ctl)
    except ConnectionError as exc:  # a dying master: its socket was still there, then reset
        ctl.close()
        raise NoMaster(str(exc)) from exc
    except BaseException:
        ctl.close()
        raise
    (kind,) = struct.unpack(">I", reply[:4])
    if kind != MUX_S_SESSION_OPENED:
        ctl.close()
        (n,) = struct.unpack(">I", reply[8:12]) if len(reply) >= 12 else (0,)
        raise TunnelError(f"ssh refused the forward to {host}:{port}: {reply[12:12 + n].decode(errors='replace')}")
    ctl.settimeout(None)
    return ctl


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: the ssh child gets SIGTERM when its supervisor dies (no orphaned connections)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_SOCKET_SUFFIX = 17  # ssh listens on "PATH.<16 random chars>" first, then links it to PATH
_SUN_PATH_MAX = 104  # sockaddr_un.sun_path: 108 on Linux, 104 on macOS/BSD
_serial = itertools.count(1)


def _control_path() -> tuple[Path, Path | None]:
    """A control socket path of this tunnel's own, and a temp dir to remove (when one was needed)."""
    name = f"tunnel-{os.getpid()}-{next(_serial)}"
    path = control_dir() / name
    if len(str(path)) + _SOCKET_SUFFIX < _SUN_PATH_MAX:
        return path, None
    tmp = Path(tempfile.mkdtemp(prefix="l3t-"))  # mode 0700
    return tmp / name, tmp


# --------------------------------------------------------------------------- the tunnel


class Tunnel:
    """Our listener on 127.0.0.1:LP, one supervised ssh master, one stdio forward per connection."""

    def __init__(self, spec: TunnelSpec, on_event: EventSink | None = None) -> None:
        self.spec = spec
        self.local_port = spec.local_port
        self.say: EventSink = on_event or (lambda msg: print(f"[tunnel] {msg}", file=sys.stderr))
        self.reconnects: list[Reconnect] = []
        self.fatal: BaseException | None = None
        self.on_reconnect: Callable[[Reconnect], None] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=50)
        self._listener: socket.socket | None = None
        self.control_path, self._control_tmp = _control_path()
        self._up = threading.Event()  # a master is ready for forwards
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    @property
    def pid(self) -> int | None:
        """The ssh master's pid (kill it and the tunnel reconnects)."""
        return self.proc.pid if self.proc else None

    # ------------------------------------------------------------------ ssh master

    def argv(self, connect_timeout: int | None = None) -> list[str]:
        s = self.spec
        return [
            "ssh",
            # ours first: for each option OpenSSH keeps the first value, and inventories may set
            # ControlMaster/ControlPath for their own connections (extra_options)
            "-o", "ControlMaster=yes",
            "-o", f"ControlPath={self.control_path}",
            "-o", "ControlPersist=no",
            "-o", "ClearAllForwardings=yes",
            *s.target.ssh_options(),
            "-N",
            "-T",
            "-o", f"ServerAliveInterval={s.keepalive_interval}",
            "-o", f"ServerAliveCountMax={s.keepalive_count}",
            "-o", f"ConnectTimeout={connect_timeout or s.connect_timeout}",
            "-o", "TCPKeepAlive=yes",
            *(["-o", f"Ciphers={s.ciphers}"] if s.ciphers else []),
            s.target.destination,
        ]  # fmt: skip

    def _reader(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line)

    def _master_ready(self) -> bool:
        try:
            mux_connect(str(self.control_path), timeout=1.0).close()
        except (OSError, TunnelError):
            return False
        return True

    def _connect(self, first: bool) -> None:
        """Start a master and wait until its control socket answers (it listens only once logged in)."""
        self._stderr.clear()
        self.control_path.unlink(missing_ok=True)  # a killed master leaves its socket behind
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
        while not (self.control_path.exists() and self._master_ready()):
            rc = proc.poll()
            if rc is not None:
                time.sleep(0.05)  # let the reader drain stderr
                raise classify_ssh_failure(self.spec.target, "\n".join(self._stderr) or f"ssh exited with {rc}")
            if time.monotonic() > deadline or self._stopping.is_set():
                stop_process(proc, timeout=2)
                raise TunnelError(f"ssh to {self.spec.target.label} did not come up in {timeout + 5}s")
            time.sleep(0.02)
        self.proc = proc
        self._up.set()

    def _wait_dead(self) -> str:
        proc = self.proc
        if proc is None:
            return "no process"
        rc = proc.wait()
        self._up.clear()
        return f"ssh exited rc={rc}: {' | '.join(list(self._stderr)[-2:])}"

    # ------------------------------------------------------------------ local side

    def start(self, timeout: float = 30.0) -> Tunnel:
        listener = bind_listener(self.spec, self.say)
        self.local_port = int(listener.getsockname()[1])
        try:
            self._connect(first=True)
        except BaseException:
            listener.close()
            self._cleanup_control()
            raise
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="tunnel-accept", daemon=True).start()
        self._watchdog = threading.Thread(target=self._supervise, name="tunnel-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _hand_over(self, conn: socket.socket) -> socket.socket | None:
        """Give ``conn`` to the master, waiting through reconnects; None when that is not possible."""
        deadline = time.monotonic() + self.spec.queue_timeout
        while not self._stopping.is_set() and self.fatal is None:
            if not self._up.wait(max(0.0, deadline - time.monotonic())):
                return None
            if self._stopping.is_set() or self.fatal is not None:
                return None
            try:
                return open_stdio_forward(str(self.control_path), conn, self.spec.remote_host, self.spec.remote_port)
            except NoMaster:  # busy, or it just died: the watchdog notices that and starts the next one
                time.sleep(0.02)
            except (OSError, TunnelError):
                return None
        return None

    def _forward(self, conn: socket.socket) -> None:
        with conn:
            ctl = self._hand_over(conn)
        if ctl is None:
            return
        with ctl, contextlib.suppress(OSError):
            ctl.recv(1)  # the master closes the control connection when the stream ends

    # ------------------------------------------------------------------ supervision

    def _health(self) -> str:
        if not self.spec.health_path:
            return ""
        from llama3_ops.remote.health import LocalHttpProbe, check_once

        ok, detail = check_once(LocalHttpProbe(self.url), timeout=5)
        return "healthy" if ok else f"unhealthy ({detail})"

    def _reconnect(self, down_at: float) -> Reconnect | None:
        delay, attempts = 0.1, 0
        while not self._stopping.is_set():
            attempts += 1
            try:
                self._connect(first=False)
            except HostKeyMismatchError as exc:
                self.fatal = exc
                self._up.set()  # release waiting connections: they see fatal and close
                self.say(f"giving up: {exc}")
                return None
            except (TunnelError, SSHError, OSError) as exc:
                if attempts in (1, 5) or attempts % 20 == 0:
                    self.say(f"reconnect attempt {attempts} failed: {str(exc).splitlines()[0][:200]}")
                self._stopping.wait(delay)
                delay = min(delay * 2, 1.0)
                continue
            return Reconnect(down_at, time.monotonic(), attempts)
        return None

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            reason = self._wait_dead()
            if self._stopping.is_set():
                return
            down_at = time.monotonic()
            self.say(f"connection lost ({reason}); reconnecting")
            rec = self._reconnect(down_at)
            if rec is None:
                return
            rec.health = self._health()
            self.reconnects.append(rec)
            self.say(f"reconnected after {rec.seconds:.2f}s ({rec.attempts} attempt(s)); server {rec.health}")
            if self.on_reconnect:
                self.on_reconnect(rec)

    def _cleanup_control(self) -> None:
        self.control_path.unlink(missing_ok=True)
        if self._control_tmp is not None:
            with contextlib.suppress(OSError):
                self._control_tmp.rmdir()

    def stop(self) -> None:
        self._stopping.set()
        self._up.set()  # release waiting connections
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=5)
        if self._watchdog and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=10)
        self._cleanup_control()

    def __enter__(self) -> Tunnel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_tunnel(spec: TunnelSpec, on_event: EventSink | None = None) -> Tunnel:
    return Tunnel(spec, on_event)


# --------------------------------------------------------------------------- foreground


def run_foreground(spec: TunnelSpec, console: Any = None, ready: str = "") -> int:
    """Hold the tunnel until Ctrl-C, printing events; ``ready`` (``{url}`` is the tunnel's URL) is the line
    said once it is up. Returns 0, or 1 when it gave up."""
    from rich.console import Console

    con = console or Console(stderr=True)
    tun = make_tunnel(spec, on_event=lambda m: con.print(f"[yellow]tunnel:[/] {m}"))
    tun.start()
    con.print((ready or "[green]tunnel up[/]: {url}/v1 -> " + f"{spec.target.label} {spec.remote_host}:"
               f"{spec.remote_port}; Ctrl-C to close").replace("{url}", tun.url))
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
    error: str = ""
    events: list[str] = field(default_factory=list)
    reconnects: int = 0
    last_reconnect_s: float | None = None
    started: float = 0.0
    alive: bool = False
    accepting: bool = False
    state_file: str = ""

    @property
    def notices(self) -> list[str]:
        """What the user must be told (a busy local port moved to the next free one)."""
        return [e.split(" ", 1)[-1] for e in self.events if "busy" in e]

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
    say(f"ready: {tun.url} -> {spec.target.label} {spec.remote_host}:{spec.remote_port}")
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


def live_tunnel(
    name: str = "llm", *, remote_port: int | None = None, target: str | None = None, root: Path | None = None
) -> TunnelState | None:
    """The detached tunnel named ``name`` (the model server's is "llm") when it is up and accepting.

    ``remote_port`` / ``target`` (an :attr:`SSHTarget.label`): also require that it forwards to that
    port / host. None when there is no such tunnel (dead or not accepting ones do not count).
    """
    for st in tunnel_status(root):
        if st.name != name or not (st.alive and st.accepting):
            continue
        if remote_port is not None and st.remote_port != remote_port:
            continue
        if target is not None and st.target != target:
            continue
        return st
    return None


def up_or_reuse(spec: TunnelSpec, *, root: Path | None = None) -> TunnelState:
    """The live detached tunnel of ``spec.name`` to the same host and port, else a new one (:func:`up`)."""
    return live_tunnel(spec.name, remote_port=spec.remote_port, target=spec.target.label, root=root) or up(
        spec, root=root)


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
    for col in ("name", "state", "local", "remote", "pid", "reconnects", "note"):
        table.add_column(col)
    for st in states:
        ok = st.alive and st.accepting
        state = "[green]up[/]" if ok else ("[red]dead[/]" if not st.alive else "[yellow]not accepting[/]")
        table.add_row(
            st.name,
            state,
            st.url if st.local_port else "",
            f"{st.target}:{st.remote_port}",
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
