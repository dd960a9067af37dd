"""Build a reward source from config: one source, or a weighted sum of several.

reward:
  sources:
    - {model: runs/rm/model}                       # a trained reward model (normalised)
    - {classifier: path/to/toxicity-clf, label: 0, weight: 0.5}   # logit of class 0
    - {function: "mypkg.rewards:brevity", weight: 0.1}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhfkit.config import StrictModel
from rlhfkit.errors import UserError
from rlhfkit.rewards.base import FunctionReward, RewardSource, WeightedSum


class RewardSpec(StrictModel):
    model: str = Field("", description="folder of a reward model trained by `rlhfkit rm`")
    classifier: str = Field("", description="folder or hub id of a sequence classifier")
    label: int | str = Field(0, description="classifier class whose logit is the reward")
    function: str = Field("", description="'module:function' taking (prompt, completion) -> float")
    weight: float = 1.0
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the reward model's weights as loaded (model sources; bfloat16 halves its memory)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSpec:
        given = [k for k in ("model", "classifier", "function") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of model / classifier / function")
        return self


class RewardConfig(StrictModel):
    sources: list[RewardSpec] = Field(default_factory=list)


def build_source(spec: RewardSpec, device: Any = "cpu") -> RewardSource:
    if spec.function:
        return FunctionReward(spec.function)
    if spec.model:
        from rlhfkit.rewards.model import RewardModel

        return RewardModel.load(spec.model, device=device, dtype=spec.dtype)
    from rlhfkit.rewards.classifier import ClassifierReward

    return ClassifierReward(spec.classifier, label=spec.label, device=device)


def build_reward(cfg: RewardConfig, device: Any = "cpu") -> RewardSource:
    if not cfg.sources:
        raise UserError("reward.sources: no reward given; add e.g. {model: runs/rm/model}")
    if len(cfg.sources) == 1 and cfg.sources[0].weight == 1.0:
        return build_source(cfg.sources[0], device)
    return WeightedSum([(s.weight, build_source(s, device)) for s in cfg.sources])
