"""Wait until an OpenAI-compatible server is really ready, with a rich progress display.

Readiness = ``GET /health`` answers 200 (``GET /v1/models`` when the server has no /health), the model
list is non-empty, and one real 1-token chat completion succeeds. Probes run either from here
(:class:`LocalHttpProbe`, e.g. through the tunnel) or on the host (:class:`RemoteHttpProbe`, one
``python3`` call over SSH, so no tunnel is needed while the server starts).
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llama3_ops.errors import Llama3OpsError
from llama3_ops.remote.services import ServiceStatus
from llama3_ops.remote.transport import Remote


@dataclass(frozen=True)
class HttpResult:
    status: int  # -1: could not connect / timed out
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class Probe(Protocol):
    label: str

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> HttpResult: ...


def _http(
    url: str, method: str, body: dict[str, Any] | None, api_key: str | None, timeout: float
) -> HttpResult:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) URLs we build
    req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return HttpResult(resp.status, resp.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return HttpResult(exc.code, exc.read().decode(errors="replace"))
    except (OSError, ValueError) as exc:
        return HttpResult(-1, f"{type(exc).__name__}: {exc}")


class LocalHttpProbe:
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.label = self.base_url

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> HttpResult:
        return _http(self.base_url + path, method, body, self.api_key, timeout)


_REMOTE_PROBE = r"""
import json, sys, urllib.request, urllib.error
a = json.loads(sys.stdin.read())
req = urllib.request.Request(a["url"], data=None if a["body"] is None else json.dumps(a["body"]).encode(),
                             method=a["method"])
req.add_header("Content-Type", "application/json")
if a.get("key"):
    req.add_header("Authorization", "Bearer " + a["key"])
try:
    with urllib.request.urlopen(req, timeout=a["timeout"]) as r:
        out = (r.status, r.read().decode(errors="replace"))
except urllib.error.HTTPError as e:
    out = (e.code, e.read().decode(errors="replace"))
except Exception as e:
    out = (-1, type(e).__name__ + ": " + str(e))
sys.stdout.write(json.dumps(out))
"""


class RemoteHttpProbe:
    """HTTP from the host itself (``python3`` there; the API key travels on stdin, not argv)."""

    def __init__(
        self, remote: Remote, port: int, api_key: str | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.remote = remote
        self.base_url = f"http://{host}:{port}"
        self.api_key = api_key
        self.label = f"{remote.label}:{self.base_url}"

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> HttpResult:
        arg = json.dumps(
            {
                "url": self.base_url + path,
                "method": method,
                "body": body,
                "key": self.api_key,
                "timeout": timeout,
            }
        )
        res = self.remote.run(
            f"python3 -c {shlex.quote(_REMOTE_PROBE)}", timeout=timeout + 30, stdin=arg, check=False
        )
        if res.rc != 0:
            return HttpResult(-1, f"probe failed on host: {res.stderr.strip()[-500:]}")
        status, text = json.loads(res.stdout)
        return HttpResult(int(status), str(text))


class NotReadyError(Llama3OpsError, RuntimeError):
    def __init__(self, message: str, log_tail: list[str] | None = None) -> None:
        tail = "\n".join(f"    {line}" for line in (log_tail or []))
        super().__init__(message + (f"\n  last log lines:\n{tail}" if tail else ""))
        self.log_tail = log_tail or []


class ServiceDiedError(NotReadyError):
    pass


@dataclass
class Ready:
    seconds: float
    health_path: str
    model_id: str
    sample: str


def check_once(probe: Probe, timeout: float = 10.0) -> tuple[bool, str]:
    """One quick health probe (used after a tunnel reconnect): ``(ok, detail)``."""
    res = probe.request("GET", "/health", timeout=timeout)
    if res.status == 404:
        res = probe.request("GET", "/v1/models", timeout=timeout)
    return res.status == 200, f"HTTP {res.status}" if res.status != -1 else res.body


def _first_token(probe: Probe, model_id: str, deadline: float, interval: float, check_alive: Callable[[], None],
                 alive: Callable[[], ServiceStatus] | None) -> str:
    """POST a 1-token chat completion until it answers (502/503 and no answer: the engine still loads)."""
    while True:
        check_alive()
        remaining = max(5.0, deadline - time.monotonic())
        res = probe.request(
            "POST",
            "/v1/chat/completions",
            {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            timeout=min(remaining, 300.0),
        )
        if res.status == 200:
            try:
                return str(res.json()["choices"][0]["message"].get("content") or "")
            except (KeyError, IndexError, ValueError) as exc:
                raise NotReadyError(f"completion answered 200 but not OpenAI-shaped: {res.body[:300]}") from exc
        if time.monotonic() > deadline or res.status not in (-1, 502, 503):
            st = alive() if alive else None
            raise NotReadyError(
                f"1-token completion failed: HTTP {res.status}: {res.body[:300]}",
                st.log_tail if st else None,
            )
        time.sleep(interval)


def wait_ready(
    probe: Probe,
    *,
    timeout: float = 600.0,
    alive: Callable[[], ServiceStatus] | None = None,
    interval: float = 1.0,
    console: Console | None = None,
    model: str | None = None,
    completion: bool = True,
) -> Ready:
    """Block until the server is ready or raise :class:`NotReadyError` / :class:`ServiceDiedError`.

    ``alive`` (normally ``lambda: services.status(remote, name, 30)``) is polled each round; when the
    service is gone the error carries its last log lines.
    """
    console = console or Console(stderr=True)
    t0 = time.monotonic()
    deadline = t0 + timeout
    health_path = "/health"
    last = ""

    def check_alive() -> None:
        if alive is None:
            return
        st = alive()
        if not st.running:
            raise ServiceDiedError(
                f"service {st.name} died during start-up (exit status {st.exit_status or 'unknown'})",
                st.log_tail,
            )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"waiting for {probe.label}{health_path}", total=None)
        # 1. liveness endpoint
        while True:
            check_alive()
            res = probe.request("GET", health_path, timeout=5)
            if res.status == 404 and health_path == "/health":
                health_path = "/v1/models"
                progress.update(task, description=f"no /health; waiting for {probe.label}{health_path}")
                continue
            if res.status == 200:
                break
            last = f"HTTP {res.status}: {res.body[:200]}" if res.status != -1 else res.body[:200]
            if res.status in (401, 403):
                raise NotReadyError(f"{probe.label}{health_path} refused our API key: {last}")
            progress.update(task, description=f"waiting for {probe.label}{health_path} ({last[:60]})")
            if time.monotonic() > deadline:
                st = alive() if alive else None
                raise NotReadyError(
                    f"{probe.label} not healthy after {timeout:.0f}s (last: {last})",
                    st.log_tail if st else None,
                )
            time.sleep(interval)
        # 2. model list
        progress.update(task, description="listing models")
        res = probe.request("GET", "/v1/models", timeout=30)
        if res.status != 200:
            raise NotReadyError(f"GET /v1/models -> HTTP {res.status}: {res.body[:300]}")
        models = [m.get("id", "") for m in res.json().get("data", [])]
        if not models:
            raise NotReadyError("GET /v1/models returned no models")
        model_id = model or models[0]
        sample = ""
        # 3. one real token
        if completion:
            progress.update(task, description=f"1-token completion on {model_id}")
            sample = _first_token(probe, model_id, deadline, interval, check_alive, alive)
    return Ready(time.monotonic() - t0, health_path, model_id, sample)
