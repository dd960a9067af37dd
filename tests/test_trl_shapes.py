"""Every TRL dataset type (https://huggingface.co/docs/trl/dataset_formats), standard and
conversational, from JSONL and from a `datasets` folder (a DatasetDict, splits named `path:split`),
loads into the stage that uses it and trains one step; one extra column rides along and is ignored.
The shapes' contents (which part becomes the prompt) are checked in test_formats.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from transformers import AutoTokenizer

from rlhfkit.config import load_config
from rlhfkit.stages import ppo, rm, sft
from testutil import CHAT_TEMPLATE, make_test_model

TOPICS = ["tea", "rain", "maps", "bees", "jazz", "salt"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def record(shape: str, conversational: bool, q: str, good: str, bad: str) -> dict[str, Any]:
    """One record of a TRL shape about question `q` (for unpaired preference: the desirable one)."""
    p, g, b = (user(q), assistant(good), assistant(bad)) if conversational else (q, good, bad)
    if shape == "language modeling":
        return {"text": f"{q} {good}"}
    if shape == "language modeling (conversational)":
        return {"messages": p + g}
    if shape == "prompt-completion":
        return {"prompt": p, "completion": g}
    if shape == "prompt-only":
        return {"prompt": p}
    if shape == "preference (explicit prompt)":
        return {"prompt": p, "chosen": g, "rejected": b}
    if shape == "preference (implicit prompt)" and conversational:
        return {"chosen": p + g, "rejected": p + b}
    if shape == "preference (implicit prompt)":  # the HH-RLHF layout
        return {"chosen": f"User: {q}\nAssistant: {good}", "rejected": f"User: {q}\nAssistant: {bad}"}
    return {"prompt": p, "completion": g, "label": True}


def rows_of(shape: str, conversational: bool) -> list[dict[str, Any]]:
    """Six records of a TRL shape (twelve judgements of six prompts for unpaired preference), each with
    an extra `source` column no stage uses."""
    rows: list[dict[str, Any]] = []
    for t in TOPICS:
        q, good, bad = f"Tell me about {t}.", f"{t.capitalize()} is lovely.", "No."
        rows.append({**record(shape, conversational, q, good, bad), "source": "web"})
        if shape == "unpaired preference":
            p, b = (user(q), assistant(bad)) if conversational else (q, bad)
            rows.append({"prompt": p, "completion": b, "label": False, "source": "web"})
    return rows


STAGE = {
    "language modeling": "sft",
    "language modeling (conversational)": "sft",
    "prompt-completion": "sft",
    "prompt-only": "ppo",
    "preference (explicit prompt)": "rm",
    "preference (implicit prompt)": "rm",
    "unpaired preference": "rm",
}
CASES = [
    (shape, conv, store)
    for shape in STAGE
    for conv in (False, True)
    if not (shape == "language modeling" and conv) and not (shape == "language modeling (conversational)" and not conv)
    for store in ("jsonl", "datasets")
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trl-model")
    make_test_model("gpt2", root, n_layer=1, d_model=16)
    tok = AutoTokenizer.from_pretrained(root)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root)
    return root


def write_data(rows: list[dict[str, Any]], store: str, root: Path) -> tuple[str, str]:
    """(train source, held-out source): two JSONL files, or the two splits of one DatasetDict folder."""
    if store == "jsonl":
        for name, part in (("train", rows[:-2]), ("valid", rows[-2:])):
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        return str(root / "train.jsonl"), str(root / "valid.jsonl")
    splits = {"train": datasets.Dataset.from_list(rows[:-2]), "test": datasets.Dataset.from_list(rows[-2:])}
    datasets.DatasetDict(splits).save_to_disk(str(root / "ds"))
    return f"{root / 'ds'}:train", f"{root / 'ds'}:test"


@pytest.mark.parametrize(("shape", "conversational", "store"), CASES)
def test_trl_shape_trains_one_step_in_its_stage(model_dir, tmp_path, caplog, shape, conversational, store):
    rows = rows_of(shape, conversational)
    train, valid = write_data(rows, store, tmp_path)
    out = tmp_path / "out"
    common = [f"output_dir={out}", "train.max_steps=1", "train.batch_size=2"]
    stage = STAGE[shape]
    if stage == "sft":
        cfg = load_config(sft.Config, None, [*common, f"model.path={model_dir}", f"data.train={train}",
                                             f"data.valid={valid}", "data.max_length=32"])  # fmt: skip
        sft.run(cfg)
        results = json.loads((out / "results.json").read_text())
        assert (results["train_examples"], results["valid_examples"], results["steps"]) == (4, 2, 1)
    elif stage == "rm":
        cfg = load_config(rm.Config, None, [*common, f"model.path={model_dir}", f"data.pairs={train}",
                                            f"data.valid={valid}", "data.max_length=32",
                                            "normalize.enabled=false"])  # fmt: skip
        rm.run(cfg)
        results = json.loads((out / "results.json").read_text())
        n_pairs = 5 if shape == "unpaired preference" else 4  # 10 judgements of 5 prompts; 4 pairs
        assert results["data"] == {"pairs": n_pairs} and results["steps"] == 1
        assert 0 <= results["valid_accuracy"] <= 1  # one held-out pair per unpaired prompt too
    else:
        cfg = load_config(ppo.Config, None, [
            f"output_dir={out}", f"prompts={train}", f"model.path={model_dir}",
            "reward.sources=[{function: 'testutil:e_frequency'}]", "stop.max_steps=1",
            "sampling.max_new_tokens=4", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.missing_eos_penalty=null",
        ])  # fmt: skip
        ppo.run(cfg)
        assert (out / "model" / "config.json").exists()
    assert "ignored column(s) the" in caplog.text and ": source (strict=true" in caplog.text


def test_generate_reads_prompt_only_rows_and_strict_refuses_extra_columns(model_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**record("prompt-only", False, t, "", ""), "source": "web"}) + "\n"
                               for t in TOPICS))  # fmt: skip
    args = ["generate", f"model.path={model_dir}", f"prompts={prompts}", "k=2", "sampling.max_new_tokens=3"]
    assert main([*args, f"output_dir={tmp_path / 'out'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"row{i}" for i in range(1, 7)] and rows[0]["prompt"] == TOPICS[0]
    assert main([*args, f"output_dir={tmp_path / 'strict'}", "strict=true"]) == 2
    assert f"{prompts}:1: source: unknown key" in capsys.readouterr().err
