"""`rlhfkit loop`: rounds end to end against a real labeling server (the simulated panel labels over
HTTP), resumed after kill -9, and its bad-input errors. Tiny untrained models keep each run short."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from testutil import CLI, make_test_model, subprocess_env, write_prompts

from rlhfkit.config import load_config
from rlhfkit.errors import UserError
from rlhfkit.stages import loop

TINY = [
    "rounds=2",
    "prompts_per_round=4",
    "candidates=[{model: current, k: 1, sampling: {max_new_tokens: 8}}, "
    "{model: previous, k: 1, sampling: {max_new_tokens: 8}}, {model: sft, k: 1, sampling: {max_new_tokens: 8}}]",
    "labels.poll_s=0.05",
    "rm.train.max_steps=3",
    "rm.train.batch_size=4",
    "rm.data.valid_fraction=0.25",
    "rm.normalize.max_prompts=4",
    "rm.normalize.samples_per_prompt=1",
    "rm.normalize.sampling.max_new_tokens=8",
    "ppo.stop.max_steps=2",
    "ppo.ppo.batch_size=4",
    "ppo.ppo.mini_batch_size=4",
    "ppo.sampling.max_new_tokens=8",
    "ppo.train.save_every=1",
    "eval.samples_per_prompt=1",
    "eval.bootstrap=20",
    "eval.sampling.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loop-inputs")
    return {
        "sft": make_test_model("gpt2", root / "sft"),
        "pool": write_prompts(root / "pool.jsonl", 10),
        "heldout": write_prompts(root / "heldout.jsonl", 4),
    }


def overrides(out: Path, inputs: dict[str, Path], *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"sft={inputs['sft']}",
        f"pool={inputs['pool']}",
        f"eval.prompts={inputs['heldout']}",
        *TINY,
        *extra,
    ]


def config(out: Path, inputs: dict[str, Path], *extra: str) -> loop.Config:
    return load_config(loop.Config, None, overrides(out, inputs, *extra))


def final(out: Path) -> dict[str, Any]:
    """What must not depend on interruptions: every round's labels, pairs and metrics."""
    rows = json.loads((out / "results.json").read_text())["rounds"]
    labels = [(out / f"round-{n}/labels/judgments.jsonl").read_text() for n in (1, 2)]
    return {"rows": rows, "labels": labels}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("loop-straight")
    loop.run(config(out, inputs))
    return out


@pytest.mark.slow
def test_two_rounds_on_the_embedded_server(uninterrupted: Path) -> None:
    out = uninterrupted
    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [1, 2] and results["stopped"] is None
    for n in (1, 2):
        d = out / f"round-{n}"
        prompts = [json.loads(line)["id"] for line in (d / "prompts.jsonl").read_text().splitlines()]
        assert len(prompts) == 4
        items = [json.loads(line) for line in (d / "labels/completions.jsonl").read_text().splitlines()]
        assert sorted(i["prompt_id"] for i in items) == sorted(prompts) and all(len(i["completions"]) == 3 for i in items)
        assert rows[n - 1]["judgments"] == 4 * 5  # every item by the whole panel, this batch only
        for path in ("rm/model/config.json", "ppo/model/config.json", "eval/results.json"):
            assert (d / path).exists(), path
    # fresh prompts each round
    ids = [{json.loads(x)["id"] for x in (out / f"round-{n}/prompts.jsonl").read_text().splitlines()} for n in (1, 2)]
    assert not ids[0] & ids[1]
    # round 2: the policy started from round 1's, the RM retrained on both rounds' training pairs,
    # and the previous RM was scored on the new pairs
    assert "previous_rm_accuracy" in rows[1] and "vs_previous" in rows[1] and "vs_previous" not in rows[0]
    train1 = (out / "round-1/rm-data/train.jsonl").read_text().splitlines()
    train2 = (out / "round-2/rm-data/train.jsonl").read_text().splitlines()
    assert set(train1) < set(train2)
    ev = json.loads((out / "round-2/eval/results.json").read_text())
    assert set(ev["models"]) == {"sft", "round-1", "round-2"}
    assert {"round-2_vs_sft", "round-2_vs_round-1"} <= set(ev["comparisons"])
    assert "Rounds" in (out / "report.html").read_text()
