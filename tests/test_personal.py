"""Personalisation: the user in prompts and pairs, a personalised reward model that learns two users'
opposite preferences where the pooled one cannot, the pooled fallback for unknown users, and the
saved model scoring with and without a user."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.data.chat import render_prompt, split_user, with_user
from rlhfkit.data.formats import Completions, Message, Ranking, read_records
from rlhfkit.errors import UserError
from rlhfkit.labels.pairs import rankings_to_pairs
from rlhfkit.rewards.model import RewardModel
from testutil import make_test_model

POSITIVE = ["good", "great", "kind", "clear"]
NEGATIVE = ["bad", "awful", "rude", "wrong"]
FILLER = ["the", "tea", "water", "garden", "river", "book", "is", "very", "a", "small"]
USERS = ("ann", "bob")


def response(rng: random.Random, word: str) -> str:
    words = rng.sample(FILLER, 4)
    words.insert(rng.randrange(5), word)
    return " ".join(words)


def opposite_pairs(n: int, seed: int = 0) -> list[dict]:
    """ann prefers the answer with a positive word, bob the one with a negative word: pooled, the
    two cancel out exactly."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos, neg = response(rng, rng.choice(POSITIVE)), response(rng, rng.choice(NEGATIVE))
        prompt = f"Tell me about tea, number {i}."
        rows.append({"prompt": prompt, "chosen": pos, "rejected": neg, "user": "ann"})
        rows.append({"prompt": prompt, "chosen": neg, "rejected": pos, "user": "bob"})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("personal")
    rows = opposite_pairs(160)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [f"System: User: {r['user']}\nUser: {r['prompt']}\nAssistant: {r['chosen']}" for r in rows]
    make_test_model("gpt2", root / "tiny", texts=texts, vocab_size=300, n_layer=2, d_model=64)
    args = [
        "rm",
        f"model.path={root / 'tiny'}",
        f"data.pairs={root / 'pairs.jsonl'}",
        f"output_dir={root / 'rm'}",
        "personalize=true",
        "data.valid_fraction=0.2",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.max_steps=150",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    return root


def test_personalised_rm_learns_opposite_users_where_the_pooled_one_cannot(trained):
    results = json.loads((trained / "rm" / "results.json").read_text())
    users = results["users"]
    assert set(users) == set(USERS) and all(u["pairs"] == 32 for u in users.values())
    for user in USERS:
        assert users[user]["accuracy"] >= 0.85, users
    # pooled, a pair and its mirror image score the same: one user's accuracy is the other's 1 - x
    assert min(u["pooled_accuracy"] for u in users.values()) <= 0.6, users
    assert users["ann"]["pooled_accuracy"] + users["bob"]["pooled_accuracy"] == pytest.approx(1.0)


def test_unknown_users_fall_back_to_pooled_and_the_saved_model_round_trips(trained, tmp_path):
    rm = RewardModel.load(trained / "rm" / "model")
    assert rm.meta.users == list(USERS)
    prompt, good, bad = "Tell me about tea, number 999.", "the tea is very kind", "the tea is very rude"
    ann = rm.score([with_user(prompt, "ann")] * 2, [good, bad])
    bob = rm.score([with_user(prompt, "bob")] * 2, [good, bad])
    assert ann[0] > ann[1] and bob[0] < bob[1]  # each user's own taste, on an unseen prompt
    pooled = rm.score([prompt] * 2, [good, bad])
    stranger = rm.score([with_user(prompt, "zed")] * 2, [good, bad])
    assert torch.equal(stranger, pooled)  # an unknown user is scored exactly as no user
    assert not torch.allclose(ann, pooled)

    # a further normalisation is folded into the weights on save: into output 0's bias only, so every
    # user's reward (output 0 + theirs) and the pooled one move alike
    rm.meta.gain, rm.meta.bias = rm.meta.gain * 2.0, rm.meta.bias + 0.5
    prompts = [with_user(prompt, "ann"), with_user(prompt, "bob"), prompt]
    before = [rm.score([p] * 2, [good, bad]) for p in prompts]
    again = RewardModel.load(rm.save(tmp_path / "copy"))
    assert again.meta.users == list(USERS) and again._logit_map() == (1.0, 0.0)  # all of it in the weights
    for p, expected in zip(prompts, before, strict=True):
        assert torch.allclose(again.score([p] * 2, [good, bad]), expected, atol=1e-4)


def test_with_user_renders_one_system_line_and_splits_back():
    plain = "How do I brew tea?"
    personal = with_user(plain, "ann")
    assert personal == [Message(role="system", content="User: ann"), Message(role="user", content=plain)]
    assert render_prompt(None, personal) == "System: User: ann\nUser: How do I brew tea?\nAssistant:"
    assert split_user(personal) == ("ann", plain) and split_user(plain) == (None, plain)
    convo = [Message(role="user", content="hi"), Message(role="assistant", content="hello"),
             Message(role="user", content="tea?")]  # fmt: skip
    assert split_user(with_user(convo, "bob")) == ("bob", convo)
    assert with_user(plain, None) == plain
    other_system = [Message(role="system", content="Be brief."), Message(role="user", content="hi")]
    assert split_user(other_system) == (None, other_system)


def test_user_fields_are_validated_and_labeler_pairs_carry_the_labeler(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "user": "ann"}) + "\n")
    assert read_records(path, "pairs")[0].user == "ann"
    for bad in ["", " ann", "a\nb"]:
        path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "user": bad}) + "\n")
        with pytest.raises(UserError, match=r"pairs.jsonl:1: user"):
            read_records(path, "pairs")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "hi", "user": "bob"}) + "\n")
    assert read_records(prompts, "prompts")[0].user == "bob"

    completions = [Completions(prompt_id="p1", prompt="q", completions=["a", "b"])]
    rankings = [
        Ranking(prompt_id="p1", labeler="ann", ranking=[1, 2]),
        Ranking(prompt_id="p1", labeler="bob", ranking=[2, 1]),
    ]
    pairs = rankings_to_pairs(rankings, completions)
    assert [(p.user, p.chosen) for p in pairs] == [("ann", "a"), ("bob", "b")]


def test_personalize_needs_pairs_with_users(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    make_test_model("gpt2", tmp_path / "tiny")
    with pytest.raises(UserError, match="no pair .* names a `user`"):
        from rlhfkit.config import load_config
        from rlhfkit.stages import rm

        rm.run(load_config(rm.Config, None, [f"model.path={tmp_path / 'tiny'}", f"data.pairs={path}",
                                              f"output_dir={tmp_path / 'rm'}", "personalize=true"]))  # fmt: skip


def test_generate_asks_as_the_user_and_eval_refuses_users_of_unknown_models(tmp_path):
    from rlhfkit.config import load_config
    from rlhfkit.stages import eval as eval_stage
    from rlhfkit.stages import generate

    model = make_test_model("gpt2", tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "How do I make tea?", "user": "bob"}) + "\n")
    common = [f"model.path={model}", f"prompts={prompts}", "k=2", "sampling.max_new_tokens=4"]
    for user, expected in (("ann", "ann"), ("", "bob")):  # user=NAME, else the prompt's own
        cfg = load_config(generate.Config, None, [*common, f"output_dir={tmp_path / user}", f"user={user}"])
        (record,) = read_records(generate.run(cfg), "completions")
        assert split_user(record.prompt) == (expected, "How do I make tea?")

    cfg = load_config(eval_stage.Config, None, [f"prompts={prompts}", f"models={{a: {model}}}", "users={b: ann}"])
    with pytest.raises(UserError, match="users: b not in models"):
        eval_stage.run(cfg)
