"""A sequence classifier as a reward: the logit of one chosen class (e.g. "not hate" of a toxicity
classifier), so PPO can push a policy towards or away from what the classifier detects.

The classifier sees the completion alone by default (a toxicity classifier judges what the model
said, not what it was asked); `with_prompt=True` gives it (prompt, completion) as a text pair.
The raw logit is used, not a probability: it does not saturate, so the policy keeps getting a
gradient signal near 0 and 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.data.formats import Text
from rlhfkit.errors import UserError
from rlhfkit.models.device import place


def _plain(text: Text) -> str:
    return text if isinstance(text, str) else "\n".join(m.content for m in text)


class ClassifierReward:
    """Reward = logit of class `label` (an index, or a name from the model's `id2label`)."""

    def __init__(
        self,
        path: str,
        label: int | str = 0,
        device: Any = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
        with_prompt: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"classifier {path!r}: cannot load a sequence classifier ({e})") from None
        if self.tokenizer.pad_token is None:  # decoder classifiers: no EOS is appended here, so EOS can pad
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        place(self.model, device).eval()
        self.label = self._label_index(path, label)
        self.batch_size, self.max_length, self.with_prompt = batch_size, max_length, with_prompt

    def _label_index(self, path: str, label: int | str) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        n = self.model.config.num_labels
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            by_name = {v: k for k, v in id2label.items()}
            if label not in by_name:
                raise UserError(f"classifier {path!r}: no class {label!r}; classes are {sorted(by_name)}")
            return by_name[label]
        index = int(label)
        if not 0 <= index < n:
            raise UserError(f"classifier {path!r}: label {index} out of range; it has {n} classes ({id2label})")
        return index

    @torch.no_grad()
    def score(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(completions), self.batch_size):
            texts = [_plain(c) for c in completions[start : start + self.batch_size]]
            pair = [_plain(p) for p in prompts[start : start + self.batch_size]] if self.with_prompt else None
            enc = self.tokenizer(
                *((pair, texts) if pair else (texts,)),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            out.append(self.model(**enc).logits[:, self.label].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
