"""Where rlhfkit's PPO step spends its time, on `ppo_vs_trl.py`'s models and settings.

Times each phase with perf_counter (sampling, the reward source, the reference pass and rollout
heads in `score_tokens`, the minibatch forwards and backwards, the optimizer) and prints seconds
per step, averaged over all steps including the first:

    .venv-bench/bin/python bench/ppo_phases.py --threads 1 [--lora]

`--algorithm grpo|rloo` times the critic-free step of `grpo_vs_trl.py` instead (its settings and
reward function; `--cpu`: process CPU time instead of wall-clock time, for a shared machine):

    python bench/ppo_phases.py --threads 1 --algorithm grpo --cpu
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_vs_trl as bench  # noqa: E402  (puts this checkout's src/ first on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="steps after the first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--algorithm", choices=["ppo", "grpo", "rloo"], default="ppo")
    p.add_argument("--cpu", action="store_true", help="process CPU time instead of wall-clock time")
    a = p.parse_args()
    import torch

    import rlhfkit.stages.ppo as ppo
    from rlhfkit.engine.trainer import Engine

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # as the benchmark's workers
    seconds: dict[str, float] = collections.defaultdict(float)

    clock = time.process_time if a.cpu else time.perf_counter

    def timed(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return f(*args, **kwargs)
            finally:
                seconds[name] += clock() - t

        return run

    ppo.sample = timed("sampling", ppo.sample)
    ppo.score_tokens = timed("reference + rollout heads", ppo.score_tokens)
    ppo.ppo_loss = timed("minibatch forwards", ppo.ppo_loss)
    Engine.backward = timed("minibatch backwards", Engine.backward)  # type: ignore[method-assign]
    Engine.optimizer_step = timed("optimizer", Engine.optimizer_step)  # type: ignore[method-assign]
    bench.SequenceClassifierReward.score = timed("reward", bench.SequenceClassifierReward.score)  # type: ignore
    args = argparse.Namespace(
        lora=a.lora, response_length=32, temperature=0.7, batch=64, mini=16, epochs=4, steps=a.steps, lr=1e-6,
        impl="ours",
    )  # fmt: skip
    if a.algorithm != "ppo":  # grpo_vs_trl.py's settings (K = 4, one optimizer step per rollout)
        import grpo_vs_trl

        args = argparse.Namespace(
            batch=64, k=4, response_length=32, temperature=0.7, beta=0.05, lr=1e-6, steps=a.steps,
            worker=f"ours-{a.algorithm}",
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        assets = bench.build_assets(Path(tmp), "gpt2", 4, 256, 2048, 150)
        seconds.clear()  # building the assets pretrains the policy
        if a.algorithm == "ppo":
            result = bench.run_ours(args, assets, Path(tmp) / "out")
        else:
            grpo_vs_trl.CLOCK.clear()
            grpo_vs_trl.run_ours(args, a.algorithm, assets, Path(tmp) / "out")
            steady = [c[1] if a.cpu else c[0] for c in grpo_vs_trl.CLOCK[1:]]  # one reward call per step
            result = {"step_s": statistics.median(b - x for x, b in zip(steady, steady[1:], strict=False))}
    steps = a.steps + 1
    what = a.algorithm if a.algorithm != "ppo" else "full fine-tuning" if not a.lora else "LoRA"
    print(f"\n{what}, {a.threads} thread(s), {'CPU' if a.cpu else 'wall-clock'} seconds, mean of {steps} steps:")
    for name, total in seconds.items():
        print(f"  {name:<28}{total / steps:7.3f} s/step")
    print(f"  {'sum':<28}{sum(seconds.values()) / steps:7.3f} s/step (median step {result['step_s']:.3f} s)")


if __name__ == "__main__":
    main()
