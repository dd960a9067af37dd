"""Reward sources: anything that scores (prompt, completion) pairs with one number each.

PPO, evaluation and the AI judges take any `RewardSource`: a trained reward model, a Python
function, a classifier's logit, or a weighted sum of these.
"""

from rlhfkit.rewards.base import FunctionReward, RewardSource, WeightedSum

__all__ = ["FunctionReward", "RewardSource", "WeightedSum"]
