"""The image/conversation set of ``fab llava-finetune`` (stage 3), made on the host, offline.

The course over-fits LLaVA on a tiny set: six multi-turn conversations about one photo
(``unique_data.json`` of InternLM's tutorial, camp2), repeated 200 times by ``repeat.py -n 200``
into ``repeated_data.json`` (1,200 records: the course's ``iter_1200.pth``). That photo cannot be
downloaded here, so the bundle draws its own: six 336 x 336 PNGs of one coloured shape each
(``finetune_files/llava_images.py``, Pillow, on the host), with conversations in the same LLaVA
format and the same shape (the first human turn starts with ``<image>``)::

    {"id": "llama3-ops-0", "image": "images/red_circle.png",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe this image."},
                       {"from": "gpt", "value": "A red circle on a white background."}, ...]}

``--data FILE --image-folder DIR`` (paths on the host) use the user's own LLaVA-format set instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# (name, RGB) of the shapes' colours, and of the backgrounds
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# (shape, colour, background) of the six images
IMAGES: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "white"), ("square", "blue", "white"), ("triangle", "green", "white"),
    ("circle", "yellow", "black"), ("square", "red", "black"), ("triangle", "blue", "black"),
)
QUESTION = "Describe this image."  # the first turn of every record, and the final check's question
SIDES = {"circle": "no corners", "square": "four equal sides", "triangle": "three sides"}
COURSE_REPEAT = 200
MAX_REPEAT = 100_000


@dataclass(frozen=True)
class ShapeSet:
    """The drawn set: ``repeat`` copies of six records (the course's ``repeat.py -n 200``)."""

    repeat: int = COURSE_REPEAT
    size: int = 336  # pixels a side (CLIP ViT-L/14-336's input)

    def validate(self) -> None:
        if not 1 <= self.repeat <= MAX_REPEAT:
            raise ValueError(f"--repeat must be between 1 and {MAX_REPEAT}, got {self.repeat}")
        if not 14 <= self.size <= 2048:
            raise ValueError(f"image size must be between 14 and 2048 pixels, got {self.size}")

    def image_specs(self) -> list[dict[str, Any]]:
        """What the host-side drawer makes: one PNG per entry."""
        return [{"file": f"images/{colour}_{shape}_on_{bg}.png", "shape": shape, "colour": COLOURS[colour],
                 "background": BACKGROUNDS[bg], "size": self.size} for shape, colour, bg in IMAGES]

    def unique(self) -> list[dict[str, Any]]:
        """The six records (``unique_data.json``)."""
        out = []
        for i, ((shape, colour, bg), spec) in enumerate(zip(IMAGES, self.image_specs(), strict=True)):
            turns = [
                (f"<image>\n{QUESTION}", f"A {colour} {shape} on a {bg} background."),
                ("What shape is in the picture?", f"A {shape}: it has {SIDES[shape]}."),
                ("What colour is it?", f"It is {colour}, on {bg}."),
            ]
            out.append({"id": f"llama3-ops-{i}", "image": spec["file"], "conversations": [
                turn for human, gpt in turns for turn in ({"from": "human", "value": human},
                                                          {"from": "gpt", "value": gpt})]})
        return out

    def repeated_text(self) -> str:
        """``repeated_data.json`` as ``repeat.py`` writes it (UTF-8, not ASCII-escaped, indent 4)."""
        self.validate()
        return json.dumps(self.unique() * self.repeat, ensure_ascii=False, indent=4) + "\n"

    @property
    def records(self) -> int:
        return len(IMAGES) * self.repeat

    @property
    def check_image(self) -> str:
        """The image the final answer is asked about (the first one), relative to the data folder."""
        return str(self.image_specs()[0]["file"])
