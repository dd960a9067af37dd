"""Pretraining end to end: the loss falls and beats the unigram baseline; a run killed with
SIGKILL and resumed ends exactly where an uninterrupted run does; two-process DDP (gloo) works."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.cli import main
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.errors import UserError
from rlhfkit.models.tiny import train_tokenizer
from rlhfkit.stages.pretrain import read_documents, to_blocks, unigram_perplexity
from testutil import CLI, make_test_model, subprocess_env

# Small, but slow enough per step (about 30 ms) that a kill lands between checkpoint and finish.
# log_every does not divide save_every on purpose: resuming mid log-window must still log exactly.
RUN = [
    "vocab_size=300",
    "data.block_size=64",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_positions=64",
    "train.batch_size=8",
    "train.max_steps=30",
    "train.warmup_steps=5",
    "train.log_every=4",
    "train.save_every=10",
]


def args(corpus, out) -> list[str]:
    return [f"output_dir={out}", f"data.train_files=[{corpus['train']}]", f"data.valid_files=[{corpus['valid']}]", *RUN]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["pretrain", *args(corpus, out)]) == 0
    return out


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_short_run_lowers_loss_and_beats_unigram(finished):
    r = results(finished)
    losses = [row["loss"] for row in read_metrics(finished / "metrics.jsonl") if "loss" in row]
    assert len(losses) == 8  # steps 4, 8, ..., 28 and the last, 30
    assert losses[-1] < losses[0] - 1.5
    assert r["steps"] == 30 and r["final_train_loss"] == losses[-1]
    assert r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"]))
    assert r["valid_ppl"] < 0.6 * r["unigram_ppl"]
    # A plain `save_pretrained` folder: transformers alone loads and runs it.
    model = AutoModelForCausalLM.from_pretrained(finished / "model")
    tok = AutoTokenizer.from_pretrained(finished / "model")
    ids = tok("Ann likes the red ball", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert (finished / "config.yaml").exists() and (finished / "tokenizer" / "tokenizer.json").exists()
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]


def test_killed_run_resumes_exactly(finished, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            [*CLI, "pretrain", *args(corpus, out)], env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if any((out / "checkpoints").glob("step-*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.003)
    assert proc.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (out / "results.json").exists() and not (out / "model").exists()  # really cut short

    assert main(["pretrain", *args(corpus, out), "--resume"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "resumed from" in printed and "step-0000010(step10)" in printed.replace(" ", "")
    a, b = results(finished), results(out)
    assert b["steps"] == 30
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-6)
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-6)
    rows_a, rows_b = read_metrics(finished / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    keys = [(r["step"], "loss" in r) for r in rows_b]
    assert len(keys) == len(set(keys)), "a step was logged twice"
    assert keys == [(r["step"], "loss" in r) for r in rows_a]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k in ("loss", "lr", "grad_norm", "valid_loss"):
            assert rb.get(k) == pytest.approx(ra.get(k), abs=1e-6), (ra["step"], k)


def test_fresh_run_in_a_used_folder_starts_over(finished, corpus, tmp_path):
    """Without --resume, old checkpoints and metrics rows are dropped, never mixed into the new run."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0009999").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    assert main(["pretrain", *args(corpus, out), "train.max_steps=3", "train.save_every=0"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_on_cpu(corpus, tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    small = [f"output_dir={out}", f"data.train_files=[{corpus['train']}]", f"data.valid_files=[{corpus['valid']}]"]
    small += ["vocab_size=300", "data.block_size=32", "model.n_layer=1", "model.d_model=32", "model.n_head=2"]
    small += ["model.max_positions=32", "train.batch_size=4", "train.max_steps=6", "train.save_every=3"]
    proc = subprocess.run(
        [*launch, "-m", "rlhfkit.cli", "pretrain", *small],
        env=subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(out)["steps"] == 6
    # Both processes wrote their RNG state into each checkpoint before it was published.
    for step in ("step-0000003", "step-0000006"):
        assert {p.name for p in (out / "checkpoints" / step).glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [6, 6]  # one process logs: the train row and the eval row
    AutoModelForCausalLM.from_pretrained(out / "model")


# ----------------------------------------------------------------------------- pieces


def test_unigram_perplexity_by_hand():
    # counts 0: 2, 1: 1; add-one over vocab 3: p(0) = 3/6, p(1) = 2/6; ppl = exp(-(ln 1/2 + ln 1/3) / 2)
    ppl = unigram_perplexity(torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1]]), vocab_size=3)
    assert ppl == pytest.approx(math.sqrt(6))


def test_documents_are_joined_with_eos_and_cut_into_blocks(tmp_path):
    tok = train_tokenizer(["one two three four five six"] * 3, vocab_size=280)
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "docs.txt"
    path.write_text("one two\n\n\n  three four  \n\nfive\n", encoding="utf-8")
    docs = read_documents([str(path)])
    assert docs == ["one two", "three four", "five"]
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = to_blocks(docs, tok, block_size=3)
    assert blocks.shape == (len(stream) // 3, 3)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(UserError, match=r"fewer than one block of data.block_size=1000"):
        to_blocks(docs, tok, block_size=1000)


def test_bad_text_files(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\nstill fine\ncaf\xe9\n")
    with pytest.raises(UserError, match=rf"^{path}:3: not valid UTF-8; re-save the file as UTF-8$"):
        read_documents([str(path)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match=r"empty.txt: no text found"):
        read_documents([str(empty)])
    with pytest.raises(UserError, match=r"missing.txt: text file not found"):
        read_documents([str(tmp_path / "missing.txt")])


def test_block_size_over_max_positions_fails_before_writing(capsys, tmp_path, corpus):
    out = tmp_path / "run"
    code = main(["pretrain", *args(corpus, out), "data.block_size=128"])
    assert code == 2
    assert capsys.readouterr().err == "error: model.max_positions=64 < data.block_size=128\n"
    assert not out.exists()


def test_continued_pretraining_of_an_existing_model_lowers_its_held_out_loss(corpus, tmp_path):
    """`model.path`: an existing causal LM (no pad token, like GPT-2) goes on learning new text with its
    own tokenizer; the held-out loss before is the loaded model's, and training lowers it."""
    base = make_test_model("llama", tmp_path / "base", pad=False, n_layer=1, d_model=32)
    out = tmp_path / "continued"
    assert main(["pretrain", f"model.path={base}", f"output_dir={out}", f"data.train_files=[{corpus['train']}]",
                 f"data.valid_files=[{corpus['valid']}]", "data.block_size=32", "train.batch_size=8",
                 "train.max_steps=25", "train.lr=3e-3", "train.warmup_steps=2"]) == 0  # fmt: skip
    r = results(out)
    tok = AutoTokenizer.from_pretrained(base)
    blocks = to_blocks(read_documents([str(corpus["valid"])]), tok, 32)
    with torch.no_grad():
        loss_of_base = float(AutoModelForCausalLM.from_pretrained(base)(input_ids=blocks, labels=blocks).loss)
    assert r["initial_valid_loss"] == pytest.approx(loss_of_base, rel=1e-4)  # it started from that model
    assert r["valid_loss"] < 0.8 * r["initial_valid_loss"], r
    assert AutoTokenizer.from_pretrained(out / "model").get_vocab() == tok.get_vocab()  # the tokenizer kept
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.vocab_size == len(tok)
    assert not (out / "tokenizer").exists()  # no new tokenizer trained
