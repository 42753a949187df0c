"""The one base class of the errors a user can provoke and act on.

Its message says what is wrong and how to fix it, in a line or two. The command line (``fab`` and
every ``python -m llama3_ops...`` entry point) prints it as ``error: MESSAGE`` and exits 1, with no
Python traceback unless ``--debug`` (or ``LLAMA3_OPS_DEBUG=1``) asks for one.
"""

from __future__ import annotations


class Llama3OpsError(Exception):
    """A failure the user can act on; ``str(exc)`` is the message to print."""

    exit_code = 1
