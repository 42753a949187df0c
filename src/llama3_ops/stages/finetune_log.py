"""Reading an XTuner (mmengine) training run: progress lines, evaluation answers, checkpoints.

mmengine's LoggerHook (``log_metric_by_epoch=False``) writes one line per ``interval`` iterations::

    11/25 14:47:21 - mmengine - INFO - Iter(train) [  20/1500]  lr: 2.0000e-04  eta: 0:40:12  time: 1.63 ... loss: 1.23

XTuner's EvaluateChatHook logs ``before_train`` / ``after_train_iter`` / ``after_train in
EvaluateChatHook.`` and then ``Sample output:`` followed by the prompt and the generated text on the
next lines. The CheckpointHook writes ``iter_<N>.pth`` (a file, or a directory under DeepSpeed) into
the work dir and the path of the newest one into ``last_checkpoint``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_ITER_RE = re.compile(r"Iter\(train\)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
_ETA_RE = re.compile(r"\beta:\s*(.+?)\s+(?:time|data_time|loss|grad_norm):")
_LOSS_RE = re.compile(r"\bloss:\s*([-+0-9.eE]+|nan|inf)")
_LR_RE = re.compile(r"\blr:\s*([-+0-9.eE]+)")
_LOG_LINE_RE = re.compile(r"^\d{2}/\d{2} \d{2}:\d{2}:\d{2} - \S+ - [A-Z]+ - ")
_CKPT_RE = re.compile(r"^iter_(\d+)\.pth$")
_HOOK_RE = re.compile(r"(before_train|after_train_iter|after_train) in EvaluateChatHook\.")
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>"
SPECIAL_TOKEN_RE = re.compile(r"<\|(?:eot_id|end_of_text|begin_of_text)\|>")


@dataclass(frozen=True)
class IterProgress:
    """One ``Iter(train) [i/N]`` line."""

    iteration: int
    total: int
    eta: str | None
    loss: float | None
    lr: float | None


def parse_iter_line(line: str) -> IterProgress | None:
    m = _ITER_RE.search(line)
    if not m:
        return None
    eta = _ETA_RE.search(line)
    loss = _LOSS_RE.search(line)
    lr = _LR_RE.search(line)
    return IterProgress(
        iteration=int(m.group(1)),
        total=int(m.group(2)),
        eta=eta.group(1).strip() if eta else None,
        loss=float(loss.group(1)) if loss else None,
        lr=float(lr.group(1)) if lr else None,
    )


def last_progress(lines: Iterable[str]) -> IterProgress | None:
    last = None
    for line in lines:
        p = parse_iter_line(line)
        if p is not None:
            last = p
    return last


@dataclass(frozen=True)
class EvalSample:
    """One answer XTuner's EvaluateChatHook logged."""

    phase: str  # before_train, after_train_iter, after_train
    text: str  # the logged sample: prompt + generation, special tokens included

    @property
    def answer(self) -> str:
        """The generated assistant turn only, without special tokens."""
        text = self.text
        if ASSISTANT_HEADER in text:
            text = text.rsplit(ASSISTANT_HEADER, 1)[1]
        return SPECIAL_TOKEN_RE.sub("", text).strip()


def eval_samples(lines: Sequence[str]) -> list[EvalSample]:
    """Every ``Sample output:`` block, tagged with the hook phase that logged it."""
    out: list[EvalSample] = []
    phase = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        hook = _HOOK_RE.search(line)
        if hook:
            phase = hook.group(1)
        if _LOG_LINE_RE.match(line) and line.rstrip().endswith("Sample output:"):
            body: list[str] = []
            i += 1
            while i < len(lines) and not _LOG_LINE_RE.match(lines[i]) and not lines[i].startswith("=== llama3-ops"):
                body.append(lines[i])
                i += 1
            out.append(EvalSample(phase, "\n".join(body).strip("\n")))
            continue
        i += 1
    return out


def final_answer(lines: Sequence[str]) -> EvalSample | None:
    """The answer logged after training (``after_train``), else the last one logged."""
    samples = eval_samples(lines)
    after = [s for s in samples if s.phase == "after_train"]
    if after:
        return after[-1]
    return samples[-1] if samples else None


def checkpoint_iteration(name: str) -> int | None:
    """``iter_500.pth`` -> 500; anything else -> None."""
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


def latest_checkpoint(names: Iterable[str]) -> str | None:
    """The ``iter_<N>.pth`` with the highest N among ``names`` (file names in the work dir)."""
    best: tuple[int, str] | None = None
    for name in names:
        n = checkpoint_iteration(name)
        if n is not None and (best is None or n > best[0]):
            best = (n, name)
    return best[1] if best else None
