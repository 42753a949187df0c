"""Build and run the course's OpenAI-compatible model server on the host (stage 4, "deploy").

Replaces ``lmdeploy serve api_server ... --server-name 0.0.0.0`` in a foreground terminal with a
supervised service bound to 127.0.0.1 (reached through :mod:`llama3_ops.remote.tunnel`).

Model names (``base``, ``merged``, ``4bit`` or a path) and the engine's environment come from the
host contract, :mod:`llama3_ops.stages.host`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from llama3_ops import engine_settings
from llama3_ops.errors import Llama3OpsError, report, returns_exit_code
from llama3_ops.remote import health, services, transport
from llama3_ops.remote.connection import SSHTarget
from llama3_ops.remote.ports import DEFAULT_PORT
from llama3_ops.remote.services import Arg, Secret, ServiceSpec, ServiceStatus
from llama3_ops.remote.transport import Remote
from llama3_ops.stages import gpu, warmup
from llama3_ops.stages.host import Host, read_host
from llama3_ops.stages.options import Opt, add_to

API_KEY_ENV = "LLAMA3_OPS_API_KEY"
ENGINE_ENV = "lmdeploy"  # host.json's env that holds the engine (lmdeploy, or transformers on the cpu profile)
SERVICE_NAME = "llm"
_TABLE = "(default: for the GPU, from llama3_ops/data/engine_settings.yml)"

# fab serve and `python -m llama3_ops.stages.serve up` take these (llama3_ops.stages.options).
OPTIONS: tuple[Opt, ...] = (
    Opt("model", "base", "base | merged | 4bit | a path on the host"),
    Opt("engine", "lmdeploy", "the server: lmdeploy (GPU) or transformers serve (CPU)",
        choices=("lmdeploy", "transformers")),
    Opt("backend", "turbomind", "lmdeploy's engine", choices=("turbomind", "pytorch")),
    Opt("tp", 1, "GPUs for tensor parallelism (a power of two)"),
    Opt("cache_max_entry_count", None, f"the KV cache's share of free GPU memory {_TABLE}", kind=float),
    Opt("quant_policy", None, f"KV cache quantization: 0 none, 4 int4, 8 int8, 16 fp8 {_TABLE}", kind=int,
        choices=(0, 4, 8, 16)),
    Opt("max_batch_size", None, f"requests the engine batches at most {_TABLE}", kind=int),
    Opt("max_prefill_token_num", None, f"tokens per prefill step {_TABLE}", kind=int),
    Opt("session_len", 8192, "tokens per session (prompt and answer)"),
    Opt("port", DEFAULT_PORT, "the server's port on the host's 127.0.0.1"),
    Opt("expose", False, f"bind 0.0.0.0 instead of 127.0.0.1: needs an API key in ${API_KEY_ENV}"),
    Opt("env", None, "bin directory of the env with the engine (default: host.json's lmdeploy env)"),
    Opt("restart", False, "replace a server that runs with other settings"),
    Opt("warmup", True, "before saying ready, send waves of requests at the max batch size so the engine "
        "compiles its kernels (--no-warmup: ready at the first token)"),
)


class ServeConfigError(Llama3OpsError, ValueError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    engine: Literal["lmdeploy", "transformers"] = "lmdeploy"
    model: str = "base"
    port: int = DEFAULT_PORT
    expose: bool = False  # bind 0.0.0.0 (needs api_key); default 127.0.0.1 + tunnel
    api_key: str | None = None
    env_bin_dir: str | None = None  # bin dir holding the engine CLI; None: host.json's lmdeploy env
    # lmdeploy
    backend: Literal["turbomind", "pytorch"] = "turbomind"
    tp: int = 1
    # None: chosen for the GPU by serve() (llama3_ops.engine_settings); a value is a flag that wins
    cache_max_entry_count: float | None = None
    quant_policy: int | None = None  # 16: fp8 KV cache (lmdeploy >= 0.10 PyTorch engine)
    max_batch_size: int | None = None
    max_prefill_token_num: int | None = None
    warmup: bool = True  # warm the engine before "ready" (llama3_ops.stages.warmup)
    session_len: int = 8192
    model_format: str | None = None  # None: awq for the 4bit model, hf otherwise
    log_level: str | None = "ERROR"
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    name: str = SERVICE_NAME

    @property
    def bind(self) -> str:
        return "0.0.0.0" if self.expose else "127.0.0.1"  # noqa: S104 - only with expose + api key

    def validate(self) -> None:
        if self.expose and not self.api_key:
            raise ServeConfigError(
                f"--expose binds 0.0.0.0 for everyone who can reach the host: it needs an API key in ${API_KEY_ENV} "
                "(export it, never on the command line); or keep the default 127.0.0.1 and use the SSH tunnel"
            )
        if self.engine == "transformers" and self.api_key:
            raise ServeConfigError(
                f"`transformers serve` cannot check an API key, and ${API_KEY_ENV} is set: unset it for the CPU "
                "engine (its server stays on 127.0.0.1, behind the tunnel), or serve with --engine lmdeploy"
            )
        if self.engine not in ("lmdeploy", "transformers"):
            raise ServeConfigError(f"unknown engine {self.engine!r} (lmdeploy|transformers)")
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"bad port {self.port}")
        if self.quant_policy not in (None, 0, 4, 8, 16):
            raise ServeConfigError("quant_policy must be 0, 4 (int4 KV), 8 (int8 KV) or 16 (fp8 KV)")
        if self.quant_policy == 16 and self.backend == "turbomind":
            raise ServeConfigError("--quant-policy 16 (fp8 KV) needs --backend pytorch; TurboMind takes 0, 4 or 8")
        for name in ("max_batch_size", "max_prefill_token_num"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be at least 1, got {n}")
        if self.tp < 1 or self.tp & (self.tp - 1):
            raise ServeConfigError(f"--tp must be a power of two (1, 2, 4, 8), as lmdeploy requires; got {self.tp}")
        if self.cache_max_entry_count is not None and not 0 < self.cache_max_entry_count <= 1:
            raise ServeConfigError(f"--cache-max-entry-count must be in (0, 1], got {self.cache_max_entry_count}")

    def settings(self) -> dict[str, str]:
        """Every setting, for the reuse fingerprint (the CPU engine's argv leaves the lmdeploy ones out)."""
        keep = ("engine", "model", "backend", "tp", "cache_max_entry_count", "quant_policy", "max_batch_size",
                "max_prefill_token_num", "session_len", "model_format", "expose")
        return {k: str(getattr(self, k)) for k in keep}


def config_from(v: Any, **more: Any) -> ServeConfig:
    """A :class:`ServeConfig` from :data:`OPTIONS`' values (the API key from ``$LLAMA3_OPS_API_KEY``)."""
    return ServeConfig(engine=v.engine, model=v.model, port=v.port, expose=v.expose, env_bin_dir=v.env,
                       backend=v.backend, tp=v.tp, cache_max_entry_count=v.cache_max_entry_count,
                       quant_policy=v.quant_policy, max_batch_size=v.max_batch_size,
                       max_prefill_token_num=v.max_prefill_token_num, session_len=v.session_len,
                       warmup=v.warmup,
                       **{"api_key": os.environ.get(API_KEY_ENV) or None, **more})


def build_spec(cfg: ServeConfig, host: Host) -> ServiceSpec:
    """The :class:`ServiceSpec` for ``cfg``; the API key is an env secret, never a literal arg."""
    cfg.validate()
    model_path, fmt = host.model(cfg.model)
    bin_dir = host.env_bin(ENGINE_ENV, cfg.env_bin_dir)
    env = {"PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **cfg.env}
    secrets: dict[str, str] = {}
    argv: list[Arg]
    if cfg.engine == "lmdeploy":
        argv = [
            f"{bin_dir}/lmdeploy",
            "serve",
            "api_server",
            model_path,
            "--server-name",
            cfg.bind,
            "--server-port",
            str(cfg.port),
            "--backend",
            cfg.backend,
            "--tp",
            str(cfg.tp),
        ]
        # None: not passed (the engine's own default); serve() fills them from the GPU table first
        for flag, value in (("--cache-max-entry-count", cfg.cache_max_entry_count),
                            ("--quant-policy", cfg.quant_policy), ("--max-batch-size", cfg.max_batch_size),
                            ("--max-prefill-token-num", cfg.max_prefill_token_num)):
            if value is not None:
                argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        argv += ["--session-len", str(cfg.session_len)]
        model_format = cfg.model_format or fmt
        if model_format:
            argv += ["--model-format", model_format]
        if cfg.api_key:
            argv += ["--api-keys", Secret(API_KEY_ENV)]
            secrets[API_KEY_ENV] = cfg.api_key
        if cfg.log_level:
            argv += ["--log-level", cfg.log_level]
    else:
        argv = [f"{bin_dir}/transformers", "serve", model_path, "--host", cfg.bind, "--port", str(cfg.port)]
        if cfg.log_level:
            argv += ["--log-level", cfg.log_level.lower()]
        env.setdefault("HF_HUB_OFFLINE", "1")
    argv += list(cfg.extra_args)
    return ServiceSpec(name=cfg.name, argv=tuple(argv), env=env, secrets=secrets, cwd="~", port=cfg.port,
                       settings=cfg.settings())


@dataclass
class ServeResult:
    status: ServiceStatus
    started_now: bool
    ready: health.Ready | None
    command: str
    tuning: engine_settings.Tuning | None = None
    warmup: warmup.Result | None = None


def tuned(cfg: ServeConfig, gpu0: gpu.GPU | None) -> tuple[ServeConfig, engine_settings.Tuning]:
    """``cfg`` with every engine setting not given as a flag taken from the GPU table (lmdeploy only)."""
    chosen = engine_settings.choose(gpu0.name if gpu0 else None, gpu0.memory_total_mib if gpu0 else -1, cfg.backend)
    t = engine_settings.with_flags(chosen, max_batch_size=cfg.max_batch_size,
                                   cache_max_entry_count=cfg.cache_max_entry_count, quant_policy=cfg.quant_policy,
                                   max_prefill_token_num=cfg.max_prefill_token_num)
    out = replace(cfg, max_batch_size=t.max_batch_size, cache_max_entry_count=t.cache_max_entry_count,
                  quant_policy=t.quant_policy, max_prefill_token_num=t.max_prefill_token_num)
    out.validate()
    return out, t


def check_host(remote: Remote, spec: ServiceSpec, cfg: ServeConfig, host: Host) -> None:
    """Clear errors before starting: the model dir and the engine executable must exist."""
    model_path = str(spec.argv[3] if cfg.engine == "lmdeploy" else spec.argv[2])
    exe = str(spec.argv[0])
    script = (
        f"m={shlex.quote(model_path)}; e={shlex.quote(exe)}\n"
        'if [ ! -d "$m" ]; then echo "model directory $m does not exist"; exit 3; fi\n'
        'if [ ! -f "$m/config.json" ]; then\n'
        '  echo "$m has no config.json: not a Hugging Face model dir"; exit 3\n'
        "fi\n"
        'if [ ! -x "$e" ]; then echo "$e not found or not executable (env_bin_dir)"; exit 4; fi\n'
    )
    res = remote.run(script, timeout=30, check=False)
    if res.rc != 0:
        hint = ""
        if res.rc == 3:
            hint = host.model_hint(cfg.model)
        elif res.rc == 4:
            hint = f" (host.json's {ENGINE_ENV!r} env, or the --env given, must have the engine installed)"
        raise ServeConfigError(f"on {remote.label}: {res.stdout.strip() or res.stderr.strip()}{hint}")


def serve(
    remote: Remote,
    cfg: ServeConfig,
    *,
    restart: bool = False,
    wait: bool = True,
    timeout: float = 900.0,
    console: Console | None = None,
    mode: services.Mode = "auto",
) -> ServeResult:
    """Start (or reuse) the model server and wait until it answers a real 1-token completion.

    On a failed start-up the service is stopped (no process, no listener left) and
    :class:`health.NotReadyError` is raised with the last log lines.
    """
    console = console or Console(stderr=True)
    cfg.validate()
    host = read_host(remote)
    # the model and the engine first: a missing one is the error to show, before any GPU question
    check_host(remote, build_spec(cfg, host), cfg, host)
    current = services.status(remote, cfg.name, log_lines=0)
    tune: engine_settings.Tuning | None = None
    if cfg.engine == "lmdeploy":
        if current.running:  # it holds the GPU memory: the table goes by the GPU's model and total memory
            gpus = gpu.query_gpus(remote)
        else:  # GPU count and memory for --tp N before anything starts
            gpus = gpu.check_tp(remote, "serve", cfg.tp)
            console.print(f"GPUs for --tp {cfg.tp}: " + gpu.memory_line(gpus), markup=False)
        cfg, tune = tuned(cfg, gpus[0] if gpus else None)
        gpu_name = gpus[0].name if gpus else "no GPU"
        console.print(f"engine settings for {gpu_name}: {tune.line()}", markup=False)
    spec = build_spec(cfg, host)
    console.print(f"{cfg.name} on {remote.label}: {spec.display()}", markup=False)
    st, started_now = services.start(remote, spec, restart=restart, mode=mode, current=current)
    console.print(
        f"{'started' if started_now else 'already running with the same settings, reused'}: "
        f"pid {st.pid} ({st.mode}), log {st.log_path}"
    )
    ready = None
    warm: warmup.Result | None = None
    if wait:
        probe = health.RemoteHttpProbe(remote, cfg.port, cfg.api_key)
        with services.stopped_on_failure(remote, cfg.name, started_now, lambda e: console.print(
                f"cleanup after failed start-up also failed: {e}", style="red", markup=False)):
            ready = health.wait_ready(
                probe,
                timeout=timeout,
                alive=lambda: services.status(remote, cfg.name, log_lines=30),
                console=console,
                interval=1.0,
            )
            if started_now and cfg.warmup:
                console.print(f"answering after {ready.seconds:.1f}s; warming up", markup=False)
                plan = warmup.plan_for(cfg.engine, cfg.max_batch_size)
                warm = warmup.run(remote, cfg.port, ready.model_id, plan, api_key=cfg.api_key, console=console)
                console.print(f"warm-up: {plan.describe()}, {warm.seconds:.1f}s", markup=False)
        total = ready.seconds + (warm.seconds if warm else 0.0)
        console.print(f"[green]ready[/] after {total:.1f}s: model {ready.model_id!r} "
                      f"(health via {ready.health_path}{', warmed' if warm else ''})", highlight=False)
    return ServeResult(st, started_now, ready, spec.display(), tune, warm)


def stop(remote: Remote, name: str = SERVICE_NAME, timeout: float = 30.0) -> ServiceStatus:
    return services.stop(remote, name, timeout=timeout)




# --------------------------------------------------------------------------- status report


@dataclass
class StatusReport:
    services: list[ServiceStatus]
    health: dict[str, str]  # service name -> "healthy" / "unhealthy (...)" / "-"
    tunnels: list[Any]  # tunnel.TunnelState


def report_status(
    remote: Remote | None,
    *,
    api_key: str | None = None,
    tunnels_root: Path | None = None,
    console: Console | None = None,
    log_lines: int = 5,
) -> StatusReport:
    """Services on the host (state + health) and tunnels on this machine; prints rich tables."""
    from llama3_ops.remote import tunnel

    sts = services.list_services(remote, log_lines=log_lines) if remote is not None else []
    hl: dict[str, str] = {}
    for st in sts:
        if st.running and st.port:
            ok, detail = health.check_once(health.RemoteHttpProbe(remote, st.port, api_key))  # type: ignore[arg-type]
            hl[st.name] = "healthy" if ok else f"unhealthy ({detail[:60]})"
        else:
            hl[st.name] = "-"
    tuns = tunnel.tunnel_status(tunnels_root)
    if console is not None:
        from rich.table import Table

        table = Table(title=f"services on {remote.label if remote else '-'}")
        for col in ("name", "state", "health", "mode", "pid", "port", "exit", "command"):
            table.add_column(col)
        for st in sts:
            color = {"running": "green", "dead": "red"}.get(st.state, "yellow")
            table.add_row(
                st.name,
                f"[{color}]{st.state}[/]",
                hl[st.name],
                st.mode,
                str(st.pid or ""),
                str(st.port or ""),
                st.exit_status or "",
                st.command,
            )
        console.print(table)
        for st in sts:
            if not st.running and st.log_tail:
                console.print(f"[red]{st.name}[/] last log lines:\n" + "\n".join(st.log_tail))
        tunnel.print_tunnels(tuns, console)
    return StatusReport(sts, hl, tuns)


# --------------------------------------------------------------------------- CLI


def target_from_args(args: argparse.Namespace) -> SSHTarget:
    if args.inventory:
        return SSHTarget.from_inventory(args.inventory, args.host_name)
    return SSHTarget(
        host=args.host,
        user=args.user,
        port=args.ssh_port,
        key_file=Path(args.key) if args.key else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        name=args.host_name or "",
    )


def add_target_args(p: argparse.ArgumentParser) -> None:
    """Where the server runs: ``--local``, ``--inventory INV --host-name NAME``, or ``--host/--user/...``."""
    p.add_argument("--local", action="store_true", help="run on this machine, no SSH")
    p.add_argument("--inventory", help="an Ansible inventory (with --host-name: the host in it)")
    p.add_argument("--host-name", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--user", default="root")
    p.add_argument("--ssh-port", type=int, default=22)
    p.add_argument("--key")
    p.add_argument("--known-hosts")


def remote_from_args(args: argparse.Namespace) -> Remote:
    return transport.LocalRemote() if args.local else transport.SSHRemote(target_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    """``python -m llama3_ops.stages.serve [target options] up|status|logs|stop ...``."""
    p = argparse.ArgumentParser(prog="python -m llama3_ops.stages.serve")
    add_target_args(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    add_to(up, OPTIONS)
    up.add_argument("--log-level", default="ERROR")
    up.add_argument("--extra-arg", action="append", default=[],
                    help="another engine flag, passed through (repeat; e.g. --extra-arg=--max-prefill-token-num)")
    up.add_argument("--setenv", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    up.add_argument("--api-key-env", default=API_KEY_ENV, help="read the API key from this env var")
    up.add_argument("--timeout", type=float, default=900.0)
    up.add_argument("--name", default=SERVICE_NAME)
    for name in ("status", "stop", "logs"):
        sp = sub.add_parser(name)
        sp.add_argument("--name", default=SERVICE_NAME)
        if name == "logs":
            sp.add_argument("-n", type=int, default=100)
            sp.add_argument("-f", action="store_true")
    return p


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """``python -m llama3_ops.stages.serve [target options] up|status|logs|stop ...`` (exit 1 on failure)."""
    args = build_parser().parse_args(argv)
    con = Console(stderr=True)
    remote = remote_from_args(args)
    try:
        if args.cmd == "up":
            cfg = config_from(args, log_level=args.log_level or None, extra_args=tuple(args.extra_arg),
                              env=dict(e.split("=", 1) for e in args.setenv), name=args.name,
                              api_key=os.environ.get(args.api_key_env) or None)
            serve(remote, cfg, restart=args.restart, timeout=args.timeout, console=con)
        elif args.cmd == "status":
            report_status(remote, console=con)
        elif args.cmd == "stop":
            st = stop(remote, args.name)
            con.print(f"{args.name}: {st.state} (exit {st.exit_status})")
        elif args.cmd == "logs":
            if args.f:
                return services.follow_logs(remote, args.name, args.n)
            sys.stdout.write(services.logs(remote, args.name, args.n))
    except Llama3OpsError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
