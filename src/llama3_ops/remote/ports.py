"""Local TCP port helpers: is it free, find the next free one, wait until something listens.

Also a /proc based listener lookup (``listening_pids``) so tests and ``down`` can prove that no
listener is left behind without needing psutil.
"""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

from llama3_ops.errors import Llama3OpsError

DEFAULT_PORT = 23333


class NoFreePortError(Llama3OpsError, RuntimeError):
    pass


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when we could bind ``host:port`` right now (SO_REUSEADDR like ssh/uvicorn do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def find_free_port(start: int = DEFAULT_PORT, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first port >= ``start`` that is free on ``host``."""
    for port in range(start, min(start + tries, 65536)):
        if is_port_free(port, host):
            return port
    raise NoFreePortError(f"no free TCP port on {host} in {start}..{start + tries - 1}")


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_accepts(
    port: int, host: str = "127.0.0.1", timeout: float = 10.0, interval: float = 0.05
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port, host, timeout=min(0.5, timeout)):
            return True
        time.sleep(interval)
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(inode)
    return inodes


def listening_pids(port: int) -> dict[int, str]:
    """pid -> command line of every local process holding a LISTEN socket on ``port``.

    A listener whose owner we cannot see (another netns, no permission) is reported as pid -1.
    """
    inodes = _listening_inodes(port)
    found: dict[int, str] = {}
    if not inodes:
        return found
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                try:
                    target = str(fd.readlink())
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found[int(pid_dir.name)] = cmd.strip()
                    break
        except OSError:
            continue
    if not found:
        found[-1] = "(listener owner not visible)"
    return found
