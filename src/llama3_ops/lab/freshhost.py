"""Throwaway Debian bookworm hosts, reached over real SSH, for tests and the local demo.

The controller here has no Docker and no systemd, so a "fresh host" is built from parts:

1. ``mmdebstrap`` builds a pristine bookworm rootfs once (about 45 s), from the controller's
   own apt sources, with openssh-server, python3, sudo and systemd;
2. every host gets its own overlay on that rootfs and its own network namespace
   (``169.254.213.(4*idx+2)``, a veth pair, NAT so apt and pip reach the registries);
3. ``systemd-nspawn --boot`` runs a real systemd as PID 1 inside (logind, ``systemctl --user``,
   linger), and the controller reaches its sshd on port 22 with strict host-key checking.

With ``package_cache=True`` (or ``LLAMA3_FRESH_HOSTS_CACHE=1``) the downloads one host made are kept
for the next: apt's ``.deb`` files and the course user's pip cache are hard-linked into a new host's
overlay before it boots and the new ones are linked back under ``BASE/cache`` when it stops. The host
still runs ``apt-get update``/``install`` and pip exactly as a fresh one does (apt checks a cached
``.deb`` against the package lists' hash; pip revalidates what it cached); only the transfers go.
Nothing is shared while hosts run, so hosts of several labs on one machine never lock each other out.

The guest's ``127.0.0.1`` is its own stack, so a server on the guest's 127.0.0.1:23333 and the
tunnel's local 127.0.0.1:23333 never collide, exactly as with a real remote host.

CLI: ``python -m llama3_ops.lab.freshhost build|up NAME IDX|down NAME IDX|ssh NAME IDX [CMD...]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.connection import SSHTarget

GUEST_USER = "student"
SUBNET_PREFIX = "169.254.213"
ROOTFS_PACKAGES = (
    "openssh-server,python3,sudo,ca-certificates,systemd,systemd-sysv,dbus,dbus-user-session,libpam-systemd"
)
# Bump when the rootfs recipe changes, so a cached rootfs is rebuilt.
ROOTFS_RECIPE = "3"
# Download caches carried from host to host (package_cache=True): guest path -> the files kept.
# apt: only the top-level .deb files (lock and partial/ stay per host); pip: its whole cache dir.
PACKAGE_CACHES = {"apt": ("var/cache/apt/archives", "*.deb"), "pip": (f"home/{GUEST_USER}/.cache/pip", "**/*")}
# Controller tools: the lab itself, plus what the tests and the demo use (git-lfs fixtures, a
# loopback sshd, tmux).
HOST_TOOLS = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container", "iptables": "iptables",
              "ssh": "openssh-client", "ip": "iproute2", "git-lfs": "git-lfs", "sshd": "openssh-server",
              "tmux": "tmux"}


class FreshHostError(Llama3OpsError, RuntimeError):
    """A fresh host could not be built, started or stopped."""


def _run(argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


def _uplink() -> str:
    out = _run(["ip", "-4", "route", "show", "default"]).stdout.split()
    if "dev" not in out:
        raise FreshHostError("no default route on the controller: fresh hosts need NAT egress for apt and pip")
    return out[out.index("dev") + 1]


@dataclass(frozen=True)
class Instance:
    name: str
    idx: int
    base: Path

    @property
    def dir(self) -> Path:
        return self.base / "inst" / self.name

    @property
    def host_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.idx * 4 + 1}"

    @property
    def guest_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.idx * 4 + 2}"

    @property
    def net(self) -> str:
        return f"{SUBNET_PREFIX}.{self.idx * 4}/30"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"


class FreshHostLab:
    """Builds the rootfs and starts/stops hosts under ``base`` (default ``./.fresh-hosts``)."""

    def __init__(self, base: Path | str = ".fresh-hosts", package_cache: bool | None = None,
                 background_cleanup: bool = False) -> None:
        self.base = Path(base).resolve()
        self.rootfs = self.base / "rootfs"
        self.key = self.base / "keys" / "id_ed25519"
        if package_cache is None:
            package_cache = os.environ.get("LLAMA3_FRESH_HOSTS_CACHE", "") not in ("", "0")
        self.package_cache = package_cache
        self.cache = self.base / "cache"
        # down() moves a stopped host's files (GBs of venvs: ~90 s to delete under load) aside and
        # deletes them in a niced background `rm -rf` instead of waiting for it.
        self.background_cleanup = background_cleanup

    # -- host tools and rootfs -------------------------------------------------------------
    @staticmethod
    def ensure_host_tools() -> None:
        if os.geteuid() != 0:
            raise FreshHostError("fresh hosts need root (network namespaces, overlays, systemd-nspawn)")
        path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool, path=path) is None})
        if missing:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
            _say(f"the fresh-host lab needs {', '.join(missing)} on this machine: apt-get update, then a dry run")
            _run(["apt-get", "update", "-qq"], env=env)
            new, upgraded = apt_plan(_run([*install[:2], "-s", *install[2:]], env=env).stdout)
            _say(f"apt will install {len(new)} package(s): {', '.join(new) or 'none'}")
            if upgraded:
                _say(f"and UPGRADE {len(upgraded)} of this machine's own: {', '.join(upgraded)}")
            _run(install, env=env)
            _say("apt: done")

    def rootfs_ready(self) -> bool:
        stamp = self.rootfs / ".llama3-ops-rootfs"
        return stamp.is_file() and stamp.read_text().strip() == ROOTFS_RECIPE

    def build(self, force: bool = False) -> Path:
        """Build the pristine rootfs (cached across calls by a recipe stamp)."""
        self.ensure_host_tools()
        self.key.parent.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llama3-ops@controller", "-f", str(self.key)])
        if self.rootfs_ready() and not force:
            return self.rootfs
        if (self.base / "inst").is_dir() and any((self.base / "inst").iterdir()):
            raise FreshHostError(f"hosts still running from {self.rootfs}; stop them before rebuilding")
        tmp = self.base / "rootfs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log = self.base / "mmdebstrap.log"
        _say(f"building the Debian bookworm rootfs with mmdebstrap (about a minute, once; log: {log})")
        sources = "/etc/apt/sources.list.d/debian.sources"
        if not Path(sources).exists():
            sources = "/etc/apt/sources.list"
        with log.open("w") as fh:
            proc = subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={ROOTFS_PACKAGES}",
                 "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr", "bookworm", str(tmp), sources],
                stdout=fh, stderr=subprocess.STDOUT, check=False,
            )
        if proc.returncode != 0:
            raise FreshHostError(f"mmdebstrap failed ({proc.returncode}); last lines:\n{_tail(log)}")
        self._customize(tmp)
        shutil.rmtree(self.rootfs, ignore_errors=True)
        tmp.rename(self.rootfs)
        return self.rootfs

    def _customize(self, r: Path) -> None:
        (r / "etc/hostname").write_text("coursehost\n")
        (r / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 coursehost\n::1 localhost ip6-localhost\n")
        _run(["chroot", str(r), "useradd", "-m", "-s", "/bin/bash", GUEST_USER])
        ssh_dir = r / "home" / GUEST_USER / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        shutil.copyfile(f"{self.key}.pub", ssh_dir / "authorized_keys")
        (ssh_dir / "authorized_keys").chmod(0o600)
        _run(["chroot", str(r), "chown", "-R", f"{GUEST_USER}:{GUEST_USER}", f"/home/{GUEST_USER}/.ssh"])
        sudoers = r / "etc/sudoers.d/90-student"
        sudoers.write_text(f"{GUEST_USER} ALL=(ALL) NOPASSWD:ALL\n")
        sudoers.chmod(0o440)
        (r / "etc/ssh/sshd_config.d/llama3-ops.conf").write_text(
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n"
            "AllowTcpForwarding yes\nMaxSessions 32\nMaxStartups 64:30:128\n"
        )
        # TLS to the registries is re-signed by a local CA on this kind of machine: trust it in the guest.
        cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        if cas:
            for ca in cas:
                shutil.copy(ca, r / "usr/local/share/ca-certificates/")
            _run(["chroot", str(r), "update-ca-certificates"])
            (r / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        # Look like a fresh cloud image: no package lists, no cached .debs.
        for deb in (r / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        shutil.rmtree(r / "var/lib/apt/lists", ignore_errors=True)
        (r / "var/lib/apt/lists/partial").mkdir(parents=True)
        (r / ".llama3-ops-rootfs").write_text(ROOTFS_RECIPE + "\n")

    # -- instances -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.base.mkdir(parents=True, exist_ok=True)
        with (self.base / ".lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def instance(self, name: str, idx: int) -> Instance:
        if not 0 <= idx < 64:
            raise FreshHostError(f"host index {idx} out of range 0..63")
        return Instance(name, idx, self.base)

    def target(self, inst: Instance) -> SSHTarget:
        return SSHTarget(host=inst.guest_ip, user=GUEST_USER, port=22, key_file=self.key,
                         known_hosts=inst.dir / "known_hosts", name=inst.name)

    def up(self, name: str, idx: int, timeout: float = 60.0) -> SSHTarget:
        """Boot a fresh host and return once ``sudo -n true`` works over SSH."""
        if not self.rootfs_ready():
            raise FreshHostError(f"no rootfs at {self.rootfs}: run `python -m llama3_ops.lab.freshhost build` first")
        inst = self.instance(name, idx)
        if _run(["ip", "netns", "list"]).stdout.split().count(name):
            raise FreshHostError(f"network namespace {name} exists: stop the old host first (down {name} {idx})")
        for sub in ("upper", "work", "merged"):
            (inst.dir / sub).mkdir(parents=True, exist_ok=True)
        if self.package_cache:
            self._seed_caches(inst)
        with self._lock():
            self._net_up(inst)
            nspawn = Path("/run/systemd/nspawn")
            if not os.path.ismount(nspawn):
                nspawn.mkdir(parents=True, exist_ok=True)
                _run(["mount", "-t", "tmpfs", "tmpfs", str(nspawn)])
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={self.rootfs},upperdir={inst.dir / 'upper'},workdir={inst.dir / 'work'}", str(inst.merged)])
        with (inst.dir / "console.log").open("w") as console:
            proc = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--keep-unit", "--register=no", "--boot", "-D", str(inst.merged),
                 f"--machine={name}", f"--network-namespace-path=/run/netns/{name}", "--resolv-conf=copy-host"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
            )
        (inst.dir / "launcher.pid").write_text(f"{proc.pid}\n")
        hostkey = (self.rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
        (inst.dir / "known_hosts").write_text(f"{inst.guest_ip} {' '.join(hostkey)}\n")
        target = self.target(inst)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(["ssh", "-o", "ConnectTimeout=1", *target.ssh_options(),
                                    f"{target.user}@{target.host}", "sudo -n true"],
                                   capture_output=True, check=False)
            if probe.returncode == 0:
                return target
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        console_tail = _tail(inst.dir / "console.log")
        self.down(name, idx)
        raise FreshHostError(f"host {name} did not come up over SSH within {timeout:.0f}s; console:\n{console_tail}")

    def _net_up(self, inst: Instance) -> None:
        n = inst.name
        _run(["ip", "link", "del", f"{n}-h"], check=False)  # a veth left by an earlier crash
        _run(["ip", "netns", "add", n])
        _run(["ip", "link", "add", f"{n}-h", "type", "veth", "peer", "name", f"{n}-n"])
        _run(["ip", "link", "set", f"{n}-n", "netns", n])
        _run(["ip", "addr", "add", f"{inst.host_ip}/30", "dev", f"{n}-h"])
        _run(["ip", "link", "set", f"{n}-h", "up"])
        _run(["ip", "-n", n, "addr", "add", f"{inst.guest_ip}/30", "dev", f"{n}-n"])
        _run(["ip", "-n", n, "link", "set", f"{n}-n", "up"])
        _run(["ip", "-n", n, "link", "set", "lo", "up"])
        _run(["ip", "-n", n, "route", "add", "default", "via", inst.host_ip])
        orig = self.base / ".ip_forward.orig"
        if not orig.exists():
            orig.write_text(Path("/proc/sys/net/ipv4/ip_forward").read_text())
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        rule = ["POSTROUTING", "-s", inst.net, "-o", _uplink(), "-j", "MASQUERADE", "-m", "comment",
                "--comment", "llama3-ops-freshhost"]
        if _run(["iptables", "-t", "nat", "-C", *rule], check=False).returncode != 0:
            _run(["iptables", "-t", "nat", "-A", *rule])

    def set_egress(self, name: str, idx: int, allowed: bool) -> None:
        """Block or allow the host's traffic beyond the controller (the offline-mode test)."""
        inst = self.instance(name, idx)
        rule = ["FORWARD", "-s", inst.net, "-j", "REJECT", "-m", "comment", "--comment", "llama3-ops-offline"]
        present = _run(["iptables", "-C", *rule], check=False).returncode == 0
        if not allowed and not present:
            _run(["iptables", "-I", *rule])
        elif allowed and present:
            _run(["iptables", "-D", *rule])

    def partition(self, name: str, idx: int, cut: bool) -> None:
        """Cut (or restore) the network between this machine and the host: packets are dropped,
        not refused, as on a real outage, so open TCP connections stall instead of resetting."""
        inst = self.instance(name, idx)
        for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
            rule = [chain, flag, inst.guest_ip, "-j", "DROP", "-m", "comment", "--comment", "llama3-ops-partition"]
            present = _run(["iptables", "-C", *rule], check=False).returncode == 0
            if cut and not present:
                _run(["iptables", "-I", *rule])
            elif not cut and present:
                _run(["iptables", "-D", *rule])

    def _netns_pids(self, name: str) -> list[int]:
        out = _run(["ip", "netns", "pids", name], check=False).stdout
        return [int(p) for p in out.split()]

    def down(self, name: str, idx: int, grace: float = 3.0) -> None:
        """Stop the host and remove everything it made: processes, netns, NAT rules, overlay."""
        inst = self.instance(name, idx)
        pid_file = inst.dir / "launcher.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # clean guest poweroff, if it is quick
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
        # systemd as the pid-namespace init ignores SIGTERM; SIGKILL on it ends the whole namespace.
        for _ in range(30):
            pids = self._netns_pids(name)
            if not pids:
                break
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.1)
        if pid:
            for _ in range(30):
                if not _alive(pid):
                    break
                time.sleep(0.1)
        if os.path.ismount(inst.merged):
            _run(["umount", str(inst.merged)], check=False)
        leftover = self._netns_pids(name)
        with self._lock():
            _run(["ip", "link", "del", f"{name}-h"], check=False)
            _run(["ip", "netns", "del", name], check=False)
            _run(["iptables", "-t", "nat", "-D", "POSTROUTING", "-s", inst.net, "-o", _uplink(), "-j",
                  "MASQUERADE", "-m", "comment", "--comment", "llama3-ops-freshhost"], check=False)
            self.set_egress(name, idx, allowed=True)
            self.partition(name, idx, cut=False)
            nat = _run(["iptables", "-t", "nat", "-S", "POSTROUTING"], check=False).stdout
            orig = self.base / ".ip_forward.orig"
            if "llama3-ops-freshhost" not in nat and orig.exists():
                Path("/proc/sys/net/ipv4/ip_forward").write_text(orig.read_text())
                orig.unlink()
            if (inst.dir / "console.log").exists():
                shutil.copyfile(inst.dir / "console.log", self.base / f"last-console-{name}.log")
            if leftover or os.path.ismount(inst.merged):
                raise FreshHostError(f"host {name}: processes {leftover} still running; kept {inst.dir}")
            if self.package_cache:
                self._harvest_caches(inst)
            self._discard(inst.dir)
            inst_root = self.base / "inst"
            nspawn = Path("/run/systemd/nspawn")
            # Another lab (a second checkout, CI beside a demo) may still run hosts: unmount only
            # when no systemd-nspawn runs on this machine at all.
            if (not inst_root.exists() or not any(inst_root.iterdir())) and os.path.ismount(nspawn) \
                    and not _nspawn_running():
                _run(["umount", str(nspawn)], check=False)

    def _discard(self, path: Path) -> None:
        if not self.background_cleanup or not path.exists():
            shutil.rmtree(path, ignore_errors=True)
            return
        trash = self.base / "trash" / f"{path.name}.{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        path.rename(trash)
        subprocess.Popen(["nice", "-n", "19", "rm", "-rf", str(trash)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    # -- download caches carried between hosts (package_cache) --------------------------------
    def _upper_dirs(self, inst: Instance, guest_path: str) -> Path:
        """Create ``guest_path``'s directories in the host's (not yet mounted) overlay upper layer with
        the rootfs's owner and mode, so the merged view looks as without them; missing ones (the
        user's ~/.cache) get the owner of the nearest parent that exists in the rootfs."""
        upper, lower = inst.dir / "upper", self.rootfs
        uid = gid = 0
        for i, _part in enumerate(Path(guest_path).parts, start=1):
            rel = Path(*Path(guest_path).parts[:i])
            target = upper / rel
            if (lower / rel).is_dir():
                st = (lower / rel).stat()
                uid, gid, mode = st.st_uid, st.st_gid, st.st_mode & 0o7777
            else:
                mode = 0o755
            if not target.is_dir():
                target.mkdir()
                os.chown(target, uid, gid)
                target.chmod(mode)
        return upper / guest_path

    def _seed_caches(self, inst: Instance) -> None:
        for key, (guest_path, _pattern) in PACKAGE_CACHES.items():
            src = self.cache / key
            if not src.is_dir():
                continue
            dest = self._upper_dirs(inst, guest_path)
            for f in src.rglob("*"):
                rel = f.relative_to(src)
                if f.is_dir():
                    d = dest / rel
                    if not d.is_dir():
                        d.mkdir(parents=True)
                        st = f.stat()
                        os.chown(d, st.st_uid, st.st_gid)
                elif f.is_file() and not (dest / rel).exists():
                    os.link(f, dest / rel)

    def _harvest_caches(self, inst: Instance) -> None:
        """Link what the host downloaded into BASE/cache (by rename, so a reader never sees half a file)."""
        for key, (guest_path, pattern) in PACKAGE_CACHES.items():
            src = inst.dir / "upper" / guest_path
            if not src.is_dir():
                continue
            dest = self.cache / key
            for f in src.glob(pattern):
                if not f.is_file() or f.is_symlink():
                    continue
                out = dest / f.relative_to(src)
                if out.exists():
                    continue
                with contextlib.suppress(OSError):  # best effort: a cache miss is only slower
                    dest.mkdir(parents=True, exist_ok=True)
                    for d in reversed(f.relative_to(src).parents[:-1]):  # each directory, as the host had it
                        if not (dest / d).is_dir():
                            (dest / d).mkdir()
                            st = (src / d).stat()
                            os.chown(dest / d, st.st_uid, st.st_gid)
                    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                    tmp.unlink(missing_ok=True)
                    os.link(f, tmp)
                    tmp.rename(out)

    @contextlib.contextmanager
    def host(self, name: str, idx: int) -> Iterator[SSHTarget]:
        target = self.up(name, idx)
        try:
            yield target
        finally:
            self.down(name, idx)

    def put(self, name: str, idx: int, src: Path, guest_path: str, owner: str = GUEST_USER) -> None:
        """Copy a controller file or directory into a running host (through its overlay)."""
        inst = self.instance(name, idx)
        if not os.path.ismount(inst.merged):
            raise FreshHostError(f"host {name} is not running")
        dest = inst.merged / guest_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
        _run(["chroot", str(inst.merged), "chown", "-R", f"{owner}:{owner}", guest_path])

    def ssh(self, target: SSHTarget, command: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the host as the course user."""
        proc = subprocess.run(target.ssh_argv(command), capture_output=True, text=True, check=False,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise FreshHostError(f"`{command}` on {target.label} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        return proc


def _say(message: str) -> None:
    print(f"[fresh-host lab] {message}", file=sys.stderr, flush=True)


def apt_plan(simulation: str) -> tuple[list[str], list[str]]:
    """``apt-get -s install``'s plan: (new packages, upgrades as ``name old -> new``)."""
    new: list[str] = []
    upgraded: list[str] = []
    for line in simulation.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "Inst":
            continue
        if parts[2].startswith("["):  # Inst NAME [OLD] (NEW ...)
            upgraded.append(f"{parts[1]} {parts[2].strip('[]')} -> {parts[3].lstrip('(')}")
        else:
            new.append(parts[1])
    return new, upgraded


def write_inventory(path: Path, targets: list[SSHTarget], host_vars: dict[str, object] | None = None) -> Path:
    """An Ansible YAML inventory putting ``targets`` in the group llama3_hosts, with strict host keys."""
    import yaml

    hosts: dict[str, dict[str, object]] = {}
    for t in targets:
        hosts[t.name or t.host] = {
            "ansible_host": t.host,
            "ansible_port": t.port,
            "ansible_user": t.user,
            "ansible_ssh_private_key_file": str(t.key_file),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={t.known_hosts} -o StrictHostKeyChecking=yes",
            **(host_vars or {}),
        }
    path.write_text(yaml.safe_dump({"llama3_hosts": {"hosts": hosts}}, sort_keys=False))
    return path


def _nspawn_running() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "systemd-nspawn":
                return True
        except OSError:
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama3_ops.lab.freshhost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.environ.get("LLAMA3_FRESH_HOSTS", ".fresh-hosts"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("deps", help="apt-get install the controller tools the lab needs (root)")
    b = sub.add_parser("build")
    b.add_argument("--force", action="store_true")
    for cmd in ("up", "down", "ssh"):
        p = sub.add_parser(cmd)
        p.add_argument("name")
        p.add_argument("idx", type=int)
        if cmd == "ssh":
            p.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    lab = FreshHostLab(args.base)
    try:
        if args.cmd == "deps":
            lab.ensure_host_tools()
        elif args.cmd == "build":
            t0 = time.monotonic()
            print(f"rootfs {lab.build(args.force)} ready in {time.monotonic() - t0:.1f}s")
        elif args.cmd == "up":
            t = lab.up(args.name, args.idx)
            print(f"{t.user}@{t.host} key={t.key_file} known_hosts={t.known_hosts}")
        elif args.cmd == "down":
            lab.down(args.name, args.idx)
        else:
            t = lab.target(lab.instance(args.name, args.idx))
            os.execvp("ssh", t.ssh_argv(*args.command))  # noqa: S606
    except FreshHostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
