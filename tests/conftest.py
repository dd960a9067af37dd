"""Shared fixtures: tiny saved models of each architecture and a small generated text corpus.

Everything is built locally from configs (no download) and sized to keep the suite fast.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from testutil import make_test_model


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: one intra-op thread per test worker. The suite runs as 2 xdist workers on 2
    cores; two threads each would wait on each other and run many times slower."""
    torch.set_num_threads(1)


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
