"""How the controller reaches a course host over SSH.

One value, :class:`SSHTarget`, is shared by Ansible inventories, Fabric tasks, the tunnel and
the test harness, so that every tool connects the same way and verifies the same host key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
