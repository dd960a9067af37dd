"""Benchmark (not a test): rlhfkit's SFT and reward-model training against TRL's SFTTrainer and
RewardTrainer, on the same data, model, batch size, steps and sequence length.

    .venv/bin/python bench/sft_rm_vs_trl.py            # defaults: GPT-2 4x256, 8k vocab, batch 8, 40 steps
    .venv/bin/python bench/sft_rm_vs_trl.py --steps 80 --repeats 5 --threads 1
    .venv/bin/python bench/sft_rm_vs_trl.py --stages rm        # the reward models only

(needs the dev dependencies, TRL included: `pip install -e '.[dev]'`, or PYTHONPATH=src with them installed).

What is measured: each run is a fresh subprocess (same conditions: same pre-tokenized ids, same
freshly initialised model, fp32, no gradient checkpointing, AdamW with a constant LR, logging every
10 steps, one checkpoint written at the end). Throughput is samples (SFT: demonstrations, RM:
preference pairs) per second over the whole training call (`Engine.fit` / `Trainer.train`).
Samples per CPU-second (process CPU time) is the figure to trust on a shared or busy machine,
where wall-clock time also measures the neighbours.
Memory is the process's peak resident set size during that call (sampled every 10 ms), and its
growth over the resident size just before it (the training state: gradients, optimizer, activations).
Runs alternate between the two libraries; the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


# ---- data and model (built once, shared by every run) ----------------------------------------
def make_assets(root: Path, args: argparse.Namespace) -> None:
    """Demonstrations and pairs of pseudo-words (a lexicon rich enough for an 8k BPE vocabulary, so
    the LM head costs what it costs in a real small model), and a fresh GPT-2 of the given size."""
    from rlhfkit.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

    rng = random.Random(0)
    lexicon = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(6000)]

    def text(n: int) -> str:
        return " ".join(rng.choice(lexicon) for _ in range(n))

    n = args.batch_size * args.steps
    demos = [{"prompt": text(12), "response": text(rng.randint(30, 60))} for _ in range(n)]
    pairs = [{"prompt": text(12), "chosen": text(rng.randint(20, 40)), "rejected": text(30)} for _ in range(n)]
    (root / "data.json").write_text(json.dumps({"demos": demos, "pairs": pairs}))
    corpus = [text(50) for _ in range(4000)]
    tokenizer = train_tokenizer(corpus, vocab_size=8192)
    size = TinyModelConfig(arch="gpt2", n_layer=args.layers, d_model=args.d_model, n_head=4)
    build_tiny_model(size, tokenizer).save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")


def encoded(root: Path, max_length: int) -> tuple[Any, list[tuple[list[int], int]], list[tuple[list[int], list[int]]]]:
    """Token ids for both libraries, made by rlhfkit's own encoding (template + response + EOS)."""
    from rlhfkit.data.chat import encode_example
    from rlhfkit.models.loading import load_tokenizer

    data = json.loads((root / "data.json").read_text())
    tok = load_tokenizer(root / "model")
    sft = [encode_example(tok, d["prompt"], d["response"], max_length=max_length)[:2] for d in data["demos"]]
    pairs = [
        (
            encode_example(tok, p["prompt"], p["chosen"], max_length=max_length)[0],
            encode_example(tok, p["prompt"], p["rejected"], max_length=max_length)[0],
        )
        for p in data["pairs"]
    ]
    return tok, sft, pairs


# ---- measuring -------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a background thread while the block runs."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---- the four runs ---------------------------------------------------------------------------
def train_config(args: argparse.Namespace) -> Any:
    from rlhfkit.engine.trainer import TrainConfig

    return TrainConfig(
        lr=args.lr, batch_size=args.batch_size, max_steps=args.steps, scheduler="constant", log_every=10, seed=0
    )


def trl_kwargs(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="steps",
        save_steps=args.steps,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        max_length=args.max_length,
        seed=0,
    )


def ours_sft(args: argparse.Namespace, root: Path, out: Path) -> PeakRSS:
    from rlhfkit.data.batching import sft_collate
    from rlhfkit.engine.trainer import Engine
    from rlhfkit.models.loading import ModelConfig, load_causal_lm
    from rlhfkit.stages.sft import lm_loss

    tok, examples, _ = encoded(root, args.max_length)
    model, _ = load_causal_lm(ModelConfig(path=str(root / "model")), tok)
    engine = Engine(train_config(args), out)
    with PeakRSS() as m:
        engine.fit(model, examples, sft_collate(tok.pad_token_id), lambda mdl, b: (lm_loss(mdl, b), {}))
    return m


def trl_sft(args: argparse.Namespace, root: Path, out: Path) -> PeakRSS:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhfkit.data.batching import sft_labels

    tok, examples, _ = encoded(root, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    data = Dataset.from_dict(
        {"input_ids": [ids for ids, _ in examples], "labels": [sft_labels(ids, n) for ids, n in examples]}
    )
    trainer = SFTTrainer(model=model, args=SFTConfig(**trl_kwargs(args, out)), train_dataset=data, processing_class=tok)
    with PeakRSS() as m:
        trainer.train()
    return m


def ours_rm(args: argparse.Namespace, root: Path, out: Path) -> PeakRSS:
    from rlhfkit.data.batching import PairGroup, pair_collate
    from rlhfkit.engine.trainer import Engine
    from rlhfkit.rewards.model import init_reward_head, load_backbone
    from rlhfkit.stages.rm import pair_loss

    tok, _, pairs = encoded(root, args.max_length)
    model, _, _ = load_backbone(str(root / "model"), "decoder")
    init_reward_head(model)
    groups = [PairGroup([{"input_ids": c}, {"input_ids": r}], [0], [1], [0.0]) for c, r in pairs]
    engine = Engine(train_config(args), out)
    with PeakRSS() as m:
        engine.fit(model, groups, pair_collate(tok.pad_token_id, share_prefix=True), pair_loss)  # as `rlhfkit rm`
    return m


def trl_rm(args: argparse.Namespace, root: Path, out: Path) -> PeakRSS:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.rewards.model import init_reward_head, load_backbone

    tok, _, pairs = encoded(root, args.max_length)
    model, _, _ = load_backbone(str(root / "model"), "decoder")  # same model, head init and dropout-off
    init_reward_head(model)
    data = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    cfg = RewardConfig(**trl_kwargs(args, out))
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    with PeakRSS() as m:
        trainer.train()
    return m


RUNS = {"rlhfkit-sft": ours_sft, "trl-sft": trl_sft, "rlhfkit-rm": ours_rm, "trl-rm": trl_rm}


def worker(args: argparse.Namespace) -> None:
    """One measured run, in its own process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.assets)
    with tempfile.TemporaryDirectory() as out:
        m = RUNS[args.worker](args, root, Path(out))
    print(
        "RESULT "
        + json.dumps(
            {
                "samples_per_s": args.steps * args.batch_size / m.seconds,
                "samples_per_cpu_s": args.steps * args.batch_size / m.cpu_seconds,
                "seconds": m.seconds,
                "peak_rss_mb": m.peak / 2**20,
                "train_rss_growth_mb": (m.peak - m.before) / 2**20,
            }
        )
    )


def run_interleaved(
    script: str, names: list[str], assets: str, common: list[str], repeats: int, rate: str
) -> dict[str, list[dict[str, float]]]:
    """Each worker of `script` in its own process, the names interleaved within each repeat (so a
    slow spell of a shared machine hits every side alike); their RESULT lines, by name."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            cmd = [sys.executable, script, f"--worker={name}", f"--assets={assets}", *common]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(line.removeprefix("RESULT ")))
            print(f"repeat {r + 1}/{repeats} {name:<12} {results[name][-1][rate]:8.1f} {rate}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", nargs="+", choices=["sft", "rm"], default=["sft", "rm"])
    p.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        make_assets(Path(tmp), args)
        skip = ("worker", "stages")
        common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k not in skip]
        names = [name for name in RUNS if name.split("-")[1] in args.stages]
        results = run_interleaved(__file__, names, tmp, common, args.repeats, "samples_per_s")

    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for name, rows in results.items()}
    print(
        f"\nGPT-2 {args.layers}x{args.d_model}, batch {args.batch_size}, {args.steps} steps, max length "
        f"{args.max_length}, {args.threads} threads, median of {args.repeats}\n"
    )
    header = f"{'stage':<6}{'metric':<30}{'rlhfkit':>10}{'TRL':>10}{'rlhfkit/TRL':>13}"
    print(header + "\n" + "-" * len(header))
    for stage in args.stages:
        ours, trl = med[f"rlhfkit-{stage}"], med[f"trl-{stage}"]
        for key, label in (
            ("samples_per_s", "samples/s (wall clock)"),
            ("samples_per_cpu_s", "samples/CPU-second"),
            ("peak_rss_mb", "peak RSS (MB)"),
            ("train_rss_growth_mb", "RSS growth in training (MB)"),
        ):
            print(f"{stage:<6}{label:<30}{ours[key]:>10.1f}{trl[key]:>10.1f}{ours[key] / trl[key]:>13.2f}")


if __name__ == "__main__":
    main()
