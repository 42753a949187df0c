"""The apps' chat module (``webapp/llama3_chat.py``, uploaded next to the apps) with the real Llama 3
tokenizer and the tiny model: prompt building, the Max Length budget, stop strings, the local backend."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llama3_ops.stages.webdemo import WEBDEMO_APP


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    d = tmp_path_factory.mktemp("webdemo-chat")
    WEBDEMO_APP.write_to(d)
    spec = importlib.util.spec_from_file_location("llama3_chat_under_test", d / "llama3_chat.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llama3_chat_under_test"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok(chat: ModuleType, tiny_model: Path) -> Any:
    return chat.load_tokenizer(str(tiny_model))


def test_prompt_is_the_llama3_chat_template(chat: ModuleType, tok: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"}]
    assert chat.build_prompt(tok, msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # One BOS: the template has it, the token count must not add another.
    prompt = chat.build_prompt(tok, msgs[1:2])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(128000) == 1 and chat.count_tokens(tok, prompt) == len(ids)


def test_max_length_budget(chat: ModuleType) -> None:
    s = chat.GenerationSettings(max_length=100)
    assert chat.new_token_budget(60, s) == 40
    assert chat.new_token_budget(60, chat.GenerationSettings(max_length=100, max_new_tokens=8)) == 8
    with pytest.raises(chat.BackendError, match=r"already 100 tokens, at or over Max Length \(100\)"):
        chat.new_token_budget(100, s)


def test_stop_on_text_ends_at_the_stop_string(chat: ModuleType, tok: Any) -> None:
    import torch

    prompt = tok("<|begin_of_text|>Question", add_special_tokens=False)["input_ids"]
    crit = chat.stop_on_text(tok, len(prompt), ["Response:"])
    going = tok("Thought: search\nAction: ArxivSearch.get_arxiv_article_information\nAction Input: {}",
                add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + going])
    assert crit(ids, None).tolist() == [False]
    stop = tok("\nResponse:", add_special_tokens=False)["input_ids"]
    assert crit(torch.tensor([prompt + going + stop]), None).tolist() == [True]
    # The prompt itself never stops it.
    crit2 = chat.stop_on_text(tok, len(prompt + stop), ["Response:"])
    assert crit2(torch.tensor([prompt + stop]), None).tolist() == [False]


def test_local_backend_streams_and_missing_model_is_clear(chat: ModuleType, tiny_model: Path, tmp_path: Path) -> None:
    be = chat.LocalBackend(str(tiny_model))
    assert be.eos_token_ids == [128001, 128009]
    msgs = [{"role": "user", "content": "Hi"}]
    n = chat.count_tokens(be.tokenizer, chat.build_prompt(be.tokenizer, msgs))
    pieces = list(be.stream(msgs, chat.GenerationSettings(max_length=n + 5, temperature=0.0)))
    out = be.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
    assert 0 < len(out) <= 6  # at most 5 new tokens (re-tokenizing may merge or split one)
    # Greedy (temperature 0) is deterministic.
    assert "".join(be.stream(msgs, chat.GenerationSettings(max_length=n + 5, temperature=0.0))) == "".join(pieces)
    with pytest.raises(chat.BackendError, match="does not exist"):
        chat.LocalBackend(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(chat.BackendError, match="not a Hugging Face model directory"):
        chat.LocalBackend(str(tmp_path / "empty"))
