"""Draw the images of fab llava-finetune's data set (runs on the host, in the llama3 env: Pillow).

Usage: ``python llava_images.py FOLDER < specs.json`` where specs.json is a list of
``{"file": "images/x.png", "shape": "circle|square|triangle", "colour": [r, g, b],
"background": [r, g, b], "size": N}``. Prints one JSON line: ``{"written": [...], "kept": [...]}``
(an image already there with the same content is kept).
"""

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def draw(spec: dict[str, Any]) -> bytes:
    n = int(spec["size"])
    img = Image.new("RGB", (n, n), tuple(spec["background"]))
    d = ImageDraw.Draw(img)
    m = n // 6
    colour = tuple(spec["colour"])
    if spec["shape"] == "circle":
        d.ellipse([m, m, n - m, n - m], fill=colour)
    elif spec["shape"] == "square":
        d.rectangle([m, m, n - m, n - m], fill=colour)
    elif spec["shape"] == "triangle":
        d.polygon([(n // 2, m), (n - m, n - m), (m, n - m)], fill=colour)
    else:
        raise SystemExit(f"unknown shape {spec['shape']!r}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    folder = Path(sys.argv[1])
    written, kept = [], []
    for spec in json.load(sys.stdin):
        data = draw(spec)
        path = folder / spec["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
            kept.append(spec["file"])
            continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        written.append(spec["file"])
    print(json.dumps({"written": written, "kept": kept}))


if __name__ == "__main__":
    main()
