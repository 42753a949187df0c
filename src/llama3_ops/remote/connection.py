"""How the controller reaches a course host over SSH.

One value, :class:`SSHTarget`, is shared by Ansible inventories, Fabric tasks, the tunnel and
the test harness, so that every tool connects the same way and verifies the same host key.
"""

from __future__ import annotations

import getpass
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama3_ops.errors import Llama3OpsError


@dataclass(frozen=True)
class SSHTarget:
    """An SSH destination with strict host-key checking."""

    host: str
    user: str
    port: int = 22
    key_file: Path | None = None
    known_hosts: Path | None = None
    jump: str | None = None
    name: str = ""
    extra_options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return self.name or f"{self.user}@{self.host}:{self.port}"

    def ssh_options(self) -> list[str]:
        """OpenSSH ``-o`` options: batch mode, strict host keys, the key and known_hosts given."""
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-p", str(self.port)]
        if self.key_file:
            opts += ["-i", str(self.key_file), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.jump:
            opts += ["-J", self.jump]
        for opt in self.extra_options:
            opts += ["-o", opt]
        return opts

    def ssh_argv(self, *remote: str) -> list[str]:
        return ["ssh", *self.ssh_options(), f"{self.user}@{self.host}", *remote]

    # ------------------------------------------------------------------ extensions (serve/tunnel)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (the detached tunnel supervisor gets its target this way)."""
        return {
            "host": self.host,
            "user": self.user,
            "port": self.port,
            "key_file": str(self.key_file) if self.key_file else None,
            "known_hosts": str(self.known_hosts) if self.known_hosts else None,
            "jump": self.jump,
            "name": self.name,
            "extra_options": list(self.extra_options),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSHTarget:
        return cls(
            host=str(data["host"]),
            user=str(data["user"]),
            port=int(data.get("port") or 22),
            key_file=Path(data["key_file"]) if data.get("key_file") else None,
            known_hosts=Path(data["known_hosts"]) if data.get("known_hosts") else None,
            jump=data.get("jump") or None,
            name=str(data.get("name") or ""),
            extra_options=tuple(data.get("extra_options") or ()),
        )

    @classmethod
    def from_inventory(cls, inventory: str | Path, host_name: str) -> SSHTarget:
        """Build a target from an Ansible inventory, using the real ``ansible-inventory`` resolver.

        Reads ``ansible_host``, ``ansible_user``, ``ansible_port``, ``ansible_ssh_private_key_file``
        and the ``-o`` options in ``ansible_ssh_common_args``/``ansible_ssh_extra_args``
        (``UserKnownHostsFile`` becomes :attr:`known_hosts`, ``ProxyJump``/``-J`` becomes :attr:`jump`;
        other ``-o`` options are kept in :attr:`extra_options`; StrictHostKeyChecking is always
        forced to ``yes`` by :meth:`ssh_options`, whatever the inventory says).
        """
        hostvars = inventory_hostvars(inventory, host_name)
        return cls.from_hostvars(host_name, hostvars, base_dir=Path(inventory).resolve().parent)

    @classmethod
    def from_hostvars(
        cls, host_name: str, hostvars: dict[str, Any], base_dir: Path | None = None
    ) -> SSHTarget:
        def _path(value: Any) -> Path | None:
            if not value:
                return None
            p = Path(str(value)).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            return p

        args = " ".join(
            str(hostvars.get(k) or "") for k in ("ansible_ssh_common_args", "ansible_ssh_extra_args")
        )
        known_hosts: Path | None = None
        jump: str | None = None
        extra: list[str] = []
        words = shlex.split(args)
        i = 0
        while i < len(words):
            word = words[i]
            value: str | None = None
            if word in ("-o", "-J") and i + 1 < len(words):
                value = words[i + 1]
                i += 2
            elif word.startswith("-o") and len(word) > 2:
                value = word[2:]
                i += 1
            elif word.startswith("-J") and len(word) > 2:
                word, value = "-J", word[2:]
                i += 1
            else:
                raise ValueError(f"{host_name}: unsupported ssh argument {word!r} in ansible_ssh_*_args")
            if word.startswith("-J"):
                jump = value
                continue
            key, _, val = value.replace("=", " ", 1).partition(" ")
            lkey = key.strip().lower()
            if lkey == "userknownhostsfile":
                known_hosts = _path(val.strip().split()[0])
            elif lkey == "proxyjump":
                jump = val.strip()
            elif lkey in ("stricthostkeychecking", "batchmode", "globalknownhostsfile"):
                continue  # ours are fixed
            else:
                extra.append(f"{key.strip()}={val.strip()}")
        host = str(hostvars.get("ansible_host") or hostvars.get("ansible_ssh_host") or host_name)
        user = str(hostvars.get("ansible_user") or hostvars.get("ansible_ssh_user") or getpass.getuser())
        port = int(hostvars.get("ansible_port") or hostvars.get("ansible_ssh_port") or 22)
        return cls(
            host=host,
            user=user,
            port=port,
            key_file=_path(hostvars.get("ansible_ssh_private_key_file")),
            known_hosts=known_hosts,
            jump=jump,
            name=host_name,
            extra_options=tuple(extra),
        )


def inventory_hostvars(inventory: str | Path, host_name: str) -> dict[str, Any]:
    """``ansible-inventory -i INV --host NAME`` as a dict; a clear error when the host is unknown."""
    exe = shutil.which("ansible-inventory") or str(Path(sys.executable).parent / "ansible-inventory")
    proc = subprocess.run(
        [exe, "-i", str(inventory), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise Llama3OpsError(f"ansible-inventory -i {inventory} --list failed ({last}): fix the inventory file")
    data = json.loads(proc.stdout)
    hostvars: dict[str, dict[str, Any]] = data.get("_meta", {}).get("hostvars", {})
    all_hosts: set[str] = set(hostvars)
    for group, body in data.items():
        if group != "_meta" and isinstance(body, dict):
            all_hosts.update(body.get("hosts", []))
    if host_name not in all_hosts:
        known = ", ".join(sorted(all_hosts)) or "(none)"
        raise KeyError(f"host {host_name!r} is not in inventory {inventory}; hosts there: {known}")
    return dict(hostvars.get(host_name, {}))


class SSHError(Llama3OpsError):
    """ssh could not connect or authenticate (rc 255); ``detail`` holds ssh's own words."""

    detail: str = ""


class HostKeyMismatchError(SSHError):
    """The host presented a key that is not the one in known_hosts (or none is known)."""


def classify_ssh_failure(target: SSHTarget, stderr: str) -> SSHError:
    """Turn OpenSSH's stderr into one line a course user can act on (ssh's own words in ``.detail``)."""
    kh = str(target.known_hosts) if target.known_hosts else "~/.ssh/known_hosts"
    hostport = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    tail = stderr.strip()[-1500:]
    changed = "Host key for" in stderr and "has changed" in stderr
    err: SSHError
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or changed:
        line = next((ln for ln in stderr.splitlines() if "Offending" in ln and "key in" in ln), "")
        where = line.split("key in", 1)[1].strip() if line else kh
        err = HostKeyMismatchError(
            f"host key for {hostport} does not match known_hosts {where}: refusing to connect "
            "(StrictHostKeyChecking=yes). If the host was really reinstalled (a rebuilt demo host, a new VM), "
            f"check its fingerprint out of band, then delete the old key with "
            f"`ssh-keygen -f {kh} -R '{hostport}'` and add the new one."
        )
    elif "Host key verification failed" in stderr or ("No " in stderr and "host key is known" in stderr):
        err = HostKeyMismatchError(
            f"host key for {hostport} is not in known_hosts {kh} (or does not match it): refusing to connect "
            f"(StrictHostKeyChecking=yes). Add the host's key to {kh} first (from its console or the provider's "
            f"panel, or `ssh-keyscan -p {target.port} {target.host}` checked against its fingerprint), never by "
            "blind accept."
        )
    elif "Could not resolve hostname" in stderr:
        err = SSHError(
            f"cannot resolve host {target.host!r}: it is neither in your inventory ($LLAMA3_INVENTORY, default "
            f"inventory/my.yml) nor a name DNS knows; add it there, or give user@address[:port]"
        )
    elif "Connection refused" in stderr or "timed out" in stderr or "No route to host" in stderr:
        last = tail.splitlines()[-1] if tail else ""
        err = SSHError(f"cannot reach {target.label} on port {target.port} ({last}): is the host up and sshd running?")
    elif "Permission denied" in stderr:
        err = SSHError(
            f"{target.user}@{target.host} refused our key (Permission denied): set ansible_ssh_private_key_file in the "
            "inventory, or add your public key to the host's ~/.ssh/authorized_keys"
        )
    else:
        last = tail.splitlines()[-1] if tail else "no message"
        err = SSHError(f"ssh to {target.label} failed: {last}")
    err.detail = tail
    return err
