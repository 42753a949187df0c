"""The one base class of the errors a user can provoke and act on.

Its message says what is wrong and how to fix it, in a line or two. The command line (``fab`` and
every ``python -m llama3_ops...`` entry point) prints it as ``error: MESSAGE`` and exits 1, with no
Python traceback unless ``--debug`` (or ``LLAMA3_OPS_DEBUG=1``) asks for one.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

DEBUG_ENV = "LLAMA3_OPS_DEBUG"
F = TypeVar("F", bound=Callable[..., Any])


class Llama3OpsError(Exception):
    """A failure the user can act on; ``str(exc)`` is the message to print."""

    exit_code = 1


def debug_wanted() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or logging.getLogger().isEnabledFor(logging.DEBUG)


def report(exc: Llama3OpsError) -> int:
    """Print ``error: MESSAGE`` on stderr as one line (never parsed as markup); return the exit code."""
    from rich.console import Console

    Console(stderr=True).print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
    return exc.exit_code


def user_errors(fn: F) -> F:
    """Run ``fn``; a :class:`Llama3OpsError` becomes one line and its exit code, Ctrl-C exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Llama3OpsError as exc:
            if debug_wanted():
                raise
            sys.exit(report(exc))
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def returns_exit_code(fn: Callable[..., int]) -> Callable[..., int]:
    """For ``main(argv) -> int`` entry points: a :class:`Llama3OpsError` is one line and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return fn(*args, **kwargs)
        except Llama3OpsError as exc:
            if debug_wanted():
                raise
            return report(exc)

    return wrapper
