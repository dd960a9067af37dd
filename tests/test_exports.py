"""Files for other libraries: pairs with the same columns on every row (a margin everywhere or
nowhere), TRL rows with the prompt rendered as the policy sees it and the raw prompt, from
`rlhfkit aggregate` and `rlhfkit data export`; and, where TRL is installed, its RewardTrainer,
DPOTrainer and KTOTrainer train on them unmodified."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from rlhfkit.cli import main
from rlhfkit.data.chat import encode_example
from rlhfkit.data.formats import Pair, Rating, Unpaired, write_records
from rlhfkit.data.trl import trl_pairs, trl_ratings, trl_unpaired
from rlhfkit.models.loading import load_tokenizer
from testutil import CHAT_TEMPLATE

CONV = [{"role": "user", "content": "Tea?"}]
ANSWER = [{"role": "assistant", "content": "Yes."}]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_margin_on_some_pairs_is_written_on_every_row(tmp_path):
    """`cai mix`: human pairs have no margin, AI pairs do; a null margin breaks TRL's RewardTrainer."""
    human = write_jsonl(tmp_path / "human.jsonl", [{"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."}])
    ai = write_jsonl(tmp_path / "ai.jsonl", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go.", "margin": 1.5}])
    assert main(["cai", "mix", f"human={human}", f"ai={ai}", f"output={tmp_path / 'mixed.jsonl'}"]) == 0
    rows = read_jsonl(tmp_path / "mixed.jsonl")
    assert [r["margin"] for r in rows] == [0.0, 1.5]  # no margin is a margin of 0 in the loss
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "mixed.jsonl"), split="train")
    assert loaded["margin"] == [0.0, 1.5]
    write_records(tmp_path / "plain.jsonl", [Pair(prompt="Tea?", chosen="Yes.", rejected="No.")])
    assert read_jsonl(tmp_path / "plain.jsonl") == [{"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."}]


def test_trl_rows_carry_the_prompt_the_policy_saw(tiny_model_dir):
    pairs = [
        Pair(prompt="Tea?", chosen="Yes.", rejected="No.", margin=0.5),
        Pair(prompt="Hi", chosen="a", rejected="b"),
    ]
    assert trl_pairs(pairs, "Q: {prompt}\nA:") == [
        {"prompt": "Q: Tea?\nA:", "chosen": " Yes.", "rejected": " No.", "raw_prompt": "Tea?", "margin": 0.5},
        {"prompt": "Q: Hi\nA:", "chosen": " a", "rejected": " b", "raw_prompt": "Hi", "margin": 0.0},
    ]
    # TRL reads a standard row as prompt + completion: exactly the text rlhfkit's models were trained on
    tok = load_tokenizer(tiny_model_dir("gpt2"))
    judged = Unpaired(prompt="How do I make tea?", completion="Boil water.", label=True)
    (row,) = trl_unpaired([judged], "User: {prompt}\nAssistant:")
    ids = tok(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
    assert ids + [tok.eos_token_id] == encode_example(tok, "How do I make tea?", "Boil water.").ids
    assert row["label"] is True and row["raw_prompt"] == "How do I make tea?"
    # conversations stay conversations (TRL applies the chat template); `chat` makes plain text one too
    assert trl_ratings([Rating(prompt=CONV, completion=ANSWER, score=0.5)], "User: {prompt}\nAssistant:") == [
        {"prompt": CONV, "completion": ANSWER, "raw_prompt": CONV, "score": 0.5}
    ]
    assert trl_pairs([Pair(prompt="Tea?", chosen="Yes.", rejected="No.")], "chat")[0]["chosen"] == ANSWER


RANKINGS = [
    {"prompt_id": "p1", "labeler": "ann", "ranking": [1, 2, 3]},
    {"prompt_id": "p1", "labeler": "bob", "ranking": [1, 3, 2]},
    {"prompt_id": "p2", "labeler": "ann", "ranking": [2, 1]},
]
COMPLETIONS = [
    {"prompt_id": "p1", "prompt": "Tea?", "completions": ["Boil it.", "Go away.", "No idea."]},
    {"prompt_id": "p2", "prompt": CONV, "completions": [ANSWER, [{"role": "assistant", "content": "No."}]]},
]


@pytest.fixture
def aggregated(tmp_path) -> Path:
    rankings, completions = write_jsonl(tmp_path / "r.jsonl", RANKINGS), write_jsonl(tmp_path / "c.jsonl", COMPLETIONS)
    out = tmp_path / "agg"
    assert main(["aggregate", f"rankings={rankings}", f"completions={completions}", f"output_dir={out}"]) == 0
    return out


def test_aggregate_writes_trl_files_next_to_its_own(aggregated):
    pairs, trl = read_jsonl(aggregated / "pairs.jsonl"), read_jsonl(aggregated / "trl" / "pairs.jsonl")
    assert len(trl) == len(pairs) > 0
    assert all(set(r) == {"prompt", "chosen", "rejected", "margin", "raw_prompt"} for r in trl)
    plain = [r for r in trl if r["raw_prompt"] == "Tea?"]
    assert plain and all(r["prompt"] == "User: Tea?\nAssistant:" and r["chosen"].startswith(" ") for r in plain)
    assert any(r["prompt"] == CONV and r["rejected"] == ANSWER for r in trl)  # p2: the second one won
    kto = read_jsonl(aggregated / "trl" / "kto.jsonl")
    assert len(kto) == len(read_jsonl(aggregated / "kto.jsonl"))
    assert all(set(r) == {"prompt", "completion", "label", "raw_prompt"} for r in kto)


def test_data_export_turns_pairs_kto_rows_and_ratings_into_trl_rows(aggregated, tmp_path, capsys):
    out = tmp_path / "trl.jsonl"
    assert main(["data", "export", str(aggregated / "pairs.jsonl"), f"output={out}"]) == 0
    assert read_jsonl(out) == read_jsonl(aggregated / "trl" / "pairs.jsonl")
    assert main(["data", "export", str(aggregated / "kto.jsonl"), f"output={out}"]) == 0
    assert read_jsonl(out) == read_jsonl(aggregated / "trl" / "kto.jsonl")
    ratings = write_jsonl(tmp_path / "ratings.jsonl", [{"prompt": "Tea?", "completion": "Yes.", "score": 1.0}])
    assert main(["data", "export", str(ratings), f"output={out}", "prompt_template='{prompt}'"]) == 0
    assert read_jsonl(out) == [{"prompt": "Tea?", "completion": " Yes.", "raw_prompt": "Tea?", "score": 1.0}]
    assert capsys.readouterr().out.strip().endswith(f"wrote 1 TRL rows to {out}")
    both = [*read_jsonl(aggregated / "pairs.jsonl"), *read_jsonl(aggregated / "kto.jsonl")]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", both)
    assert main(["data", "export", str(mixed), f"output={out}"]) == 2
    assert "mixes pairs and unpaired {prompt, completion, label} rows" in capsys.readouterr().err


@pytest.fixture
def own_accelerate_state():
    """TRL's trainers set up accelerate their own way; later tests in this process must not inherit it."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("conversational", [False, True])
def test_trl_trainers_take_the_exports_unmodified(aggregated, tiny_model_dir, tmp_path, own_accelerate_state,
                                                  conversational):  # fmt: skip
    """TRL is not a dependency, so this skips without it. To run it, a venv on top of the project's
    with TRL added (seconds, no download but TRL itself):
        python3 -m venv .venv-trl
        echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-trl/lib/python3.11/site-packages/rlhfkit-venv.pth
        .venv-trl/bin/pip install --no-deps -c constraints.txt trl==1.12.0
        .venv-trl/bin/python -m pytest tests/test_exports.py
    """
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = tiny_model_dir("gpt2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if conversational:
        tok.chat_template = CHAT_TEMPLATE

    def data(name: str) -> datasets.Dataset:
        """The standard or the conversational rows (one dataset holds one kind)."""
        rows = [r for r in read_jsonl(aggregated / "trl" / name) if isinstance(r["raw_prompt"], list) == conversational]
        assert rows
        return datasets.Dataset.from_list(rows * 4)

    common = dict(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                  save_strategy="no", use_cpu=True, bf16=False)  # fmt: skip
    reward = trl.RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
        args=trl.RewardConfig(**common, center_rewards_coefficient=None),
        train_dataset=data("pairs.jsonl"),
        processing_class=tok,
    )
    assert reward.train().global_step == 1
    dpo = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=trl.DPOConfig(**common),
        train_dataset=data("pairs.jsonl"),
        processing_class=tok,
    )
    assert dpo.train().global_step == 1
    kto = trl.KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=trl.KTOConfig(**common),
        train_dataset=data("kto.jsonl"),
        processing_class=tok,
    )
    assert kto.train().global_step == 1
