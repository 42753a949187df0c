"""Fabric tasks: each course stage as one command from your laptop. Logic lives in llama3_ops.

    fab -H gpu1 provision            ansible-playbook site.yml on that host
    fab -H gpu1 serve                lmdeploy api_server on the host's 127.0.0.1:23333 + SSH tunnel
    fab -H gpu1 client               streamed chat with the served model, through the tunnel
    fab -H gpu1 status | logs | stop | down
    fab -H gpu1 chat [--model 4bit]  lmdeploy chat in this terminal, then the GPU memory it held
    fab -H gpu1 quantize             W4A16 AWQ (course parameters, offline calibration) -> <model>_4bit
    fab -H gpu1 llava --image F|URL  describe an image with LLaVA-Llama-3 (lmdeploy pipeline)
    fab -H gpu1 webdemo | agent      the Streamlit chat / the Lagent ReAct demo, tunnelled
    fab -H gpu1 finetune | agent-finetune    XTuner train -> pth_to_hf -> merge (resumable)

Hosts come from the Ansible inventory ($LLAMA3_INVENTORY, default inventory/my.yml).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fabric import Connection, task
from rich.console import Console

from llama3_ops.cli import user_errors
from llama3_ops.provision import playbook as provisioning
from llama3_ops.remote import hosts, services, transport, tunnel
from llama3_ops.stages import agent as agent_stage
from llama3_ops.stages import agent_finetune as agent_ft
from llama3_ops.stages import chat as chat_stage
from llama3_ops.stages import client as chat_client
from llama3_ops.stages import finetune as ft
from llama3_ops.stages import llava as llava_stage
from llama3_ops.stages import quantize as quantize_stage
from llama3_ops.stages import serve as srv
from llama3_ops.stages import webdemo as webdemo_stage

console = Console()


def _remote(c: Connection) -> transport.SSHRemote:
    return transport.SSHRemote(hosts.resolve(c.original_host or c.host))


@task
@user_errors
def provision(c: Connection, profile: str = "", check: bool = False) -> None:
    """Provision the host with site.yml (optionally --profile cpu|course|current, --check)."""
    extra: dict[str, object] | None = {"llama3_profile": profile} if profile else None
    run = provisioning.run_playbook(hosts.default_inventory(), extra_vars=extra, check=check, echo=True,
                                 limit=c.original_host or c.host)
    sys.exit(run.rc)


@task(help={"model": "base | merged | 4bit | a path on the host", "engine": "lmdeploy (GPU) | transformers (CPU)",
            "detach": "leave a background tunnel and return", "restart": "restart a server with other settings"})
@user_errors
def serve(c: Connection, model: str = "base", engine: str = "lmdeploy", backend: str = "turbomind", tp: int = 1,
          cache_max_entry_count: float = 0.5, quant_policy: int = 0, max_batch_size: int = 64,
          session_len: int = 8192, port: int = 23333, local_port: int = 23333, expose: bool = False,
          env: str = "", restart: bool = False, detach: bool = False) -> None:
    """Start (or reuse) the model server on the host and open the SSH tunnel to it."""
    remote = _remote(c)
    cfg = srv.ServeConfig(engine=engine, model=model, port=port, expose=expose,  # type: ignore[arg-type]
                          api_key=os.environ.get(srv.API_KEY_ENV), env_bin_dir=env or None, backend=backend,  # type: ignore[arg-type]
                          tp=tp, cache_max_entry_count=cache_max_entry_count, quant_policy=quant_policy,  # type: ignore[arg-type]
                          max_batch_size=max_batch_size, session_len=session_len)
    result = srv.serve(remote, cfg, restart=restart, console=console)
    spec = tunnel.TunnelSpec(target=remote.target, remote_port=port, local_port=local_port)
    model_id = result.ready.model_id if result.ready else "?"
    if detach:
        state = tunnel.up(spec)
        console.print(f"API {state.url}/docs  model {model_id!r}  stop: fab -H {c.host} down")
        return
    console.print(f"model {model_id!r}; Swagger UI on the local URL below; Ctrl-C closes the tunnel "
                  f"(the server keeps running: fab -H {c.host} stop)")
    sys.exit(tunnel.run_foreground(spec, console=console))


@task
@user_errors
def client(c: Connection, local_port: int = 23333) -> None:
    """Interactive streamed chat through the tunnel (opens one if none is up)."""
    states = [s for s in tunnel.tunnel_status() if s.alive]
    if not states:
        states = [tunnel.up(tunnel.TunnelSpec(target=_remote(c).target, local_port=local_port))]
    sys.exit(chat_client.repl(states[0].url, api_key=os.environ.get(srv.API_KEY_ENV)))


@task
@user_errors
def status(c: Connection) -> None:
    """Services on the host with their health, and tunnels on this machine."""
    srv.report_status(_remote(c), api_key=os.environ.get(srv.API_KEY_ENV), console=console)


@task
@user_errors
def logs(c: Connection, service: str = "llm", lines: int = 50, follow: bool = True) -> None:
    """Tail (and follow) a service's log."""
    if follow:
        sys.exit(services.follow_logs(_remote(c), service, lines=lines))
    print(services.logs(_remote(c), service, lines=lines))


@task
@user_errors
def stop(c: Connection, service: str = "llm") -> None:
    """Stop a service on the host and check nothing listens on its port any more."""
    remote = _remote(c)
    known = [s.name for s in services.list_services(remote)]
    if service not in known:
        raise services.ServiceError(f"no service {service!r} on {remote.label} (services there: "
                                    f"{', '.join(known) or 'none'}); fab -H {c.host} status lists them")
    st = srv.stop(remote, service)
    console.print(f"{service}: {st.state}")


@task
@user_errors
def down(c: Connection) -> None:
    """Stop every service on the host and every tunnel on this machine."""
    remote = _remote(c)
    for st in services.list_services(remote):
        srv.stop(remote, st.name)
        console.print(f"stopped {st.name}")
    for name in tunnel.down():
        console.print(f"closed tunnel {name}")


@task(help={"model": "base | merged | 4bit | a path on the host", "backend": "turbomind | pytorch",
            "cache_max_entry_count": "KV cache share of free GPU memory (course: 0.5, then 0.01)",
            "env": "bin directory of the host's lmdeploy env"})
@user_errors
def chat(c: Connection, model: str = "base", backend: str = "turbomind", cache_max_entry_count: float = 0.0,
         session_len: int = 0, env: str = "") -> None:
    """lmdeploy chat on the host in this terminal; then the GPU memory it held (as the course's nvidia-smi)."""
    cfg = chat_stage.ChatConfig(model=model, backend=backend,  # type: ignore[arg-type]
                                cache_max_entry_count=cache_max_entry_count or None,
                                session_len=session_len or None, env_bin_dir=env or None)
    sys.exit(chat_stage.run_interactive(_remote(c), cfg, console=console))


@task(help={"model": "base | merged | a path on the host", "out": "default: the model's path + _4bit",
            "calib_file": "a local UTF-8 text to calibrate on (default: the Python reference text on the host)",
            "calib_dataset": "lmdeploy's own set instead (needs the Hugging Face Hub)",
            "force": "quantize again over a finished result", "restart": "replace a running quantization"})
@user_errors
def quantize(c: Connection, model: str = "base", out: str = "", calib_file: str = "", calib_dataset: str = "",
             calib_samples: int = 128, calib_seqlen: int = 1024, w_group_size: int = 128, batch_size: int = 1,
             env: str = "", force: bool = False, restart: bool = False) -> None:
    """W4A16 AWQ (lmdeploy auto_awq, offline calibration) into <model>_4bit; then chat/serve --model 4bit."""
    cfg = quantize_stage.QuantizeConfig(model=model, out=out or None,
                                        calib_file=Path(calib_file) if calib_file else None,
                                        calib_dataset=calib_dataset or None, calib_samples=calib_samples,
                                        calib_seqlen=calib_seqlen, w_group_size=w_group_size,
                                        batch_size=batch_size, env_bin_dir=env or None, force=force)
    quantize_stage.quantize(_remote(c), cfg, console=console, restart=restart)


@task(help={"image": "a local image file (uploaded) or an http(s) URL",
            "model": "LLaVA-Llama-3 on the host", "install_llava": "pip install --no-deps the LLaVA repo first"})
@user_errors
def llava(c: Connection, image: str, prompt: str = "Describe this image.", model: str = llava_stage.DEFAULT_MODEL,
          backend: str = "turbomind", env: str = "", install_llava: bool = False,
          llava_ref: str = "") -> None:
    """Describe an image with LLaVA-Llama-3 through lmdeploy's pipeline on the host."""
    cfg = llava_stage.LlavaConfig(image=image, prompt=prompt, model=model, backend=backend,  # type: ignore[arg-type]
                                  env_bin_dir=env or None, install_llava=install_llava, llava_ref=llava_ref)
    result = llava_stage.describe(_remote(c), cfg, console=console)
    console.print(result.text, markup=False, highlight=False)


@task(help={"model": "base | merged | 4bit | a path on the host (api backend: the served model, for its tokenizer)",
            "backend": "local (the app loads the model) | api (the fab serve server)",
            "local_port": "local end of the tunnel (the next free port when busy)",
            "detach": "leave a background tunnel and return", "restart": "replace a web demo with other settings"})
@user_errors
def webdemo(c: Connection, model: str = "base", backend: str = "local", port: int = 8501, local_port: int = 8501,
            api_port: int = 23333, max_length: int = 8192, env: str = "", restart: bool = False,
            detach: bool = False) -> None:
    """The course's Streamlit chat on the host (supervised), tunnelled to local 8501 or the next free port."""
    cfg = webdemo_stage.StreamlitConfig(model=model, backend=backend, port=port, api_port=api_port,  # type: ignore[arg-type]
                                        api_key=os.environ.get(srv.API_KEY_ENV), env_bin_dir=env or None,
                                        max_length=max_length)
    sys.exit(webdemo_stage.webdemo(_remote(c), cfg, local_port=local_port, detach=detach, restart=restart,
                                   host=c.original_host or c.host, console=console))


@task(help={"model": "base | merged | 4bit | a path on the host", "backend": "local | api (the fab serve server)",
            "max_turn": "LLM calls per question (lagent's ReAct default 4)",
            "max_new_tokens": "tokens per step (the slider's start value)",
            "detach": "leave a background tunnel and return", "restart": "replace an agent demo with other settings"})
@user_errors
def agent(c: Connection, model: str = "base", backend: str = "local", port: int = 8502, local_port: int = 8502,
          api_port: int = 23333, max_turn: int = 4, max_new_tokens: int = 512, env: str = "",
          restart: bool = False, detach: bool = False) -> None:
    """The course's Lagent ReAct web demo (ArxivSearch + FinishAction), tunnelled to local 8502 or the next free."""
    cfg = agent_stage.agent_config(model, backend, port=port, api_port=api_port,
                                   api_key=os.environ.get(srv.API_KEY_ENV), env_bin_dir=env or None, max_turn=max_turn,
                                   max_new_tokens=max_new_tokens)
    sys.exit(agent_stage.agent(_remote(c), cfg, local_port=local_port, detach=detach, restart=restart,
                               host=c.original_host or c.host, console=console))


def _finetune_errors(run: object) -> None:
    try:
        run()  # type: ignore[operator]
    except ft.FinetuneDetached as exc:
        console.print(str(exc), style="yellow", markup=False)
        sys.exit(130)


@task(help={"name": "the assistant's name the dataset teaches (course: SmartFlowAI)",
            "count": "identical records in the dataset (course: 2000)",
            "system": "system prompt of the records (default: the course's)",
            "base_model": "base | a model path on the host",
            "device": "auto | gpu | cpu (cpu: LoRA instead of QLoRA, --cpu-iters iterations)",
            "max_iters": "a short GPU run of N iterations (0: the course's 3 epochs)",
            "until": "train | convert | merge (default merge: all the way)"})
@user_errors
def finetune(c: Connection, name: str = "SmartFlowAI", count: int = 2000, system: str = "", base_model: str = "base",
             device: str = "auto", cpu_iters: int = 4, max_iters: int = 0, until: str = "merge") -> None:
    """Self-cognition fine-tune: dataset, xtuner train, pth_to_hf, merge into ~/model/llama3_hf_merged."""
    _finetune_errors(lambda: ft.run_finetune(
        _remote(c), name=name, count=count, system=system or None, base_model=base_model,
        device=device, cpu_iters=cpu_iters, max_iters=max_iters, until=until, console=console))  # type: ignore[arg-type]


@task(help={"data_dir": "Agent-FLAN's data/ folder on the host",
            "upload": "a local folder with Agent-FLAN's *.jsonl, uploaded instead",
            "base_model": "base | a model path on the host", "device": "auto | gpu | cpu",
            "max_iters": "a short GPU run of N iterations (0: the course's 3 epochs)",
            "until": "train | convert | merge"})
@user_errors
def agent_finetune(c: Connection, data_dir: str = "~/Agent-FLAN/data", upload: str = "", base_model: str = "base",
                   device: str = "auto", cpu_iters: int = 2, max_iters: int = 0, until: str = "merge") -> None:
    """Agent-FLAN fine-tune (LoRA r=64, max_length 4096), convert, merge into ~/model/llama3_agent_flan_merged."""
    _finetune_errors(lambda: agent_ft.run_agent_finetune(
        _remote(c), data_dir=data_dir, upload=Path(upload) if upload else None, base_model=base_model,
        device=device, cpu_iters=cpu_iters, max_iters=max_iters, until=until, console=console))  # type: ignore[arg-type]
