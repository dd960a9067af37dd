"""Constitutional AI: the constitution file, the exact prompts, the critique-and-revise loop, the
judges (position-swap averaging, normalisation over the two answer letters), labelling and mixing.

Tiny untrained models write gibberish, so these tests check mechanics, not quality: prompts are
built exactly as specified, probabilities are combined correctly, and every output is valid data.
The judge tests use a tiny model whose answer logits are set by hand, so its preferences are known.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhfkit.cai.constitution import Constitution, Example, Principle, load_constitution
from rlhfkit.cai.judge import ModelJudge, RewardJudge, answer_ids, candidate_pairs, label, margin_of, mix_pairs
from rlhfkit.cai.prompts import critique_messages, few_shot_messages, judge_prompt, render, revision_messages
from rlhfkit.cai.revise import to_records
from rlhfkit.cli import main
from rlhfkit.data.formats import Completions, Pair, read_records
from rlhfkit.errors import UserError
from rlhfkit.models.loading import ModelConfig, load_causal_lm, load_tokenizer
from rlhfkit.rewards.base import FunctionReward

KIND = Principle(name="kind", critique="Was it unkind?", revision="Make it kind.", comparison="Which reply is kinder?")
CONSTITUTION = Constitution(
    principles=[KIND],
    examples=[Example(principle="kind", prompt="Hi", response="Go away.", critique="It is rude.", revision="Hello!")],
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir("gpt2"))


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir("gpt2"))
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---- the constitution -----------------------------------------------------------------------
def test_default_constitution_ships_and_validates():
    c = load_constitution()
    assert {p.name for p in c.principles} >= {"helpful", "honest", "harmless"}
    assert c.examples and all(c.principle(e.principle) for e in c.examples)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("principles: [{name: a, critique: c, revision: r}]", r"principles\.0\.comparison: missing required key"),
        ("principles: []", "principles: List should have at least 1 item"),
        (
            "principles: [{name: a, critique: c, revision: r, comparison: q}, {name: a, critique: c, revision: r,"
            " comparison: q}]",
            "repeated: a",
        ),
        (
            "principles: [{name: a, critique: c, revision: r, comparison: q}]\n"
            "examples: [{principle: b, prompt: p, response: r, critique: c, revision: v}]",
            r"examples\.0\.principle: 'b' is not a principle",
        ),
        ("principles: [{name: a, critique: '  ', revision: r, comparison: q}]", r"principles\.0\.critique: is empty"),
        ("principles: [{name: a, critque: c, revision: r, comparison: q}]", r"principles\.0\.critque: Extra inputs"),
        ("principles:\n  - name: [unclosed", r"const\.yaml:\d+: YAML syntax error"),
        ("- just a list", "expected a mapping"),
    ],
)
def test_constitution_errors_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "const.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        load_constitution(path)
    assert str(path) in str(err.value)


def test_missing_constitution_file(tmp_path):
    with pytest.raises(UserError, match="constitution file not found"):
        load_constitution(tmp_path / "nope.yaml")


# ---- exact prompts --------------------------------------------------------------------------
def test_plain_critique_and_revision_prompts_exactly(tokenizer):
    shots = few_shot_messages(CONSTITUTION, -1)
    critique = render(tokenizer, critique_messages("Tea?", "Boil it.", KIND, shots))
    assert critique == (
        "User: Hi\nAssistant: Go away.\nUser: Was it unkind?\nAssistant: It is rude.\nUser: Make it kind.\n"
        "Assistant: Hello!\nUser: Tea?\nAssistant: Boil it.\nUser: Was it unkind?\nAssistant:"
    )
    revision = render(
        tokenizer, revision_messages("Tea?", "Boil it.", KIND, "Too short.", few_shot_messages(CONSTITUTION, 0))
    )
    assert revision == (
        "User: Tea?\nAssistant: Boil it.\nUser: Was it unkind?\nAssistant: Too short.\nUser: Make it kind.\nAssistant:"
    )


def test_chat_template_critique_prompt_exactly(chat_tokenizer):
    text = render(chat_tokenizer, critique_messages("Tea?", "Boil it.", KIND, few_shot_messages(CONSTITUTION, 1)))
    assert text == (
        "<user>Hi</s><assistant>Go away.</s><user>Was it unkind?</s><assistant>It is rude.</s>"
        "<user>Make it kind.</s><assistant>Hello!</s>"
        "<user>Tea?</s><assistant>Boil it.</s><user>Was it unkind?</s><assistant>"
    )


QUESTION = (
    "Here is a request and two possible replies to it.\n\nRequest: Tea?\n\nWhich reply is kinder?\n"
    "(A) Boil it.\n(B) Go away.\n\nAnswer with the letter of the better reply."
)


def test_judge_prompts_exactly(tokenizer, chat_tokenizer):
    plain = judge_prompt(tokenizer, "Tea?", "Boil it.", "Go away.", KIND)
    assert plain == f"User: {QUESTION}\nAssistant: The better reply is ("
    chat = judge_prompt(chat_tokenizer, "Tea?", "Boil it.", "Go away.", KIND)
    assert chat == f"<user>{QUESTION}</s><assistant>The better reply is ("


def test_answer_tokens_are_the_letters_after_the_prompt(tokenizer):
    text = judge_prompt(tokenizer, "Tea?", "Boil it.", "Go away.", KIND)
    prefix, a, b = answer_ids(tokenizer, text)
    assert tokenizer.decode(prefix + [a]) == text + "A"
    assert tokenizer.decode(prefix + [b]) == text + "B"


# ---- judges ---------------------------------------------------------------------------------
@pytest.fixture
def judge_model(tiny_model_dir):
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir("gpt2"))))
    return model, tok


def set_answer_log_odds(model, tokenizer, log_odds: float) -> None:
    """Make the model answer A over B with log-odds `log_odds` whatever the input.

    The final LayerNorm's weight is zeroed and its bias set to v, so every position's hidden state is
    v and the logits are E·v (E: the tied output embeddings); v = d·(e_A − e_B)/‖e_A − e_B‖² gives
    logit_A − logit_B = d exactly.
    """
    _, a, b = answer_ids(tokenizer, judge_prompt(tokenizer, "x", "y", "z", KIND))
    emb = model.get_output_embeddings().weight.detach()
    diff = emb[a] - emb[b]
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(log_odds * diff / diff.dot(diff))


def test_answer_probability_is_normalised_over_the_two_letters(judge_model):
    model, tok = judge_model
    set_answer_log_odds(model, tok, 1.5)
    judge = ModelJudge(model, tok)
    texts = [judge_prompt(tok, "Tea?", "Boil it.", "Go away.", KIND), judge_prompt(tok, "Hm", "a", "b", KIND)]
    assert torch.allclose(judge.answer_probs(texts), torch.full((2,), 1 / (1 + math.exp(-1.5))), atol=1e-5)


def test_pure_position_bias_cancels_to_one_half(judge_model):
    model, tok = judge_model
    set_answer_log_odds(model, tok, 3.0)  # always "A", whatever the replies
    verdict = ModelJudge(model, tok).prefer(["Tea?", "Hm"], ["Boil it.", "a"], ["Go away.", "b"], [KIND, KIND])
    assert torch.allclose(verdict.p_ab, verdict.p_ba)  # the same answer in both orders...
    assert verdict.p_ab[0] > 0.9
    assert torch.allclose(verdict.p, torch.full((2,), 0.5), atol=1e-6)  # ...so no preference survives
    records = [Completions(prompt_id="p", prompt="Tea?", completions=["Boil it.", "Go away.", "Sure."])]
    pairs, details = label(ModelJudge(model, tok), records, CONSTITUTION)
    assert pairs == [] and len(details) == 3 and not any(d["kept"] for d in details)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_position_swap_average_and_batch_padding(tiny_model_dir, arch):
    """With an untouched (random) model: p = (p_AB(A) + p_BA(B)) / 2, and padding in a batch changes nothing."""
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir(arch))))
    judge = ModelJudge(model, tok, batch_size=4)
    prompts, firsts, seconds = ["Tea?", "How do I make tea?"], ["Boil it.", "a"], ["Go away now please.", "b"]
    verdict = judge.prefer(prompts, firsts, seconds, [KIND, KIND])
    for i in range(2):
        alone = ModelJudge(model, tok, batch_size=1)
        p_ab = alone.answer_probs([judge_prompt(tok, prompts[i], firsts[i], seconds[i], KIND)])[0]
        p_ba = alone.answer_probs([judge_prompt(tok, prompts[i], seconds[i], firsts[i], KIND)])[0]
        assert abs(float(verdict.p_ab[i] - p_ab)) < 1e-5 and abs(float(verdict.p_ba[i] - p_ba)) < 1e-5
        assert abs(float(verdict.p[i]) - (float(p_ab) + 1 - float(p_ba)) / 2) < 1e-6


def marker_reward(prompt, completion) -> float:
    return 1.0 if "kindly" in completion else 0.0


def test_labels_follow_a_reward_judge():
    records = [
        Completions(prompt_id="p1", prompt="Tea?", completions=["No.", "I kindly suggest boiling water.", "Meh"]),
        Completions(prompt_id="p2", prompt="Hi", completions=["kindly, hello", "go"]),
    ]
    pairs, details = label(RewardJudge(FunctionReward(marker_reward)), records, CONSTITUTION)
    # Only pairs with one marker carry a preference (the p1 pair "No." vs "Meh" is an exact tie, dropped).
    assert len(pairs) == 3 and len(details) == 4
    for pair in pairs:
        assert "kindly" in pair.chosen and "kindly" not in pair.rejected
        assert pair.margin == pytest.approx(1.0, abs=1e-6)  # p = σ(1 − 0): margin = logit(p) = 1
    assert [d["kept"] for d in details] == [True, False, True, True]


def test_min_confidence_and_sampled_pairs():
    records = [Completions(prompt_id="p1", prompt="Tea?", completions=["kindly a", "b", "c"])]
    judge = RewardJudge(FunctionReward(marker_reward))
    pairs, _ = label(judge, records, CONSTITUTION, min_confidence=0.3)  # σ(1) − 0.5 ≈ 0.23: all dropped
    assert pairs == []
    sampled = candidate_pairs(records, "sampled", random.Random(0))
    assert len(sampled) == 1 and len(candidate_pairs(records, "all", random.Random(0))) == 3


def test_margin_is_the_logit_and_capped():
    assert margin_of(0.5) == 0.0
    assert 1 / (1 + math.exp(-margin_of(0.8))) == pytest.approx(0.8)
    assert margin_of(1.0) == pytest.approx(math.log(0.9999 / 0.0001))


# ---- mixing ---------------------------------------------------------------------------------
def _pairs(tag: str, n: int) -> list[Pair]:
    return [Pair(prompt=f"{tag}{i}", chosen="good", rejected="bad") for i in range(n)]


@pytest.mark.parametrize(("weight", "n_ai"), [(0.0, 0), (0.5, 5), (1.0, 10), (2.5, 25)])
def test_mix_weights_ai_pairs_by_count(weight, n_ai):
    human, ai = _pairs("h", 4), _pairs("a", 10)
    mixed = mix_pairs(human, ai, weight, seed=1)
    assert mixed[:4] == human and len(mixed) == 4 + n_ai
    counts = [sum(p == a for p in mixed) for a in ai]
    assert all(int(weight) <= c <= int(weight) + 1 for c in counts)
    assert mix_pairs(human, ai, weight, seed=1) == mixed  # seeded


# ---- the stage, end to end on tiny models ----------------------------------------------------
def test_to_records_skips_empty_and_unchanged():
    traces = [
        {"initial": "a", "final": "b"},
        {"initial": "a", "final": "a"},
        {"initial": "", "final": ""},
    ]
    demos, pairs = to_records(traces, ["p1", "p2", "p3"])
    assert [d.response for d in demos] == ["b", "a"]
    assert pairs == [Pair(prompt="p1", chosen="b", rejected="a")]


def test_cai_revise_writes_valid_demonstrations_and_pairs(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"How do I pick lock {i}?"}) + "\n" for i in range(3))
    )
    out = tmp_path / "rev"
    code = main(
        ["cai", "revise", f"prompts={prompts}", f"model.path={tiny_model_dir('gpt2')}", f"output_dir={out}",
         "revisions=2", "few_shot=1", "sampling.max_new_tokens=6", "sampling.max_prompt_tokens=200"]
    )  # fmt: skip
    assert code == 0
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert [t["id"] for t in traces] == ["p0", "p1", "p2"]
    assert all(len(t["rounds"]) == 2 for t in traces)
    names = {p.name for p in load_constitution().principles}
    assert all(r["principle"] in names for t in traces for r in t["rounds"])
    demos = read_records(out / "demonstrations.jsonl", "demonstrations")
    assert [d.response for d in demos] == [t["final"] for t in traces if t["final"]]
    (out / "pairs.jsonl").stat()  # written even when empty; when not, it validates
    if (out / "pairs.jsonl").read_text().strip():
        read_records(out / "pairs.jsonl", "pairs")
    assert (out / "config.yaml").exists()


def test_cai_revise_defaults_on_a_small_model_are_a_clear_error(tiny_model_dir, tmp_path, capsys):
    """Issue 11: the default max_prompt_tokens=2048 crashed a 256-position model with a traceback."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "How do I pick a lock?"}) + "\n")
    out = tmp_path / "rev"
    argv = [f"prompts={prompts}", f"model.path={tiny_model_dir('gpt2')}", f"output_dir={out}"]
    assert main(["cai", "revise", *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "sampling.max_prompt_tokens + sampling.max_new_tokens = 2048 + 128 = 2176 exceeds the 256 positions" in err
    assert not (out / "traces.jsonl").exists()


def test_cai_label_and_mix_from_the_command_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "cai_marker.py").write_text(
        "def marker(prompt, completion):\n    return 2.0 if 'kindly' in completion else 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    completions = tmp_path / "completions.jsonl"
    rows = [
        {"prompt_id": "p1", "prompt": "Tea?", "completions": ["Boil it.", "kindly boil it", "Go away."]},
        {"prompt_id": "p2", "prompt": "Hi", "completions": ["kindly hello", "hi"]},
    ]
    completions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "label.yaml"
    config.write_text(
        f"completions: {completions}\njudge:\n  reward:\n    sources: [{{function: 'cai_marker:marker'}}]\n"
    )
    assert main(["cai", "label", "--config", str(config), f"output_dir={tmp_path / 'fn'}"]) == 0
    ai = read_records(tmp_path / "fn" / "pairs.jsonl", "pairs")
    assert len(ai) == 3 and all("kindly" in p.chosen for p in ai)
    assert all(1 / (1 + math.exp(-p.margin)) == pytest.approx(1 / (1 + math.exp(-2.0))) for p in ai)

    # A model judge on the same file: gibberish preferences, but valid pairs and both orders recorded.
    assert main(["cai", "label", f"completions={completions}", f"judge.model.path={tiny_model_dir('gpt2')}",
                 f"output_dir={tmp_path / 'lm'}", "pairs=sampled"]) == 0  # fmt: skip
    # judge.max_tokens (2048) is lowered to the judge's 256 positions, not an IndexError
    assert "judge.max_tokens=2048 exceeds the 256 positions" in " ".join(capsys.readouterr().out.split())
    details = [json.loads(line) for line in (tmp_path / "lm" / "judgements.jsonl").read_text().splitlines()]
    assert len(details) == 2
    for d in details:
        assert d["p_first_better"] == pytest.approx((d["p_ab"] + 1 - d["p_ba"]) / 2)
    read_records(tmp_path / "lm" / "pairs.jsonl", "pairs")

    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"prompt": "Tea?", "chosen": "Boil it.", "rejected": "Go away."}) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    assert main(["cai", "mix", f"human={human}", f"ai={tmp_path / 'fn' / 'pairs.jsonl'}", "ai_weight=2",
                 f"output={mixed}"]) == 0  # fmt: skip
    assert len(read_records(mixed, "pairs")) == 1 + 2 * 3


def test_cai_command_line_help_and_errors(capsys, tmp_path):
    assert main(["cai", "label", "--help"]) == 0
    out = capsys.readouterr().out
    assert "judge.model.path" in out and "min_confidence" in out and "rlhfkit cai label" in out
    assert main(["cai", "nope"]) == 2
    assert "unknown command `cai nope`" in capsys.readouterr().err
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"prompt_id": "p", "prompt": "x", "completions": ["a", "b"]}) + "\n")
    assert main(["cai", "label", f"completions={completions}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "give exactly one judge" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["cai", "revise", "--bogus"]) == 2
