"""``fab agent`` on a fresh host provisioned with the cpu profile (lagent 0.2.4, Streamlit 1.67,
transformers 4.48): the Lagent ReAct demo supervised on the host, its page in a real headless Chromium
through the tunnel, with arxiv.org unreachable, and one question through the agent.

arxiv.org is made unreachable on purpose (the app's ``https_proxy`` is a closed port), so the test
means the same on a machine that has internet: the page must load, say that ArxivSearch will fail
and why, and still answer through the ReAct loop.
"""

from __future__ import annotations

import io
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from hostlab import MODEL_DIR, Provisioned
from llama3_ops.remote import services, transport, tunnel
from llama3_ops.remote.files import put_package_file
from llama3_ops.remote.ports import find_free_port
from llama3_ops.stages import agent as ag
from llama3_ops.stages import webdemo as wd

from .test_webdemo_browser import assert_real_png, visit

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]
DEAD_PROXY = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "state"
    monkeypatch.setenv("LLAMA3_OPS_STATE_DIR", str(root))
    yield root
    tunnel.down()


def test_agent_page_loads_says_arxiv_is_unreachable_and_answers(
    provisioned: Provisioned, state_dir: Path, tmp_path: Path
) -> None:
    remote = transport.SSHRemote(provisioned.target)
    buf = io.StringIO()
    con = Console(file=buf, width=400, force_terminal=False, color_system=None)
    cfg = ag.agent_config(max_turn=1, max_new_tokens=8, env=DEAD_PROXY)
    rc = ag.agent(remote, cfg, local_port=find_free_port(18502), detach=True, console=con)
    try:
        assert rc == 0, buf.getvalue()
        st = services.status(remote, "agent")
        assert st.running and st.port == 8502
        [state] = [s for s in tunnel.tunnel_status() if s.name == "agent"]
        assert f"Lagent Web Demo: open {state.url}" in buf.getvalue()

        v = visit(state.url + "/", "agent-freshhost", f"ReAct agent on local model {MODEL_DIR} (cpu)",
                  chat="What is the ReAct paper about?", profile=tmp_path / "chromium")
        assert "Lagent Web Demo" in v.text and "Plugins" in v.text and "ArxivSearch" in v.text
        assert "ArxivSearch will fail: export.arxiv.org cannot be reached from this host (URLError:" in v.text
        assert "The agent still runs; its paper searches fail" in v.text
        # One ReAct turn of lagent 0.2.4 ran: the random-weight model follows no format, so the step
        # is lagent's NoAction and the answer lagent's default.
        assert [m["role"] for m in v.messages] == ["user", "assistant"], v.messages
        assert "Step 1: NoAction" in v.messages[1]["text"]
        assert "Sorry that I cannot answer your question." in v.messages[1]["text"]
        assert_real_png(v.png)
    finally:
        tunnel.down("agent")
        stopped = services.stop(remote, "agent")
    assert not stopped.running


HOST_APPTEST = r"""
import json, os, sys
from streamlit.testing.v1 import AppTest
os.environ.update({"LLAMA3_AGENT_MODEL": sys.argv[2], "LLAMA3_AGENT_MAX_TURN": "2",
                   "LLAMA3_AGENT_MAX_NEW_TOKENS": "8"})
at = AppTest.from_file(sys.argv[1], default_timeout=600).run()
out = {"title": [t.value for t in at.title], "warnings": [w.value for w in at.warning],
       "errors": [e.value for e in at.error], "exception": [str(e.value) for e in at.exception]}
if at.chat_input.len:
    at.chat_input[0].set_value("Find papers about Llama 3").run()
    out["exception"] += [str(e.value) for e in at.exception]
    out["errors"] += [e.value for e in at.error]
    out["messages"] = at.session_state["agent_messages"]
    out["prompts"] = at.session_state["last_prompts"]
print("@@" + json.dumps(out))
"""


def test_agent_app_in_the_hosts_env_with_apptest(provisioned: Provisioned) -> None:
    """The app under AppTest in the host's own llama3 env (lagent isn't in the test venv): two ReAct
    turns, each prompt the tokenizer's Llama 3 chat template of lagent's ReAct messages."""
    remote = transport.SSHRemote(provisioned.target)
    home = transport.remote_home(remote)
    for name in ag.AGENT_APP.files:  # laid out as fab agent uploads them
        put_package_file(remote, wd.PACKAGE, name, f"~/apptest-agent/{Path(name).name}")
    script = f"{home}/apptest-agent/{Path(ag.AGENT_APP.files[0]).name}"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in DEAD_PROXY.items())
    res = remote.run(
        f"cd ~/apptest-agent && {env} HF_HUB_OFFLINE=1 ~/envs/llama3/bin/python -c {shlex.quote(HOST_APPTEST)} "
        f"{shlex.quote(script)} {shlex.quote(MODEL_DIR)}",
        timeout=900,
        check=False,
    )
    assert res.rc == 0, res.stderr[-3000:]
    [line] = [x for x in res.stdout.splitlines() if x.startswith("@@")]
    out = json.loads(line[2:])
    assert out["title"] == ["Lagent Web Demo"] and not out["exception"] and not out["errors"], out
    assert any("ArxivSearch will fail: export.arxiv.org cannot be reached" in w for w in out["warnings"]), out
    [user, answer] = out["messages"]
    assert user == {"role": "user", "content": "Find papers about Llama 3"}
    assert answer["content"] == "Sorry that I cannot answer your question."
    assert [s["action"] for s in answer["steps"]] == ["NoAction", "NoAction"]
    first, second = out["prompts"]
    assert first.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                            "You are a assistant who can utilize external tools.")
    assert "ArxivSearch.get_arxiv_article_information" in first
    assert first.endswith("<|start_header_id|>user<|end_header_id|>\n\nFind papers about Llama 3<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The second call carries the first answer and lagent's "follow the format" response.
    assert second.startswith(first[: first.index("<|start_header_id|>assistant")])
    assert "Response:Please follow the format" in second
