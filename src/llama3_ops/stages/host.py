"""The host contract: what provisioning wrote about a course host, read once by every stage.

``ansible-playbook site.yml`` (role ``llama3_course``) writes ``~/llama3-course/host.json`` (and
links it from ``~/.config/llama3-ops/host.json``, the place read first, so a course dir moved with
``llama3_course_dir`` is still found)::

    {"profile": "course", "user": "student", "course_dir": "/home/student/llama3-course",
     "model_dir": "/home/student/model/Meta-Llama-3-8B-Instruct", "model_stamp": "...",
     "envs": {"llama3": "/home/student/miniforge3/envs/llama3/bin", "lmdeploy": "..."},
     "offline": false, "service_manager": "systemd"}

Every stage and ``fab serve`` take the host's facts from :func:`read_host`: the environment that
runs each stage (``envs``: conda envs under ``~/miniforge3/envs`` for the ``course`` profile, venvs
under ``~/envs`` for ``cpu``) and where the models are. An explicit ``--env`` still overrides the
environment. Model names (the models live beside ``model_dir``):

=========  ===========================================  ================================
``base``   ``model_dir`` (``~/model/Meta-Llama-3-8B-Instruct``)   the model download (site.yml)
``merged`` ``<model_dir's parent>/llama3_hf_merged``       stage 2, ``fab finetune``
``4bit``   ``<model_dir>_4bit``                            stage 4, ``fab quantize`` (AWQ)
other      a path on the host (``~`` = the host user's home)
=========  ===========================================  ================================
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.transport import Remote

HOST_JSON = "~/llama3-course/host.json"
HOST_JSON_LINK = "~/.config/llama3-ops/host.json"
PROVISION_HINT = "ansible-playbook -i INVENTORY site.yml --limit HOST (or: fab -H HOST provision)"
REQUIRED = ("profile", "user", "course_dir", "model_dir", "model_stamp", "envs", "offline", "service_manager")

MERGED_NAME = "llama3_hf_merged"
AWQ_SUFFIX = "_4bit"
# Which stage makes each named model, for "run X first" messages.
MADE_BY = {
    "base": "the model download (ansible-playbook site.yml --tags model)",
    "merged": "the fine-tune stage (fab finetune merges into it)",
    "4bit": "fab quantize",
}


class HostContractError(Llama3OpsError):
    """The host has no usable ``host.json``: it was not provisioned, or the file was edited."""


def expand(path: str, home: str) -> str:
    """``~`` and ``~/...`` against the host user's ``home``; other paths unchanged."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return home.rstrip("/") + path[1:]
    return path


@dataclass(frozen=True)
class Host:
    """A provisioned course host, as ``host.json`` describes it (paths absolute)."""

    label: str
    home: str
    profile: str
    user: str
    course_dir: str
    model_dir: str
    model_stamp: str
    envs: dict[str, str] = field(default_factory=dict)
    offline: bool = False
    service_manager: str = ""

    def expand(self, path: str) -> str:
        return expand(path, self.home)

    def env_bin(self, name: str, override: str | None = None) -> str:
        """The bin directory of env ``name`` (``override``, when given, wins: ``--env``)."""
        if override:
            return self.expand(override).rstrip("/")
        try:
            return self.expand(self.envs[name]).rstrip("/")
        except KeyError:
            have = ", ".join(sorted(self.envs)) or "none"
            raise HostContractError(
                f"{self.label}: host.json names no {name!r} environment (it has: {have}); provision the host "
                f"with a profile that has it ({PROVISION_HINT}) or pass --env with that env's bin directory"
            ) from None

    def sibling(self, name: str) -> str:
        """A model directory next to the base model (where fine-tunes merge to)."""
        return posixpath.join(posixpath.dirname(self.model_dir.rstrip("/")), name)

    @property
    def models(self) -> dict[str, str]:
        return {"base": self.model_dir, "merged": self.sibling(MERGED_NAME),
                "4bit": self.model_dir.rstrip("/") + AWQ_SUFFIX}  # fmt: skip

    def model(self, name: str) -> tuple[str, str | None]:
        """``(absolute path, model format or None)`` for ``base``, ``merged``, ``4bit`` or a path."""
        path = self.models.get(name) or self.expand(name)
        return path, ("awq" if name == "4bit" else None)

    def model_hint(self, name: str) -> str:
        """``; it is made by STAGE: run that first`` for a named model, else ``""``."""
        return f"; it is made by {MADE_BY[name]}: run that first" if name in MADE_BY else ""


def parse_host(label: str, home: str, text: str) -> Host:
    """A :class:`Host` from ``host.json``'s text; :class:`HostContractError` with the fix when unusable."""
    if not text.strip():
        raise HostContractError(f"{label} has no {HOST_JSON}: it was not provisioned. Provision it first: "
                                f"{PROVISION_HINT}")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HostContractError(
            f"{label}: {HOST_JSON} is not JSON ({exc}); provisioning rewrites it: {PROVISION_HINT}"
        ) from exc
    if not isinstance(data, dict):
        raise HostContractError(f"{label}: {HOST_JSON} is not a JSON object; provisioning rewrites it: "
                                f"{PROVISION_HINT}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise HostContractError(
            f"{label}: {HOST_JSON} lacks {', '.join(missing)} (written by an older bundle, or edited); "
            f"provisioning rewrites it: {PROVISION_HINT}"
        )
    envs = data["envs"]
    if not isinstance(envs, dict) or not all(isinstance(v, str) and v for v in envs.values()):
        raise HostContractError(f"{label}: {HOST_JSON}'s envs must map names to bin directories; {PROVISION_HINT}")
    for key in ("course_dir", "model_dir"):
        if not isinstance(data[key], str) or not data[key]:
            raise HostContractError(f"{label}: {HOST_JSON}'s {key} must be a path; {PROVISION_HINT}")
    return Host(
        label=label,
        home=home,
        profile=str(data["profile"]),
        user=str(data["user"]),
        course_dir=expand(data["course_dir"], home),
        model_dir=expand(data["model_dir"], home),
        model_stamp=expand(str(data["model_stamp"]), home),
        envs={str(k): expand(v, home) for k, v in envs.items()},
        offline=bool(data["offline"]),
        service_manager=str(data["service_manager"]),
    )


def read_host(remote: Remote) -> Host:
    """The host's :class:`Host`, in one remote call."""
    link, main = (p.removeprefix("~/") for p in (HOST_JSON_LINK, HOST_JSON))
    res = remote.run(f'printf "%s\\n" "$HOME"; cat "$HOME/{link}" 2>/dev/null || cat "$HOME/{main}" 2>/dev/null; true',
                     timeout=30)  # fmt: skip
    home, _, text = res.stdout.partition("\n")
    return parse_host(remote.label, home.strip(), text)
