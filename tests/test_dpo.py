"""DPO and KTO stages on a tiny model: they learn the preference, resume exactly, store the reference
log-probs with the run, save a plain transformers model, and refuse bad configs naming the field."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.data.batching import sft_collate
from rlhfkit.data.chat import PROMPT_TEMPLATE, encode_example
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.stages.dpo import PairDataConfig, read_pairs, sequence_logps
from testutil import kill_after_first_checkpoint, make_test_model

GOOD = ["good", "great", "kind", "clear"]
BAD = ["bad", "awful", "rude", "wrong"]
FILLER = ["the", "tea", "water", "garden", "river", "book", "is", "very", "a", "small"]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen answers hold a kind word, rejected ones an unkind word: a rule a tiny model can learn."""
    rng = random.Random(seed)

    def answer(word: str) -> str:
        words = rng.sample(FILLER, 4)
        words.insert(rng.randrange(5), word)
        return " ".join(words)

    return [
        {"prompt": f"Tell me about thing {i}.", "chosen": answer(rng.choice(GOOD)), "rejected": answer(rng.choice(BAD))}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    rows = pairs(48)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [f"{r['prompt']} {r['chosen']} {r['rejected']}" for r in rows]
    make_test_model("gpt2", root / "model", texts=texts)
    return root


def settings(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}", f"model.path={root / 'model'}", f"data.pairs={root / 'pairs.jsonl'}",
        "data.valid_fraction=0.1", "train.lr=3e-3", "train.batch_size=8", "train.warmup_steps=0",
        "train.scheduler=constant", "train.log_every=1", *extra,
    ]  # fmt: skip


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_dpo_widens_the_chosen_rejected_margin_and_saves_a_plain_model(root, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(["dpo", *settings(root, out, "train.max_steps=30", "dpo.beta=0.5")]) == 0
    r = results(out)
    assert r["train_pairs"] + r["valid_pairs"] == 48 and r["steps"] == 30
    # the policy started as the reference: every implicit reward, hence the margin, was exactly 0
    assert r["train_reward_margin"] > 2.0 and r["train_accuracy"] >= 0.95, r
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "reward_margin" in m]
    assert rows[0]["reward_margin"] < 0.5 < rows[-1]["reward_margin"]
    stored = torch.load(out / "reference_logps.pt")["logps"]
    assert stored["train_chosen"].shape == (r["train_pairs"],) and (stored["train_chosen"] < 0).all()
    # the saved model, loaded by plain transformers, scores chosen answers above the rejected ones
    # relative to the stored reference log-probs (which follow the order of the training pairs)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    train, _ = read_pairs(PairDataConfig(pairs=str(root / "pairs.jsonl"), valid_fraction=0.1), seed=0)
    ratio = {}
    for side in ("chosen", "rejected"):
        seqs = [encode_example(tokenizer, p.prompt, getattr(p, side), PROMPT_TEMPLATE, 512) for p in train]
        batch = sft_collate(tokenizer.pad_token_id)([(e.ids, e.response_start) for e in seqs])
        with torch.no_grad():
            ratio[side] = sequence_logps(model, batch) - stored[f"train_{side}"]
    assert (ratio["chosen"] > ratio["rejected"]).float().mean() >= 0.95


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_ipo_and_hinge_also_learn(root, tmp_path, loss):
    out = tmp_path / loss
    assert main(["dpo", *settings(root, out, "train.max_steps=20", "dpo.beta=0.5", f"dpo.loss={loss}")]) == 0
    assert results(out)["train_accuracy"] >= 0.9


def test_lora_reference_is_the_base_model_with_the_adapter_off(root, tmp_path):
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert main(["dpo", *settings(root, full, "train.max_steps=1")]) == 0
    assert main(["dpo", *settings(root, lora, "train.max_steps=1", "model.lora.r=4")]) == 0
    a, b = (torch.load(run / "reference_logps.pt")["logps"] for run in (full, lora))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.slow
def test_killed_dpo_run_resumes_to_where_an_uninterrupted_run_ends(root, tmp_path, capsys):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    extra = ("train.max_steps=6", "train.save_every=3", "dpo.beta=0.5")
    assert main(["dpo", *settings(root, straight, *extra)]) == 0
    # the same run in a child process, SIGKILLed once its step-3 checkpoint exists
    assert kill_after_first_checkpoint(["dpo", *settings(root, cut, *extra)], cut / "checkpoints") == 3
    assert not (cut / "results.json").exists()
    capsys.readouterr()
    assert main(["dpo", *settings(root, cut, *extra), "--resume"]) == 0
    printed = capsys.readouterr().out.replace("\n", "")
    assert "reference log-probs from" in printed and "(step 3)" in printed
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k not in ("time", "tokens_per_s")} == {
            k: v for k, v in y.items() if k not in ("time", "tokens_per_s")
        }
    w_a, w_b = (load_file(run / "model" / "model.safetensors") for run in (straight, cut))
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    # other token ids (a shorter max_length cuts the sequences): the stored log-probs are not reused
    assert main(["dpo", *settings(root, cut, *extra, "data.max_length=12"), "--resume"]) == 0
    assert "was made for other data" in capsys.readouterr().out.replace("\n", "")


def test_kto_raises_desirable_answers_above_undesirable_ones(root, tmp_path):
    out = tmp_path / "kto"
    extra = ("train.max_steps=30", "kto.beta=0.5", "kto.desirable_weight=1.0", "kto.undesirable_weight=1.0")
    assert main(["kto", *settings(root, out, *extra)]) == 0
    r = results(out)
    assert r["desirable_examples"] * 2 == r["train_examples"]
    assert r["train_reward_margin"] > 1.0, r
    assert set(torch.load(out / "reference_logps.pt")["logps"]) == {"train_own", "train_kl", "valid_own", "valid_kl"}


def test_bad_configs_fail_naming_the_setting(root, tmp_path, capsys):
    other = make_test_model("gpt2", tmp_path / "other", texts=["something else entirely"] * 8, vocab_size=280)
    assert main(["dpo", *settings(root, tmp_path / "a", f"ref_model={other}")]) == 2
    err = capsys.readouterr().err
    assert "ref_model" in err and "different tokenizer" in err
    assert main(["dpo", *settings(root, tmp_path / "b", "dpo.loss=ipo", "dpo.label_smoothing=0.1")]) == 2
    assert "label_smoothing" in capsys.readouterr().err
    assert main(["dpo", f"output_dir={tmp_path / 'c'}", f"model.path={root / 'model'}"]) == 2
    assert "data.pairs" in capsys.readouterr().err
    assert main(["kto", *settings(root, tmp_path / "d", "kto.beta=0")]) == 2
    assert "kto.beta" in capsys.readouterr().err


def test_dpo_and_kto_on_rankings_read_every_pair_and_count_cut_sequences(root, tmp_path):
    completions = [
        {"prompt_id": "p1", "prompt": "Say hi.", "completions": ["hi good", "hi bad", "hi ok"]},
        {"prompt_id": "p2", "prompt": "Say yo.", "completions": ["yo good", "yo bad"]},
    ]
    rankings = [
        {"prompt_id": "p1", "labeler": "a", "ranking": [1, 3, 2]},
        {"prompt_id": "p2", "labeler": "a", "ranking": [1, 2]},
    ]
    for name, rows in (("completions", completions), ("rankings", rankings)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"data.rankings={tmp_path / 'rankings.jsonl'}", f"data.completions={tmp_path / 'completions.jsonl'}"]
    common = [f"model.path={root / 'model'}", "data.valid_fraction=0", "train.max_steps=1", "data.max_length=6", *data]
    assert main(["dpo", f"output_dir={tmp_path / 'dpo'}", *common]) == 0
    r = results(tmp_path / "dpo")
    assert r["train_pairs"] == 3 + 1 and r["truncated_sequences"] == 2 * 4  # C(3,2) + 1 pairs, all cut
    assert main(["kto", f"output_dir={tmp_path / 'kto'}", *common]) == 0
    r = results(tmp_path / "kto")
    # distinct (answer, label): p1 good+, ok+, ok-, bad-; p2 good+, bad-
    assert r["train_examples"] == 6 and r["desirable_examples"] == 3


def test_sequence_logps_sum_the_response_tokens_only(root):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    examples = [([5, 6, 7, 8, 9], 2), ([10, 11, 12], 1), ([13, 14, 15, 16], 3)]  # (ids, response start)
    batch = sft_collate(0)(examples)
    with torch.no_grad():
        got = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    # the response tokens ids[start:] are predicted from positions start-1 .. len-2
    want = [
        sum(float(logp[row, t - 1, ids[t]]) for t in range(start, len(ids)))
        for row, (ids, start) in enumerate(examples)
    ]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)


def test_kto_takes_unpaired_rows_as_they_are_and_dpo_pairs_them(root, tmp_path):
    rows = [
        {"prompt": "Say hi.", "completion": "hi good", "label": True},
        {"prompt": "Say hi.", "completion": "hi ok", "label": True},
        {"prompt": "Say hi.", "completion": "hi bad", "label": False},
        {"prompt": "Say yo.", "completion": "yo bad", "label": False},  # no desirable answer: no pair
    ]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model.path={root / 'model'}", "data.valid_fraction=0", "train.max_steps=1"]
    assert main(["kto", f"output_dir={tmp_path / 'kto'}", f"data.pairs={tmp_path / 'kto.jsonl'}", *common]) == 0
    r = results(tmp_path / "kto")
    assert r["train_examples"] == 4 and r["desirable_examples"] == 2
    assert main(["dpo", f"output_dir={tmp_path / 'dpo'}", f"data.pairs={tmp_path / 'kto.jsonl'}", *common]) == 0
    assert results(tmp_path / "dpo")["train_pairs"] == 2  # good > bad, ok > bad
