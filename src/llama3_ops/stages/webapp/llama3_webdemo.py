"""The course's Llama 3 web demo: a Streamlit chat with the course's look and settings.

    streamlit run llama3_webdemo.py -- --model ~/model/Meta-Llama-3-8B-Instruct            # local
    streamlit run llama3_webdemo.py -- --backend api --api-url http://127.0.0.1:23333 \\
        --model ~/model/Meta-Llama-3-8B-Instruct                         # the `fab serve` server

Every option also comes from the environment (``LLAMA3_WEBDEMO_BACKEND``, ``..._MODEL``,
``..._API_URL``, ``..._API_MODEL``, ``..._MAX_LENGTH``); the API key only from
``LLAMA3_OPS_API_KEY``. In api mode ``--model`` is the served model's directory on this host, used
for its tokenizer and chat template (to count tokens against Max Length).

Unlike the course's script: no avatar image paths (a missing icon file crashed Streamlit), no
transformers private APIs (public ``generate`` + ``TextIteratorStreamer``), the prompt comes from the
tokenizer's chat template, and a missing model is one clear message on the page.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import llama3_chat as chat  # noqa: E402 - the sibling module, uploaded next to this file

TITLE = "Llama3-Instruct"
ENV_PREFIX = "LLAMA3_WEBDEMO_"
API_KEY_ENV = "LLAMA3_OPS_API_KEY"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llama3_webdemo.py", description="Llama 3 chat (Streamlit)")
    chat.add_backend_args(p, ENV_PREFIX)
    p.add_argument("--max-length", type=int, default=int(os.environ.get(ENV_PREFIX + "MAX_LENGTH", "8192")),
                   help="the Max Length slider's start value and maximum")
    return p.parse_args(argv)


@st.cache_resource(show_spinner="Loading the model…")
def get_backend(choice: chat.BackendChoice) -> chat.Backend:
    return chat.make_backend(choice.backend, choice.model, api_url=choice.api_url,
                             api_model=choice.api_model or None, api_key=os.environ.get(API_KEY_ENV) or None)


def clear_history() -> None:
    st.session_state.messages = []
    st.session_state.last_prompt = ""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # api backend on a host without torch
        pass


def sidebar(max_length: int) -> chat.GenerationSettings:
    with st.sidebar:
        length = st.slider("Max Length", min_value=8, max_value=max(8, max_length), value=max(8, max_length))
        top_p = st.slider("Top P", min_value=0.0, max_value=1.0, value=0.8, step=0.01)
        temperature = st.slider("Temperature", min_value=0.0, max_value=1.0, value=0.7, step=0.01)
        st.button("Clear Chat History", on_click=clear_history)
        st.toggle("Show the prompt", key="show_prompt", value=False)
    return chat.GenerationSettings(max_length=length, top_p=top_p, temperature=temperature)


def main() -> None:
    st.set_page_config(page_title=TITLE, page_icon="🦙")
    st.title(TITLE)
    try:
        args = parse_args(chat.script_argv(__file__))
    except SystemExit:
        st.error("bad command-line arguments for the web demo: see the server log")
        st.stop()
    settings = sidebar(args.max_length)
    st.session_state.setdefault("messages", [])
    st.session_state.setdefault("last_prompt", "")
    try:
        backend = get_backend(chat.backend_choice(args))
    except (chat.BackendError, OSError, ValueError) as exc:
        st.error(f"The model could not be loaded: {exc}")
        st.stop()
    st.caption(f"Chatting with {backend.label}")

    for message in st.session_state.messages:
        with st.chat_message(message["role"]):
            st.markdown(message["content"])

    if prompt := st.chat_input("Hello!"):
        with st.chat_message("user"):
            st.markdown(prompt)
        messages = [*st.session_state.messages, {"role": "user", "content": prompt}]
        st.session_state.last_prompt = chat.build_prompt(backend.tokenizer, messages)
        with st.chat_message("assistant"):
            try:
                reply = st.write_stream(backend.stream(messages, settings))
            except chat.BackendError as exc:
                st.error(str(exc))
                reply = None
            if reply == "":
                st.caption("(the model ended its answer at once)")
        if isinstance(reply, str):  # failed turns are not kept in the history
            st.session_state.messages = [*messages, {"role": "assistant", "content": reply}]

    if st.session_state.get("show_prompt") and st.session_state.last_prompt:
        with st.expander("The last prompt (the tokenizer's chat template)", expanded=True):
            st.code(st.session_state.last_prompt, language=None)


main()
