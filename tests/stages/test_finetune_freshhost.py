"""`fab finetune` and `fab agent-finetune` for real on a fresh host provisioned with the cpu profile.

The tiny Llama-3-shaped model is at ~/model/Meta-Llama-3-8B-Instruct there (the `provisioned`
fixture). XTuner 0.2.0 from the profile's llama3 env trains LoRA adapters (QLoRA's NF4 needs CUDA),
a training run is killed part-way (SIGKILL, as the OOM killer would), nothing is merged or marked
ready, the next run resumes from the newest checkpoint, converts and merges it, and `fab serve`
(transformers serve, the lmdeploy env) serves the merged model for a chat completion through the
SSH tunnel.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import time
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from hostlab import Provisioned
from llama3_ops.remote import transport, tunnel
from llama3_ops.remote.ports import find_free_port
from llama3_ops.stages import agent_finetune, finetune
from llama3_ops.stages import serve as srv
from llama3_ops.stages.finetune import READY_MARKER, TRAIN_DONE, FinetuneError

from .test_agent_finetune import write_agent_flan

pytestmark = [pytest.mark.freshhost, pytest.mark.slow]

HOME = "/home/student"
MERGED = f"{HOME}/model/llama3_hf_merged"
WORK = f"{HOME}/llama3-course/work_dirs/finetune"
SERVE = srv.ServeConfig(engine="transformers", model="merged",
                        name="llm-merged", port=23334)

# Compares one LoRA-targeted weight of the base and the merged model, on the host (llama3 env).
WEIGHT_DIFF = r"""
import sys, torch
from safetensors import safe_open
def load(d, key):
    import json, os
    idx = os.path.join(d, "model.safetensors.index.json")
    f = json.load(open(idx))["weight_map"][key] if os.path.exists(idx) else "model.safetensors"
    with safe_open(os.path.join(d, f), "pt") as h:
        return h.get_tensor(key).float()
k = "model.layers.0.self_attn.q_proj.weight"
a, b = load(sys.argv[1], k), load(sys.argv[2], k)
print(a.shape == b.shape, float((a - b).abs().max()))
"""


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return dict(json.loads(resp.read()))


def test_finetune_killed_resumed_converted_merged_and_served(provisioned: Provisioned, tmp_path: Path) -> None:
    remote = transport.SSHRemote(provisioned.target)
    timings: dict[str, float] = {}

    # A missing base model: one clear message, nothing started.
    with pytest.raises(FinetuneError, match=r"base model /home/student/model/nope on .* does not exist"):
        finetune.run_finetune(remote, count=50, base_model="~/model/nope")

    # 1. Training killed part-way, after the first checkpoint (iter_2.pth), as the OOM killer would.
    # A watcher on the host does it the moment mmengine has written the checkpoint and its
    # `last_checkpoint` pointer: the tiny model's 4 CPU iterations can all end within one of the
    # stage's 2 s progress polls, so killing from the progress callback raced the end of training.
    provisioned.sh(
        # `;` and setsid -f: the watcher alone goes to the background, with no hold on ssh's output
        # pipe (a backgrounded `rm && setsid ...` list kept it, and ssh waited for the watcher).
        f"rm -f {WORK}/last_checkpoint /tmp/finetune-killed; "
        "setsid -f sh -c 'ok=; "
        f"for i in $(seq 1 12000); do if [ -s {WORK}/last_checkpoint ]; then ok=1; break; fi; sleep 0.05; done; "
        # Kill the training's whole process group (the stage runs `python -m xtuner.tools.train` as a
        # supervised service). /proc, not pgrep: minimal hosts lack procps. [n]: the pattern must
        # not match this shell's own command line. `kill -s KILL --`: dash's kill reads `-KILL --` as a pid.
        "[ -n \"$ok\" ] || exit 0; pg=; for d in /proc/[0-9]*; do "
        "if tr \"\\000\" \" \" < $d/cmdline 2>/dev/null | grep -q xtuner.tools.trai[n]; then "
        "pg=$(cut -d\" \" -f5 $d/stat); break; fi; done; "
        "echo \"checkpoint seen, group ${pg:-none}\"; "
        "[ -n \"$pg\" ] && kill -s KILL -- -$pg && date +%s.%N > /tmp/finetune-killed' "
        ">/tmp/finetune-watch.log 2>&1 </dev/null"
    )
    console, out = _console()
    t = time.monotonic()
    try:
        with pytest.raises(FinetuneError) as err:
            finetune.run_finetune(remote, count=50, console=console)
    except BaseException:
        print("kill watcher:", provisioned.sh("cat /tmp/finetune-watch.log; ls -la " + WORK, check=False))
        raise
    timings["killed run"] = time.monotonic() - t
    assert provisioned.exists("/tmp/finetune-killed"), f"the watcher never killed the training: {err.value}"
    msg = str(err.value)
    assert "training failed" in msg and "last log lines" in msg and re.search(r"Iter\(train\) \[[23]/4\]", msg), msg
    assert "CPU host: plain LoRA" in out.getvalue()
    assert not provisioned.exists(MERGED), "nothing merged"
    assert not provisioned.exists(f"{MERGED}.tmp-llama3-ops")
    assert finetune.merged_ready(remote) is None
    assert provisioned.exists(f"{WORK}/iter_2.pth") and not provisioned.exists(f"{WORK}/{TRAIN_DONE}")
    dataset = json.loads(provisioned.sh("cat ~/llama3-course/data/personal_assistant.json"))
    assert len(dataset) == 50 and "SmartFlowAI" in dataset[0]["conversation"][0]["output"]
    config = provisioned.sh("cat ~/llama3-course/configs/llama3_8b_instruct_qlora_assistant_cpu.py")
    assert "\r" not in config and "/root" not in config and "pretrained_model_name_or_path = '/home/student/model/" \
        "Meta-Llama-3-8B-Instruct'" in config

    # 2. The next run resumes from the newest checkpoint and goes through convert and merge.
    console, out = _console()
    t = time.monotonic()
    result = finetune.run_finetune(remote, count=50, console=console)
    timings["resumed run"] = time.monotonic() - t
    log = out.getvalue()
    assert "resuming from iter_2.pth" in log and "--resume /home/student/llama3-course/work_dirs/finetune/iter_2.pth" \
        in log.replace("\n", " ")
    assert result.checkpoint == f"{WORK}/iter_4.pth" and result.merged_path == MERGED
    assert result.params.quantization == "none" and result.params.lora_r == 16
    assert result.eval_answer, "XTuner's after-train evaluation answer is read from the log"
    assert result.merged_answer is not None
    ready = finetune.merged_ready(remote)
    assert ready is not None and ready["checkpoint"] == "iter_4.pth" and ready["answer"] == result.merged_answer
    files = provisioned.sh(f"ls {MERGED}").split()
    assert READY_MARKER not in files  # ls hides dot files; the marker is read above
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    same_shape, diff = provisioned.sh(
        f"~/envs/llama3/bin/python -c {shlex.quote(WEIGHT_DIFF)} ~/model/Meta-Llama-3-8B-Instruct {MERGED}").split()
    assert same_shape == "True" and float(diff) > 0, "the merged weights carry the trained LoRA delta"

    # 3. Running it again does nothing but report.
    t = time.monotonic()
    again = finetune.run_finetune(remote, count=50, console=_console()[0])
    timings["re-run"] = time.monotonic() - t
    assert again.skipped == ["train", "convert", "merge"]

    # 4. fab serve --model merged, one chat completion through the tunnel.
    t = time.monotonic()
    served = srv.serve(remote, SERVE, timeout=300)
    try:
        assert served.ready is not None
        root = tmp_path / "tunnels"
        state = tunnel.up(tunnel.TunnelSpec(target=provisioned.target, local_port=find_free_port(),
                                            remote_port=SERVE.port, name="ft"), root=root)
        try:
            models = json.loads(urllib.request.urlopen(state.url + "/v1/models", timeout=30).read())
            model_id = models["data"][0]["id"]
            assert model_id.rstrip("/").endswith("llama3_hf_merged")
            reply = _post(state.url + "/v1/chat/completions", {
                "model": model_id, "messages": [{"role": "user", "content": "你是（请用中文回答）"}], "max_tokens": 8})
            choice = reply["choices"][0]  # type: ignore[index]
            assert choice["message"]["role"] == "assistant"
        finally:
            tunnel.down("ft", root=root)
    finally:
        srv.stop(remote, SERVE.name)
    timings["serve + chat"] = time.monotonic() - t
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_agent_finetune_converts_agent_flan_and_trains(provisioned: Provisioned, tmp_path: Path) -> None:
    remote = transport.SSHRemote(provisioned.target)
    data = write_agent_flan(tmp_path / "Agent-FLAN" / "data")
    console, out = _console()
    t = time.monotonic()
    # Train only: convert and merge are the self-cognition test's machinery, unchanged.
    result = agent_finetune.run_agent_finetune(remote, upload=data, device="cpu", cpu_iters=1, until="train",
                                               console=console)
    log = out.getvalue()
    assert re.search(r"converted 3 records from 2 file\(s\)", log), log[-2000:]
    assert result.params.lora_r == 64 and result.params.max_length == 4096
    assert result.checkpoint == f"{HOME}/llama3-course/work_dirs/agent-finetune/iter_1.pth"
    assert result.merged_path is None and result.adapter is None
    assert result.eval_answer is not None
    assert finetune.merged_ready(remote, f"{HOME}/model/{agent_finetune.MERGED_NAME}") is None
    config = provisioned.sh("cat ~/llama3-course/configs/llama3_8b_instruct_qlora_agentflan_3e_cpu.py")
    assert "dataset_map_fn=openai_map_fn" in config and "r=64" in config and "max_length = 4096" in config
    converted = provisioned.sh(
        "~/envs/llama3/bin/python -c 'from datasets import load_from_disk; import json; "
        "d = load_from_disk(\"/home/student/llama3-course/data/agent_flan_converted\"); "
        "print(json.dumps([d.column_names, len(d), d[0][\"messages\"][2][\"loss\"]]))'")
    assert json.loads(converted) == [["messages"], 3, True]
    print(f"agent-finetune: {time.monotonic() - t:.1f}s", result.timings)
