"""The reward-source interface and the sources that need no model: functions and weighted sums."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from rlhfkit.data.formats import Text
from rlhfkit.errors import UserError


@runtime_checkable
class RewardSource(Protocol):
    """Scores completions: `score(prompts, completions)` returns a float tensor of shape (N,)."""

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> torch.Tensor: ...


def import_object(spec: str) -> object:
    """Import `package.module:attribute` (the way console scripts name functions)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{spec!r}: expected 'module:function', e.g. mypkg.rewards:length_reward")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{spec!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}") from None


class FunctionReward:
    """A deterministic Python function `f(prompt, completion) -> float` as a reward source."""

    def __init__(self, fn: Callable[[Text, str], float] | str):
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise UserError(f"{fn!r} is not callable")

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(self.fn(p, c)) for p, c in zip(prompts, completions, strict=True)])


class WeightedSum:
    """Σ wᵢ·sourceᵢ: e.g. a reward model plus a small penalty from a toxicity classifier."""

    def __init__(self, parts: Sequence[tuple[float, RewardSource]]):
        if not parts:
            raise UserError("a weighted reward needs at least one source")
        self.parts = list(parts)

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(len(completions))
        for weight, source in self.parts:
            total += weight * source.score(prompts, completions).float().cpu()
        return total
