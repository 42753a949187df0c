from __future__ import annotations

import os
from pathlib import Path

from llama3_ops.remote.files import put_text
from llama3_ops.remote.transport import LocalRemote


def test_put_text_creates_parents_mode_and_tilde(tmp_path: Path) -> None:
    remote = LocalRemote(env={"HOME": str(tmp_path)})
    got = put_text(remote, "~/a b/c.txt", "hello\n$HOME `x`\n", mode="0600")
    assert got == f"{tmp_path}/a b/c.txt"
    p = tmp_path / "a b" / "c.txt"
    assert p.read_text() == "hello\n$HOME `x`\n"
    assert oct(os.stat(p).st_mode & 0o777) == "0o600"
    assert not [x for x in (tmp_path / "a b").iterdir() if ".tmp." in x.name]
