"""Fast unit tests: command construction, secrets, fingerprints, ports, SSHTarget, inventory."""

from __future__ import annotations

import shutil
import socket
import stat
import time
from pathlib import Path

import pytest

from llama3_ops.remote import services
from llama3_ops.remote.connection import HostKeyMismatchError, SSHTarget, classify_ssh_failure
from llama3_ops.remote.ports import find_free_port, is_port_free, listening_pids
from llama3_ops.remote.services import Secret, ServiceSpec
from llama3_ops.remote.transport import LocalRemote
from llama3_ops.stages.host import Host
from llama3_ops.stages.serve import ServeConfig, ServeConfigError, build_spec

# A cpu-profile host (venvs under ~/envs) and a course-profile host (conda envs under ~/miniforge3/envs).
HOME = Host(label="h", home="/home/u", profile="cpu", user="u", course_dir="/home/u/llama3-course",
            model_dir="/home/u/model/Meta-Llama-3-8B-Instruct", model_stamp="/home/u/model/.stamp",
            envs={"lmdeploy": "/home/u/envs/lmdeploy/bin", "llama3": "/home/u/envs/llama3/bin"})
COURSE = Host(label="c", home="/root", profile="course", user="root", course_dir="/root/llama3-course",
              model_dir="/root/autodl-tmp/model/Meta-Llama-3-8B-Instruct", model_stamp="/root/autodl-tmp/model/.s",
              envs={"lmdeploy": "/root/miniforge3/envs/lmdeploy/bin", "llama3": "/root/miniforge3/envs/llama3/bin"})


def test_lmdeploy_command_defaults_to_loopback() -> None:
    spec = build_spec(ServeConfig(), HOME)
    argv = [str(a) for a in spec.argv]
    assert argv[:4] == [
        "/home/u/envs/lmdeploy/bin/lmdeploy",
        "serve",
        "api_server",
        "/home/u/model/Meta-Llama-3-8B-Instruct",
    ]
    assert argv[argv.index("--server-name") + 1] == "127.0.0.1"
    assert argv[argv.index("--server-port") + 1] == "23333"
    for flag in ("--backend", "--tp", "--session-len"):
        assert flag in argv
    # not chosen yet (serve() fills them from the GPU table): left to the engine, never a stale default
    for flag in ("--cache-max-entry-count", "--quant-policy", "--max-batch-size", "--max-prefill-token-num"):
        assert flag not in argv
    assert "--api-keys" not in argv and "--model-format" not in argv
    assert spec.port == 23333


def test_4bit_model_gets_awq_and_paths_map() -> None:
    argv = [str(a) for a in build_spec(ServeConfig(model="4bit"), HOME).argv]
    assert argv[3] == "/home/u/model/Meta-Llama-3-8B-Instruct_4bit"
    assert argv[argv.index("--model-format") + 1] == "awq"
    assert HOME.model("merged") == ("/home/u/model/llama3_hf_merged", None)
    assert HOME.model("~/x") == ("/home/u/x", None)
    assert HOME.model("/abs/m") == ("/abs/m", None)


def test_a_course_host_serves_from_its_conda_env_and_its_model_dir() -> None:
    argv = [str(a) for a in build_spec(ServeConfig(), COURSE).argv]
    assert argv[:4] == ["/root/miniforge3/envs/lmdeploy/bin/lmdeploy", "serve", "api_server",
                        "/root/autodl-tmp/model/Meta-Llama-3-8B-Instruct"]
    assert build_spec(ServeConfig(), COURSE).env["PATH"].startswith("/root/miniforge3/envs/lmdeploy/bin:")
    assert [str(a) for a in build_spec(ServeConfig(model="merged"), COURSE).argv][3] == \
        "/root/autodl-tmp/model/llama3_hf_merged"
    # --env still wins
    assert str(build_spec(ServeConfig(env_bin_dir="~/other/bin"), COURSE).argv[0]) == "/root/other/bin/lmdeploy"


def test_expose_requires_api_key() -> None:
    with pytest.raises(ServeConfigError, match="needs an API key"):
        build_spec(ServeConfig(expose=True), HOME)
    with pytest.raises(ServeConfigError, match=r"`transformers serve` cannot check an API key, and "
                                                r"\$LLAMA3_OPS_API_KEY is set: unset it"):
        build_spec(ServeConfig(engine="transformers", expose=True, api_key="k"), HOME)


def test_api_key_is_masked_everywhere_and_kept_in_a_0600_env_file(tmp_path: Path) -> None:
    key = "sk-very-secret-123"
    cfg = ServeConfig(expose=True, api_key=key)
    spec = build_spec(cfg, HOME)
    argv = [str(a) for a in spec.argv]
    assert argv[argv.index("--server-name") + 1] == "0.0.0.0"
    assert argv[argv.index("--api-keys") + 1] == "***"
    assert key not in spec.display() and "'***'" in spec.display()
    assert key not in spec.launcher() and '"$LLAMA3_OPS_API_KEY"' in spec.launcher()
    assert key in spec.env_file()
    # start it for real (locally), with an argv that echoes the key: the env file is 0600 and the
    # log shows the masked command line; the key only reaches the process at exec time
    home = tmp_path / "home"
    home.mkdir()
    remote = LocalRemote(env={"HOME": str(home)})
    echo = ServiceSpec(
        name="masked",
        argv=("sh", "-c", 'echo "got ${#1} chars"; sleep 30', "x", Secret("K")),
        secrets={"K": key},
    )
    services.start(remote, echo)
    try:
        envf = home / ".local/state/llama3-ops/run/masked.env"
        assert stat.S_IMODE(envf.stat().st_mode) == 0o600
        deadline = time.monotonic() + 5
        log = ""
        while "got" not in log and time.monotonic() < deadline:
            log = services.logs(remote, "masked")
            time.sleep(0.05)
        assert f"got {len(key)} chars" in log
        assert key not in log and "***" in log
        assert key not in (home / ".local/state/llama3-ops/run/masked.json").read_text()
        for name in ("masked.sh", "masked.fp"):
            assert key not in (home / ".local/state/llama3-ops/run" / name).read_text()
    finally:
        services.stop(remote, "masked")


def test_transformers_command() -> None:
    spec = build_spec(ServeConfig(engine="transformers", port=24001, env_bin_dir="/opt/env/bin"), HOME)
    assert [str(a) for a in spec.argv][:7] == [
        "/opt/env/bin/transformers", "serve", "/home/u/model/Meta-Llama-3-8B-Instruct",
        "--host", "127.0.0.1", "--port", "24001",
    ]  # fmt: skip
    assert spec.env["PATH"].startswith("/opt/env/bin:")


def test_the_cpu_engine_refuses_a_key_and_fingerprints_every_setting() -> None:
    with pytest.raises(ServeConfigError, match="cannot check an API key"):
        build_spec(ServeConfig(engine="transformers", api_key="k"), HOME)
    with pytest.raises(ServeConfigError, match=r"needs an API key in \$LLAMA3_OPS_API_KEY \(export it"):
        build_spec(ServeConfig(expose=True), HOME)
    base = build_spec(ServeConfig(engine="transformers"), HOME)
    # transformers serve's argv has no session length or batch size, yet a change is never reused
    for change in ({"session_len": 4096}, {"max_batch_size": 8}, {"cache_max_entry_count": 0.9}, {"tp": 2}):
        other = build_spec(ServeConfig(engine="transformers", **change), HOME)  # type: ignore[arg-type]
        assert [str(a) for a in other.argv] == [str(a) for a in base.argv]
        assert other.fingerprint() != base.fingerprint(), change


def test_fingerprint_changes_with_settings_and_secret() -> None:
    a = build_spec(ServeConfig(expose=True, api_key="k1"), HOME)
    assert a.fingerprint() == build_spec(ServeConfig(expose=True, api_key="k1"), HOME).fingerprint()
    assert a.fingerprint() != build_spec(ServeConfig(expose=True, api_key="k2"), HOME).fingerprint()
    assert a.fingerprint() != build_spec(ServeConfig(expose=True, api_key="k1", tp=2), HOME).fingerprint()


def test_service_reuse_refuse_restart_and_stop(tmp_path: Path) -> None:
    remote = LocalRemote(env={"HOME": str(tmp_path)})
    port = find_free_port(26500)
    spec = ServiceSpec(
        name="web", argv=("python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)), port=port
    )
    st, new = services.start(remote, spec)
    try:
        assert new and st.running and st.mode == "setsid"
        deadline = time.monotonic() + 10
        while not services.status(remote, "web").listening and time.monotonic() < deadline:
            time.sleep(0.05)
        st2, new2 = services.start(remote, spec)
        assert not new2 and st2.pid == st.pid  # same fingerprint: reused
        other = ServiceSpec(name="web", argv=("sleep", "60"), port=port)
        with pytest.raises(services.FingerprintMismatchError, match="restart=True"):
            services.start(remote, other)
        st3, new3 = services.start(remote, other, restart=True)
        assert new3 and st3.pid != st.pid and st3.fingerprint == other.fingerprint()
        assert is_port_free(port)  # the old server's listener is gone
        assert [s.name for s in services.list_services(remote)] == ["web"]
    finally:
        final = services.stop(remote, "web")
    assert final.state == "dead" and final.exit_status == "stopped"
    assert "=== llama3-ops stop" in final.log_tail[-1]


def test_service_that_exits_reports_status_and_log(tmp_path: Path) -> None:
    remote = LocalRemote(env={"HOME": str(tmp_path)})
    spec = ServiceSpec(name="boom", argv=("sh", "-c", "echo about to fail; exit 3"))
    services.start(remote, spec)
    deadline = time.monotonic() + 5
    st = services.status(remote, "boom")
    while st.running and time.monotonic() < deadline:
        time.sleep(0.05)
        st = services.status(remote, "boom")
    assert st.state == "dead" and st.exit_status == "3"
    assert "about to fail" in st.log_tail
    assert services.status(remote, "never-started").state == "absent"


def test_bad_service_name_rejected() -> None:
    with pytest.raises(ValueError, match="service name"):
        ServiceSpec(name="a b; rm", argv=("true",))
    with pytest.raises(ValueError, match="secret"):
        ServiceSpec(name="x", argv=(Secret("NOPE"),))


def test_free_port_selection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        assert not is_port_free(busy)
        nxt = find_free_port(busy)
        assert nxt > busy and is_port_free(nxt)
        assert listening_pids(busy)  # us
    assert is_port_free(busy)


def test_ssh_target_options() -> None:
    t = SSHTarget(
        host="10.0.0.5", user="root", port=2222, key_file=Path("/k"), known_hosts=Path("/kh"), jump="b@j"
    )
    argv = t.ssh_argv("true")
    joined = " ".join(argv)
    assert "StrictHostKeyChecking=yes" in joined and "BatchMode=yes" in joined
    assert "UserKnownHostsFile=/kh" in joined and "GlobalKnownHostsFile=/dev/null" in joined
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == "/k"
    assert argv[argv.index("-J") + 1] == "b@j"
    assert argv[-2:] == ["root@10.0.0.5", "true"]
    assert SSHTarget.from_dict(t.to_dict()) == t
    err = classify_ssh_failure(
        t, "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed."
    )
    assert isinstance(err, HostKeyMismatchError)
    assert "host key for [10.0.0.5]:2222 does not match known_hosts /kh" in str(err)


@pytest.mark.skipif(shutil.which("ansible-inventory") is None, reason="ansible-core not installed")
def test_target_from_real_ansible_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yml"
    (tmp_path / "keys").mkdir()
    inv.write_text(
        """all:
  children:
    gpu:
      hosts:
        course-gpu:
          ansible_host: 203.0.113.7
          ansible_port: 40022
          ansible_user: root
          ansible_ssh_private_key_file: keys/id_ed25519
          ansible_ssh_common_args: >-
            -o UserKnownHostsFile=keys/known_hosts -o ProxyJump=jump@bastion:22
            -o StrictHostKeyChecking=no -o ServerAliveInterval=15
        other:
          ansible_host: 198.51.100.1
"""
    )
    t = SSHTarget.from_inventory(inv, "course-gpu")
    assert (t.host, t.user, t.port, t.name) == ("203.0.113.7", "root", 40022, "course-gpu")
    assert t.key_file == tmp_path / "keys/id_ed25519"
    assert t.known_hosts == tmp_path / "keys/known_hosts"
    assert t.jump == "jump@bastion:22"
    assert t.extra_options == ("ServerAliveInterval=15",)
    assert "StrictHostKeyChecking=yes" in t.ssh_options()  # the inventory's "no" is ignored
    assert "StrictHostKeyChecking=no" not in " ".join(t.ssh_options())
    o = SSHTarget.from_inventory(inv, "other")
    assert o.host == "198.51.100.1" and o.port == 22
    with pytest.raises(KeyError, match=r"not in inventory.*course-gpu"):
        SSHTarget.from_inventory(inv, "nope")


def test_status_survives_a_log_without_final_newline(tmp_path: Path) -> None:
    """lmdeploy's log ends in a progress bar (no newline): status must still parse."""
    from llama3_ops.remote import services as svc

    run_dir = tmp_path / ".local/state/llama3-ops/run"
    log_dir = tmp_path / ".local/state/llama3-ops/logs"
    run_dir.mkdir(parents=True)
    log_dir.mkdir(parents=True)
    (run_dir / "llm.fp").write_text("abc\n")
    (run_dir / "llm.mode").write_text("setsid\n")
    (run_dir / "llm.pid").write_text("999999\n")
    (log_dir / "llm.log").write_text("loading\rWarming up decoding: 100%|##########| 10/10")
    st = svc.status(LocalRemote(env={"HOME": str(tmp_path)}), "llm", log_lines=5)
    assert st.state == "dead"
    assert st.log_tail[-1].endswith("10/10")


def test_tunnel_master_argv_own_control_socket_keepalive_ciphers_and_short_reconnects() -> None:
    from llama3_ops.remote.connection import SSHTarget
    from llama3_ops.remote.tunnel import Tunnel, TunnelSpec

    target = SSHTarget(host="gpu1", user="u", port=2222, extra_options=("ControlPath=/elsewhere/%C",))
    spec = TunnelSpec(target=target, local_port=23334)
    tun = Tunnel(spec)
    first, again = tun.argv(spec.connect_timeout), tun.argv(spec.reconnect_timeout)
    # a master of the tunnel's own; ours come first, so an inventory's ControlPath does not win
    assert first.index(f"ControlPath={tun.control_path}") < first.index("ControlPath=/elsewhere/%C")
    assert "ControlMaster=yes" in first and "ControlPersist=no" in first and "-N" in first
    assert not any(a.startswith("-L") for a in first) and "StrictHostKeyChecking=yes" in first
    assert "ServerAliveInterval=2" in first
    assert "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com" in first
    assert "ConnectTimeout=5" in first and "ConnectTimeout=2" in again
    spec.ciphers = ""
    assert not any(a.startswith("Ciphers=") for a in tun.argv())


def test_tunnel_spec_reads_state_files_of_older_versions() -> None:
    from llama3_ops.remote.connection import SSHTarget
    from llama3_ops.remote.tunnel import TunnelSpec

    d = TunnelSpec(target=SSHTarget(host="gpu1", user="u")).to_dict()
    assert TunnelSpec.from_dict({**d, "impl": "openssh"}).to_dict() == d
