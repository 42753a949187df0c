"""Interactive streamed chat with the course model through the tunnel (OpenAI chat API, SSE).

Replaces ``lmdeploy serve api_client`` (gone since lmdeploy 0.10). Standard library HTTP only, so it
works with any OpenAI-compatible server (lmdeploy api_server, ``transformers serve``). The stream is
parsed by the web demo's own parser (``webapp/llama3_chat.py``, which is uploaded to the host with the apps).
Commands: ``/exit`` (or Ctrl-D), ``/clear`` (forget the history), ``/system TEXT``.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.text import Text

from llama3_ops.errors import Llama3OpsError
from llama3_ops.stages.webapp.llama3_chat import StreamError, sse_content

Message = dict[str, str]


class ChatError(Llama3OpsError):
    """The server cannot be reached, refused the request, or failed mid-answer."""


def _request(
    base_url: str, path: str, body: dict[str, Any] | None, api_key: str | None
) -> urllib.request.Request:
    req = urllib.request.Request(  # noqa: S310 - URL built from our own base_url
        base_url.rstrip("/") + path,
        data=json.dumps(body).encode() if body is not None else None,
        method="POST" if body is not None else "GET",
    )
    req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    return req


def _open(req: urllib.request.Request, timeout: float) -> Any:
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        raise ChatError(
            f"HTTP {exc.code} from {req.full_url}: {exc.read().decode(errors='replace')[:500]}"
        ) from exc
    except OSError as exc:
        raise ChatError(f"cannot reach {req.full_url}: {exc} (is the tunnel up? `fab client`)") from exc


def list_models(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> list[str]:
    with _open(_request(base_url, "/v1/models", None, api_key), timeout) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


def complete(
    base_url: str,
    messages: list[Message],
    model: str,
    *,
    api_key: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    timeout: float = 300.0,
) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    with _open(_request(base_url, "/v1/chat/completions", body, api_key), timeout) as resp:
        return str(json.loads(resp.read())["choices"][0]["message"].get("content") or "")


def stream_chat(
    base_url: str,
    messages: list[Message],
    model: str,
    *,
    api_key: str | None = None,
    max_tokens: int = 512,
    temperature: float = 0.7,
    timeout: float = 300.0,
) -> Iterator[str]:
    """Yield content deltas of a streamed chat completion (``data: {...}`` lines up to ``[DONE]``)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    with _open(_request(base_url, "/v1/chat/completions", body, api_key), timeout) as resp:
        try:
            yield from sse_content(resp)
        except StreamError as exc:
            raise ChatError(f"server error mid-stream: {exc.detail}") from exc


@dataclass
class ChatSession:
    base_url: str
    model: str
    api_key: str | None = None
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    history: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text``; history is updated once the answer is complete."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            for piece in stream_chat(
                self.base_url,
                self.messages(),
                self.model,
                api_key=self.api_key,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
            ):
                parts.append(piece)
                yield piece
        except BaseException:
            self.history.pop()  # a failed turn is not remembered
            raise
        self.history.append({"role": "assistant", "content": "".join(parts)})

    def clear(self) -> None:
        self.history.clear()


def repl(
    base_url: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    system: str | None = None,
    max_tokens: int = 512,
    console: Console | None = None,
) -> int:
    """The interactive loop behind ``fab client``. Returns the process exit code."""
    con = console or Console()
    try:
        model = model or list_models(base_url, api_key)[0]
    except ChatError as exc:
        con.print(Text(str(exc), style="red"))
        return 1
    except IndexError:
        con.print(Text(f"the server at {base_url} lists no models (GET /v1/models)", style="red"))
        return 1
    session = ChatSession(base_url, model, api_key, system, max_tokens)
    con.print(Text.assemble((f"chat with {model}", "bold"), f" at {base_url}  (/exit, /clear, /system TEXT)"))
    while True:
        try:
            text = con.input("[bold cyan]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            con.print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            session.clear()
            con.print("[dim]history cleared[/]")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system") :].strip() or None
            session.clear()
            con.print("[dim]system prompt set, history cleared[/]")
            continue
        con.print("[bold green]llama3> [/]", end="")
        try:
            for piece in session.ask(text):
                con.out(piece, end="", highlight=False)
                sys.stdout.flush()
            con.print()
        except KeyboardInterrupt:
            con.print("\n[dim](interrupted)[/]")
        except ChatError as exc:
            con.print()
            con.print(Text(str(exc), style="red"))
