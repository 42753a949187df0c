"""``python -m llama3_ops.bench``."""

from __future__ import annotations

import sys

from llama3_ops.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
