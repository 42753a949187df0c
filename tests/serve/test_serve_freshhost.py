"""`fab serve` on a fresh host provisioned with the cpu profile: a systemd user unit serving the tiny
model with `transformers serve`, reached through the bundle's SSH tunnel from this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from hostlab import Provisioned
from llama3_ops.remote import services, transport, tunnel
from llama3_ops.remote.ports import find_free_port, is_port_free, port_accepts
from llama3_ops.remote.tunnel import Tunnel, TunnelSpec
from llama3_ops.stages import serve as srv

from .conftest import kill_ssh_mid_stream, stream_worker

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CFG = srv.ServeConfig(engine="transformers", model="base", name="llm")


LISTENERS = ("python3 -c 'import sys\nfor f in (\"/proc/net/tcp\", \"/proc/net/tcp6\"):\n"
             "  for line in open(f).read().splitlines()[1:]:\n    c = line.split()\n"
             "    if c[3] == \"0A\" and int(c[1].split(\":\")[1], 16) == 23333: print(c[1])'")


def listeners(provisioned: Provisioned) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on the host's port 23333: minimal hosts have no ss."""
    return provisioned.sh(LISTENERS).split()


def _post(url: str, body: dict[str, object]) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return bytes(resp.read())


def test_serve_as_systemd_unit_and_chat_through_the_tunnel(provisioned: Provisioned, tmp_path: Path) -> None:
    remote = transport.SSHRemote(provisioned.target)
    result = srv.serve(remote, CFG, timeout=300)
    try:
        assert result.status.mode == "systemd", "a host with systemd gets a supervised user unit"
        assert result.ready is not None and result.ready.model_id
        # The server binds the host's loopback only.
        assert listeners(provisioned) == ["0100007F:5B25"], "127.0.0.1:23333 only, never 0.0.0.0"

        root = tmp_path / "tunnels"
        state = tunnel.up(tunnel.TunnelSpec(target=provisioned.target, local_port=find_free_port(), name="t"),
                          root=root)
        try:
            models = json.loads(urllib.request.urlopen(state.url + "/v1/models", timeout=30).read())
            model_id = models["data"][0]["id"]
            reply = json.loads(_post(state.url + "/v1/chat/completions", {
                "model": model_id, "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 5}))
            assert reply["choices"][0]["message"]["role"] == "assistant"
            stream = _post(state.url + "/v1/chat/completions", {
                "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
            chunks = [line for line in stream.decode().splitlines() if line.startswith("data: {")]
            assert len(chunks) >= 2, stream[:500]

            # A second serve with the same settings reuses the server; other settings are refused.
            again = srv.serve(remote, CFG, timeout=60)
            assert not again.started_now and again.status.pid == result.status.pid
            with pytest.raises(services.FingerprintMismatchError):
                srv.serve(remote, replace(CFG, log_level="INFO"), timeout=60)
        finally:
            tunnel.down("t", root=root)
        assert is_port_free(state.local_port or 0)
    finally:
        stopped = srv.stop(remote, "llm")
    assert not stopped.running
    assert listeners(provisioned) == []


def test_fab_serve_detached_status_and_down(provisioned: Provisioned, tmp_path: Path) -> None:
    """The fabfile itself, as a user runs it, against the inventory Ansible used: status and down exactly
    as `nox -s demo -- --keep` prints them (run by a shell, from another folder)."""
    from llama3_ops.lab.demo import kept_commands

    env = {**os.environ, "LLAMA3_INVENTORY": str(provisioned.inventory), "LLAMA3_OPS_STATE_DIR": str(tmp_path)}
    fab = [str(Path(sys.executable).parent / "fab"), "--search-root", str(ROOT), "-H", provisioned.name]
    printed = {c.split(" -H ")[-1].split()[1]: c for c in kept_commands(provisioned.inventory, provisioned.name,
                                                                           provisioned.lab.base) if " -H " in c}

    def shell(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", command], env={**env, "LLAMA3_INVENTORY": ""}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, check=False)

    up = subprocess.run([*fab, "serve", "--engine", "transformers", "--detach", "--local-port", str(find_free_port())],
                        env=env, capture_output=True, text=True, timeout=600, check=False)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        assert "/docs" in up.stdout
        st = shell(printed["status"])
        assert st.returncode == 0 and "running" in st.stdout and "healthy" in st.stdout, st.stdout + st.stderr
        nosuch = subprocess.run([*fab, "stop", "--service", "nosuch"], env=env, capture_output=True, text=True,
                                timeout=120, check=False)
        assert nosuch.returncode == 1 and nosuch.stderr.strip().startswith(
            f"error: no service 'nosuch' on {provisioned.name} (services there: llm)"), nosuch.stderr
    finally:
        down = shell(printed["down"])
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped llm" in down.stdout
    assert listeners(provisioned) == []


def test_tunnel_heals_after_ssh_kill_and_network_outage(provisioned: Provisioned) -> None:
    """Real network between this machine and a fresh host: kill the tunnel's ssh mid-stream, then
    drop every packet to the host for 8 s (longer than keepalive 2 s x 2), and time the way back."""
    remote = transport.SSHRemote(provisioned.target)
    result = srv.serve(remote, CFG, timeout=300)
    assert result.ready is not None
    model_id = result.ready.model_id
    events: list[str] = []
    tun = Tunnel(TunnelSpec(target=provisioned.target, local_port=find_free_port(), name="heal"),
                        on_event=events.append)
    tun.start()
    try:
        # 1. The ssh process dies while three streams are in flight.
        killed = kill_ssh_mid_stream(tun, model_id, events)
        rec = killed.reconnect
        print(f"\n[fresh host] ssh killed -> back in {rec.seconds:.2f}s ({rec.attempts} attempt(s), server "
              f"{rec.health}); in-flight streams lost: {killed.lost}/{len(killed.results)}")
        assert rec.seconds < 5 and rec.health == "healthy"
        after: dict[str, object] = {}
        stream_worker(tun.url, model_id, 5, after)
        assert after.get("ok"), after

        # 2. A network outage: packets dropped both ways for 8 s.
        before = len(tun.reconnects)
        provisioned.lab.partition(provisioned.name, provisioned.idx, cut=True)
        try:
            time.sleep(8)
        finally:
            provisioned.lab.partition(provisioned.name, provisioned.idx, cut=False)
        back_at = time.monotonic()
        while len(tun.reconnects) == before and time.monotonic() - back_at < 30:
            time.sleep(0.02)
        assert len(tun.reconnects) > before, f"no reconnect after the outage: {events[-5:]}"
        rec = tun.reconnects[-1]
        after_back = rec.up_at - back_at
        print(f"[fresh host] 8 s outage: ssh gave up after {rec.down_at - (back_at - 8):.1f}s; tunnel back "
              f"{after_back:.2f}s after the network ({rec.attempts} attempt(s), server {rec.health})")
        assert after_back < 5, events[-5:]
        assert rec.health == "healthy"
        after = {}
        stream_worker(tun.url, model_id, 5, after)
        assert after.get("ok"), after
    finally:
        tun.stop()
        srv.stop(remote, "llm")
    assert not port_accepts(tun.local_port)
