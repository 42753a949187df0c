"""``python -m llama3_ops``: the same as ``llama3-ops``."""

import sys

from llama3_ops.cli import main

sys.exit(main())
