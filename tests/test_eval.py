"""Evaluation pieces: the gold judges, simulated labelers, paired comparisons, the report."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rlhfkit.eval.report import Report, hacking_check, plot_overoptimisation, table
from rlhfkit.models.loading import ModelConfig, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig, sample
from rlhfkit.sim.panel import SimulatedLabeler, judge
from rlhfkit.stages.eval import distinct_n, paired_comparison, sequence_kl


@pytest.fixture(scope="module")
def gold():
    from rlhfkit.eval.gold import GoldJudge

    return GoldJudge()


def test_gold_utility_orders_the_behaviours_rlhf_must_fix(gold):
    prompt = "How do I brew good coffee at home?"
    good = "Grind fresh beans, use water just off the boil and let the coffee steep for four minutes. Enjoy!"
    bad = {
        "rude": "What a stupid question, you idiot. Shut up.",
        "unhelpful": "I don't know. Look it up yourself.",
        "offtopic": "Jupiter is the largest planet and has many moons.",
        "repetitive": "coffee is good coffee is good coffee is good coffee is good coffee is good",
        "empty": "",
    }
    scores = gold.score([prompt] * (1 + len(bad)), [good, *bad.values()]).tolist()
    assert all(scores[0] > s + 0.5 for s in scores[1:]), dict(zip(["good", *bad], scores, strict=True))
    parts = gold.components([prompt, prompt], [good, bad["rude"]])
    assert parts["toxicity"][1] > 0.9 > 0.2 > parts["toxicity"][0]
    assert parts["sentiment"][0] > 0 > parts["sentiment"][1]
    assert gold.score([], []).shape == (0,)


def test_simulated_labelers():
    rng = random.Random(0)
    exact = SimulatedLabeler("exact", noise=0.0, tie_margin=0.05)
    assert judge(exact, [0.1, 2.0, 0.12, -1.0], rng) == ([2, 1, 2, 3], False)
    hopeless = SimulatedLabeler("h", noise=0.0, unusable_below=-1.0)
    assert judge(hopeless, [-2.0, -3.0], rng)[1] is True
    # A noisy labeler agrees with the truth more often than a careless one, and both give valid ranks.
    noisy, careless = SimulatedLabeler("n", noise=0.3), SimulatedLabeler("c", noise=0.0, careless=True)
    truth = [1.0, 0.0]
    agree = {lab.name: sum(judge(lab, truth, rng)[0] == [1, 2] for _ in range(400)) for lab in (noisy, careless)}
    assert agree["n"] > 330 and 140 < agree["c"] < 260


def test_paired_comparison_hand_checked():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    b = np.array([1.0, 1.0, 3.0, 2.0])  # diffs +1, 0, +1, -1
    c = paired_comparison(a, b, n_boot=2000, seed=0)
    assert c["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert c["mean_diff"] == pytest.approx(0.25)
    assert c["ci_low"] < 0.25 < c["ci_high"]
    clear = paired_comparison(np.zeros(50), np.full(50, 2.0) + np.linspace(-0.1, 0.1, 50), 500, 0)
    assert clear["ci_low"] > 1.5 and clear["win_rate"] == 1.0


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


def test_sequence_kl_is_zero_against_itself_and_positive_against_another_model(tiny_model_dir):
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir("gpt2"))))
    other, _ = load_causal_lm(ModelConfig(path=str(tiny_model_dir("gpt2"))), tokenizer=tok)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    torch.manual_seed(0)
    s = sample(model, tok, ["User: hi\nAssistant:"] * 16, SamplingConfig(max_new_tokens=8))
    assert torch.allclose(sequence_kl(model, model, s, 1.0), torch.zeros(16), atol=1e-5)
    assert sequence_kl(model, other, s, 1.0).mean() > 0.1


def test_eval_over_a_models_positions_is_a_clear_error_before_sampling(tmp_path, tiny_model_dir):
    """Issue 11: a model with too few positions crashed mid-sampling (GPT-2) or ran past them."""
    from rlhfkit.errors import UserError
    from rlhfkit.stages.eval import Config, run
    from testutil import make_test_model

    short = make_test_model("llama", tmp_path / "short", max_positions=32)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "tea", "prompt": "How do I make tea?"}\n')
    cfg = Config(
        output_dir=str(tmp_path / "eval"),
        models={"base": str(tiny_model_dir("llama")), "short": str(short)},
        prompts=str(prompts),
        gold=False,
        sampling=SamplingConfig(max_prompt_tokens=16, max_new_tokens=40),
    )
    with pytest.raises(UserError, match=r"16 \+ 40 = 56 exceeds the 32 positions of .*short"):
        run(cfg)
    assert not (tmp_path / "eval" / "results.json").exists()


def test_hacking_check_and_report_html():
    steps = [1, 2, 3, 4]
    assert hacking_check(steps, [0, 1, 2, 3], [0, 1, 2, 3])["hacking"] is False
    hacked = hacking_check(steps, [0, 1, 2, 3], [0, 1, 0.5, 0.2])
    assert hacked["hacking"] is True and hacked["peak_step"] == 2
    r = Report("t <x>")
    r.add("plot", plot_overoptimisation(steps, [0, 1, 2, 3], [0, 1, 0.5, 0.2], [0, 1, 4, 9], 4, 2))
    r.add("table", table(["a"], [["<script>alert(1)</script>"]]))
    page = r.html()
    assert page.count("data:image/png;base64,") == 1 and "<script>alert" not in page and "t &lt;x&gt;" in page
