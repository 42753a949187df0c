"""The command line: ``llama3-ops COMMAND ...`` and the one place user-facing errors are printed.

``llama3-ops`` runs the same entry points as ``python -m llama3_ops.<module>`` (the ones the GPU
device scripts and the tests call); ``fab`` tasks wrap their bodies with :func:`user_errors`. Either
way an error the user can act on (:class:`~llama3_ops.errors.Llama3OpsError`) is printed as one
``error: ...`` line and exits 1, with no traceback unless ``LLAMA3_OPS_DEBUG=1`` (or ``fab --debug``).
"""

from __future__ import annotations

import importlib
import sys

from llama3_ops.errors import Llama3OpsError, debug_wanted, report

# llama3-ops COMMAND -> the module whose main(argv) it runs (python -m MODULE is the same command).
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("llama3_ops.stages.serve", "the model server on a host: up | status | logs | stop"),
    "chat": ("llama3_ops.stages.chat", "lmdeploy chat with the GPU memory report (--local)"),
    "quantize": ("llama3_ops.stages.quantize", "W4A16 AWQ with offline calibration (--local)"),
    "llava": ("llama3_ops.stages.llava", "describe an image with LLaVA-Llama-3 (--local)"),
    "finetune": ("llama3_ops.stages.finetune", "self-cognition QLoRA fine-tune, convert, merge (--local)"),
    "llava-finetune": ("llama3_ops.stages.llava_finetune", "the LLaVA image fine-tune, convert, answer (--local)"),
    "agent-finetune": ("llama3_ops.stages.agent_finetune", "the Agent-FLAN fine-tune (--local)"),
    "bench": ("llama3_ops.bench.cli", "the course's throughput benchmark (online | offline | workload | check)"),
    "tunnel": ("llama3_ops.remote.tunnel", "the SSH tunnels on this machine: status | down"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: llama3-ops COMMAND [ARGS...]   (llama3-ops COMMAND --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except Llama3OpsError as exc:
        if debug_wanted():
            raise
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
