"""Convert Agent-FLAN jsonl files into the dataset XTuner loads (runs on the host, llama3 env).

Agent-FLAN (huggingface.co/datasets/internlm/Agent-FLAN, data/*.jsonl) has one conversation per
line::

    {"conversation": [{"role": "system", "content": "...", "loss": false},
                      {"role": "user", "content": "...", "loss": false},
                      {"role": "assistant", "content": "...", "loss": true}, ...],
     "id": "..."}

XTuner cannot load it as it is: a ``conversation`` column means XTuner's own input/output format.
As the course's tools/convert_agentflan.py does, each record's ``conversation`` becomes
``messages`` (read by XTuner's ``openai_map_fn``, which honours ``loss``), ``id`` is dropped, and
the records are saved with ``datasets.Dataset.save_to_disk``. Unlike the course script this one
checks every record and names the file and line of a bad one, reads the files in a fixed order,
and writes to a temporary directory renamed into place, so a failed run leaves no half dataset.

Usage: python convert_agentflan.py SRC_DIR OUT_DIR   (prints one JSON line with the counts)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class ConversionError(ValueError):
    pass


def convert_record(raw: Any, where: str) -> dict[str, Any]:
    """One Agent-FLAN record -> ``{"messages": [{"role", "content", "loss"}, ...]}``."""
    if not isinstance(raw, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    conv = raw.get("conversation")
    if not isinstance(conv, list) or not conv:
        raise ConversionError(f"{where}: no 'conversation' list (keys: {', '.join(sorted(raw)) or 'none'})")
    messages = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise ConversionError(f"{where}: conversation[{i}] is not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ConversionError(f"{where}: conversation[{i}] has role {role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise ConversionError(f"{where}: conversation[{i}] has no text 'content'")
        loss = msg.get("loss", role == "assistant")
        if not isinstance(loss, bool):
            raise ConversionError(f"{where}: conversation[{i}] 'loss' must be true or false, got {loss!r}")
        messages.append({"role": role, "content": content, "loss": loss})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversionError(f"{where}: the conversation has no assistant turn to train on")
    return {"messages": messages}


def read_records(src: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    files = sorted(p for p in src.iterdir() if p.suffix == ".jsonl" and p.is_file())
    if not files:
        raise ConversionError(f"{src} holds no .jsonl files (Agent-FLAN keeps them in its data/ folder)")
    records: list[dict[str, Any]] = []
    per_file: dict[str, int] = {}
    for path in files:
        n = 0
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConversionError(f"{where}: not JSON ({exc.msg})") from exc
                records.append(convert_record(raw, where))
                n += 1
        per_file[path.name] = n
    return records, per_file


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    if not src.is_dir():
        print(f"Agent-FLAN data directory {src} does not exist", file=sys.stderr)
        return 3
    try:
        records, per_file = read_records(src)
    except ConversionError as exc:
        print(f"cannot convert {src}: {exc}", file=sys.stderr)
        return 4
    from datasets import Dataset

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(records).save_to_disk(str(tmp))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(json.dumps({"records": len(records), "files": per_file, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
