"""``fab agent``: the course's Lagent web demo (ReAct, ArxivSearch + FinishAction) on the host, tunnelled.

Replaces the course's ``streamlit run ~/Agent-FLAN/... internlm2_agent_web_demo_hf.py``-style script
adapted for Llama 3 (with its hard-coded paths and lagent's ``HFTransformerCasualLM``, which calls
transformers' private ``_get_logits_warper``, removed in transformers 4.45). The app
(:mod:`llama3_ops.stages.agent_app`) uses lagent 0.2.x's ``ReAct``, ``ActionExecutor``,
``ArxivSearch`` and ``FinishAction`` with a lagent LLM wrapper over the same chat backends as the web
demo: the model loaded with transformers' public API, or the ``fab serve`` server (``--backend api``).

Start-up, checks, supervision and the tunnel are the web demo's (:mod:`llama3_ops.stages.webdemo`);
the service is ``agent`` on the host's 127.0.0.1:8502, the tunnel local 8502 or the next free port.
On a host that cannot reach arxiv.org the page loads and says so; failed searches show the tool's error.
"""

from __future__ import annotations

from rich.console import Console

from llama3_ops.remote import transport
from llama3_ops.stages.options import Opt
from llama3_ops.stages.webdemo import StageError, StreamlitApp, StreamlitConfig, app_options, run_stage

DEFAULT_PORT = 8502

AGENT_APP = StreamlitApp(
    name="agent",
    files=("agent_app/llama3_agent.py", "webapp/llama3_chat.py"),
    remote_dir="~/llama3-course/agent",
    title="Lagent Web Demo",
    imports=("streamlit", "transformers", "torch", "lagent", "arxiv"),
)


OPTIONS: tuple[Opt, ...] = (
    *app_options(DEFAULT_PORT, "local: the app loads the model; api: its LLM calls go to fab serve's server"),
    Opt("max_turn", 4, "LLM calls per question (lagent's ReAct default)"),
    Opt("max_new_tokens", 512, "tokens per step (the slider's start value)"),
)


def agent_config(
    model: str = "base",
    backend: str = "local",
    *,
    port: int = DEFAULT_PORT,
    api_port: int = 23333,
    api_key: str | None = None,
    env_bin_dir: str | None = None,
    max_turn: int = 4,
    max_new_tokens: int = 512,
    env: dict[str, str] | None = None,
) -> StreamlitConfig:
    """The agent's :class:`StreamlitConfig`: ``max_turn`` LLM calls per question (lagent's default 4),
    ``max_new_tokens`` per call (the slider's start value), ``env`` for the app (e.g. ``https_proxy``)."""
    if max_turn < 1:
        raise StageError(f"max_turn must be at least 1, got {max_turn}")
    if not 8 <= max_new_tokens <= 2048:
        raise StageError(f"max_new_tokens must be in 8..2048 (the slider's range), got {max_new_tokens}")
    return StreamlitConfig(model=model, backend=backend, port=port, api_port=api_port,  # type: ignore[arg-type]
                           api_key=api_key, env_bin_dir=env_bin_dir, env=dict(env or {}),
                           extra_args=("--max-turn", str(max_turn), "--max-new-tokens", str(max_new_tokens)))


def agent(
    remote: transport.SSHRemote,
    cfg: StreamlitConfig,
    *,
    local_port: int = DEFAULT_PORT,
    detach: bool = False,
    restart: bool = False,
    host: str = "",
    console: Console | None = None,
) -> int:
    """``fab agent``: start (or reuse) the agent demo, open the tunnel, print the URL; the exit code."""
    return run_stage(remote, AGENT_APP, cfg, local_port=local_port, detach=detach, restart=restart, host=host,
                     console=console)
