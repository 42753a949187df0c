#!/usr/bin/env python3
"""Verify (and copy) a Hugging Face model directory on a course host. Standard library only.

  verify --dir D [--lfs] [--manifest JSON] [--remove-bad] [--stamp FILE --fingerprint FP]
  copy   --src S --dir D

``verify`` checks that config and tokenizer files exist, that every shard named by the
safetensors (or .bin) index exists with the size its own header implies, and, unless
``--no-sha``, that each file's sha256 equals its git-lfs OID (``--lfs``) or the manifest entry.
Only when everything passes does it write the stamp (atomically). It prints one JSON object.
With ``--remove-bad`` it deletes files that failed (and their cached LFS objects) so that the
next fetch downloads them again: never use it on a directory the bundle does not own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",))
REQUIRED = ("config.json", "tokenizer_config.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: str, label: str) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    done, last = 0, time.monotonic()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(8 << 20)
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
            if time.monotonic() - last > 5:
                log(f"sha256 {label}: {done * 100 // max(size, 1)}%")
                last = time.monotonic()
    return h.hexdigest()


def safetensors_expected_size(path: str) -> int | None:
    """Size a complete .safetensors file must have, read from its own header."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end


def lfs_oids(repo: str) -> dict[str, str]:
    out = subprocess.run(["git", "-C", repo, "lfs", "ls-files", "-l"], capture_output=True, text=True, check=True)
    oids = {}
    for line in out.stdout.splitlines():
        # "<oid> <*|-> <path>"
        parts = line.split(" ", 2)
        if len(parts) == 3:
            oids[parts[2]] = parts[0]
    return oids


def weight_files(d: str, problems: dict[str, list[str]]) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(d, index)
        if os.path.exists(p):
            try:
                with open(p) as fh:
                    return sorted(set(json.load(fh)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                problems["bad_index"].append(f"{index}: {exc}")
                return []
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(d, single)):
            return [single]
    problems["missing"].append("model.safetensors.index.json (or model.safetensors)")
    return []


def verify(args: argparse.Namespace) -> int:
    problems: dict[str, list[str]] = {"missing": [], "size_mismatch": [], "sha_mismatch": [],
                                      "not_downloaded": [], "bad_index": [], "unreadable": []}
    try:
        return _verify(args, problems)
    except PermissionError as exc:
        problems["unreadable"].append(f"{exc.filename}: permission denied for this user")
        return report(args, problems, [], 0)


def _verify(args: argparse.Namespace, problems: dict[str, list[str]]) -> int:
    d = args.dir
    if not os.path.isdir(d):
        problems["missing"].append(d)
        return report(args, problems, [], 0)
    for f in REQUIRED:
        if not os.path.isfile(os.path.join(d, f)):
            problems["missing"].append(f)
    if not any(all(os.path.isfile(os.path.join(d, f)) for f in fs) for fs in TOKENIZER_SETS):
        problems["missing"].append("tokenizer.json or tokenizer.model")
    shards = weight_files(d, problems)
    total = 0
    for s in shards:
        p = os.path.join(d, s)
        if not os.path.isfile(p):
            problems["missing"].append(s)
            continue
        with open(p, "rb") as fh:
            if fh.read(len(LFS_POINTER)) == LFS_POINTER:
                problems["not_downloaded"].append(s)
                continue
        size = os.path.getsize(p)
        total += size
        if s.endswith(".safetensors"):
            want = safetensors_expected_size(p)
            if want != size:
                problems["size_mismatch"].append(f"{s}: {size} bytes, header implies {want}")
    expected: dict[str, str] = {}
    if args.lfs:
        expected.update(lfs_oids(d))
    if args.manifest:
        expected.update(json.loads(args.manifest))
    bad = {x.split(":")[0] for x in problems["size_mismatch"]} | set(problems["not_downloaded"])
    if not args.no_sha:
        todo = [f for f in sorted(expected) if f not in bad and os.path.isfile(os.path.join(d, f))]
        for i, f in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] sha256 {f}")
            got = sha256_file(os.path.join(d, f), f)
            if got != expected[f]:
                problems["sha_mismatch"].append(f"{f}: sha256 {got}, expected {expected[f]}")
        for f in sorted(expected):
            if not os.path.exists(os.path.join(d, f)) and f not in problems["missing"]:
                problems["missing"].append(f)
    return report(args, problems, shards, total)


def report(args: argparse.Namespace, problems: dict[str, list[str]], shards: list[str], total: int) -> int:
    ok = not any(problems.values())
    removed: list[str] = []
    if ok and args.stamp:
        stamp = {"fingerprint": args.fingerprint, "dir": os.path.realpath(args.dir), "shards": shards,
                 "bytes": total, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "sha256_checked": not args.no_sha}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.stamp)), prefix=".stamp.")
        with os.fdopen(fd, "w") as fh:
            json.dump(stamp, fh, indent=2)
        os.replace(tmp, args.stamp)
    elif not ok and args.remove_bad:
        oids = lfs_oids(args.dir) if args.lfs else {}
        for entry in problems["size_mismatch"] + problems["sha_mismatch"]:
            name = entry.split(":")[0]
            path = os.path.join(args.dir, name)
            if os.path.isfile(path):
                os.unlink(path)
                removed.append(name)
            oid = oids.get(name)
            if oid:  # the cached object is as bad as the checkout made from it
                obj = os.path.join(args.dir, ".git", "lfs", "objects", oid[:2], oid[2:4], oid)
                if os.path.isfile(obj):
                    os.unlink(obj)
    print(json.dumps({"ok": ok, "problems": problems, "removed": removed, "shards": len(shards), "bytes": total}))
    return 0 if ok else 1


def copy(args: argparse.Namespace) -> int:
    """Copy SRC to DIR, resuming: files already there with the same size are kept."""
    src, dst = os.path.realpath(args.src), args.dir
    if not os.path.isdir(src):
        print(json.dumps({"ok": False, "error": f"source {src} is not a directory"}))
        return 1
    copied = []
    for root, _dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        if rel.split(os.sep)[0] == ".git":
            continue
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            s, t = os.path.join(root, f), os.path.normpath(os.path.join(dst, rel, f))
            if os.path.isfile(t) and os.path.getsize(t) == os.path.getsize(s):
                continue
            log(f"copy {os.path.relpath(s, src)}")
            tmp = t + ".partial"
            shutil.copyfile(s, tmp)
            os.replace(tmp, t)
            copied.append(os.path.relpath(t, dst))
    print(json.dumps({"ok": True, "copied": copied, "changed": bool(copied)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--dir", required=True)
    v.add_argument("--lfs", action="store_true")
    v.add_argument("--manifest", default="")
    v.add_argument("--no-sha", action="store_true")
    v.add_argument("--remove-bad", action="store_true")
    v.add_argument("--stamp", default="")
    v.add_argument("--fingerprint", default="")
    c = sub.add_parser("copy")
    c.add_argument("--src", required=True)
    c.add_argument("--dir", required=True)
    args = ap.parse_args()
    return verify(args) if args.cmd == "verify" else copy(args)


if __name__ == "__main__":
    sys.exit(main())
