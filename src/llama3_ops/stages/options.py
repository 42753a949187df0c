"""One definition of each command's options, for its ``fab`` task and its ``python -m`` twin.

A stage module lists its options as :class:`Opt` values; :func:`add_to` puts them on an argparse
parser (the ``python -m llama3_ops.stages.X --local`` entry points the GPU device runs use), and
:func:`fab_task` makes the Fabric task with the same names, defaults, choices and help texts (so
``fab -h TASK`` documents every option, and the two cannot drift).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from llama3_ops.errors import Llama3OpsError, user_errors


class OptionError(Llama3OpsError):
    """A value the option does not take."""


@dataclass(frozen=True)
class Opt:
    """An option: ``name`` (a Python identifier; ``--name-with-dashes`` on the command line)."""

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    kind: type = str  # the value's type when ``default`` is None

    @property
    def type(self) -> type:
        return type(self.default) if self.default is not None else self.kind

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def help_text(self) -> str:
        extra = f" ({' | '.join(map(str, self.choices))})" if self.choices else ""
        shown = "" if self.default in (None, "", False) or self.type is bool else f" [default: {self.default}]"
        return self.help + extra + shown

    def convert(self, value: Any) -> Any:
        """The value as the option's type (Fabric hands over strings for options without a default)."""
        if value is None or (self.type is not bool and isinstance(value, self.type)):
            out = value
        else:
            try:
                out = self.type(value)
            except (TypeError, ValueError):
                raise OptionError(f"{self.flag} takes a {self.type.__name__}, not {value!r}") from None
        if self.choices and out is not None and out not in self.choices:
            raise OptionError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}; got {out!r}")
        return out


def values(opts: Sequence[Opt], given: dict[str, Any]) -> SimpleNamespace:
    """The options' values, converted and checked (:class:`OptionError` names the option)."""
    return SimpleNamespace(**{o.name: o.convert(given.get(o.name, o.default)) for o in opts})


def add_to(parser: argparse.ArgumentParser, opts: Sequence[Opt]) -> None:
    """Put ``opts`` on an argparse parser: the same flags, defaults, choices and help as the fab task."""
    for o in opts:
        if o.type is bool:
            action = argparse.BooleanOptionalAction if o.default else "store_true"
            parser.add_argument(o.flag, dest=o.name, action=action, default=o.default, help=o.help_text)
        else:
            parser.add_argument(o.flag, dest=o.name, type=o.type, default=o.default, help=o.help_text,
                                choices=list(o.choices) or None)  # fmt: skip


def fab_task(name: str, doc: str, opts: Sequence[Opt], body: Callable[[Any, SimpleNamespace], None]) -> Any:
    """A Fabric task ``name`` taking ``opts``; ``body(connection, values)`` runs with user errors as one line."""
    from fabric import task

    def run(c: Any, **given: Any) -> None:
        body(c, values(opts, given))

    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=o.default) for o in opts]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = name.replace("-", "_")
    run.__doc__ = doc
    return task(name=name, help={o.name: o.help_text for o in opts})(user_errors(run))
