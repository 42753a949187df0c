"""The whole chain on CPU against a throwaway local host: ``nox -s demo``.

1. boot a fresh Debian bookworm host (systemd-nspawn, own network namespace, real SSH);
2. publish a tiny Llama-3-shaped checkpoint (real tokenizer) as a git-lfs repo on that host;
3. ``ansible-playbook site.yml`` with the ``cpu`` profile, twice (the second must change nothing);
4. show what is on the host;
5. serve the model with ``transformers serve`` (what ``fab serve --engine transformers`` does),
   open the SSH tunnel, ask one question through it;
6. run a short online benchmark through the tunnel;
7. tear everything down (``--keep`` leaves the host, server and tunnel up, and says how to reach it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from llama3_ops.lab.checkpoint import make_checkpoint
from llama3_ops.lab.freshhost import FreshHostError, FreshHostLab, write_inventory
from llama3_ops.lab.lfsrepo import publish
from llama3_ops.provision.playbook import ROOT, run_playbook
from llama3_ops.remote import tunnel
from llama3_ops.remote.connection import SSHTarget
from llama3_ops.remote.transport import SSHRemote
from llama3_ops.stages import serve as srv

FIXTURE = "/srv/llama3-fixtures/Meta-Llama-3-8B-Instruct.git"
NAME, IDX = "demo", 1

console = Console()


def _provision(lab: FreshHostLab, work: Path) -> tuple[Path, SSHTarget]:
    model = work / "tiny-model"
    if not (model / "config.json").exists():
        with console.status("making the tiny Llama-3-shaped checkpoint (real tokenizer)"):
            make_checkpoint(model, "tiny")
    repo = work / "Meta-Llama-3-8B-Instruct.git"
    publish(model, repo)
    with console.status("booting a fresh Debian bookworm host"):
        t0 = time.monotonic()
        target = lab.up(NAME, IDX)
    console.print(f"host up in {time.monotonic() - t0:.1f}s: {target.user}@{target.host} (strict host key)")
    lab.put(NAME, IDX, repo, FIXTURE)
    inventory = write_inventory(work / "inventory.yml", [target],
                                {"llama3_profile": "cpu", "llama3_model_git_url": f"file://{FIXTURE}"})
    for run_no in (1, 2):
        console.rule(f"ansible-playbook -i {inventory} site.yml  (run {run_no})")
        run = run_playbook(inventory, log=work / f"site-run{run_no}.log", echo=run_no == 1)
        counts = run.counts()
        console.print(f"run {run_no}: {run.seconds:.1f}s, {counts}")
        if run.rc != 0:
            raise SystemExit(f"provisioning failed; log: {work / f'site-run{run_no}.log'}")
    if counts["changed"] != 0:
        raise SystemExit(f"the second run changed {counts['changed']} things: not idempotent")
    return inventory, target


def _show_host(lab: FreshHostLab, target: SSHTarget) -> None:
    probe = lab.ssh(target, (
        "echo os=$(. /etc/os-release; echo $PRETTY_NAME);"
        "echo git-lfs=$(git lfs version | cut -d' ' -f1);"
        "for e in llama3 lmdeploy; do echo env:$e=$(~/envs/$e/bin/python -c "
        "'import torch, transformers; "
        "print(\"torch\", torch.__version__, \"transformers\", transformers.__version__)');"
        " done;"
        "echo model=$(ls ~/model/Meta-Llama-3-8B-Instruct | tr '\\n' ' ');"
        "echo stamp=$(cat ~/model/.Meta-Llama-3-8B-Instruct.llama3-ops.json | tr -d '\\n ' | cut -c1-120)"
    )).stdout
    table = Table(title="what is on the host", show_header=False)
    for line in probe.splitlines():
        key, _, value = line.partition("=")
        table.add_row(key, value)
    console.print(table)


def kept_commands(inventory: Path, host: str, lab_base: Path, bin_dir: Path | None = None) -> list[str]:
    """What `--keep` prints: the user's commands against the kept host, exactly as they run from any folder
    (the demo's inventory and venv named; fab finds this project's fabfile with -r)."""
    bindir = bin_dir or Path(sys.executable).parent
    fab = (f"LLAMA3_INVENTORY={shlex.quote(str(inventory))} {shlex.quote(str(bindir / 'fab'))} "
           f"-r {shlex.quote(str(ROOT))}")
    py = shlex.quote(str(bindir / "python"))
    return [
        f"{fab} -H {host} status",
        f"{fab} -H {host} client",
        f"{fab} -H {host} webdemo --detach",
        f"{fab} -H {host} down",
        f"{py} -m llama3_ops.lab.freshhost --base {shlex.quote(str(lab_base))} down {NAME} {IDX}",
    ]


def _ask(url: str, question: str) -> str:
    body = json.dumps({"model": "", "messages": [{"role": "user", "content": question}],
                       "max_tokens": 16, "temperature": 0}).encode()
    models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=30).read())  # noqa: S310
    model_id = models["data"][0]["id"] if models.get("data") else ""
    body = body.replace(b'"model": ""', json.dumps({"model": model_id})[1:-1].encode())
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,  # noqa: S310
                                 headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=120).read())  # noqa: S310
    return str(reply["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".fresh-hosts" / "demo-work")
    ap.add_argument("--keep", action="store_true", help="leave the host, server and tunnel running")
    ap.add_argument("--bench-requests", type=int, default=8)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    lab = FreshHostLab(ROOT / ".fresh-hosts")
    t_start = time.monotonic()
    try:
        with console.status("building the bookworm rootfs (cached after the first time, ~45 s)"):
            lab.build()
        inventory, target = _provision(lab, args.work)
        _show_host(lab, target)

        console.rule("fab serve --engine transformers  (server on the host's 127.0.0.1:23333)")
        remote = SSHRemote(target)
        cfg = srv.ServeConfig(engine="transformers", model="base")  # the env: host.json's, as fab serve
        srv.serve(remote, cfg, timeout=300, console=console)
        state = tunnel.up(tunnel.TunnelSpec(target=target, name="demo"))
        console.print(f"tunnel ready: {state.url} -> {target.host}:23333")
        question = "Who are you?"
        answer = _ask(state.url, question)
        console.print(Panel(f"[bold]Q:[/] {question}\n[bold]A:[/] {answer!r}\n"
                            "(random weights: gibberish is expected; the tokens went through the real "
                            "tokenizer, server and tunnel)", title="one question through the tunnel"))

        console.rule("short online benchmark through the tunnel")
        from llama3_ops.bench.cli import main as bench_main

        models = json.loads(urllib.request.urlopen(state.url + "/v1/models", timeout=30).read())  # noqa: S310
        rc = bench_main(["online", "--base-url", state.url, "--model", models["data"][0]["id"],
                         "--num-prompts", str(args.bench_requests), "--concurrency", "1,4",
                         "--max-output-len", "8", "--profile", "cpu", "--engine", "transformers",
                         "--out", str(args.work / "bench")])
        if rc != 0:
            raise SystemExit(f"the benchmark failed (exit {rc})")
        console.print(f"bench JSON and PNGs: {args.work / 'bench'}")

        console.rule("fab finetune --device cpu  (50 records, 4 LoRA iterations -> ~/model/llama3_hf_merged)")
        from llama3_ops.stages.finetune import tiny_cpu_finetune

        ft_result = tiny_cpu_finetune(remote, console=console)
        merged = srv.ServeConfig(engine="transformers", model="merged",
                                 name="llm-merged", port=23334)
        ready = srv.serve(remote, merged, timeout=300, console=console).ready
        console.print(Panel(
            f"merged model: {ft_result.merged_path}\n"
            f"XTuner's eval answer after training: {ft_result.eval_answer!r}\n"
            f"the merged model's answer: {ft_result.merged_answer!r}\n"
            f"served by fab serve --model merged on the host's 127.0.0.1:23334 ({ready.model_id if ready else '?'})",
            title="fine-tune -> convert -> merge -> serve"))
        srv.stop(remote, "llm-merged")

        console.rule("fab webdemo  (Streamlit on the host's 127.0.0.1:8501, tunnelled here)")
        from llama3_ops.stages import webdemo as webdemo_stage

        rc = webdemo_stage.webdemo(remote, webdemo_stage.StreamlitConfig(model="base"), detach=True,
                                   host=target.name or target.host, console=console)
        if rc != 0:
            raise SystemExit(f"the web demo did not start (exit {rc})")
        console.rule(f"demo finished in {time.monotonic() - t_start:.0f}s")
        if args.keep:
            lines = [f"ssh -i {lab.key} -o UserKnownHostsFile={target.known_hosts} {target.user}@{target.host}",
                     *kept_commands(inventory, target.name or target.host, lab.base)]
            console.print(f"kept: the host, its server and the tunnels (API at {state.url}). Reach it with:",
                          markup=False)
            for line in lines:
                console.print("  " + line, markup=False, highlight=False, soft_wrap=True)
    except FreshHostError as exc:
        console.print(f"error: {exc}", style="red", markup=False)
        return 1
    finally:
        if not args.keep:
            tunnel.down("demo")
            tunnel.down("webdemo")
            lab.down(NAME, IDX)
    return 0


if __name__ == "__main__":
    sys.exit(main())
