"""``fab webdemo`` on a fresh host provisioned with the cpu profile (transformers 4.48, Streamlit 1.67):
the app supervised on the host, the tunnel, and a chat turn in a real headless Chromium through it.
Plus the bad inputs: a missing model, a missing merged model, a busy host port, no model server."""

from __future__ import annotations

import io
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from hostlab import MODEL_DIR, Provisioned
from llama3_ops.remote import services, transport, tunnel
from llama3_ops.remote.ports import find_free_port, is_port_free
from llama3_ops.stages import serve as srv
from llama3_ops.stages import webdemo as wd

from .test_webdemo_browser import assert_real_png, visit

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]
LOOPBACK_8501 = "0100007F:2135"  # 127.0.0.1:8501 as /proc/net/tcp writes it


def listeners(p: Provisioned, port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on ``port`` on the host."""
    script = (
        "import sys\nfor f in ('/proc/net/tcp', '/proc/net/tcp6'):\n"
        "  for line in open(f).read().splitlines()[1:]:\n    c = line.split()\n"
        f"    if c[3] == '0A' and int(c[1].split(':')[1], 16) == {port}: print(c[1])"
    )
    return p.sh(f"python3 -c \"{script}\"").split()


class Out:
    """A rich console whose output the test reads back."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.console = Console(file=self.buf, width=400, force_terminal=False, color_system=None)

    @property
    def text(self) -> str:
        return self.buf.getvalue()


@pytest.fixture
def remote(provisioned: Provisioned) -> transport.SSHRemote:
    return transport.SSHRemote(provisioned.target)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Tunnel state in a temp dir; every tunnel a test opened is closed afterwards."""
    root = tmp_path / "state"
    monkeypatch.setenv("LLAMA3_OPS_STATE_DIR", str(root))
    yield root
    tunnel.down()


def _stop(remote: transport.SSHRemote, name: str, p: Provisioned, port: int) -> None:
    st = services.stop(remote, name)
    assert not st.running
    assert listeners(p, port) == []


def test_webdemo_on_the_host_chats_in_chromium_through_the_tunnel(
    provisioned: Provisioned, remote: transport.SSHRemote, state_dir: Path, tmp_path: Path
) -> None:
    cfg = wd.StreamlitConfig(model="base", max_length=40)
    # The wanted local port is busy: the tunnel takes the next free one and says so.
    busy = find_free_port(18501)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        out = Out()
        rc = wd.webdemo(remote, cfg, local_port=busy, detach=True, host=provisioned.name, console=out.console)
    try:
        assert rc == 0, out.text
        st = services.status(remote, "webdemo")
        assert st.running and st.mode == "systemd", st
        assert listeners(provisioned, 8501) == [LOOPBACK_8501], "127.0.0.1:8501 on the host only"
        [state] = [s for s in tunnel.tunnel_status() if s.name == "webdemo"]
        assert state.local_port and state.local_port > busy
        assert f"local port {busy} is busy; using 127.0.0.1:{state.local_port} instead" in out.text
        assert f"Llama3-Instruct: open {state.url}" in out.text
        assert "healthy after" in out.text

        # A real browser through the tunnel: the page, a chat turn, the screenshot.
        v = visit(state.url + "/", "webdemo-freshhost", f"Chatting with local model {MODEL_DIR} (cpu)",
                  chat="Who are you?", profile=tmp_path / "chromium")
        assert "Llama3-Instruct" in v.text and "Max Length" in v.text and "Clear Chat History" in v.text
        assert [m["role"] for m in v.messages] == ["user", "assistant"], v.messages
        assert v.messages[1]["text"].strip()
        assert "<title>Llama3-Instruct</title>" in v.dom
        assert_real_png(v.png)

        # Same settings again: reused, not restarted; other settings are refused without --restart.
        again = Out()
        assert wd.webdemo(remote, cfg, local_port=state.local_port, detach=True, console=again.console) == 0
        assert "already running with the same settings, reused" in again.text
        assert services.status(remote, "webdemo").pid == st.pid
        other = Out()
        assert wd.webdemo(remote, wd.StreamlitConfig(model="base", max_length=64), detach=True,
                          console=other.console) == 1
        assert "webdemo already runs on" in other.text and "pass --restart" in other.text
    finally:
        tunnel.down("webdemo")
        _stop(remote, "webdemo", provisioned, 8501)
    assert is_port_free(state.local_port or 0)


def test_webdemo_talks_to_the_fab_serve_server(
    provisioned: Provisioned, remote: transport.SSHRemote, state_dir: Path, tmp_path: Path
) -> None:
    serve_cfg = srv.ServeConfig(engine="transformers", model="base")
    srv.serve(remote, serve_cfg, timeout=300)
    try:
        out = Out()
        cfg = wd.StreamlitConfig(backend="api", max_length=36)
        rc = wd.webdemo(remote, cfg, local_port=find_free_port(18601), detach=True, console=out.console)
        assert rc == 0, out.text
        assert "--backend api" in out.text and "--api-url http://127.0.0.1:23333" in out.text
        [state] = [s for s in tunnel.tunnel_status() if s.name == "webdemo"]
        v = visit(state.url + "/", "webdemo-freshhost-api", "at http://127.0.0.1:23333",
                  chat="Hello", profile=tmp_path / "chromium")
        assert [m["role"] for m in v.messages] == ["user", "assistant"], v.messages
        assert v.messages[1]["text"].strip()
        assert_real_png(v.png)
    finally:
        tunnel.down("webdemo")
        _stop(remote, "webdemo", provisioned, 8501)
        srv.stop(remote, "llm")


def _nothing_left(remote: transport.SSHRemote, p: Provisioned, port: int = 8501) -> None:
    assert not services.status(remote, "webdemo", log_lines=0).running
    assert listeners(p, port) == []
    assert [s for s in tunnel.tunnel_status() if s.name == "webdemo"] == []


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("merged", f"model directory {MODEL_DIR.rsplit('/', 1)[0]}/llama3_hf_merged does not exist on {{label}}; "
                   "it is made by the fine-tune stage (fab finetune merges into it): run that first"),
        ("/home/student/model/nope", "model directory /home/student/model/nope does not exist on {label}"),
    ],
)
def test_missing_model_is_one_clear_message_and_nothing_runs(
    provisioned: Provisioned, remote: transport.SSHRemote, state_dir: Path, model: str, message: str
) -> None:
    # The session's host is shared: the fine-tune test may already have merged a model there. Move it
    # aside for this test so "merged" is really missing, and put it back afterwards.
    merged = f"{MODEL_DIR.rsplit('/', 1)[0]}/llama3_hf_merged"
    provisioned.sh(f"if [ -e {merged} ]; then mv {merged} {merged}.aside; fi")
    try:
        out = Out()
        rc = wd.webdemo(remote, wd.StreamlitConfig(model=model), local_port=find_free_port(18701), detach=True,
                        console=out.console)
        assert rc == 1, out.text
        errors = [line for line in out.text.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {message.format(label=remote.label)}"], out.text
        _nothing_left(remote, provisioned)
    finally:
        if services.status(remote, "webdemo", log_lines=0).running:  # a failed assertion above: leave no app
            tunnel.down("webdemo")
            services.stop(remote, "webdemo")
        provisioned.sh(f"if [ -e {merged}.aside ]; then mv {merged}.aside {merged}; fi")


def test_busy_host_port_is_one_clear_message(
    provisioned: Provisioned, remote: transport.SSHRemote, state_dir: Path
) -> None:
    port = 8511
    pid = provisioned.sh(
        f"setsid nohup python3 -m http.server --bind 127.0.0.1 {port} >/dev/null 2>&1 </dev/null & echo $!"
    ).strip()
    try:
        for _ in range(50):
            if listeners(provisioned, port):
                break
            time.sleep(0.2)
        out = Out()
        rc = wd.webdemo(remote, wd.StreamlitConfig(port=port), local_port=find_free_port(18801), detach=True,
                        console=out.console)
        assert rc == 1
        errors = [line for line in out.text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out.text
        assert re.fullmatch(
            rf"error: port {port} on {re.escape(remote.label)} is already in use \(pid {pid}: python3 -m "
            rf"http\.server --bind 127\.0\.0\.1 {port} ?\): stop that process or choose another port \(--port\)",
            errors[0],
        ), errors[0]
        assert not services.status(remote, "webdemo", log_lines=0).running
        assert listeners(provisioned, port), "the other process is left alone"
    finally:
        provisioned.sh(f"kill {pid}", check=False)


def test_api_backend_without_a_server_is_one_clear_message(
    provisioned: Provisioned, remote: transport.SSHRemote, state_dir: Path
) -> None:
    out = Out()
    rc = wd.webdemo(remote, wd.StreamlitConfig(backend="api", api_port=23399), local_port=find_free_port(18901),
                    detach=True, console=out.console)
    assert rc == 1
    errors = [line for line in out.text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: no model server answers on {remote.label} 127.0.0.1:23399 ("), out.text
    assert errors[0].endswith("start it first with `fab serve` (or pass --api-port)")
    _nothing_left(remote, provisioned)
