"""Benchmark (not a test): rlhfkit's PPO against TRL's last PPO trainer (`trl.experimental.ppo`, trl 1.12).

The same tiny policy and reward model, the same prompts, batch, minibatch, PPO epochs, response
length and sampling temperature go through both, in one run. Each configuration runs in its own
subprocess (so its peak memory is its own), twice, interleaved, and the median is reported:

    seconds per PPO step (rollout + update), response tokens/s, peak RSS, and MFU: model FLOPs per
    step / (seconds per step x the matmul peak of this CPU, measured here with the same threads).

Configurations: `ours` (value head on the policy: one trunk forward gives logits and values),
`ours-critic` (a separate critic initialised from the reward model, like TRL), `trl` (policy +
separate reference copy + value model from the reward model, as in TRL's examples).

`--memory` instead compares peak memory of our LoRA mode (reference = base with the adapter
disabled) against full fine-tuning with a separate reference copy, on a ~40M-parameter Llama.

    .venv-bench/bin/python bench/ppo_vs_trl.py            # see bench/README.md to build .venv-bench
    .venv-bench/bin/python bench/ppo_vs_trl.py --memory
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
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rlhfkit, whatever the venv has installed
from rlhfkit.data.chat import PROMPT_TEMPLATE, RESPONSE_SEPARATOR  # noqa: E402

SUBJECTS = ["tea", "coffee", "a garden", "a bicycle", "the river", "a small dog", "bread", "the moon", "a song", "rain"]
ASKS = ["How do I look after {}?", "What is good about {}?", "Can you tell me about {}?", "Why do people like {}?"]
ANSWERS = [
    "Start slowly and be patient with {}.",
    "Most people enjoy {} in the morning.",
    "Keep {} clean and check it every week.",
    "Ask a friend who knows {} well.",
    "There is no single answer, but {} rewards care.",
]


def dialogues(n: int, seed: int = 0) -> list[str]:
    """Short synthetic User/Assistant exchanges (one to three answer sentences)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        answer = " ".join(rng.choice(ANSWERS).format(subject) for _ in range(rng.randint(1, 3)))
        out.append(f"User: {rng.choice(ASKS).format(subject)}\nAssistant: {answer}")
    return out


# ------------------------------------------------------------------------------------ assets


def build_assets(root: Path, arch: str, layers: int, d_model: int, vocab: int, pretrain_steps: int) -> dict[str, str]:
    """A policy pretrained for a few steps on dialogues with our `pretrain` stage, so that, like an
    SFT model, it writes answers and ends them with EOS at varying lengths; a reward model (the
    policy's trunk with a random one-output head); and prompts. All saved as ordinary folders/files."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.engine.trainer import TrainConfig
    from rlhfkit.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer
    from rlhfkit.stages import pretrain

    texts = dialogues(2000)
    size = TinyModelConfig(arch=arch, n_layer=layers, d_model=d_model, n_head=max(2, d_model // 64))
    if pretrain_steps:
        (root / "dialogues.txt").write_text("\n\n".join(texts))
        data = pretrain.DataConfig(train_files=[str(root / "dialogues.txt")], block_size=64)
        train = TrainConfig(lr=3e-3, batch_size=16, max_steps=pretrain_steps, warmup_steps=10, log_every=50)
        model = pretrain.PretrainModelConfig(**size.model_dump())
        policy = pretrain.run(pretrain.Config(output_dir=str(root / "pretrain"), vocab_size=vocab, data=data,
                                              model=model, train=train))  # fmt: skip
    else:  # untrained (for memory measurements, where only the size matters)
        tok = train_tokenizer(texts, vocab_size=vocab)
        policy = root / "policy"
        build_tiny_model(size, tok).save_pretrained(policy)
        tok.save_pretrained(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.score.weight, std=1 / (d_model + 1) ** 0.5)  # PPO detail 1
    rm.save_pretrained(root / "rm")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (policy / f).exists():
            (root / "rm" / f).write_bytes((policy / f).read_bytes())
    with (root / "prompts.jsonl").open("w") as f:
        for i, text in enumerate(dialogues(256, seed=1)):
            f.write(json.dumps({"id": str(i), "prompt": text.split("\n")[0].removeprefix("User: ")}) + "\n")
    return {"policy": str(policy), "rm": str(root / "rm"), "prompts": str(root / "prompts.jsonl")}


class SequenceClassifierReward:
    """The reward model as a reward source: its one logit at the last token of prompt + response.

    Prompt and response are tokenized separately and concatenated, as TRL's query + response ids.
    """

    def __init__(self, path: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def score(self, prompts: list[str], completions: list[str]) -> Any:
        import torch

        encode = partial(self.tok, add_special_tokens=False)
        rows = [
            encode(PROMPT_TEMPLATE.format(prompt=p))["input_ids"] + encode(RESPONSE_SEPARATOR + c)["input_ids"]
            for p, c in zip(prompts, completions, strict=True)
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        mask = (ids != self.tok.pad_token_id).long()
        with torch.no_grad():  # no KV cache, as TRL's get_reward
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0]


# ----------------------------------------------------------------------------------- workers


def rss_mb() -> float:
    """This process's peak resident memory so far (MB).

    Why VmHWM and not `getrusage(...).ru_maxrss`: Linux carries ru_maxrss over fork and exec, so a
    worker spawned by a parent that built bigger assets would report the parent's peak."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024  # kB


def run_ours(a: argparse.Namespace, assets: dict[str, str], out: Path) -> dict[str, Any]:
    from rlhfkit.engine.metrics import read_metrics
    from rlhfkit.stages.ppo import Config, train_ppo

    cfg = Config.model_validate(
        {
            "output_dir": str(out),
            "prompts": assets["prompts"],
            "model": {"path": assets["policy"], "lora": {"r": 16, "alpha": 32} if a.lora else None},
            "sampling": {
                "max_new_tokens": a.response_length,
                "temperature": a.temperature,
                "stop": [],
                "batch_size": a.batch,
            },
            "ppo": {
                "batch_size": a.batch,
                "mini_batch_size": a.mini,
                "epochs": a.epochs,
                "missing_eos_penalty": None,
                "value_init": "reward_model" if a.impl == "ours-critic" else "zero",
                "critic_path": assets["rm"],
                "kl": {"beta": 0.05, "kind": "k1"},
            },
            "stop": {"max_steps": a.steps + 1},
            "train": {"lr": a.lr, "adam_eps": 1e-8, "scheduler": "linear", "min_lr_ratio": 0.0, "log_every": 1000},
            "log_samples_every": 0,
        }
    )
    train_ppo(cfg, reward=SequenceClassifierReward(assets["rm"]))
    rows = read_metrics(out / "metrics.jsonl")
    periods = [b["time"] - a_["time"] for a_, b in zip(rows, rows[1:], strict=False)]  # first step = warm-up
    length = statistics.mean(r["response_length"] for r in rows)
    return {"step_s": statistics.median(periods), "response_tokens": length}


def run_trl(a: argparse.Namespace, assets: dict[str, str], out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(assets["policy"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
    queries = [tok(PROMPT_TEMPLATE.format(prompt=p), add_special_tokens=False)["input_ids"] for p in prompts]
    ds = Dataset.from_dict({"input_ids": queries})
    policy = AutoModelForCausalLM.from_pretrained(assets["policy"])
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    ref = None if a.lora else AutoModelForCausalLM.from_pretrained(assets["policy"])
    rm = AutoModelForSequenceClassification.from_pretrained(assets["rm"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(assets["rm"], num_labels=1)
    args = PPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=a.batch // a.mini,
        num_ppo_epochs=a.epochs,
        total_episodes=a.batch * (a.steps + 1),
        local_rollout_forward_batch_size=a.batch,
        response_length=a.response_length,
        temperature=a.temperature,
        stop_token="eos",
        missing_eos_penalty=None,
        kl_coef=0.05,
        kl_estimator="k1",
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    lengths: list[float] = []  # generated tokens per response, up to and including EOS
    generate = policy.generate

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        new = out.sequences[:, kwargs["input_ids"].shape[1] :]
        is_eos = new == tok.eos_token_id
        ends = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
        lengths.extend(ends.tolist())
        return out

    policy.generate = counting_generate
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=rm,
        train_dataset=ds,
        value_model=value,
        eval_dataset=ds.select(range(a.batch)),
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    torch.manual_seed(0)
    trainer.train()
    periods = [b - a_ for a_, b in zip(stamps[1:], stamps[2:], strict=False)]  # first step = warm-up
    return {"step_s": statistics.median(periods), "response_tokens": statistics.mean(lengths)}


def worker(a: argparse.Namespace) -> None:
    import peft  # noqa: F401  (imported before the baseline: its memory is no model's)
    import torch

    if a.impl == "trl":
        import trl.experimental.ppo  # noqa: F401
    else:
        import rlhfkit.stages.ppo  # noqa: F401
    torch.set_num_threads(a.threads)
    # Numbers below 1e-38 (saturated GELUs, masked attention) are ~100x slower on x86 CPUs; both
    # implementations get them flushed to zero, like they get the same number of threads.
    torch.set_flush_denormal(True)
    base = rss_mb()  # after the imports: the floor every configuration pays
    assets = json.loads(a.assets)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_trl if a.impl == "trl" else run_ours
        result = run(a, assets, Path(tmp) / "out")
    result.update(peak_rss_mb=rss_mb(), base_rss_mb=base)
    Path(a.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------- measurement


def matmul_peak_gflops(threads: int, n: int = 1024, repeats: int = 20, clock: Any = time.perf_counter) -> float:
    """Best float32 GEMM throughput of this CPU with `threads` threads (the MFU denominator).

    `clock=time.process_time` (one thread): GFLOP per CPU-second, which a busy machine hardly moves."""
    import torch

    torch.set_num_threads(threads)
    x, y = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        x @ y
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        x @ y
        best = min(best, clock() - t)
    return 2 * n**3 / best / 1e9


def matmul_params(path: str, causal: bool) -> int:
    """Parameters a token's forward multiplies by: all but the embedding lookups, LM head included."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = cls.from_config(AutoConfig.from_pretrained(path))
    head = model.get_output_embeddings().weight.numel() if causal else 0
    return model.num_parameters(exclude_embeddings=True) + head


def model_flops(impl: str, n_pol: int, n_rm: int, a: argparse.Namespace, prompt_len: float, resp: float) -> float:
    """Model FLOPs of one PPO step, as each implementation's model is built (2N per token forward,
    6N forward + backward, 4N with LoRA: frozen weights get no gradient). Both: generation (whose
    outputs give the old log-probs), reference forward, reward forward, policy updates. With a
    separate critic (ours-critic, TRL): its forward at rollout and its forward + backward in every
    update (TRL trains its critic fully even with LoRA; ours gives it LoRA too)."""
    seq = a.batch * (prompt_len + resp)
    train = 4 if a.lora else 6
    flops = 2 * n_pol * seq * 2 + 2 * n_rm * seq + a.epochs * train * n_pol * seq
    if impl != "ours":
        critic_train = 6 if impl == "trl" else train
        flops += 2 * n_rm * seq + a.epochs * critic_train * n_rm * seq
    return flops


def spawn(impl: str, a: argparse.Namespace, assets: dict[str, str], lora: bool = False, threads: int = 0) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            impl,
            "--assets",
            json.dumps(assets),
            "--result",
            f.name,
            "--threads",
            str(threads or a.threads),
            "--batch",
            str(a.batch),
            "--mini",
            str(a.mini),
            "--epochs",
            str(a.epochs),
            "--response-length",
            str(a.response_length),
            "--steps",
            str(a.steps),
            "--temperature",
            str(a.temperature),
            "--lr",
            str(a.lr),
        ] + (["--lora"] if lora else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(f.name).read_text())


def speed(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp), a.arch, a.layers, a.d_model, a.vocab, a.pretrain_steps)
        n_pol = matmul_params(assets["policy"], causal=True)
        n_rm = matmul_params(assets["rm"], causal=False)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(assets["policy"])
        prompts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
        prompt_len = statistics.mean(
            len(tok(PROMPT_TEMPLATE.format(prompt=p), add_special_tokens=False)["input_ids"]) for p in prompts
        )
        peak = matmul_peak_gflops(a.threads)
        impls = ["ours", "ours-critic", "trl"]
        runs: dict[str, list[dict]] = {k: [] for k in impls}
        for _ in range(a.repeats):  # interleaved, so a busy moment of the machine hits all alike
            for impl in impls:
                runs[impl].append(spawn(impl, a, assets, lora=a.lora))
                print(f"  {impl}: {runs[impl][-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    print(
        f"\nPPO step, {a.arch} policy {n_pol / 1e6:.2f}M matmul params, reward/value model {n_rm / 1e6:.2f}M; "
        f"batch {a.batch}, minibatch {a.mini}, {a.epochs} epochs, prompt ~{prompt_len:.0f} + response "
        f"<= {a.response_length} tokens, {'LoRA' if a.lora else 'full fine-tuning'}, {a.threads} thread(s); "
        f"median of {a.repeats} runs x {a.steps} steps"
    )
    print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s\n")
    columns = ["s/step", "resp len", "tokens/s", "peak MB", "(+ over imports)", "MFU", "speed-up"]
    print(f"{'':<12}" + "".join(f"{c:>{w}}" for c, w in zip(columns, (9, 9, 10, 9, 17, 8, 10), strict=True)))
    trl_step = statistics.median(r["step_s"] for r in runs["trl"])
    for impl in impls:
        step = statistics.median(r["step_s"] for r in runs[impl])
        resp = statistics.mean(r["response_tokens"] for r in runs[impl])
        mem = max(r["peak_rss_mb"] for r in runs[impl])
        extra = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in runs[impl])
        mfu = model_flops(impl, n_pol, n_rm, a, prompt_len, resp) / step / (peak * 1e9)
        print(
            f"{impl:<12}{step:>9.3f}{resp:>9.1f}{a.batch * resp / step:>10.0f}{mem:>9.0f}{extra:>17.0f}"
            f"{100 * mfu:>7.1f}%{trl_step / step:>9.2f}x"
        )


def memory(a: argparse.Namespace) -> None:
    """Peak RSS of LoRA (shared base) vs full fine-tuning (+ separate reference) on a ~40M Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM

    a.batch, a.mini, a.response_length, a.steps = 8, 8, 16, 1
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp), "llama", layers=8, d_model=640, vocab=8000, pretrain_steps=0)
        total = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["policy"])).num_parameters()
        full, lora = (spawn("ours", a, assets, lora=lora) for lora in (False, True))
    full_mb, lora_mb = (r["peak_rss_mb"] - r["base_rss_mb"] for r in (full, lora))
    print(
        f"\nPPO peak memory above the imports, Llama {total / 1e6:.1f}M params "
        f"(float32 weights {4 * total / 2**20:.0f} MB), batch 8, response 16 tokens, {a.threads} thread(s):"
    )
    print(f"  full fine-tuning + separate reference copy: {full_mb:8.0f} MB")
    print(f"  LoRA, reference = adapter disabled:         {lora_mb:8.0f} MB  ({lora_mb / full_mb:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", action="store_true", help="LoRA vs full fine-tuning peak memory instead")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama", "qwen2"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--pretrain-steps", type=int, default=150, help="steps of pretraining the policy on dialogues")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mini", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-6, help="small: the policy (and so the lengths) barely move")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.impl = a.worker
        worker(a)
    elif a.memory:
        memory(a)
    else:
        speed(a)


if __name__ == "__main__":
    main()
