"""rlhfkit: reinforcement learning from human feedback, the whole loop in one tool.

Pipeline (one folder per concern):
  data/      formats, validation, the embedded corpus, tokenisation
  models/    loading causal LMs (any `transformers` architecture), tiny test models, reward models
  engine/    the one training engine (accelerate) every stage uses
  stages/    pretrain, generate, sft, rm, ppo, ... one module per CLI subcommand
  rl/        PPO math as pure tensor functions
  feedback/  the labeling web app, aggregation and agreement
  eval/      evaluation and the report
"""

__version__ = "0.1.0"
