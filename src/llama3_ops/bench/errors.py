"""The one error type the bench CLI turns into a clean message and exit code 2."""

from __future__ import annotations

from llama3_ops.errors import Llama3OpsError


class BenchError(Llama3OpsError):
    """Bad input or an unreachable target: reported as one line, exit code 2, no traceback."""

    exit_code = 2
