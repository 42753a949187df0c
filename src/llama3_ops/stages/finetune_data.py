"""The self-cognition dataset of the course's fine-tune stage (its ``tools/gdata.py``, parametrised).

The course writes the same conversation N times to ``data/personal_assistant.json``, in XTuner's
single-turn conversation format::

    [{"conversation": [{"system": "你是一个懂中文的小助手",
                        "input": "你是（请用中文回答）",
                        "output": "您好，我是SmartFlowAI，一个由 SmartFlowAI 打造的人工智能助手，"
                                  "请问有什么可以帮助您的吗？"}]},
     ...]

Here the assistant's name, the maker, the record count, the system prompt and the question are
parameters, and the count is exact (gdata.py writes n+1 records).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

COURSE_SYSTEM = "你是一个懂中文的小助手"
COURSE_QUESTION = "你是（请用中文回答）"
COURSE_ANSWER = "您好，我是{name}，一个由 {maker} 打造的人工智能助手，请问有什么可以帮助您的吗？"
MAX_COUNT = 1_000_000


@dataclass(frozen=True)
class SelfCognition:
    """Who the fine-tuned assistant says it is, and how many identical records teach it."""

    name: str = "SmartFlowAI"
    count: int = 2000
    system: str = COURSE_SYSTEM
    maker: str = "SmartFlowAI"
    question: str = COURSE_QUESTION

    def validate(self) -> None:
        if not self.name.strip():
            raise ValueError("the assistant's name must not be empty")
        if not self.maker.strip():
            raise ValueError("the maker's name must not be empty")
        if not self.question.strip():
            raise ValueError("the question must not be empty")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be between 1 and {MAX_COUNT}, got {self.count}")

    @property
    def answer(self) -> str:
        return COURSE_ANSWER.format(name=self.name.strip(), maker=self.maker.strip())

    def record(self) -> dict[str, Any]:
        return {"conversation": [{"system": self.system, "input": self.question, "output": self.answer}]}

    def records(self) -> list[dict[str, Any]]:
        self.validate()
        return [self.record() for _ in range(self.count)]

    def json_text(self) -> str:
        """The file's text, as gdata.py writes it (UTF-8, not ASCII-escaped, indent 4)."""
        return json.dumps(self.records(), ensure_ascii=False, indent=4) + "\n"
