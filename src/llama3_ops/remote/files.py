"""Put files on a host through a :class:`~llama3_ops.remote.transport.Remote` (content travels on stdin)."""

from __future__ import annotations

import shlex
from importlib import resources

from llama3_ops.remote.transport import Remote


def put_text(remote: Remote, path: str, text: str, mode: str = "0644", timeout: float = 60.0) -> str:
    """Write ``text`` to ``path`` on the host atomically (tmp file + rename); ``~/`` is the user's home.

    Returns the absolute path. Parent directories are created.
    """
    target = f'"$HOME"/{shlex.quote(path[2:])}' if path.startswith("~/") else shlex.quote(path)
    script = (
        "set -e; "
        f"p={target}; "
        'mkdir -p "$(dirname "$p")"; '
        'tmp="$p.tmp.$$"; '
        'cat > "$tmp"; '
        f'chmod {shlex.quote(mode)} "$tmp"; '
        'mv -f "$tmp" "$p"; '
        'printf %s "$p"'
    )
    return remote.run(script, stdin=text, timeout=timeout).stdout.strip()


def put_package_file(remote: Remote, package: str, name: str, path: str, mode: str = "0644") -> str:
    """Upload a data file shipped inside ``package`` (e.g. ``llama3_ops.stages``) to ``path``."""
    text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    return put_text(remote, path, text, mode=mode)
