"""Benchmark (not a test): rlhfkit's critic-free RL (`rlhfkit ppo ppo.algorithm=grpo|rloo`) against
TRL's `GRPOTrainer` and `RLOOTrainer`, at equal settings.

The same tiny GPT-2 policy (built from a config and pretrained a few steps on dialogues, as in
`bench/ppo_vs_trl.py`, whose helpers this reuses), the same prompts, prompts per step, generations
per prompt (K), maximum response length, sampling temperature, KL coefficient, learning rate and
schedule, and the same deterministic reward function (`reward_texts`) go through both. One step =
one rollout of `batch` responses (batch / K prompts x K) and one optimizer step on all of them
(TRL: `steps_per_generation=1`, `num_iterations=1`; ours: `mini_batch_size=batch`, `epochs=1`).
GRPO: group-normalised advantages, KL as a k3 loss term (TRL's `beta`; `loss_type="grpo"`, ours
`kl.mode=loss kl.kind=k3`). RLOO: leave-one-out baseline, KL in the reward (k1, as TRL's RLOO).

Each configuration runs in its own subprocess (so its peak memory is its own), the configurations
are interleaved and repeated, and the medians are reported: seconds and CPU-seconds per step (the
time between two calls of the reward function, which both call once per step; the first step is a
warm-up), response tokens per second and per CPU-second (process CPU time: the figure to trust on a
shared machine, where wall-clock time also measures the neighbours), peak RSS (VmHWM), and MFU
(model FLOPs per step, counted as in `ppo_vs_trl.model_flops`: generation + reference forward +
one forward and backward; / CPU-seconds per step / the float32 matmul peak per CPU-second measured
here with the same threads).

`ours-grpo-plain` / `ours-rloo-plain` (not run by default) are rlhfkit with `ppo.share_prompt=false`:
every response its own row in the reference pass and the update (the K responses are still sampled
from one prefill of their prompt), to measure what sharing the prompt's tokens gives.

GRPOTrainer and RLOOTrainer need trl >= 1.0 (this was measured with trl 1.16.0, the newest; `make
bench-venv-new` builds `.venv-bench-new` with it):

    .venv-bench-new/bin/python bench/grpo_vs_trl.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rlhfkit, whatever the venv has installed
sys.path.insert(0, str(ROOT / "bench"))
from ppo_vs_trl import build_assets, matmul_params, matmul_peak_gflops, model_flops, rss_mb  # noqa: E402

from rlhfkit.data.chat import PROMPT_TEMPLATE  # noqa: E402

IMPLS = {"ours-grpo": "grpo", "trl-grpo": "grpo", "ours-rloo": "rloo", "trl-rloo": "rloo"}
# rlhfkit with ppo.share_prompt=false (every response its own row in the reference pass and update)
PLAIN = {"ours-grpo-plain": "grpo", "ours-rloo-plain": "rloo"}
CLOCK: list[tuple[float, float]] = []  # (wall, process CPU time) at every reward call: once per step in both


def reward_texts(completions: list[str]) -> list[float]:
    """A deterministic reward both libraries call on the decoded responses: distinct words, capped.

    Both call it exactly once per step (after sampling), so the time between two calls is one whole
    step (update + the next rollout) in either library: the same clock for both."""
    CLOCK.append((time.perf_counter(), time.process_time()))
    return [min(len(set(c.split())), 12) / 12 for c in completions]


class TextReward:
    """`reward_texts` as an rlhfkit reward source."""

    def score(self, prompts: list[Any], completions: list[str]) -> Any:
        import torch

        return torch.tensor(reward_texts(list(completions)))


def trl_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """`reward_texts` as a TRL reward function."""
    return reward_texts(completions)


# ----------------------------------------------------------------------------------- workers


def run_ours(a: argparse.Namespace, algorithm: str, assets: dict[str, str], out: Path) -> dict[str, Any]:
    from rlhfkit.engine.metrics import read_metrics
    from rlhfkit.stages.ppo import Config, train_ppo

    kl = {"beta": a.beta, "kind": "k3", "mode": "loss"} if algorithm == "grpo" else {"beta": a.beta, "kind": "k1"}
    cfg = Config.model_validate(
        {
            "output_dir": str(out),
            "prompts": assets["prompts"],
            "model": {"path": assets["policy"]},
            "sampling": {"max_new_tokens": a.response_length, "temperature": a.temperature, "stop": [],
                         "batch_size": a.batch},  # fmt: skip
            "ppo": {
                "algorithm": algorithm,
                "num_generations": a.k,
                "batch_size": a.batch,
                "mini_batch_size": a.batch,
                "epochs": 1,
                "missing_eos_penalty": None,
                "kl": kl,
                "share_prompt": a.worker not in PLAIN,
            },
            "stop": {"max_steps": a.steps + 1},
            "train": {"lr": a.lr, "adam_eps": 1e-8, "scheduler": "linear", "min_lr_ratio": 0.0, "log_every": 1000},
            "log_samples_every": 0,
        }
    )
    train_ppo(cfg, reward=TextReward())
    return {"response_tokens": statistics.mean(r["response_length"] for r in read_metrics(out / "metrics.jsonl"))}


def run_trl(a: argparse.Namespace, algorithm: str, assets: dict[str, str], out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    if algorithm == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer

        extra: dict[str, Any] = {"loss_type": "grpo"}
    else:
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as TRLTrainer

        extra = {}
    tok = AutoTokenizer.from_pretrained(assets["policy"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
    ds = Dataset.from_dict({"prompt": [PROMPT_TEMPLATE.format(prompt=p) for p in prompts]})
    args = TRLConfig(
        output_dir=str(out),
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=a.k,
        max_completion_length=a.response_length,
        temperature=a.temperature,
        beta=a.beta,
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        max_steps=a.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=0,
        **extra,
    )
    trainer = TRLTrainer(
        model=assets["policy"],  # TRL loads it, and its reference copy, from the folder
        reward_funcs=trl_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
    )
    torch.manual_seed(0)
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"response_tokens": statistics.mean(lengths)}


def worker(a: argparse.Namespace) -> None:
    import torch

    if a.worker.startswith("trl"):
        import trl  # noqa: F401
    else:
        import rlhfkit.stages.ppo  # noqa: F401
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # both, as in ppo_vs_trl.py (rlhfkit's ppo sets it itself)
    base = rss_mb()  # after the imports: the floor every configuration pays
    assets = json.loads(a.assets)
    run = run_trl if a.worker.startswith("trl") else run_ours
    with tempfile.TemporaryDirectory() as tmp:
        result = run(a, (IMPLS | PLAIN)[a.worker], assets, Path(tmp) / "out")
    if len(CLOCK) != a.steps + 1:
        raise SystemExit(f"the reward was called {len(CLOCK)} times in {a.steps + 1} steps: the step clock is off")
    steady = CLOCK[1:]  # from the first reward call on: the warm-up step's update is not timed
    result.update(
        step_s=statistics.median(b[0] - a_[0] for a_, b in zip(steady, steady[1:], strict=False)),
        cpu_step_s=statistics.median(b[1] - a_[1] for a_, b in zip(steady, steady[1:], strict=False)),
        peak_rss_mb=rss_mb(),
        base_rss_mb=base,
    )
    Path(a.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------- measurement


def spawn(impl: str, a: argparse.Namespace, assets: dict[str, str]) -> dict[str, Any]:
    """One configuration in a fresh process (its own peak memory); its result dict."""
    settings = ("threads", "batch", "k", "response_length", "steps", "temperature", "beta", "lr")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", impl, "--assets", json.dumps(assets), "--result", f.name]
        cmd += [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in settings]
        path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(f.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--pretrain-steps", type=int, default=150, help="steps of pretraining the policy on dialogues")
    p.add_argument("--batch", type=int, default=64, help="responses per step (prompts x k)")
    p.add_argument("--k", type=int, default=4, help="generations per prompt")
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-6, help="small: the policy (and so the lengths) barely move")
    p.add_argument("--steps", type=int, default=4, help="steps per run after a warm-up step (steps - 1 timed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impls", nargs="+", choices=list(IMPLS | PLAIN), default=list(IMPLS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    import trl
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp), "gpt2", a.layers, a.d_model, a.vocab, a.pretrain_steps)
        n_pol = matmul_params(assets["policy"], causal=True)
        tok = AutoTokenizer.from_pretrained(assets["policy"])
        prompts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
        prompt_len = statistics.mean(
            len(tok(PROMPT_TEMPLATE.format(prompt=p), add_special_tokens=False)["input_ids"]) for p in prompts
        )
        # per CPU-second, like the steps' MFU below: on a shared machine wall-clock time also measures the neighbours
        peak = matmul_peak_gflops(a.threads, clock=time.process_time)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in a.impls}
        for _ in range(a.repeats):  # interleaved, so a busy moment of the machine hits all alike
            for impl in a.impls:
                runs[impl].append(spawn(impl, a, assets))
                print(f"  {impl}: {runs[impl][-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    print(
        f"\ncritic-free RL step, gpt2 policy {n_pol / 1e6:.2f}M matmul params; {a.batch} responses per step "
        f"({a.batch // a.k} prompts x {a.k}), one optimizer step on all of them; prompt ~{prompt_len:.0f} + "
        f"response <= {a.response_length} tokens; {a.threads} thread(s); trl {trl.__version__}; "
        f"median of {a.repeats} runs x {a.steps - 1} timed steps"
    )
    print(f"measured float32 matmul peak: {peak:.1f} GFLOP per CPU-second\n")
    flops_args = argparse.Namespace(batch=a.batch, epochs=1, lora=False)
    columns = ["s/step", "CPU-s", "resp len", "tokens/s", "tok/CPU-s", "peak MB", "MFU", "vs TRL GRPO (wall, CPU)"]
    widths = (9, 9, 9, 10, 11, 9, 8, 26)
    print(f"{'':<16}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    trl_grpo, trl_grpo_cpu = (
        statistics.median(r[k] for r in runs["trl-grpo"]) if "trl-grpo" in runs else float("nan")
        for k in ("step_s", "cpu_step_s")
    )
    for impl, rows in runs.items():
        step = statistics.median(r["step_s"] for r in rows)
        resp = statistics.mean(r["response_tokens"] for r in rows)
        cpu_step = statistics.median(r["cpu_step_s"] for r in rows)
        mem = max(r["peak_rss_mb"] for r in rows)
        mfu = model_flops("ours", n_pol, 0, flops_args, prompt_len, resp) / cpu_step / (peak * 1e9)
        print(
            f"{impl:<16}{step:>9.3f}{cpu_step:>9.3f}{resp:>9.1f}{a.batch * resp / step:>10.0f}"
            f"{a.batch * resp / cpu_step:>11.0f}{mem:>9.0f}{100 * mfu:>7.1f}%{trl_grpo / step:>9.2f}x"
            f"{trl_grpo_cpu / cpu_step:>9.2f}x"
        )


if __name__ == "__main__":
    main()
