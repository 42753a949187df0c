#!/usr/bin/env python3
"""Verify (and copy) a Hugging Face model directory on a course host. Standard library only.

  verify --dir D [--lfs [--rev REV]] [--manifest JSON] [--remove-bad] [--stamp FILE --fingerprint FP]
  copy   --src S --dir D

``verify`` checks that config and tokenizer files exist, that every shard named by the
safetensors (or .bin) index exists with the size its own header implies, and, unless
``--no-sha``, that each file's sha256 equals the manifest entry or, with ``--lfs``, the OID in
the LFS pointer committed at ``REV`` (``git cat-file`` of the commit's blobs: never the working
tree, the index or the local LFS cache, which a damaged file rewrites). With ``--lfs`` it also
checks every file's size against its pointer, the other committed files against their blobs, and
each cached LFS object (``.git/lfs/objects``) against its OID; a cached object that is a hard link
(git-lfs links objects from a ``file://`` remote on the same filesystem) is first replaced by a
private copy, so nothing done to this clone ever writes through into the origin.
Only when everything passes does it write the stamp (atomically); on a failure it removes the
stamp. It prints one JSON object. With ``--remove-bad`` it deletes files that failed (shards and
cached objects) so that the next fetch downloads them again: never use it on a directory the
bundle does not own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

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
    return int(8 + n + end)


class Pointer(NamedTuple):
    oid: str
    size: int


def git_blob_sha1(path: str) -> str:
    """The git blob id a file would have (``git hash-object``, without filters)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_pointer(data: bytes) -> Pointer | None:
    if not data.startswith(LFS_POINTER):
        return None
    fields = dict(line.split(" ", 1) for line in data.decode("ascii", "replace").splitlines() if " " in line)
    oid, size = fields.get("oid", ""), fields.get("size", "")
    if not oid.startswith("sha256:") or not size.isdigit():
        return None
    return Pointer(oid.removeprefix("sha256:"), int(size))


def committed(repo: str, rev: str) -> tuple[str, dict[str, Pointer], dict[str, str]]:
    """The commit ``rev`` names, its LFS pointers and its other blobs, read from git's object store.

    These are what the repository committed: a file damaged on disk, re-added to the index by
    git's clean filter (``git status`` does it) or cached under .git/lfs, cannot change them.
    """
    def git(*argv: str, stdin: bytes | None = None) -> bytes:
        return subprocess.run(["git", "-C", repo, *argv], input=stdin, capture_output=True, check=True).stdout

    commit = git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}").decode().strip()
    blobs: dict[str, tuple[str, int]] = {}
    for entry in git("ls-tree", "-r", "-z", "--long", "--full-tree", commit).split(b"\0"):
        if not entry:
            continue
        meta, path = entry.split(b"\t", 1)
        mode, kind, blob_id, blob_size = meta.split()
        if kind == b"blob" and mode in (b"100644", b"100755"):
            blobs[path.decode()] = (blob_id.decode(), int(blob_size))
    small = [p for p, (_oid, size) in blobs.items() if size < 1024]  # a pointer is ~130 bytes
    pointers: dict[str, Pointer] = {}
    if small:
        out = git("cat-file", "--batch", stdin=b"".join(f"{blobs[p][0]}\n".encode() for p in small))
        pos = 0
        for p in small:
            header_end = out.index(b"\n", pos)
            length = int(out[pos:header_end].split()[2])
            pointer = parse_pointer(out[header_end + 1:header_end + 1 + length])
            pos = header_end + 1 + length + 1
            if pointer:
                pointers[p] = pointer
    others = {p: oid for p, (oid, _size) in blobs.items() if p not in pointers}
    return commit, pointers, others


def lfs_object_path(repo: str, oid: str) -> str:
    return os.path.join(repo, ".git", "lfs", "objects", oid[:2], oid[2:4], oid)


def unshare_and_hash(path: str, label: str) -> str:
    """sha256 of ``path``; a file with other hard links is first replaced by a private copy."""
    if os.stat(path).st_nlink == 1:
        return sha256_file(path, label)
    log(f"{label}: hard-linked (to the origin's object?): making a private copy")
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".unshare.")
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            for chunk in iter(lambda: src.read(8 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return h.hexdigest()


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


PROBLEM_KINDS = ("missing", "size_mismatch", "sha_mismatch", "lfs_object_mismatch", "not_downloaded",
                 "bad_index", "bad_repo", "unreadable")


def verify(args: argparse.Namespace) -> int:
    problems: dict[str, list[str]] = {k: [] for k in PROBLEM_KINDS}
    bad: set[str] = set()
    try:
        return _verify(args, problems, bad)
    except PermissionError as exc:
        problems["unreadable"].append(f"{exc.filename}: permission denied for this user")
        return report(args, problems, bad, [], 0, "")


def is_pointer(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(LFS_POINTER)) == LFS_POINTER


def _verify(args: argparse.Namespace, problems: dict[str, list[str]], bad: set[str]) -> int:
    """Fill ``problems`` (what is wrong, naming each file) and ``bad`` (files to remove)."""
    d = args.dir
    if not os.path.isdir(d):
        problems["missing"].append(d)
        return report(args, problems, bad, [], 0, "")
    for f in REQUIRED:
        if not os.path.isfile(os.path.join(d, f)):
            problems["missing"].append(f)
    if not any(all(os.path.isfile(os.path.join(d, f)) for f in fs) for fs in TOKENIZER_SETS):
        problems["missing"].append("tokenizer.json or tokenizer.model")
    commit, pointers, others = "", dict[str, Pointer](), dict[str, str]()
    if args.lfs:
        try:
            commit, pointers, others = committed(d, args.rev)
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            detail = err.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
            problems["bad_repo"].append(f"{d}: cannot read the committed files of {args.rev}: {detail[0]}")
            return report(args, problems, bad, [], 0, "")
    shards = weight_files(d, problems)
    total = 0
    for s in shards:
        p = os.path.join(d, s)
        if not os.path.isfile(p):
            problems["missing"].append(s)
            continue
        if is_pointer(p):
            problems["not_downloaded"].append(s)
            continue
        size = os.path.getsize(p)
        total += size
        if s.endswith(".safetensors"):
            want = safetensors_expected_size(p)
            if want != size:
                problems["size_mismatch"].append(f"{s}: {size} bytes, header implies {want}")
                bad.add(s)
    for f, ptr in sorted(pointers.items()):
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            if f not in problems["missing"]:
                problems["missing"].append(f)
        elif is_pointer(p):
            if f not in problems["not_downloaded"]:
                problems["not_downloaded"].append(f)
        elif os.path.getsize(p) != ptr.size and f not in bad:
            problems["size_mismatch"].append(f"{f}: {os.path.getsize(p)} bytes, committed pointer says {ptr.size}")
            bad.add(f)
    for f, blob in sorted(others.items()):
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            if f not in problems["missing"]:
                problems["missing"].append(f)
        elif git_blob_sha1(p) != blob:
            problems["sha_mismatch"].append(f"{f}: differs from the file committed at {commit[:12]}")
            bad.add(f)
    expected = {f: ptr.oid for f, ptr in pointers.items()}
    if args.manifest:
        expected.update(json.loads(args.manifest))
    unfetched = set(problems["not_downloaded"]) | set(problems["missing"])
    got: dict[str, str] = {}
    if not args.no_sha:
        todo = [f for f in sorted(expected) if f not in bad | unfetched and os.path.isfile(os.path.join(d, f))]
        for i, f in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] sha256 {f}")
            got[f] = sha256_file(os.path.join(d, f), f)
            if got[f] != expected[f]:
                problems["sha_mismatch"].append(f"{f}: sha256 {got[f]}, expected {expected[f]}")
                bad.add(f)
        for f in sorted(expected):
            if not os.path.exists(os.path.join(d, f)) and f not in problems["missing"]:
                problems["missing"].append(f)
    check_lfs_cache(d, pointers, got, args.no_sha, problems, bad)
    return report(args, problems, bad, shards, total, commit)


def check_lfs_cache(d: str, pointers: dict[str, Pointer], got: dict[str, str], no_sha: bool,
                    problems: dict[str, list[str]], bad: set[str]) -> None:
    """Check each cached LFS object against its OID (after unsharing hard-linked ones)."""
    oids = {ptr.oid for ptr in pointers.values()}
    for f, ptr in sorted(pointers.items()):
        obj = lfs_object_path(d, ptr.oid)
        rel = os.path.relpath(obj, d)
        if not os.path.isfile(obj):
            continue
        size = os.path.getsize(obj)
        if size != ptr.size:
            problems["lfs_object_mismatch"].append(f"{f}: cached LFS object {rel} has {size} bytes, "
                                                   f"its pointer says {ptr.size}")
            bad.add(rel)
            continue
        digest = unshare_and_hash(obj, f"cached {f}")
        if not no_sha and digest != ptr.oid:
            problems["lfs_object_mismatch"].append(f"{f}: cached LFS object {rel} has sha256 {digest}, not its OID")
            bad.add(rel)
    for f, digest in got.items():
        # git's clean filter stores a damaged file as an object of its own (``git status`` does
        # it): that copy is garbage as large as the shard.
        stray = lfs_object_path(d, digest)
        if f in pointers and digest != pointers[f].oid and digest not in oids and os.path.isfile(stray):
            bad.add(os.path.relpath(stray, d))


def report(args: argparse.Namespace, problems: dict[str, list[str]], bad: set[str], shards: list[str],
           total: int, commit: str) -> int:
    ok = not any(problems.values())
    removed: list[str] = []
    if ok and args.stamp:
        stamp = {"fingerprint": args.fingerprint, "dir": os.path.realpath(args.dir), "shards": shards,
                 "bytes": total, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "sha256_checked": not args.no_sha}
        if commit:
            stamp["revision"] = commit
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.stamp)), prefix=".stamp.")
        with os.fdopen(fd, "w") as fh:
            json.dump(stamp, fh, indent=2)
        os.replace(tmp, args.stamp)
    elif not ok and args.stamp and os.path.lexists(args.stamp):
        os.unlink(args.stamp)  # a re-verification that fails: the model is no longer complete
    if not ok and args.remove_bad:
        for rel in sorted(bad):
            path = os.path.join(args.dir, rel)
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)  # unlink, never truncate: a hard link elsewhere stays intact
                removed.append(rel)
    print(json.dumps({"ok": ok, "problems": problems, "removed": removed, "shards": len(shards), "bytes": total,
                      "revision": commit}))
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
    v.add_argument("--rev", default="HEAD", help="with --lfs: the revision whose committed pointers are expected")
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
