"""One SSE parser for the course chat: ``webapp/llama3_chat.py`` (uploaded with the apps) has it,
``fab client`` imports it; both read the real stand-in server's stream the same way."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from llama3_ops.lab.standin import standin_process
from llama3_ops.stages import client
from llama3_ops.stages.webdemo import WEBDEMO_APP


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """llama3_chat as the host imports it: from a directory holding only the app's files."""
    d = tmp_path_factory.mktemp("webapp")
    WEBDEMO_APP.write_to(d)
    spec = importlib.util.spec_from_file_location("llama3_chat_shipped", d / "llama3_chat.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llama3_chat_shipped"] = mod
    spec.loader.exec_module(mod)
    return mod


def _sse(*chunks: object) -> list[bytes]:
    return [f"data: {c if isinstance(c, str) else json.dumps(c)}\n".encode() for c in chunks]


def test_the_parser_reads_deltas_up_to_done_and_raises_on_an_error_chunk(shipped: ModuleType) -> None:
    stream = [b": keep-alive\n", b"\n", *_sse({"choices": [{"delta": {"role": "assistant"}}]},
              {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
              "[DONE]", {"choices": [{"delta": {"content": "after DONE"}}]})]  # fmt: skip
    assert list(shipped.sse_content(stream)) == ["Hel", "lo"]
    broken = _sse({"choices": [{"delta": {"content": "Hi"}}]}, {"error": "engine died"})
    with pytest.raises(shipped.StreamError) as info:
        list(shipped.sse_content(broken))
    assert info.value.detail == "engine died"


def test_fab_client_uses_the_parser_shipped_with_the_apps(shipped: ModuleType) -> None:
    assert client.sse_content.__module__ == "llama3_ops.stages.webapp.llama3_chat"
    assert Path(sys.modules[client.sse_content.__module__].__file__ or "").read_bytes() == Path(
        shipped.__file__ or ""
    ).read_bytes()


def test_client_and_api_backend_stream_the_same_answer(shipped: ModuleType, tiny_model: Path) -> None:
    msgs = [{"role": "user", "content": "Say hi"}]
    with standin_process(tokens_per_s=500.0) as base:
        ours = list(client.stream_chat(base, msgs, "standin", max_tokens=5))
        backend = shipped.ApiBackend(base, str(tiny_model), "standin", None)
        theirs = list(backend.stream(msgs, shipped.GenerationSettings(max_length=64, max_new_tokens=5)))
    assert ours == [" hi"] * 5
    assert theirs == ours
