"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-3-shaped checkpoint (random weights, real tokenizer), built once per run."""
    from llama3_ops.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "Meta-Llama-3-8B-Instruct", "tiny")
