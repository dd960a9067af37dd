"""Plain helpers shared by test modules (fixtures live in conftest.py, which is not importable by
name: tests/ and tests/feedback/ each have one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHS = ("gpt2", "llama", "qwen2")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running `python -m rlhfkit.cli` on this checkout's code in a child process."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


CLI = [sys.executable, "-m", "rlhfkit.cli"]
