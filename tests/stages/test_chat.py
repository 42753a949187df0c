"""``fab chat``: the lmdeploy command (checked with lmdeploy 0.4.1's and 0.18's own parsers), model and env
preflight, and the terminal session over a real ``ssh -t`` to a loopback sshd.

``lmdeploy chat`` needs a GPU, so the session runs a stand-in that speaks its terminal protocol
(lm_support.FAKE_LMDEPLOY) beside a stand-in nvidia-smi; what is under test is ours: the command, the
PTY over SSH with strict host keys, Ctrl-C handling, and the GPU memory report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from llama3_ops.remote.connection import SSHTarget
from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages import chat
from llama3_ops.stages.lm_models import HostModel, LmdeployEnv, ModelError

from .lm_support import (
    ENGINE_MIB,
    H100,
    RTX3060,
    base_path,
    env_bin,
    fake_host,
    parse_with_lmdeploy,
    write_gpus,
)

try:  # the loopback sshd of the serve tests (a throwaway user, strict host keys)
    from serve.conftest import SSHHost, sshd_host
except ImportError:  # pragma: no cover - run from another rootdir
    from tests.serve.conftest import SSHHost, sshd_host  # noqa: F401

ENV18 = LmdeployEnv("/h/envs/lmdeploy/bin", "0.18.0", "/h/envs/lmdeploy/bin/python")
ENV041 = LmdeployEnv("/h/envs/lmdeploy/bin", "0.4.1", "/h/envs/lmdeploy/bin/python")
BASE = HostModel("base", "/h/model/Meta-Llama-3-8B-Instruct", None, ("LlamaForCausalLM",))
AWQ = HostModel("4bit", "/h/model/Meta-Llama-3-8B-Instruct_4bit", "awq", ("LlamaForCausalLM",),
                {"quant_method": "awq", "bits": 4, "group_size": 128})


# --------------------------------------------------------------------------- command construction


def test_course_command_base_model() -> None:
    argv = chat.lmdeploy_argv(chat.ChatConfig(cache_max_entry_count=0.01), BASE, ENV18)
    assert argv == ["/h/envs/lmdeploy/bin/lmdeploy", "chat", BASE.path, "--backend", "turbomind", "--tp", "1",
                    "--cache-max-entry-count", "0.01"]


def test_4bit_uses_model_format_awq_on_turbomind_only() -> None:
    tm = chat.lmdeploy_argv(chat.ChatConfig(model="4bit"), AWQ, ENV041)
    assert tm[-2:] == ["--model-format", "awq"]
    pt = chat.lmdeploy_argv(chat.ChatConfig(model="4bit", backend="pytorch"), AWQ, ENV18)
    assert "--model-format" not in pt  # 0.18's PyTorch engine reads quantization_config itself
    with pytest.raises(chat.ChatConfigError, match=r"lmdeploy 0.4.1's PyTorch engine cannot run AWQ"):
        chat.lmdeploy_argv(chat.ChatConfig(model="4bit", backend="pytorch"), AWQ, ENV041)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"backend": "vllm"}, "unknown backend"),
        ({"cache_max_entry_count": 0.0}, r"cache_max_entry_count must be in \(0, 1\]"),
        ({"cache_max_entry_count": 1.5}, r"cache_max_entry_count must be in \(0, 1\]"),
        ({"session_len": 10}, "session_len must be at least 64"),
        ({"tp": 0}, "tp must be >= 1"),
        ({"quant_policy": 2}, "quant_policy must be 0, 4 or 8"),
        ({"env": {"BAD-NAME": "x"}}, "bad environment variable name"),
    ],
)
def test_bad_settings(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(chat.ChatConfigError, match=msg):
        chat.ChatConfig(**kw).validate()  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.4.1", "0.18.0"])
def test_commands_parse_with_lmdeploys_own_cli(version: str) -> None:
    env = ENV041 if version == "0.4.1" else ENV18
    cases = [
        (chat.ChatConfig(cache_max_entry_count=0.01), BASE,
         {"backend": "turbomind", "cache_max_entry_count": 0.01, "model_format": None, "tp": 1}),
        (chat.ChatConfig(model="4bit", cache_max_entry_count=0.5, session_len=2048), AWQ,
         {"model_format": "awq", "cache_max_entry_count": 0.5, "session_len": 2048}),
        (chat.ChatConfig(backend="pytorch", quant_policy=8), BASE, {"backend": "pytorch", "quant_policy": 8}),
    ]
    argvs = [chat.lmdeploy_argv(cfg, model, env) for cfg, model, _ in cases]
    results = parse_with_lmdeploy(version, [a[1:] for a in argvs])
    for (_, model, expect), argv, res in zip(cases, argvs, results, strict=True):
        assert res["ok"], f"lmdeploy {version} rejects {argv[1:]}: {res['error']}"
        ns = res["ns"]
        assert ns["command"] == "chat" and ns["model_path"] == model.path
        for key, val in expect.items():
            assert ns[key] == val, (version, key, ns[key])


def test_pty_argv_uses_strict_host_keys() -> None:
    t = SSHTarget(host="gpu1.example", user="course", port=2222, key_file=Path("/k/id"),
                  known_hosts=Path("/k/known_hosts"), name="gpu1")
    argv = chat.pty_argv(t, "sh /x/chat_session.sh R B -- lmdeploy chat /m")
    assert argv[:2] == ["ssh", "-t"]
    assert argv[-2:] == ["course@gpu1.example", "sh /x/chat_session.sh R B -- lmdeploy chat /m"]
    opts = " ".join(argv[2:-2])
    for o in ("-o StrictHostKeyChecking=yes", "-o BatchMode=yes", "-p 2222", "-i /k/id", "-o IdentitiesOnly=yes",
              "-o UserKnownHostsFile=/k/known_hosts", "-o GlobalKnownHostsFile=/dev/null"):
        assert o in opts
    cmd = chat.session_command("/home/u", "/home/u/r.json", ENV18, ["lmdeploy", "chat", "/m x"], {"A": "1 2"})
    assert cmd == ("exec sh /home/u/.local/share/llama3-ops/stages/chat_session.sh /home/u/r.json "
                   "/h/envs/lmdeploy/bin -- env 'A=1 2' lmdeploy chat '/m x'")


# --------------------------------------------------------------------------- preflight on a "host"


def _host(tmp_path: Path, gpus: list[dict[str, object]] | None = None,
          version: str = "0.18.0", layout: str = "venv") -> tuple[LocalRemote, Path]:
    home = tmp_path / "home"
    bin_dir = fake_host(home, layout, version=version, gpus=gpus)
    remote = LocalRemote(env={"HOME": str(home), "PATH": f"{bin_dir}:{base_path()}"})
    return remote, home


def _model(home: Path, tiny_model: Path, name: str = "Meta-Llama-3-8B-Instruct", quant: bool = False) -> Path:
    dest = home / "model" / name
    dest.mkdir(parents=True)
    cfg = json.loads((tiny_model / "config.json").read_text())
    if quant:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                                      "zero_point": True}
        (dest / ".llama3-ops-awq.json").write_text("{}")
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_missing_models_name_the_stage_that_makes_them(tmp_path: Path, tiny_model: Path) -> None:
    remote, home = _host(tmp_path)
    with pytest.raises(ModelError, match=r"model 'base' not found on localhost: .*/model/Meta-Llama-3-8B-Instruct "
                                         r"does not exist; it is made by the model download"):
        chat.prepare(remote, chat.ChatConfig())
    with pytest.raises(ModelError, match=r"model 'merged' not found .*llama3_hf_merged does not exist; it is made by "
                                         r"the fine-tune stage \(fab finetune merges into it\)"):
        chat.prepare(remote, chat.ChatConfig(model="merged"))
    with pytest.raises(ModelError, match=r"model '4bit' not found .*_4bit does not exist; it is made by fab quantize: "
                                         r"run that first"):
        chat.prepare(remote, chat.ChatConfig(model="4bit"))
    # a half-written quantization (no marker, no quantization_config) is not a 4-bit model
    _model(home, tiny_model, "Meta-Llama-3-8B-Instruct_4bit")
    with pytest.raises(ModelError, match=r"is not a finished 4-bit model .* Run fab quantize"):
        chat.prepare(remote, chat.ChatConfig(model="4bit"))
    (home / "model" / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        chat.prepare(remote, chat.ChatConfig(model=str(home / "model" / "empty")))


def test_missing_env_and_small_gpu(tmp_path: Path, tiny_model: Path) -> None:
    remote, home = _host(tmp_path, gpus=[dict(RTX3060)])
    _model(home, tiny_model)
    with pytest.raises(ModelError, match=r"no lmdeploy environment at .*/nowhere/bin \(--env\) on localhost: "
                                         r".*/python does not exist\. Provision the host"):
        chat.prepare(remote, chat.ChatConfig(env_bin_dir="~/nowhere/bin"))
    from llama3_ops.stages.gpu import GPUCheckError

    with pytest.raises(GPUCheckError, match=r"stage chat needs ~16.2 GiB .*RTX 3060.*fab chat --model 4bit"):
        chat.prepare(remote, chat.ChatConfig())
    _model(home, tiny_model, "Meta-Llama-3-8B-Instruct_4bit", quant=True)
    prep = chat.prepare(remote, chat.ChatConfig(model="4bit"))  # ~6.5 GiB fits in 12 GiB
    assert prep.argv[-2:] == ["--model-format", "awq"] and prep.env.version == "0.18.0"


@pytest.mark.parametrize("layout", ["venv", "conda"])
def test_batch_session_reports_gpu_memory(tmp_path: Path, tiny_model: Path, layout: str) -> None:
    """The default paths: host.json names the env (a conda env on a course-profile host), no --env."""
    remote, home = _host(tmp_path, layout=layout)
    _model(home, tiny_model)
    res = chat.run_batch(remote, chat.ChatConfig(cache_max_entry_count=0.01), ["What is 2+2?", "two\nlines"],
                         timeout=60)
    assert res.rc == 0, res.stderr
    assert "fake-lmdeploy answer to 'What is 2+2?'" in res.stdout
    assert "fake-lmdeploy answer to 'two\\nlines'" in res.stdout  # a message ends with an empty line
    argv = json.loads(re.search(r"fake-lmdeploy argv=(.*)", res.stdout).group(1))  # type: ignore[union-attr]
    assert argv == ["chat", str(home / "model" / "Meta-Llama-3-8B-Instruct"), "--backend", "turbomind", "--tp", "1",
                    "--cache-max-entry-count", "0.01"]
    [g] = res.memory.gpus
    assert (g["name"], g["before_mib"], g["peak_mib"], g["total_mib"]) == (H100["name"], 0, ENGINE_MIB, 81559)
    assert g["samples"] >= 1
    assert f"[llama3-ops] GPU 0 ({H100['name']}): peak {ENGINE_MIB} MiB in use of 81559 MiB" in res.stdout
    line = res.memory.lines("chat")[0]
    assert line.startswith(f"GPU 0 ({H100['name']}): {ENGINE_MIB} MiB of 81559 MiB in use at the peak (+{ENGINE_MIB}")
    assert "the course saw 16176 MiB" in line
    assert res.command.split(" -- ")[0].endswith(str(env_bin(home, "lmdeploy", layout)))
    # the report file is where the session said, and the poller is gone
    assert not list((home / ".local/state/llama3-ops/chat").glob("*.samples"))


def test_batch_session_without_nvidia_smi_still_chats(tmp_path: Path, tiny_model: Path) -> None:
    remote, home = _host(tmp_path)
    _model(home, tiny_model)
    (home / "envs/lmdeploy/bin/nvidia-smi").unlink()
    res = chat.run_batch(remote, chat.ChatConfig(check_gpu=False), ["hi"], timeout=60)
    assert res.rc == 0 and "fake-lmdeploy answer to 'hi'" in res.stdout
    assert res.memory.gpus == [] and "no nvidia-smi" in res.memory.lines()[0]


# --------------------------------------------------------------------------- real ssh -t to a loopback sshd


class Pty:
    """A child process on a pseudo-terminal; ``expect`` waits for output."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.buf = b""
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.buf += data

    def text(self) -> str:
        with self.lock:
            return self.buf.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None and time.monotonic() > deadline - timeout + 1:
                time.sleep(0.3)
                m = re.search(pattern, self.text())
                if m:
                    return m
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the terminal output:\n{self.text()[-3000:]}")

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        os.close(self.master)
        return rc


@pytest.fixture
def ssh_chat_host(sshd_host: SSHHost, tiny_model: Path) -> SSHHost:
    """The sshd user's home gets the stand-in lmdeploy env (with nvidia-smi) and the models."""
    home = Path(sshd_host.home)
    for d in ("envs/lmdeploy", "envs/fake-site", "model/Meta-Llama-3-8B-Instruct_4bit"):
        shutil.rmtree(home / d, ignore_errors=True)
    fake_host(home, version="0.4.1")
    _model(home, tiny_model, "Meta-Llama-3-8B-Instruct_4bit", quant=True)
    subprocess.run(["chown", "-R", f"{sshd_host.target.user}:{sshd_host.target.user}", str(home / "envs"),
                    str(home / "model"), str(home / "llama3-course")], check=True)
    return sshd_host


@pytest.mark.sshd
def test_interactive_chat_over_ssh_t(ssh_chat_host: SSHHost) -> None:
    host = ssh_chat_host
    cfg = chat.ChatConfig(model="4bit", cache_max_entry_count=0.01, check_gpu=False)
    prep = chat.prepare(host.remote, cfg)
    term = Pty(chat.pty_argv(host.target, prep.command))
    term.expect(r"fake-lmdeploy tty=True")  # a real terminal on the host
    argv = json.loads(term.expect(r"fake-lmdeploy argv=(\[.*?\])").group(1))
    assert argv == ["chat", prep.model.path, "--backend", "turbomind", "--tp", "1", "--cache-max-entry-count", "0.01",
                    "--model-format", "awq"]
    term.expect(r"double enter to end input >>> ")
    term.send("Hello there\r\r")
    term.expect(r"fake-lmdeploy answer to 'Hello there'")
    term.send("exit\r\r")
    term.expect(rf"\[llama3-ops\] GPU 0 \({H100['name']}\): peak {ENGINE_MIB} MiB in use of 81559 MiB")
    assert term.wait() == 0
    report = chat.read_report(host.remote, prep.report)
    assert report.rc == 0 and report.gpus[0]["peak_mib"] == ENGINE_MIB
    assert "the course saw" not in report.lines("chat_4bit")[0]


@pytest.mark.sshd
def test_ctrl_c_ends_the_chat_and_still_reports(ssh_chat_host: SSHHost) -> None:
    host = ssh_chat_host
    write_gpus(Path(host.home) / "envs/lmdeploy/bin/gpu-state.json", [dict(H100, used=500)])
    prep = chat.prepare(host.remote, chat.ChatConfig(model="4bit", check_gpu=False))
    term = Pty(chat.pty_argv(host.target, prep.command))
    term.expect(r"double enter to end input >>> ")
    term.send("\x03")  # Ctrl-C in the laptop's terminal reaches lmdeploy on the host
    term.expect(r"fake-lmdeploy interrupted")
    term.expect(rf"peak {500 + ENGINE_MIB} MiB in use of 81559 MiB while the chat ran \(\+{ENGINE_MIB} MiB over the "
                r"500 MiB before it")
    assert term.wait() == 130
    assert chat.read_report(host.remote, prep.report).rc == 130
    # nothing of the session is left running on the host (the nvidia-smi poller included)
    left = subprocess.run(["pgrep", "-u", host.target.user, "-f", "nvidia-smi|lmdeploy"], capture_output=True,
                          text=True)
    assert left.stdout.strip() == ""


@pytest.mark.sshd
def test_wrong_host_key_is_refused_before_any_chat(ssh_chat_host: SSHHost, tmp_path: Path) -> None:
    host = ssh_chat_host
    other = tmp_path / "known_hosts"
    pub = Path(str(host.target.known_hosts)).read_text().split()
    fake_key = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    assert fake_key.returncode == 0
    key_type, key_b64 = (tmp_path / "k.pub").read_text().split()[:2]
    other.write_text(f"{pub[0]} {key_type} {key_b64}\n")
    bad = SSHTarget(host=host.target.host, user=host.target.user, port=host.target.port,
                    key_file=host.target.key_file, known_hosts=other)
    proc = subprocess.run(chat.pty_argv(bad, "echo should-not-run"), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 255
    assert "should-not-run" not in proc.stdout
    assert re.search(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed", proc.stderr)


def test_chat_main_is_the_device_code_path(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m llama3_ops.stages.chat --local`` as scripts/gpu/stages-run.sh calls it."""
    remote, home = _host(tmp_path)
    model = _model(home, tiny_model, "work-model")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", remote.env["PATH"])  # type: ignore[index]
    out = tmp_path / "chat.json"
    rc = chat.main(["--local", "--model", str(model), "--backend", "pytorch", "--cache-max-entry-count", "0.01",
                    "--session-len", "512", "--env", str(home / "envs/lmdeploy/bin"), "--setenv", "FOO=bar",
                    "--question", "Please introduce yourself.", "--timeout", "60", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert "fake-lmdeploy answer to 'Please introduce yourself.'" in res["stdout_tail"]
    assert res["memory"]["gpus"][0]["peak_mib"] == ENGINE_MIB
    assert res["command"].endswith(f"-- env FOO=bar {home}/envs/lmdeploy/bin/lmdeploy chat {model} --backend pytorch "
                                   "--tp 1 --cache-max-entry-count 0.01 --session-len 512")
    # a missing model is one clear line and exit 1
    bin_dir = str(home / "envs/lmdeploy/bin")
    assert chat.main(["--local", "--model", str(tmp_path / "nope"), "--env", bin_dir]) == 1


@pytest.mark.sshd
def test_run_interactive_prints_the_memory_report_after_the_session(ssh_chat_host: SSHHost) -> None:
    """What ``fab chat`` calls: preflight, ``ssh -t`` with this terminal, then the report read back."""
    import sys

    host = ssh_chat_host
    write_gpus(Path(host.home) / "envs/lmdeploy/bin/gpu-state.json", [dict(H100)])
    code = (
        "import json, sys\n"
        "from llama3_ops.remote.connection import SSHTarget\n"
        "from llama3_ops.remote.transport import SSHRemote\n"
        "from llama3_ops.stages import chat\n"
        "t = SSHTarget.from_dict(json.loads(sys.argv[1]))\n"
        "rc = chat.run_interactive(SSHRemote(t), chat.ChatConfig(cache_max_entry_count=0.01, check_gpu=False))\n"
        "print('RC', rc)\n"
    )
    (Path(host.home) / "model/Meta-Llama-3-8B-Instruct").mkdir(parents=True, exist_ok=True)
    term = Pty([sys.executable, "-c", code, json.dumps(host.target.to_dict())])
    term.expect(r"double enter to end input >>> ", timeout=60)
    term.send("what is AWQ?\r\r")
    term.expect(r"fake-lmdeploy answer to 'what is AWQ\?'")
    term.send("exit\r\r")
    term.expect(rf"GPU 0 \({H100['name']}\): {ENGINE_MIB} MiB of 81559 MiB in use at the peak \(\+{ENGINE_MIB} MiB "
                r"for the chat\); the course saw 16176 MiB with --cache-max-entry-count 0\.01")
    term.expect(r"RC 0")
    assert term.wait() == 0
