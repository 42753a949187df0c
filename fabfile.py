"""Fabric tasks: each course stage as one command from your laptop. Logic lives in llama3_ops.

    fab -H gpu1 provision            ansible-playbook site.yml on that host
    fab -H gpu1 serve                lmdeploy api_server on the host's 127.0.0.1:23333 + SSH tunnel
    fab -H gpu1 client               streamed chat with the served model, through the tunnel
    fab -H gpu1 status | logs | stop | down
    fab -H gpu1 webdemo              stage 1: the Streamlit chat, tunnelled
    fab -H gpu1 finetune             stage 2: XTuner train -> pth_to_hf -> merge (resumable)
    fab -H gpu1 chat [--model 4bit]  stage 4: lmdeploy chat in this terminal, then the GPU memory it held
    fab -H gpu1 quantize             stage 4: W4A16 AWQ (course parameters, offline calibration)
    fab -H gpu1 llava --image F|URL  stage 4: describe an image with LLaVA-Llama-3 (lmdeploy pipeline)
    fab -H gpu1 agent | agent-finetune    stage 5: the Lagent ReAct demo; the Agent-FLAN fine-tune

Hosts come from the Ansible inventory ($LLAMA3_INVENTORY, default inventory/my.yml). Each task's
options are defined once, in its stage module (``fab -h TASK`` lists them); an error is one line.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from fabric import Connection, task
from rich.console import Console

from llama3_ops.errors import user_errors
from llama3_ops.provision import playbook as provisioning
from llama3_ops.remote import hosts, services, transport, tunnel
from llama3_ops.stages import agent as agent_stage
from llama3_ops.stages import agent_finetune as agent_ft
from llama3_ops.stages import chat as chat_stage
from llama3_ops.stages import client as chat_client
from llama3_ops.stages import finetune as ft
from llama3_ops.stages import llava as llava_stage
from llama3_ops.stages import llava_finetune as llava_ft
from llama3_ops.stages import quantize as quantize_stage
from llama3_ops.stages import serve as srv
from llama3_ops.stages import webdemo as webdemo_stage
from llama3_ops.stages.options import Opt, fab_task

console = Console()


def _remote(c: Connection) -> transport.SSHRemote:
    return transport.SSHRemote(hosts.resolve(c.original_host or c.host))


def _host(c: Connection) -> str:
    return str(c.original_host or c.host)


@task(help={"profile": "cpu | course | current | host (default: the inventory's)", "check": "dry run (--check)"})
@user_errors
def provision(c: Connection, profile: str = "", check: bool = False) -> None:
    """Provision the host with site.yml (ansible-playbook -i $LLAMA3_INVENTORY site.yml --limit HOST)."""
    extra: dict[str, object] | None = {"llama3_profile": profile} if profile else None
    run = provisioning.run_playbook(hosts.default_inventory(), extra_vars=extra, check=check, echo=True,
                                    limit=_host(c))
    sys.exit(run.rc)


def _serve(c: Connection, v: SimpleNamespace) -> None:
    remote = _remote(c)
    result = srv.serve(remote, srv.config_from(v), restart=v.restart, console=console)
    spec = tunnel.TunnelSpec(target=remote.target, remote_port=v.port, local_port=v.local_port)
    model_id = result.ready.model_id if result.ready else "?"
    if v.detach:
        state = tunnel.up(spec)
        for notice in state.notices:
            console.print(f"tunnel: {notice}", style="yellow", markup=False)
        console.print(f"API {state.url}/docs  model {model_id!r}  stop: fab -H {c.host} down", markup=False)
        return
    console.print(f"model {model_id!r}; Swagger UI on the local URL below; Ctrl-C closes the tunnel "
                  f"(the server keeps running: fab -H {c.host} stop)", markup=False)
    sys.exit(tunnel.run_foreground(spec, console=console))


serve = fab_task("serve", "Start (or reuse) the model server on the host and open the SSH tunnel to it.", (
    *srv.OPTIONS,
    Opt("local_port", 23333, "the tunnel's local end"),
    Opt("detach", False, "leave a background tunnel and return"),
), _serve)


@task(help={"local_port": "the tunnel's local end, when none is open yet",
            "port": "the model server's port on the host"})
@user_errors
def client(c: Connection, local_port: int = 23333, port: int = 23333) -> None:
    """Interactive streamed chat with fab serve's model server, through its tunnel (opened if none is up)."""
    target = _remote(c).target
    state = tunnel.up_or_reuse(tunnel.TunnelSpec(target=target, remote_port=port, local_port=local_port,
                                                 name=srv.SERVICE_NAME))
    sys.exit(chat_client.repl(state.url, api_key=os.environ.get(srv.API_KEY_ENV)))


@task
@user_errors
def status(c: Connection) -> None:
    """Services on the host with their health, and tunnels on this machine."""
    srv.report_status(_remote(c), api_key=os.environ.get(srv.API_KEY_ENV), console=console)


@task(help={"service": "llm (fab serve), webdemo, agent, finetune-train, ...", "lines": "lines to show",
            "follow": "keep following (--no-follow: print and return)"})
@user_errors
def logs(c: Connection, service: str = "llm", lines: int = 50, follow: bool = True) -> None:
    """Tail (and follow) a service's log."""
    if follow:
        sys.exit(services.follow_logs(_remote(c), service, lines=lines))
    print(services.logs(_remote(c), service, lines=lines))


@task(help={"service": "the service to stop (fab status lists them)"})
@user_errors
def stop(c: Connection, service: str = "llm") -> None:
    """Stop a service on the host and check nothing listens on its port any more."""
    remote = _remote(c)
    known = [s.name for s in services.list_services(remote)]
    if service not in known:
        raise services.ServiceError(f"no service {service!r} on {remote.label} (services there: "
                                    f"{', '.join(known) or 'none'}); fab -H {c.host} status lists them")
    st = srv.stop(remote, service)
    console.print(f"{service}: {st.state}", markup=False)


@task
@user_errors
def down(c: Connection) -> None:
    """Stop every service on the host and every tunnel on this machine."""
    remote = _remote(c)
    for st in services.list_services(remote):
        srv.stop(remote, st.name)
        console.print(f"stopped {st.name}", markup=False)
    for name in tunnel.down():
        console.print(f"closed tunnel {name}", markup=False)


def _chat(c: Connection, v: SimpleNamespace) -> None:
    sys.exit(chat_stage.run_interactive(_remote(c), chat_stage.config_from(v), console=console))


chat = fab_task("chat", "lmdeploy chat on the host in this terminal; then the GPU memory it held (the course's "
                "nvidia-smi).", chat_stage.OPTIONS, _chat)


def _quantize(c: Connection, v: SimpleNamespace) -> None:
    quantize_stage.quantize(_remote(c), quantize_stage.config_from(v), console=console, restart=v.restart)


quantize = fab_task("quantize", "W4A16 AWQ (lmdeploy auto_awq, offline calibration) into <model>_4bit; then "
                    "chat/serve --model 4bit.", (
    *quantize_stage.OPTIONS, Opt("restart", False, "replace a running quantization")), _quantize)


def _llava(c: Connection, v: SimpleNamespace) -> None:
    cfg = llava_stage.config_from(v, install_llava=v.install_llava, llava_ref=v.llava_ref)
    result = llava_stage.describe(_remote(c), cfg, console=console)
    console.print(result.text, markup=False, highlight=False)


llava = fab_task("llava", "Describe an image with LLaVA-Llama-3 through lmdeploy's pipeline on the host.", (
    *llava_stage.OPTIONS,
    Opt("install_llava", False, "pip install --no-deps the LLaVA repo first (lmdeploy 0.4.x)"),
    Opt("llava_ref", "", "a tag or commit of the LLaVA repo (default: its default branch)"),
), _llava)


def _webdemo(c: Connection, v: SimpleNamespace) -> None:
    cfg = webdemo_stage.StreamlitConfig(model=v.model, backend=v.backend, port=v.port, api_port=v.api_port,
                                        api_key=os.environ.get(srv.API_KEY_ENV), env_bin_dir=v.env,
                                        max_length=v.max_length)
    sys.exit(webdemo_stage.webdemo(_remote(c), cfg, local_port=v.local_port, detach=v.detach, restart=v.restart,
                                   host=_host(c), console=console))


webdemo = fab_task("webdemo", "Stage 1: the course's Streamlit chat on the host (supervised), tunnelled to local "
                   "8501 or the next free port.", webdemo_stage.OPTIONS, _webdemo)


def _agent(c: Connection, v: SimpleNamespace) -> None:
    cfg = agent_stage.agent_config(v.model, v.backend, port=v.port, api_port=v.api_port,
                                   api_key=os.environ.get(srv.API_KEY_ENV), env_bin_dir=v.env, max_turn=v.max_turn,
                                   max_new_tokens=v.max_new_tokens)
    sys.exit(agent_stage.agent(_remote(c), cfg, local_port=v.local_port, detach=v.detach, restart=v.restart,
                               host=_host(c), console=console))


agent = fab_task("agent", "Stage 5: the course's Lagent ReAct web demo (ArxivSearch + FinishAction), tunnelled to "
                 "local 8502 or the next free port.", agent_stage.OPTIONS, _agent)


def _detachable(run: object) -> None:
    try:
        run()  # type: ignore[operator]
    except ft.FinetuneDetached as exc:
        console.print(str(exc), style="yellow", markup=False)
        sys.exit(130)


finetune = fab_task("finetune", "Stage 2: self-cognition fine-tune: dataset, xtuner train, pth_to_hf, merge into "
                    "~/model/llama3_hf_merged.", ft.OPTIONS,
                    lambda c, v: _detachable(lambda: ft.finetune_from(_remote(c), v, console)))
llava_finetune = fab_task("llava-finetune", "Stage 3: LLaVA image fine-tune (XTuner: LoRA on Llama 3 and CLIP, "
                          "the pretrained projector), pth_to_hf, then one answer about an image.", llava_ft.OPTIONS,
                          lambda c, v: _detachable(lambda: llava_ft.llava_finetune_from(_remote(c), v, console)))
agent_finetune = fab_task("agent-finetune", "Stage 5: Agent-FLAN fine-tune (LoRA r=64, max_length 4096), convert, "
                          "merge into ~/model/llama3_agent_flan_merged.", agent_ft.OPTIONS,
                          lambda c, v: _detachable(lambda: agent_ft.agent_finetune_from(_remote(c), v, console)))
