"""The course's Lagent agent demo for Llama 3: a ReAct agent with ArxivSearch (and FinishAction).

    streamlit run llama3_agent.py -- --model ~/model/Meta-Llama-3-8B-Instruct              # local
    streamlit run llama3_agent.py -- --backend api --api-url http://127.0.0.1:23333 --model DIR

Options also come from ``LLAMA3_AGENT_BACKEND``, ``..._MODEL``, ``..._API_URL``, ``..._API_MODEL``,
``..._MAX_TURN``, ``..._MAX_LENGTH``, ``..._MAX_NEW_TOKENS``; the API key only from ``LLAMA3_OPS_API_KEY``.

lagent 0.2.x supplies the agent (``ReAct``, its protocol and ``ActionExecutor``) and the tools
(``ArxivSearch``, ``FinishAction``). The LLM is not lagent's ``HFTransformerCasualLM``: that one calls
transformers' private ``_get_logits_warper``, gone since transformers 4.45. :class:`Llama3LLM` is a
lagent ``BaseModel`` that renders lagent's messages with the tokenizer's Llama 3 chat template and
generates with :mod:`llama3_chat` (transformers' public API, or the ``fab serve`` server).

When arxiv.org cannot be reached (offline hosts) the page still loads and says so, and a failed
search is shown as the tool's error in the agent's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import streamlit as st

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import llama3_chat as chat  # noqa: E402 - uploaded next to this file
from lagent.actions import ActionExecutor, ArxivSearch, FinishAction  # noqa: E402
from lagent.agents.react import ReAct, ReActProtocol  # noqa: E402
from lagent.llms.base_llm import BaseModel  # noqa: E402
from lagent.schema import ActionReturn, ActionStatusCode  # noqa: E402

TITLE = "Lagent Web Demo"
ENV_PREFIX = "LLAMA3_AGENT_"
API_KEY_ENV = "LLAMA3_OPS_API_KEY"
ARXIV_PROBE_URL = "https://export.arxiv.org/api/query?search_query=all:llama&max_results=1"
TOOLS = {"ArxivSearch": ArxivSearch}
TOOL_ACTIONS = {"ArxivSearch.get_arxiv_article_information"}


class Llama3LLM(BaseModel):  # type: ignore[misc]
    """lagent's LLM interface (``chat(messages) -> str``) over a :mod:`llama3_chat` backend."""

    def __init__(self, backend: chat.Backend, settings: chat.GenerationSettings, stop: list[str]) -> None:
        super().__init__(path=backend.label, tokenizer_only=True, max_new_tokens=settings.max_new_tokens or 512,
                         top_p=settings.top_p, temperature=settings.temperature, stop_words=stop)
        self.backend = backend
        self.settings = settings
        self.stop = stop
        self.prompts: list[str] = []

    def chat(self, inputs: list[dict[str, str]], **gen_params: Any) -> str:
        messages = [{"role": m["role"], "content": str(m["content"])} for m in inputs]
        self.prompts.append(chat.build_prompt(self.backend.tokenizer, messages))
        return str(chat.complete(self.backend, messages, self.settings, self.stop))

    def generate(self, inputs: str | list[str], **gen_params: Any) -> str:
        raise NotImplementedError("Llama3LLM renders chat messages; use chat()")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llama3_agent.py", description="Lagent ReAct agent with Llama 3 (Streamlit)")
    chat.add_backend_args(p, ENV_PREFIX)
    p.add_argument("--max-turn", type=int, default=int(os.environ.get(ENV_PREFIX + "MAX_TURN", "4")),
                   help="LLM calls per question before the agent gives up (lagent's ReAct default: 4)")
    p.add_argument("--max-length", type=int, default=int(os.environ.get(ENV_PREFIX + "MAX_LENGTH", "8192")),
                   help="the model's context: prompt + answer tokens")
    p.add_argument("--max-new-tokens", type=int,
                   default=int(os.environ.get(ENV_PREFIX + "MAX_NEW_TOKENS", "512")),
                   help="the per-step answer slider's start value (lagent's default: 512)")
    return p.parse_args(argv)


@st.cache_resource(show_spinner="Loading the model…")
def get_backend(choice: chat.BackendChoice) -> chat.Backend:
    return chat.make_backend(choice.backend, choice.model, api_url=choice.api_url,
                             api_model=choice.api_model or None, api_key=os.environ.get(API_KEY_ENV) or None)


@st.cache_data(ttl=300, show_spinner="Checking that arxiv.org answers…")
def arxiv_status() -> tuple[bool, str]:
    """Can ArxivSearch work from this host: the arxiv client it calls, and the API it reaches?"""
    import arxiv

    if not hasattr(arxiv.Search, "results"):
        version = getattr(arxiv, "__version__", "") or "4 or newer"
        return False, (f"the installed arxiv package ({version}) removed Search.results, which lagent 0.2's "
                       "ArxivSearch calls: install arxiv<4 in this env")
    try:
        with urllib.request.urlopen(ARXIV_PROBE_URL, timeout=8) as resp:
            resp.read(256)
            return True, f"export.arxiv.org answers (HTTP {resp.status})"
    except Exception as exc:  # any failure means the tool will fail the same way
        return False, f"export.arxiv.org cannot be reached from this host ({type(exc).__name__}: {exc})"


def step_record(action: ActionReturn) -> dict[str, Any]:
    """One agent step as plain data (kept in the session, rendered again on each rerun)."""
    ok = action.state == ActionStatusCode.SUCCESS
    return {
        "thought": (action.thought or "").strip(),
        "action": str(action.type or ""),
        "args": action.args or {},
        "ok": ok,
        "result": action.format_result() if ok else "",
        "error": "" if ok else str(action.errmsg or "failed"),
    }


def render_step(i: int, step: dict[str, Any], no_action: str, finish: str) -> None:
    action = step["action"]
    if action == finish:
        return
    with st.expander(f"Step {i}: {action or 'no action'}", expanded=not step["ok"] and action in TOOL_ACTIONS):
        if step["thought"]:
            st.markdown(f"**Thought:** {step['thought']}")
        if action == no_action:
            st.caption("The model's reply followed neither the tool format nor the final-answer format.")
            return
        st.markdown(f"**Action:** `{action}`")
        st.code(json.dumps(step["args"], ensure_ascii=False), language="json")
        if step["ok"]:
            st.markdown(f"**Response:** {step['result']}")
        elif action in TOOL_ACTIONS:
            st.warning(f"The tool {action} failed: {step['error']}")
        else:
            st.caption(step["error"])


def clear_history() -> None:
    st.session_state.agent_messages = []
    st.session_state.last_prompts = []


def main() -> None:
    st.set_page_config(page_title=TITLE, page_icon="🤖")
    st.title(TITLE)
    try:
        args = parse_args(chat.script_argv(__file__))
    except SystemExit:
        st.error("bad command-line arguments for the agent demo: see the server log")
        st.stop()
    st.session_state.setdefault("agent_messages", [])
    st.session_state.setdefault("last_prompts", [])
    with st.sidebar:
        plugins = st.multiselect("Plugins", list(TOOLS), default=list(TOOLS))
        max_new = st.slider("Max New Tokens (per step)", min_value=8, max_value=2048,
                            value=min(max(8, args.max_new_tokens), 2048))
        top_p = st.slider("Top P", min_value=0.0, max_value=1.0, value=0.8, step=0.01)
        temperature = st.slider("Temperature", min_value=0.0, max_value=1.0, value=0.7, step=0.01)
        st.button("Clear Chat History", on_click=clear_history)
    if "ArxivSearch" in plugins:
        usable, detail = arxiv_status()
        if usable:
            st.sidebar.success(f"ArxivSearch: {detail}")
        else:
            st.warning(
                f"ArxivSearch will fail: {detail}. The agent still runs; its paper searches fail and "
                "each failure is shown in the agent's steps."
            )
    try:
        backend = get_backend(chat.backend_choice(args))
    except (chat.BackendError, OSError, ValueError) as exc:
        st.error(f"The model could not be loaded: {exc}")
        st.stop()
    st.caption(f"ReAct agent on {backend.label}; tools: {', '.join(plugins) or 'none'}")

    protocol = ReActProtocol()
    stop = [protocol.response["begin"]]  # the tool's answer comes from the tool, not the model
    settings = chat.GenerationSettings(max_length=args.max_length, top_p=top_p, temperature=temperature,
                                       max_new_tokens=max_new)
    llm = Llama3LLM(backend, settings, stop)
    executor = ActionExecutor(actions=[TOOLS[name]() for name in plugins], finish_action=FinishAction())
    agent = ReAct(llm=llm, action_executor=executor, protocol=protocol, max_turn=args.max_turn)
    no_action, finish = executor.no_action.name, executor.finish_action.name

    for message in st.session_state.agent_messages:
        with st.chat_message(message["role"]):
            for i, step in enumerate(message.get("steps", []), 1):
                render_step(i, step, no_action, finish)
            st.markdown(message["content"])

    if prompt := st.chat_input("Ask about papers, e.g. what is the ReAct paper about?"):
        with st.chat_message("user"):
            st.markdown(prompt)
        history = [{"role": m["role"], "content": m["content"]} for m in st.session_state.agent_messages]
        with st.chat_message("assistant"):
            try:
                with st.spinner("The agent is thinking…"):
                    result = agent.chat([*history, {"role": "user", "content": prompt}])
            except chat.BackendError as exc:
                st.error(str(exc))
                return
            finally:
                st.session_state.last_prompts = llm.prompts
            steps = [step_record(a) for a in result.actions]
            for i, step in enumerate(steps, 1):
                render_step(i, step, no_action, finish)
            st.markdown(result.response)
        st.session_state.agent_messages = [
            *st.session_state.agent_messages,
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": result.response, "steps": steps},
        ]


main()
