"""PPO throughput on 1 and 2 processes (DDP, `accelerate launch` with configs/accelerate/ddp.yaml),
one thread each, the same global batch: tokens/s, scaling efficiency and peak memory per process.

Each run is `rlhfkit ppo` on a GPT-2-style model built from a config (no download) and a function
reward, for `--steps` steps; tokens/s = response tokens / time over the steps after the first (the
first pays for warm-up). Runs alternate 1, 2, 1, 2, ... (`--repeats` of each), so that load from
other jobs on a shared machine hits both alike; the table gives medians. Efficiency =
tokens/s on 2 processes / (2 x tokens/s on 1). Peak RSS: the largest resident memory any training
process reached (polled every 50 ms), per process.

    .venv/bin/python bench/ppo_scaling.py [--repeats 3] [--steps 5] [--batch 32] [--d-model 256]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

REWARD = """
def e_frequency(prompt, completion):
    return 10 * completion.count("e") / max(1, len(completion))
"""


def build(tmp: Path, d_model: int, n_layer: int) -> tuple[Path, Path]:
    """A model folder and a prompts file."""
    from rlhfkit.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

    texts = [f"User: Tell me about thing number {i}, please.\nAssistant: It is a fine thing, see." for i in range(200)]
    tokenizer = train_tokenizer(texts, 2048)
    model = build_tiny_model(TinyModelConfig(arch="gpt2", n_layer=n_layer, d_model=d_model, n_head=4), tokenizer)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about thing number {i}"}) + "\n" for i in range(256)))
    (tmp / "bench_reward.py").write_text(REWARD)
    return tmp / "model", prompts


def run(processes: int, tmp: Path, model: Path, prompts: Path, a: argparse.Namespace, tag: str) -> dict[str, float]:
    """One PPO run; its tokens/s after the first step and the peak RSS of its training processes."""
    out = tmp / f"run-{tag}"
    settings = [
        f"model.path={model}", f"prompts={prompts}", f"output_dir={out}",
        "reward.sources=[{function: 'bench_reward:e_frequency'}]",
        f"ppo.batch_size={a.batch}", f"ppo.mini_batch_size={a.batch // 2}", "ppo.epochs=2",
        f"sampling.max_new_tokens={a.response_length}", "sampling.batch_size=64", f"stop.max_steps={a.steps}",
        "ppo.missing_eos_penalty=null", "log_samples_every=0", "train.report_to=[]",
    ]  # fmt: skip
    cli = ["-m", "rlhfkit.cli", "ppo", *settings]
    if processes == 1:
        command = [sys.executable, *cli]
    else:
        config = ROOT / "configs" / "accelerate" / "ddp.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--num_processes", str(processes), "--main_process_port", "0", *cli]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    with log.open("wb") as sink:
        child = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        peak = _watch(child)
    if child.returncode != 0:
        raise SystemExit(f"run {tag} failed:\n{log.read_text()[-6000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    tokens = sum(r["tokens_per_s"] * r["time_step"] for r in rows)
    return {"tokens_per_s": tokens / sum(r["time_step"] for r in rows), "peak_rss_mb": max(peak.values()) / 2**20}


def _watch(child: subprocess.Popen) -> dict[int, int]:
    """Poll a run until it ends: the peak resident memory of each of its training processes."""
    import psutil

    peak: dict[int, int] = {}
    while child.poll() is None:
        try:
            tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
            for proc in tree:
                if "rlhfkit.cli" in proc.cmdline() and "accelerate.commands.launch" not in proc.cmdline():
                    peak[proc.pid] = max(peak.get(proc.pid, 0), proc.memory_info().rss)
        except psutil.Error:  # a process ended between the listing and the reading
            pass
        time.sleep(0.05)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="PPO steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=32, help="global rollout batch (responses)")
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--keep", default="", help="work in this (new) folder and keep it (default: a temporary one)")
    a = p.parse_args()
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(a.keep) if a.keep else Path(tmp_name)
        model, prompts = build(tmp, a.d_model, a.n_layer)
        for repeat in range(a.repeats):
            for n in (1, 2):
                results[n].append(run(n, tmp, model, prompts, a, f"{n}-{repeat}"))
                print(f"repeat {repeat + 1}, {n} process(es): {results[n][-1]}", flush=True)
    median = {n: statistics.median(r["tokens_per_s"] for r in rows) for n, rows in results.items()}
    print(f"\nglobal batch {a.batch}, {a.steps - 1} timed steps, {a.repeats} repeats, 1 thread per process")
    print("| processes | tokens/s (median) | runs | speed-up | efficiency | peak RSS per process (max) |")
    print("|---|---|---|---|---|---|")
    for n, rows in results.items():
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rows)
        speedup = median[n] / median[1]
        rss = max(r["peak_rss_mb"] for r in rows)
        print(f"| {n} | {median[n]:.0f} | {runs} | {speedup:.2f}x | {speedup / n:.2f} | {rss:.0f} MB |")


if __name__ == "__main__":
    main()
