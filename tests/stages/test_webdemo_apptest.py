"""The web demo app, headless with Streamlit's AppTest: the tiny model loaded in-process (local backend)
and a real ``transformers serve`` (api backend), in the test venv (transformers 5.x).

The app directory is written exactly as ``fab webdemo`` uploads it (``WEBDEMO_APP.write_to``). The
same app under the host's transformers 4.48 is covered by tests/stages/test_webdemo_freshhost.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llama3_ops.lab.standin import free_port, transformers_serve_process
from llama3_ops.stages.webdemo import WEBDEMO_APP

if os.environ.get("CI"):
    import streamlit  # noqa: F401 - CI must run these: streamlit is a dev dependency
else:
    pytest.importorskip("streamlit", reason="streamlit is a dev dependency (pip install -e '.[dev]')")

from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow
TIMEOUT = 240  # a first run loads the model; this 2-core machine is shared


@pytest.fixture(scope="module")
def app_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return WEBDEMO_APP.write_to(tmp_path_factory.mktemp("webdemo"))


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("BACKEND", "MODEL", "API_URL", "API_MODEL", "MAX_LENGTH"):
        monkeypatch.delenv(f"LLAMA3_WEBDEMO_{name}", raising=False)
    monkeypatch.delenv("LLAMA3_OPS_API_KEY", raising=False)
    return monkeypatch


def _tokenizer(model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def _slider(at: AppTest, label: str) -> Any:
    [s] = [s for s in at.sidebar.slider if s.label == label]
    return s


def _messages(at: AppTest) -> list[tuple[str, str]]:
    return [(m.name, "".join(str(x.value) for x in m.markdown)) for m in at.chat_message]


def _budget(tok: Any, messages: list[dict[str, str]], new_tokens: int) -> int:
    """A Max Length that leaves ``new_tokens`` for the answer (CPU time is scarce here)."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(prompt, add_special_tokens=False)["input_ids"]) + new_tokens


def test_local_model_chat_turn_history_prompt_and_clear(app_script: Path, app_env: pytest.MonkeyPatch,
                                                        tiny_model: Path) -> None:
    app_env.setenv("LLAMA3_WEBDEMO_MODEL", str(tiny_model))
    at = AppTest.from_file(str(app_script), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Llama3-Instruct"]
    # The course's settings.
    assert _slider(at, "Max Length").value == 8192
    assert _slider(at, "Top P").value == pytest.approx(0.8)
    assert _slider(at, "Temperature").value == pytest.approx(0.7)
    assert "local model" in at.caption[0].value and str(tiny_model) in at.caption[0].value
    assert at.chat_message.len == 0

    tok = _tokenizer(tiny_model)
    first = [{"role": "user", "content": "Who are you?"}]
    _slider(at, "Max Length").set_value(_budget(tok, first, 6)).run()
    at.chat_input[0].set_value("Who are you?").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    msgs = _messages(at)
    assert [role for role, _ in msgs] == ["user", "assistant"]
    assert msgs[0][1] == "Who are you?"
    history = at.session_state["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    # The prompt is the tokenizer's Llama 3 chat template, exactly.
    prompt = at.session_state["last_prompt"]
    assert prompt == tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")

    # A second turn carries the first one in its prompt.
    second = [*history, {"role": "user", "content": "And then?"}]
    _slider(at, "Max Length").set_value(_budget(tok, second, 4)).run()
    at.chat_input[0].set_value("And then?").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert [role for role, _ in _messages(at)] == ["user", "assistant", "user", "assistant"]
    assert at.session_state["last_prompt"] == tok.apply_chat_template(second, tokenize=False,
                                                                      add_generation_prompt=True)
    # "Show the prompt" puts it on the page.
    [toggle] = [t for t in at.sidebar.toggle if t.label == "Show the prompt"]
    toggle.set_value(True).run()
    assert at.code[0].value.rstrip("\n") == at.session_state["last_prompt"].rstrip("\n")  # st.code trims the end

    [clear] = [b for b in at.sidebar.button if b.label == "Clear Chat History"]
    clear.click().run()
    assert at.chat_message.len == 0
    assert at.session_state["messages"] == []


def test_conversation_longer_than_max_length_is_one_clear_error(app_script: Path, app_env: pytest.MonkeyPatch,
                                                                tiny_model: Path) -> None:
    app_env.setenv("LLAMA3_WEBDEMO_MODEL", str(tiny_model))
    at = AppTest.from_file(str(app_script), default_timeout=TIMEOUT).run()
    _slider(at, "Max Length").set_value(8).run()
    at.chat_input[0].set_value("Who are you?").run()
    assert not at.exception
    n = _budget(_tokenizer(tiny_model), [{"role": "user", "content": "Who are you?"}], 0)
    assert n > 8
    assert [e.value for e in at.error] == [
        f"the conversation is already {n} tokens, at or over Max Length (8): raise Max Length or clear the chat history"
    ]
    assert at.session_state["messages"] == [], "a failed turn is not kept"


def test_missing_model_is_one_clear_message_on_the_page(app_script: Path, app_env: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    app_env.setenv("LLAMA3_WEBDEMO_MODEL", str(tmp_path / "llama3_hf_merged"))
    at = AppTest.from_file(str(app_script), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        f"The model could not be loaded: model directory {tmp_path / 'llama3_hf_merged'} does not exist"
    ]
    assert at.chat_input.len == 0, "no chat box without a model"


@pytest.fixture(scope="module")
def tserve(tiny_model: Path) -> Iterator[str]:
    """A real ``transformers serve`` with the tiny model (the same helper tests/bench uses)."""
    try:
        with transformers_serve_process(str(tiny_model)) as base:
            yield base
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_api_backend_chats_with_transformers_serve(app_script: Path, app_env: pytest.MonkeyPatch,
                                                   tiny_model: Path, tserve: str) -> None:
    app_env.setenv("LLAMA3_WEBDEMO_BACKEND", "api")
    app_env.setenv("LLAMA3_WEBDEMO_API_URL", tserve)
    app_env.setenv("LLAMA3_WEBDEMO_MODEL", str(tiny_model))
    at = AppTest.from_file(str(app_script), default_timeout=TIMEOUT).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert at.caption[0].value == f"Chatting with {tiny_model} at {tserve}"
    tok = _tokenizer(tiny_model)
    turn = [{"role": "user", "content": "Hello"}]
    _slider(at, "Max Length").set_value(_budget(tok, turn, 4)).run()
    at.chat_input[0].set_value("Hello").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    msgs = _messages(at)
    assert [role for role, _ in msgs] == ["user", "assistant"]
    assert msgs[1][1].strip(), "the server streamed an answer"
    assert at.session_state["last_prompt"] == tok.apply_chat_template(turn, tokenize=False,
                                                                      add_generation_prompt=True)


def test_api_backend_without_a_server_is_one_clear_message(app_script: Path, app_env: pytest.MonkeyPatch,
                                                           tiny_model: Path) -> None:
    port = free_port()  # nothing listens there
    app_env.setenv("LLAMA3_WEBDEMO_BACKEND", "api")
    app_env.setenv("LLAMA3_WEBDEMO_API_URL", f"http://127.0.0.1:{port}")
    app_env.setenv("LLAMA3_WEBDEMO_MODEL", str(tiny_model))
    at = AppTest.from_file(str(app_script), default_timeout=TIMEOUT).run()
    assert not at.exception
    [err] = [e.value for e in at.error]
    assert err.startswith(f"The model could not be loaded: cannot reach the model server at http://127.0.0.1:{port}")
    assert "is `fab serve` running on this host?" in err
