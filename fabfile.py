"""Fabric tasks: each course stage as one command from your laptop. Logic lives in llama3_ops.

    fab -H gpu1 provision            ansible-playbook site.yml on that host
    fab -H gpu1 serve                lmdeploy api_server on the host's 127.0.0.1:23333 + SSH tunnel
    fab -H gpu1 client               streamed chat with the served model, through the tunnel
    fab -H gpu1 status | logs | stop | down

Hosts come from the Ansible inventory ($LLAMA3_INVENTORY, default inventory/my.yml).
"""

from __future__ import annotations

import os
import sys

from fabric import Connection, task
from rich.console import Console

from llama3_ops import chat_client, hosts, services, tunnel
from llama3_ops import provision as provisioning
from llama3_ops import serve as srv
from llama3_ops.health import NotReadyError

console = Console()


def _remote(c: Connection) -> services.SSHRemote:
    return services.SSHRemote(hosts.resolve(c.original_host or c.host))


@task
def provision(c: Connection, profile: str = "", check: bool = False) -> None:
    """Provision the host with site.yml (optionally --profile cpu|course|current, --check)."""
    extra: dict[str, object] | None = {"llama3_profile": profile} if profile else None
    run = provisioning.run_playbook(hosts.default_inventory(), extra_vars=extra, check=check, echo=True,
                                 limit=c.original_host or c.host)
    sys.exit(run.rc)


@task(help={"model": "base | merged | 4bit | a path on the host", "engine": "lmdeploy (GPU) | transformers (CPU)",
            "detach": "leave a background tunnel and return", "restart": "restart a server with other settings"})
def serve(c: Connection, model: str = "base", engine: str = "lmdeploy", backend: str = "turbomind", tp: int = 1,
          cache_max_entry_count: float = 0.5, quant_policy: int = 0, max_batch_size: int = 64,
          session_len: int = 8192, port: int = 23333, local_port: int = 23333, expose: bool = False,
          env: str = "~/envs/lmdeploy/bin", restart: bool = False, detach: bool = False) -> None:
    """Start (or reuse) the model server on the host and open the SSH tunnel to it."""
    remote = _remote(c)
    cfg = srv.ServeConfig(engine=engine, model=model, port=port, expose=expose,  # type: ignore[arg-type]
                          api_key=os.environ.get(srv.API_KEY_ENV), env_bin_dir=env, backend=backend,  # type: ignore[arg-type]
                          tp=tp, cache_max_entry_count=cache_max_entry_count, quant_policy=quant_policy,  # type: ignore[arg-type]
                          max_batch_size=max_batch_size, session_len=session_len)
    try:
        result = srv.serve(remote, cfg, restart=restart, console=console)
    except (srv.ServeConfigError, services.ServiceError, NotReadyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)
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
def client(c: Connection, local_port: int = 23333) -> None:
    """Interactive streamed chat through the tunnel (opens one if none is up)."""
    states = [s for s in tunnel.tunnel_status() if s.alive]
    if not states:
        states = [tunnel.up(tunnel.TunnelSpec(target=_remote(c).target, local_port=local_port))]
    sys.exit(chat_client.repl(states[0].url, api_key=os.environ.get(srv.API_KEY_ENV)))


@task
def status(c: Connection) -> None:
    """Services on the host with their health, and tunnels on this machine."""
    srv.report_status(_remote(c), api_key=os.environ.get(srv.API_KEY_ENV), console=console)


@task
def logs(c: Connection, service: str = "llm", lines: int = 50, follow: bool = True) -> None:
    """Tail (and follow) a service's log."""
    if follow:
        sys.exit(services.follow_logs(_remote(c), service, lines=lines))
    print(services.logs(_remote(c), service, lines=lines))


@task
def stop(c: Connection, service: str = "llm") -> None:
    """Stop a service on the host and check nothing listens on its port any more."""
    st = srv.stop(_remote(c), service)
    console.print(f"{service}: {st.state}")


@task
def down(c: Connection) -> None:
    """Stop every service on the host and every tunnel on this machine."""
    remote = _remote(c)
    for st in services.list_services(remote):
        srv.stop(remote, st.name)
        console.print(f"stopped {st.name}")
    for name in tunnel.down():
        console.print(f"closed tunnel {name}")
