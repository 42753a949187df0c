#!/usr/bin/env python3
"""Render the per-role variables table of README.md from roles/*/meta/argument_specs.yml.

    python scripts/render_variables.py          rewrite README.md between the markers
    python scripts/render_variables.py --check  exit 1 if README.md is out of date (a test runs this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- variables:begin -->", "<!-- variables:end -->"
ORDER = ["llama3", "llama3_preflight", "llama3_base", "llama3_python_env", "llama3_model", "llama3_course"]


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = " ".join(str(text).split())
    return "`" + text.replace("|", "\\|") + "`" if text else '`""`'


def render() -> str:
    parts = []
    for role in ORDER:
        spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
        main = spec["argument_specs"]["main"]
        parts.append(f"**`{role}`**: {main['short_description']}\n")
        parts.append("| variable | type | default | meaning |\n|---|---|---|---|")
        for name, opt in main["options"].items():
            parts.append(f"| `{name}` | {opt['type']} | {_cell(opt.get('default', ''))} | {opt['description']} |")
        parts.append("")
    return "\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("README.md's variables table is out of date: run python scripts/render_variables.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
