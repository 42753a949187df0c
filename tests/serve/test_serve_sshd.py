"""Integration: the tiny model served by a real `transformers serve`, started over a real sshd
(setsid path, no systemd here), reached through real SSH tunnels.

On the loopback sshd the tunnel's local port and the server's port share one network stack, so the
server listens on its own free port (never 23333) and every port is a parameter.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from llama3_ops.remote import health, services, transport, tunnel
from llama3_ops.remote.connection import HostKeyMismatchError
from llama3_ops.remote.ports import find_free_port, listening_pids, port_accepts
from llama3_ops.remote.tunnel import Tunnel, TunnelSpec
from llama3_ops.stages import client as chat_client
from llama3_ops.stages import serve

from .conftest import SSHHost, kill_ssh_mid_stream, stream_worker

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


@dataclass
class Served:
    cfg: serve.ServeConfig
    result: serve.ServeResult
    model_id: str


def _listening_remote(host: SSHHost, port: int) -> str:
    """What listens on ``port`` on the host (as root there): empty when nothing."""
    return host.root(f"ss -ltnH 'sport = :{port}'").stdout.strip()


def _group_alive(host: SSHHost, pgid: int) -> bool:
    out = host.root(
        f'awk -v g={pgid} \'{{ sub(/.*\\) /, ""); if ($3 == g && $1 != "Z") f=1 }} END {{ exit !f }}\' '
        "/proc/[0-9]*/stat 2>/dev/null"
    )
    return out.returncode == 0


@pytest.fixture(scope="module")
def served(ssh_target: SSHHost) -> Iterator[Served]:
    port = find_free_port(24100 + os.getpid() % 500)
    cfg = serve.ServeConfig(
        engine="transformers",
        model="base",
        port=port,
        env_bin_dir=ssh_target.env_bin_dir,
        log_level="info",
        name="llm",
    )
    res = serve.serve(ssh_target.remote, cfg, timeout=240)
    assert res.started_now and res.ready is not None
    # warmed on the host before "ready" (transformers serve: one request), through the shared connection
    assert res.warmup is not None and res.warmup.waves == [{"ok": 1, "failed": 0, "seconds": pytest.approx(
        res.warmup.waves[0]["seconds"])}]
    assert res.tuning is None  # the CPU engine has no engine settings to choose
    yield Served(cfg, res, res.ready.model_id)
    st = services.stop(ssh_target.remote, "llm")
    assert not st.running
    assert _listening_remote(ssh_target, port) == ""


def _tunnel_spec(host: SSHHost, served: Served, **kw: object) -> TunnelSpec:
    base: dict[str, object] = {
        "target": host.target,
        "remote_port": served.cfg.port,
        "local_port": find_free_port(27300 + os.getpid() % 300),
    }
    base.update(kw)
    return TunnelSpec(**base)  # type: ignore[arg-type]


def test_serve_health_chat_and_stream_through_tunnel(ssh_target: SSHHost, served: Served) -> None:
    st = services.status(ssh_target.remote, "llm")
    assert st.running and st.mode == "setsid" and st.listening
    assert st.port == served.cfg.port
    # bound to 127.0.0.1 on the host only
    assert f"127.0.0.1:{served.cfg.port}" in _listening_remote(ssh_target, served.cfg.port)
    # same settings again: reused, not restarted
    again = serve.serve(ssh_target.remote, served.cfg, timeout=60)
    assert not again.started_now and again.status.pid == st.pid
    # other settings: refused without restart=True
    with pytest.raises(services.FingerprintMismatchError, match="other settings"):
        serve.serve(ssh_target.remote, replace(served.cfg, log_level="warning"), wait=False)

    with tunnel.make_tunnel(_tunnel_spec(ssh_target, served)) as tun:
        assert chat_client.list_models(tun.url) == [served.model_id]
        msgs = [{"role": "user", "content": "Say hi"}]
        text = chat_client.complete(tun.url, msgs, served.model_id, max_tokens=4)
        assert isinstance(text, str) and text
        pieces = list(chat_client.stream_chat(tun.url, msgs, served.model_id, max_tokens=6))
        assert len(pieces) >= 3, pieces
        # a chat session keeps history
        sess = chat_client.ChatSession(tun.url, served.model_id, max_tokens=3)
        "".join(sess.ask("one"))
        "".join(sess.ask("two"))
        assert [m["role"] for m in sess.history] == ["user", "assistant", "user", "assistant"]
        sess.clear()
        assert sess.history == []
        local_port = tun.local_port
        control = tun.control_path
        assert control.exists()
    assert not port_accepts(local_port), f"listener left on {local_port}"
    assert not control.exists(), "control socket left behind"


def test_tunnel_reconnects_after_ssh_killed(ssh_target: SSHHost, served: Served) -> None:
    events: list[str] = []
    tun = Tunnel(_tunnel_spec(ssh_target, served), on_event=events.append)
    tun.start()
    try:
        killed = kill_ssh_mid_stream(tun, served.model_id, events)
        rec = killed.reconnect
        assert tun.pid != killed.old_pid
        print(
            f"\n[reconnect] ssh killed -> listener back in {rec.seconds:.2f}s "
            f"({rec.attempts} attempt(s), server {rec.health}); in-flight lost: {killed.lost}/{len(killed.results)}"
        )
        assert rec.seconds < 5
        assert rec.health == "healthy"
        after: list[dict[str, object]] = [{} for _ in range(2)]
        for r in after:
            stream_worker(tun.url, served.model_id, 5, r)
        assert all(r.get("ok") for r in after), after
    finally:
        tun.stop()
    assert not port_accepts(tun.local_port)
    assert tun.proc is not None and tun.proc.poll() is not None


def test_busy_local_port_moves_to_next_free(ssh_target: SSHHost, served: Served) -> None:
    busy = find_free_port(27800 + os.getpid() % 100)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", busy))
    blocker.listen(1)
    try:
        events: list[str] = []
        spec = _tunnel_spec(ssh_target, served, local_port=busy)
        with tunnel.make_tunnel(spec, on_event=events.append) as tun:
            assert tun.local_port > busy
            assert any(f"local port {busy} is busy" in e and str(tun.local_port) in e for e in events), events
            ok, detail = health.check_once(health.LocalHttpProbe(tun.url))
            assert ok, detail
        with pytest.raises(tunnel.TunnelError, match="busy"):
            tunnel.make_tunnel(replace(spec, auto_port=False)).start()
    finally:
        blocker.close()


def test_a_detached_tunnel_says_it_moved_off_a_busy_port(ssh_target: SSHHost, served: Served,
                                                         state_root: Path) -> None:
    """fab serve --detach and fab webdemo --detach print state.notices: the move is never silent."""
    busy = find_free_port(27900 + os.getpid() % 100)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", busy))
    blocker.listen(1)
    try:
        st = tunnel.up(_tunnel_spec(ssh_target, served, local_port=busy, name="t-busy"), root=state_root)
        assert st.local_port != busy
        assert st.notices == [f"local port {busy} is busy; using 127.0.0.1:{st.local_port} instead"], st.events
    finally:
        blocker.close()
        tunnel.down("t-busy", root=state_root)


def test_wrong_host_key_is_refused(ssh_target: SSHHost, served: Served, tmp_path: Path) -> None:
    other = ssh_target.target.known_hosts.parent / "other_host_key.pub"  # type: ignore[union-attr]
    kind, key = other.read_text().split()[:2]
    bad = tmp_path / "known_hosts"
    bad.write_text(f"[127.0.0.1]:{ssh_target.target.port} {kind} {key}\n")
    target = replace(ssh_target.target, known_hosts=bad)
    with pytest.raises(HostKeyMismatchError, match="does not match known_hosts"):
        transport.SSHRemote(target).run("true")
    local = find_free_port(27900 + os.getpid() % 50)
    spec = TunnelSpec(target=target, remote_port=served.cfg.port, local_port=local)
    with pytest.raises(HostKeyMismatchError, match=r"host key for \[127.0.0.1\]:\d+ does not match known_hosts"):
        tunnel.make_tunnel(spec).start()
    assert not port_accepts(local), "a listener was left behind"
    # unknown host (empty known_hosts): also refused, never silently accepted
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyMismatchError, match="not in known_hosts"):
        transport.SSHRemote(replace(target, known_hosts=empty)).run("true")
    assert empty.read_text() == ""


def test_detached_tunnel_up_status_down(ssh_target: SSHHost, served: Served, state_root: Path) -> None:
    spec = _tunnel_spec(ssh_target, served, name="t-detached")
    st = tunnel.up(spec, root=state_root)
    assert st.status == "ready" and st.alive and st.accepting
    assert chat_client.list_models(st.url) == [served.model_id]
    again = tunnel.up(spec, root=state_root)  # idempotent
    assert again.pid == st.pid
    [listed] = tunnel.tunnel_status(state_root)
    assert listed.name == "t-detached" and listed.alive
    port = int(st.local_port or 0)
    owners = listening_pids(port)
    assert list(owners) == [st.pid], owners  # the supervisor holds the port, not ssh
    live = tunnel.live_tunnel("t-detached", remote_port=served.cfg.port, root=state_root)
    assert live is not None and live.pid == st.pid
    assert tunnel.live_tunnel("t-detached", remote_port=served.cfg.port + 1, root=state_root) is None
    assert tunnel.live_tunnel("llm", root=state_root) is None
    msgs = tunnel.down("t-detached", root=state_root)
    assert msgs and not port_accepts(port)
    assert tunnel.tunnel_status(state_root) == []
    time.sleep(0.2)
    for pid in [st.pid, *owners]:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1]
        ), pid
    assert not listening_pids(port)


def test_missing_model_path_is_a_clear_error(ssh_target: SSHHost) -> None:
    cfg = serve.ServeConfig(
        engine="transformers",
        model="~/model/does-not-exist",
        port=find_free_port(26100),
        env_bin_dir=ssh_target.env_bin_dir,
        name="missing",
    )
    with pytest.raises(
        serve.ServeConfigError, match=r"model directory .*/model/does-not-exist does not exist"
    ):
        serve.serve(ssh_target.remote, cfg)
    assert services.status(ssh_target.remote, "missing").state == "absent"
    with pytest.raises(serve.ServeConfigError, match=r"llama3_hf_merged does not exist; it is made by the fine-tune"):
        serve.serve(ssh_target.remote, replace(cfg, model="merged", engine="lmdeploy"))


def test_server_dying_at_startup_leaves_nothing_behind(ssh_target: SSHHost) -> None:
    bogus = f"{ssh_target.home}/model/bogus"
    ssh_target.remote.run(f'mkdir -p {bogus} && echo \'{{"model_type": "nonsense"}}\' > {bogus}/config.json')
    port = find_free_port(26200)
    cfg = serve.ServeConfig(
        engine="transformers", model=bogus, port=port, env_bin_dir=ssh_target.env_bin_dir, name="bogus"
    )
    with pytest.raises(health.NotReadyError) as info:
        serve.serve(ssh_target.remote, cfg, timeout=120)
    msg = str(info.value)
    assert "last log lines" in msg and len(info.value.log_tail) > 0
    print(f"\n[startup failure] {msg[:600]}")
    st = services.status(ssh_target.remote, "bogus")
    assert not st.running and st.pid is not None
    assert not _group_alive(ssh_target, st.pid)
    assert _listening_remote(ssh_target, port) == ""
    # the CLI: exit 1, the error and the log lines on stderr, still nothing left
    t = ssh_target.target
    proc = subprocess.run(
        [
            sys.executable, "-m", "llama3_ops.stages.serve",
            "--host", t.host, "--user", t.user, "--ssh-port", str(t.port),
            "--key", str(t.key_file), "--known-hosts", str(t.known_hosts),
            "up", "--engine", "transformers", "--model", bogus, "--port", str(port),
            "--env", ssh_target.env_bin_dir, "--name", "bogus", "--timeout", "120",
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "last log lines" in proc.stderr
    assert _listening_remote(ssh_target, port) == ""
    assert not services.status(ssh_target.remote, "bogus").running


@pytest.mark.parametrize("ready", ["", "[green]web demo[/]: open {url}  (Ctrl-C closes the tunnel)"])
def test_foreground_tunnel_says_its_url_and_closes_on_ctrl_c(ssh_target: SSHHost, served: Served, ready: str) -> None:
    """fab serve and fab webdemo without --detach: tunnel.run_foreground, the line that says the URL, Ctrl-C."""
    import json
    import signal

    code = ("import json, sys\nfrom llama3_ops.remote import tunnel\n"
            "from llama3_ops.remote.connection import SSHTarget\n"
            "d = json.loads(sys.argv[1])\n"
            "spec = tunnel.TunnelSpec(target=SSHTarget.from_dict(d['t']), remote_port=d['rp'], local_port=d['lp'])\n"
            "sys.exit(tunnel.run_foreground(spec, ready=d['ready']))\n")
    port = find_free_port(27600 + os.getpid() % 100)
    arg = json.dumps({"t": ssh_target.target.to_dict(), "rp": served.cfg.port, "lp": port, "ready": ready})
    proc = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "COLUMNS": "300"})
    try:
        deadline = time.monotonic() + 60
        while not port_accepts(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert chat_client.list_models(f"http://127.0.0.1:{port}") == [served.model_id]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    said = f"web demo: open http://127.0.0.1:{port}" if ready else f"tunnel up: http://127.0.0.1:{port}/v1 ->"
    assert said in out and "tunnel closed" in out and "{url}" not in out, out
    assert not port_accepts(port)


def test_zz_killed_server_reported_dead_then_restarted(ssh_target: SSHHost, served: Served) -> None:
    """Runs last in this module (it restarts the shared server)."""
    port = served.cfg.port
    ssh_target.root(
        f"for p in $(ss -ltnpH 'sport = :{port}' | grep -o 'pid=[0-9]*' | cut -d= -f2); "
        "do kill -KILL $p; done"
    )
    deadline = time.monotonic() + 20
    st = services.status(ssh_target.remote, "llm", log_lines=10)
    while st.running and time.monotonic() < deadline:
        time.sleep(0.3)
        st = services.status(ssh_target.remote, "llm", log_lines=10)
    assert st.state == "dead"
    assert st.exit_status == "137"  # 128 + SIGKILL, written by the wrapper
    assert st.log_tail and any("Uvicorn running" in line or "HTTP" in line for line in st.log_tail), (
        st.log_tail
    )
    res = serve.serve(ssh_target.remote, served.cfg, timeout=240)
    assert res.started_now and res.ready is not None
    assert services.status(ssh_target.remote, "llm").running
