"""Shared fixtures: tiny saved models of each architecture and a small generated text corpus.

Everything is built locally from configs (no download) and sized to keep the suite fast.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from rlhfkit.models.tiny import make_test_model

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHS = ("gpt2", "llama", "qwen2")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running `python -m rlhfkit.cli` on this checkout's code in a child process."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", **extra}


CLI = [sys.executable, "-m", "rlhfkit.cli"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(arch)`: the folder of a tiny untrained model + tokenizer (built once per session)."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_test_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Short documents from a tiny grammar: enough structure for a small LM to beat word counts."""
    rng = random.Random(seed)
    names = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn"]
    verbs = ["likes", "sees", "helps", "calls", "finds"]
    things = ["the red ball", "a small cat", "the old book", "a green tree", "the blue cup"]
    places = ["in the park", "at home", "by the river", "after school"]
    return [
        " ".join(
            f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} {rng.choice(places)}."
            for _ in range(rng.randint(2, 4))
        )
        for _ in range(n_docs)
    ]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """{"train": path, "valid": path}: text files with one document per paragraph."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents(300)
    paths = {"train": root / "train.txt", "valid": root / "valid.txt"}
    paths["train"].write_text("\n\n".join(docs[:270]) + "\n", encoding="utf-8")
    paths["valid"].write_text("\n\n".join(docs[270:]) + "\n", encoding="utf-8")
    return paths
