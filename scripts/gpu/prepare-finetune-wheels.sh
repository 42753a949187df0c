#!/usr/bin/env bash
# Wheels for the fine-tune stage on the lent GPU machine (the `device` tool), where only PyPI's
# files we carry are available (at most 64 MiB with the lmdeploy wheelhouse). The machine has
# Python 3.12, torch 2.11 (CUDA 13.0), torchvision 0.26, peft 0.21.0, accelerate 1.15, matplotlib,
# scipy, scikit-image, einops, sentencepiece, tiktoken, pandas, pyarrow, opencv-python-headless and
# transformers 5.17 (see results/h200/2026-12-01/pip-list.txt). XTuner 0.2.0 needs transformers
# 4.48 (which needs tokenizers 0.21 and huggingface_hub < 1.0), so those are carried and put in
# front of the machine's own on PYTHONPATH, in a separate target dir from lmdeploy's.
#
#   scripts/gpu/prepare-finetune-wheels.sh [DIR]      (default .whl-ft; gitignored)
#
# bitsandbytes 0.50.2 is 43 MB because it ships a library for every CUDA/ROCm/XPU version; the
# copy made here keeps only libbitsandbytes_cuda${BNB_CUDA:-130}.so and the CPU one (~4 MB),
# with RECORD rewritten to match.
set -euo pipefail
DIR=${1:-.whl-ft}
BNB_CUDA=${BNB_CUDA:-130}
mkdir -p "$DIR"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DIR" \
  xtuner==0.2.0 mmengine==0.10.6 transformers==4.48.0 tokenizers==0.21.4 huggingface_hub==0.36.2 \
  datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.6.0 loguru==0.7.3 openpyxl==3.1.5 \
  et_xmlfile==2.0.0 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 platformdirs==4.14.9
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" bitsandbytes==0.50.2
python3 - "$tmp"/bitsandbytes-*.whl "$DIR" "$BNB_CUDA" <<'PY'
import pathlib, re, sys, zipfile
src, out_dir, cuda = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
keep = {f"bitsandbytes/libbitsandbytes_cuda{cuda}.so", "bitsandbytes/libbitsandbytes_cpu.so"}
dst = out_dir / src.name
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    names = zin.namelist()
    if not keep <= set(names):
        sys.exit(f"{src.name} has no {sorted(keep - set(names))}")
    drop = {n for n in names if re.fullmatch(r"bitsandbytes/libbitsandbytes_.*\.so", n) and n not in keep}
    for info in zin.infolist():
        if info.filename in drop:
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] not in drop]
            data = ("\n".join(lines) + "\n").encode()
        zout.writestr(info, data)
print(f"{dst.name}: kept {sorted(keep)}, dropped {len(drop)} libraries, {dst.stat().st_size / 2**20:.1f} MiB")
PY
du -sh "$DIR"
