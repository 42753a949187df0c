"""Llama 3 chat backends for the course's Streamlit apps (the web demo and the agent demo).

Runs on the course host, where llama3_ops is not installed: standard library, transformers and
torch only. Two backends with one interface (``stream(messages, settings)`` yields text pieces):

* :class:`LocalBackend`: the model loaded in this process with transformers' public API
  (``AutoModelForCausalLM.generate`` + ``TextIteratorStreamer`` in a thread);
* :class:`ApiBackend`: the OpenAI-compatible server ``fab serve`` runs (lmdeploy api_server or
  ``transformers serve``), streamed over SSE with urllib.

Both build the prompt with the tokenizer's own chat template (``apply_chat_template``): the Llama 3
template for the course model. "Max Length" is the course's setting: prompt plus answer, in tokens.

:func:`sse_content` reads an OpenAI chat completion stream; ``fab client``
(:mod:`llama3_ops.stages.client`) imports it from here, so the laptop and the host parse streams alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Message = dict[str, str]
EOT_TOKEN = "<|eot_id|>"  # noqa: S105 - the end of a Llama 3 Instruct turn, not a secret


class BackendError(RuntimeError):
    """A failure the app shows as one clear message (missing model, server down, prompt too long)."""


class StreamError(RuntimeError):
    """The server reported an error in the middle of a stream (an ``{"error": ...}`` chunk)."""

    def __init__(self, detail: object) -> None:
        super().__init__(str(detail))
        self.detail = detail


def sse_content(lines: Iterable[bytes]) -> Iterator[str]:
    """The content deltas of a streamed OpenAI chat completion: its ``data: {...}`` lines up to
    ``data: [DONE]`` (or the end of the stream; ``transformers serve`` sends no ``[DONE]``).

    Raises :class:`StreamError` for an error chunk.
    """
    for raw in lines:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise StreamError(chunk["error"])
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield str(piece)


@dataclass(frozen=True)
class GenerationSettings:
    max_length: int = 8192  # prompt + answer tokens
    top_p: float = 0.8
    temperature: float = 0.7
    max_new_tokens: int | None = None  # also cap the answer alone (the agent's per-step budget)


def check_model_dir(path: str) -> Path:
    """The model directory, or :class:`BackendError` naming what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BackendError(f"model directory {p} does not exist")
    if not (p / "config.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise BackendError(f"{p} has no config.json or tokenizer_config.json: not a Hugging Face model directory")
    return p


def load_tokenizer(path: str) -> Any:
    """The model's tokenizer; it must carry a chat template (Llama 3 Instruct models do)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(check_model_dir(path)))
    if not getattr(tok, "chat_template", None):
        raise BackendError(f"the tokenizer in {path} has no chat_template (tokenizer_config.json)")
    return tok


def build_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The exact prompt text: the tokenizer's chat template with the assistant header appended."""
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))


def count_tokens(tokenizer: Any, prompt: str) -> int:
    # The template already starts with <|begin_of_text|>: add no second BOS.
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def new_token_budget(prompt_tokens: int, settings: GenerationSettings) -> int:
    budget = settings.max_length - prompt_tokens
    if budget <= 0:
        raise BackendError(
            f"the conversation is already {prompt_tokens} tokens, at or over Max Length "
            f"({settings.max_length}): raise Max Length or clear the chat history"
        )
    return min(budget, settings.max_new_tokens) if settings.max_new_tokens else budget


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class Backend(Protocol):
    label: str
    tokenizer: Any

    def stream(
        self, messages: Sequence[Message], settings: GenerationSettings, stop: Sequence[str] = ()
    ) -> Iterator[str]: ...


def stop_on_text(tokenizer: Any, prompt_len: int, stop: Sequence[str], window: int = 32) -> Any:
    """A public ``StoppingCriteria`` that ends generation once the answer contains a stop string.

    (``generate(stop_strings=...)`` needs transformers 4.42+; the course's env has 4.40.)
    """
    import torch
    from transformers import StoppingCriteria

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tail = input_ids[0, max(prompt_len, input_ids.shape[1] - window):]
            text = tokenizer.decode(tail, skip_special_tokens=True)
            done = any(s in text for s in stop)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StopOnText()


def complete(backend: Backend, messages: Sequence[Message], settings: GenerationSettings,
             stop: Sequence[str] = ()) -> str:
    """The whole answer, cut before the first stop string (OpenAI servers drop it, generate keeps it)."""
    text = "".join(backend.stream(messages, settings, stop))
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


class LocalBackend:
    """The model in this process: public ``generate`` with a ``TextIteratorStreamer`` in a thread."""

    def __init__(self, model_path: str, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.tokenizer = load_tokenizer(model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 as the checkpoint is stored on GPU; float32 on CPU (bf16 matmuls are slow there).
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(str(check_model_dir(model_path)), **dtype_kwargs(dtype))
        self.model = model.to(self.device).eval()
        self.label = f"local model {model_path} ({self.device})"
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eot = self.tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
            ids.add(eot)  # Meta's first 8B-Instruct release listed only <|end_of_text|>
        self.eos_token_ids = sorted(ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

    def stream(
        self, messages: Sequence[Message], settings: GenerationSettings, stop: Sequence[str] = ()
    ) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        prompt = build_prompt(self.tokenizer, messages)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        n_prompt = int(inputs["input_ids"].shape[1])
        budget = new_token_budget(n_prompt, settings)
        # No clean-up of "tokenization spaces": it is meant for WordPiece and corrupts BPE text.
        streamer: Any = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
        kwargs: dict[str, Any] = {
            **inputs,
            "streamer": streamer,
            "max_length": n_prompt + budget,  # the course's Max Length: prompt + answer
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if settings.temperature > 0:
            kwargs.update(do_sample=True, top_p=settings.top_p, temperature=settings.temperature)
        else:
            kwargs.update(do_sample=False, top_p=None, temperature=None)
        if stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([stop_on_text(self.tokenizer, n_prompt, stop)])
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the reader below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="llama3-generate", daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:
            raise BackendError(f"generation failed: {type(failure[0]).__name__}: {failure[0]}") from failure[0]


class ApiBackend:
    """The server ``fab serve`` runs, through its OpenAI chat API (SSE streaming, stdlib HTTP).

    The tokenizer (the served model's directory on this host) renders the same chat template to
    count prompt tokens, so Max Length means what it means for the local backend.
    """

    def __init__(
        self,
        base_url: str,
        tokenizer_path: str,
        model_id: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.model_id = model_id or self._first_model()
        self.label = f"{self.model_id} at {self.base_url}"

    def _request(self, path: str, body: dict[str, Any] | None) -> urllib.request.Request:
        req = urllib.request.Request(  # noqa: S310 - the URL is our own setting
            self.base_url + path,
            data=json.dumps(body).encode() if body is not None else None,
            method="POST" if body is not None else "GET",
        )
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        return req

    def _open(self, req: urllib.request.Request, timeout: float) -> Any:
        try:
            return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise BackendError(f"the model server answered HTTP {exc.code} for {req.full_url}: {detail}") from exc
        except OSError as exc:
            raise BackendError(
                f"cannot reach the model server at {self.base_url} ({exc}): is `fab serve` running on this host?"
            ) from exc

    def _first_model(self) -> str:
        with self._open(self._request("/v1/models", None), 15) as resp:
            models = [m["id"] for m in json.loads(resp.read()).get("data", [])]
        if not models:
            raise BackendError(f"the model server at {self.base_url} lists no models")
        return str(models[0])

    def stream(
        self, messages: Sequence[Message], settings: GenerationSettings, stop: Sequence[str] = ()
    ) -> Iterator[str]:
        prompt = build_prompt(self.tokenizer, messages)
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": list(messages),
            "max_tokens": new_token_budget(count_tokens(self.tokenizer, prompt), settings),
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "stream": True,
        }
        if stop:
            body["stop"] = list(stop)
        with self._open(self._request("/v1/chat/completions", body), self.timeout) as resp:
            try:
                yield from sse_content(resp)
            except StreamError as exc:
                raise BackendError(f"the model server failed mid-answer: {exc.detail}") from exc


def make_backend(
    backend: str,
    model_path: str,
    *,
    api_url: str = "",
    api_model: str | None = None,
    api_key: str | None = None,
) -> Backend:
    if backend == "local":
        return LocalBackend(model_path)
    if backend == "api":
        if not api_url:
            raise BackendError("the api backend needs the model server's URL (--api-url)")
        return ApiBackend(api_url, model_path, api_model or None, api_key)
    raise BackendError(f"unknown backend {backend!r}: local or api")


# --------------------------------------------------------------------------- app settings


def script_argv(script: str) -> list[str]:
    """The app's own arguments: only when ``streamlit run SCRIPT -- ARGS`` started it (not AppTest)."""
    if sys.argv and Path(sys.argv[0]).resolve() == Path(script).resolve():
        return sys.argv[1:]
    return []


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    model: str
    api_url: str
    api_model: str


def add_backend_args(p: argparse.ArgumentParser, env_prefix: str, environ: dict[str, str] | None = None) -> None:
    """``--backend --model --api-url --api-model``; each defaults to ``{env_prefix}NAME`` in the environment."""
    environ = dict(os.environ) if environ is None else environ

    def env(name: str, default: str) -> str:
        return environ.get(env_prefix + name, default)

    p.add_argument("--backend", choices=["local", "api"], default=env("BACKEND", "local"))
    p.add_argument("--model", default=env("MODEL", "~/model/Meta-Llama-3-8B-Instruct"),
                   help="model directory (api backend: the served model's directory, for its tokenizer)")
    p.add_argument("--api-url", default=env("API_URL", "http://127.0.0.1:23333"))
    p.add_argument("--api-model", default=env("API_MODEL", ""), help="model id on the server (default: its first)")


def backend_choice(a: argparse.Namespace) -> BackendChoice:
    return BackendChoice(a.backend, str(Path(a.model).expanduser()), a.api_url, a.api_model)
