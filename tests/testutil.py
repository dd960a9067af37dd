"""Plain helpers shared by test modules (fixtures live in conftest.py, which is not importable by
name: tests/ and tests/feedback/ each have one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhfkit.models.tiny import EOS_TOKEN, TinyModelConfig, build_tiny_model, train_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHS = ("gpt2", "llama", "qwen2")
# A minimal chat template for the tiny tokenizers, so conversations render as an instruct model's would.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running `python -m rlhfkit.cli` on this checkout's code in a child process."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


CLI = [sys.executable, "-m", "rlhfkit.cli"]
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def accelerate_launch(
    args: list[str], config: str = "ddp.yaml", path: Path | None = None, script: Path | None = None, **env: str
) -> subprocess.Popen:
    """`accelerate launch --config_file configs/accelerate/CONFIG -m rlhfkit.cli ARGS` in a child process
    (2 processes; on a CPU-only machine the engine forms a gloo group); `path` goes first on PYTHONPATH
    (e.g. a reward module); `script` runs instead of `-m rlhfkit.cli` (e.g. PAUSED_CLI written to a
    file). Output: stdout, with stderr in it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config)]
    command += ["--main_process_port", "0", *([str(script)] if script else ["-m", "rlhfkit.cli"]), *args]
    child_env = subprocess_env(**env)
    if path is not None:
        child_env["PYTHONPATH"] = os.pathsep.join([str(path), child_env["PYTHONPATH"]])
    return subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_tree(child: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of
    their own, so a process-group kill would leave them running)."""
    import signal

    import psutil  # accelerate's own dependency

    for process in [*psutil.Process(child.pid).children(recursive=True), psutil.Process(child.pid)]:
        process.send_signal(signal.SIGKILL)


def kill_at_first_checkpoint(child: subprocess.Popen, checkpoints: Path, timeout: float = 180) -> None:
    """Wait until a launched run has written a checkpoint (a `step-*` folder exists only once
    complete), then SIGKILL it and every process under it: a crash with no chance to clean up."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not list(checkpoints.glob("step-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_tree(child)
    out, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL, out.decode()[-4000:]


def finish(child: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a child process; its output, after checking that it succeeded."""
    out, _ = child.communicate(timeout=timeout)
    text = out.decode()
    assert child.returncode == 0, text[-4000:]
    return text


# ---- runs killed mid-way (resume tests)

# `rlhfkit ARGS` with a pause before every optimizer step, so that a test can kill it between two
# checkpoints; the pause changes no number the run computes.
PAUSED_CLI = """
import os, sys, time
from rlhfkit.engine.trainer import Engine
from rlhfkit.cli import main
step = Engine.optimizer_step
def paused_step(self):
    time.sleep(float(os.environ["RLHFKIT_TEST_STEP_PAUSE"]))
    return step(self)
Engine.optimizer_step = paused_step
sys.exit(main(sys.argv[1:]))
"""


def kill_after_first_checkpoint(args: list[str], checkpoints: Path, pause: float = 0.2, timeout: float = 120) -> int:
    """Run `rlhfkit ARGS` in a child process, SIGKILL it (no chance to clean up) as soon as its first
    checkpoint exists, and return the optimizer step that checkpoint holds.

    The child uses the test process's thread count, so that its numbers are bit-identical to an
    uninterrupted run in this process."""
    import signal
    import time

    import torch

    env = subprocess_env(
        RLHFKIT_TEST_STEP_PAUSE=str(pause),
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(SRC), os.environ.get("PYTHONPATH", "")]),
    )
    child = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    # a `step-*` folder exists only once completely written (it is renamed from a temporary folder)
    while not list(checkpoints.glob("step-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    return int(max(p.name for p in checkpoints.glob("step-*")).removeprefix("step-"))


def config_file(cfg: Any, path: Path) -> Path:
    """A stage's config object written as the YAML file `--config` reads."""
    import yaml

    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


# ---- PPO runs (test_ppo*.py)


def e_frequency(prompt: Any, completion: str) -> float:
    """A reward a random model can learn: 10 x the share of the letter 'e' in the response."""
    return 10 * completion.count("e") / max(1, len(completion))


def write_prompts(path: Path, n: int = 16) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Tell me about thing number {i}"}) + "\n")
    return path


def ppo_config(out: Path, model_dir: Path, prompts: Path, **sections: Any) -> Any:
    """A small, fast PPO config (`rlhfkit.stages.ppo.Config`); `sections` override whole keys (dicts
    are merged one level deep)."""
    from rlhfkit.stages.ppo import Config

    data: dict[str, Any] = {
        "output_dir": str(out),
        "prompts": str(prompts),
        "model": {"path": str(model_dir)},
        "sampling": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "missing_eos_penalty": None},
        "stop": {"max_steps": 2},
        "train": {"lr": 1e-3, "scheduler": "constant"},
        "log_samples_every": 1,
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return Config.model_validate(data)


# ---- `rlhfkit loop` runs (test_loop.py, feedback/test_loop_server.py)

LOOP_TINY = [
    "rounds=2",
    "prompts_per_round=4",
    "candidates=[{model: current, k: 1, sampling: {max_new_tokens: 8}}, "
    "{model: previous, k: 1, sampling: {max_new_tokens: 8}}, {model: sft, k: 1, sampling: {max_new_tokens: 8}}]",
    "labels.poll_s=0.05",
    "rm.train.max_steps=3",
    "rm.train.batch_size=4",
    "rm.data.valid_fraction=0.25",
    "rm.normalize.max_prompts=4",
    "rm.normalize.samples_per_prompt=1",
    "rm.normalize.sampling.max_new_tokens=8",
    "ppo.stop.max_steps=3",
    "ppo.ppo.batch_size=4",
    "ppo.ppo.mini_batch_size=4",
    "ppo.sampling.max_new_tokens=8",
    "ppo.train.save_every=1",
    "eval.samples_per_prompt=1",
    "eval.bootstrap=20",
    "eval.sampling.max_new_tokens=8",
]


def loop_inputs(root: Path) -> dict[str, Path]:
    """A tiny SFT model, a pool of 10 prompts (2 rounds of 4 leave 2) and 4 held-out prompts."""
    heldout = root / "heldout.jsonl"
    rows = [{"id": f"h{i}", "prompt": f"How do I fix bike {i}?"} for i in range(4)]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = write_prompts(root / "pool.jsonl", 10)
    return {"sft": make_test_model("gpt2", root / "sft"), "pool": pool, "heldout": heldout}


def loop_overrides(out: Path, inputs: dict[str, Path], *extra: str) -> list[str]:
    """A tiny 2-round `rlhfkit loop` (KEY=VALUE overrides; `extra` come last and win)."""
    paths = [f"output_dir={out}", f"sft={inputs['sft']}", f"pool={inputs['pool']}", f"eval.prompts={inputs['heldout']}"]
    return [*paths, *LOOP_TINY, *extra]


# ---- tiny models


def tokenizer_without_pad(texts: Iterable[str], eos: bool = True, vocab_size: int = 280) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose vocabulary has no pad token at all (like GPT-2's or Llama's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN if eos else None)


def make_test_model(
    arch: str, out_dir: str | Path, texts: Iterable[str] | None = None, pad: bool = True, **size: Any
) -> Path:
    """Save a tiny untrained model + tokenizer folder, built from a config (no download); `pad=False`:
    a vocabulary without a pad token, like GPT-2's and Llama's."""
    texts = (
        list(texts)
        if texts is not None
        else [
            "User: How do I make tea?\nAssistant: Boil water and steep the leaves for three minutes.",
            "The quick brown fox jumps over the lazy dog. Good answers are kind and clear.",
        ]
        * 4
    )
    vocab_size = size.pop("vocab_size", 300)
    tokenizer = train_tokenizer(texts, vocab_size) if pad else tokenizer_without_pad(texts, vocab_size=vocab_size)
    cfg = TinyModelConfig(arch=arch, **{"n_layer": 2, "d_model": 32, "n_head": 4, **size})
    model = build_tiny_model(cfg, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
