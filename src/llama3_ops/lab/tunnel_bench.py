"""Throughput through the tunnel vs direct: streamed chat completions at fixed concurrency.

``bench_tunnel()`` measures requests/s and streamed tokens/s against one server, once directly and
once through the tunnel (:mod:`llama3_ops.remote.tunnel`), at each concurrency.

``python -m llama3_ops.lab.tunnel_bench`` is self-contained: it runs the SSE stand-in
(:mod:`llama3_ops.lab.standin`) and a throwaway sshd on 127.0.0.1 (as the current user, its own host
key, key and known_hosts in a temp dir), then prints the table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from llama3_ops.remote.connection import SSHTarget
from llama3_ops.remote.ports import find_free_port, wait_port_accepts
from llama3_ops.remote.procs import stop_process
from llama3_ops.remote.tunnel import TunnelSpec, down, make_tunnel, up


@dataclass
class BenchRow:
    path: str  # direct | openssh | openssh[<first cipher>]
    concurrency: int
    requests: int
    ok: int
    seconds: float
    rps: float
    tok_s: float
    ttft_p50_ms: float
    tunnel_cpu_s: float = 0.0  # CPU time of the tunnel's processes (supervisor + ssh) during the run


def _tree_cpu_s(pid: int) -> float:
    """user + system CPU seconds of ``pid`` and its descendants (Linux /proc; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


@contextlib.contextmanager
def _tunnel(spec: TunnelSpec, in_process: bool) -> Iterator[tuple[str, int]]:
    """The tunnel's URL and the pid whose process tree carries it: detached (as ``fab serve
    --detach`` runs it, in a supervisor process of its own) or in this process."""
    if in_process:
        tun = make_tunnel(spec, on_event=lambda m: None).start()
        try:
            yield tun.url, int(tun.pid or 0)
        finally:
            tun.stop()
        return
    root = Path(tempfile.mkdtemp(prefix="l3-bench-tunnel-"))
    try:
        st = up(spec, root=root)
        yield st.url, st.pid
    finally:
        down(spec.name, root=root)
        shutil.rmtree(root, ignore_errors=True)


async def _one(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> tuple[int, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    t0 = time.perf_counter()
    ttft = -1.0
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for ch in chunk.get("choices", []):
                if (ch.get("delta") or {}).get("content"):
                    tokens += 1
                    if ttft < 0:
                        ttft = time.perf_counter() - t0
    return tokens, ttft


async def load(
    url: str, *, concurrency: int, requests: int, max_tokens: int, model: str
) -> tuple[int, int, float, float]:
    """``(ok requests, tokens, seconds, median ttft s)`` for ``requests`` streams at ``concurrency``."""
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300)
    results: list[tuple[int, float]] = []
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def run() -> None:
            async with sem:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    results.append(await _one(session, url, model, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(requests)))
        dt = time.perf_counter() - t0
    ok = [r for r in results if r[0] >= max_tokens]
    ttfts = sorted(r[1] for r in ok) or [0.0]
    return len(ok), sum(r[0] for r in results), dt, ttfts[len(ttfts) // 2]


def bench_tunnel(
    target: SSHTarget,
    remote_port: int,
    direct_url: str | None,
    *,
    concurrencies: Sequence[int] = (64, 256),
    requests_per_client: int = 4,
    max_tokens: int = 32,
    model: str = "standin",
    openssh_ciphers: Sequence[str] = ("",),
    in_process: bool = False,
) -> list[BenchRow]:
    """Measure direct (when ``direct_url`` is reachable from here) and through the tunnel.

    ``openssh_ciphers``: one OpenSSH run per entry (a ``Ciphers=`` list; "" = the bundle's default);
    the row's path is ``openssh`` for the default and ``openssh[<first cipher>]`` otherwise.
    ``in_process``: run the tunnel in this process (its threads then share the GIL with the load).
    """
    rows: list[BenchRow] = []
    paths: list[tuple[str, str | None, str]] = [("direct", direct_url, "")] if direct_url else []
    paths += [(f"openssh[{c.split(',')[0]}]" if c else "openssh", None, c) for c in openssh_ciphers]
    for path, direct, ciphers in paths:
        spec = TunnelSpec(
            target=target,
            remote_port=remote_port,
            local_port=find_free_port(29300),
            name="bench-tunnel",
            health_path=None,
        )
        if ciphers:
            spec.ciphers = ciphers
        with contextlib.ExitStack() as stack:
            url, pid = (direct, 0) if direct else stack.enter_context(_tunnel(spec, in_process))
            asyncio.run(load(url, concurrency=8, requests=16, max_tokens=4, model=model))  # warm-up
            for c in concurrencies:
                n = c * requests_per_client
                cpu0 = _tree_cpu_s(pid) if pid else 0.0
                ok, tokens, dt, ttft = asyncio.run(
                    load(url, concurrency=c, requests=n, max_tokens=max_tokens, model=model)
                )
                cpu = (_tree_cpu_s(pid) - cpu0) if pid else 0.0
                rows.append(
                    BenchRow(
                        path,
                        c,
                        n,
                        ok,
                        round(dt, 3),
                        round(ok / dt, 1),
                        round(tokens / dt, 1),
                        round(ttft * 1000, 1),
                        round(cpu, 2),
                    )
                )
    return rows


def ratios(rows: Sequence[BenchRow]) -> dict[str, dict[int, dict[str, float]]]:
    """tunnel / direct for rps and tok/s, per path and concurrency."""
    direct = {r.concurrency: r for r in rows if r.path == "direct"}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in rows:
        d = direct.get(r.concurrency)
        if r.path == "direct" or d is None or not d.rps:
            continue
        out.setdefault(r.path, {})[r.concurrency] = {
            "rps": round(r.rps / d.rps, 3),
            "tok_s": round(r.tok_s / d.tok_s, 3),
        }
    return out


@contextlib.contextmanager
def loopback_sshd() -> Iterator[SSHTarget]:
    """An sshd on 127.0.0.1 for the current user (no root needed), torn down afterwards."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    d = Path(tempfile.mkdtemp(prefix="l3-bench-sshd-"))
    proc = None
    try:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)  # noqa: PTH101
        port = find_free_port(22900)
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            "AllowTcpForwarding yes\nMaxStartups 500:30:1000\nMaxSessions 500\nLogLevel ERROR\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
        if not wait_port_accepts(port, timeout=10):
            raise RuntimeError("bench sshd did not start")
        kind, key = (d / "host_key.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
        yield SSHTarget(
            host="127.0.0.1",
            user=getpass.getuser(),
            port=port,
            key_file=d / "client_key",
            known_hosts=d / "known_hosts",
            name="bench-loopback",
        )
    finally:
        if proc is not None:
            stop_process(proc, timeout=10)
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from llama3_ops.lab.standin import standin_process

    ap = argparse.ArgumentParser(prog="python -m llama3_ops.lab.tunnel_bench")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tokens-per-s", type=float, default=200.0, help="stand-in rate per stream")
    ap.add_argument("--ciphers", nargs="+", default=[""],
                    help="OpenSSH Ciphers= lists to compare ('' = the bundle's default, AES-GCM first)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the tunnel in the bench's process instead of a detached supervisor")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with standin_process(tokens_per_s=args.tokens_per_s) as base, loopback_sshd() as target:
        port = int(base.rsplit(":", 1)[1])
        rows = bench_tunnel(
            target,
            port,
            base,
            concurrencies=args.concurrency,
            requests_per_client=args.requests_per_client,
            max_tokens=args.max_tokens,
            openssh_ciphers=args.ciphers,
            in_process=args.in_process,
        )
    table = Table(
        title=f"streamed chat, {args.max_tokens} tokens/request at {args.tokens_per_s:g} tok/s/stream"
    )
    for col in ("path", "concurrency", "ok/requests", "s", "req/s", "tok/s", "TTFT p50 ms", "tunnel CPU s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.path,
            str(r.concurrency),
            f"{r.ok}/{r.requests}",
            str(r.seconds),
            str(r.rps),
            str(r.tok_s),
            str(r.ttft_p50_ms),
            str(r.tunnel_cpu_s),
        )
    con = Console()
    con.print(table)
    rat = ratios(rows)
    con.print({"tunnel/direct": rat})
    if args.json:
        setup = {"tokens_per_s_per_stream": args.tokens_per_s, "max_tokens": args.max_tokens,
                 "requests_per_client": args.requests_per_client, "cpu_count": os.cpu_count(),
                 "default_ciphers": TunnelSpec.__dataclass_fields__["ciphers"].default,
                 "load_avg_at_end": os.getloadavg()}
        args.json.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows], "ratios": rat},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
