"""Which host a Fabric task talks to: the same inventory Ansible uses.

``fab -H gpu1 serve`` looks ``gpu1`` up in ``$LLAMA3_INVENTORY`` (default ``inventory/my.yml``,
else ``inventory/example.yml``) for its address, user, port, key, known_hosts and jump host. A
name that is not in the inventory is taken as ``[user@]host[:port]`` with your ssh defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from llama3_ops.remote.connection import SSHTarget

ROOT = Path(__file__).resolve().parents[3]


def default_inventory() -> Path:
    env = os.environ.get("LLAMA3_INVENTORY")
    if env:
        return Path(env)
    mine = ROOT / "inventory" / "my.yml"
    return mine if mine.exists() else ROOT / "inventory" / "example.yml"


def resolve(host: str | None, inventory: str | Path | None = None) -> SSHTarget:
    """The :class:`SSHTarget` for ``host`` (an inventory name, or ``[user@]host[:port]``)."""
    if not host:
        raise SystemExit("name the host: fab -H <inventory host or user@host[:port]> <task>")
    inv = Path(inventory) if inventory else default_inventory()
    if inv.exists():
        try:
            return SSHTarget.from_inventory(inv, host)
        except KeyError:
            pass  # not an inventory name: a plain [user@]host[:port]
    user, _, rest = host.rpartition("@")
    name, _, port = rest.partition(":")
    return SSHTarget(host=name, user=user or os.environ.get("USER", "root"), port=int(port or 22), name=host)
