"""SFT: label masking, packing that is exactly equivalent to no packing, LoRA saving, resume, and a
learning test (the model learns the demonstrated answers and to stop with EOS)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhfkit.cli import main
from rlhfkit.config import load_config
from rlhfkit.data.batching import IGNORE_INDEX, pack_examples, packed_collate, sft_collate
from rlhfkit.data.chat import encode_example, render_prompt
from rlhfkit.data.formats import Message
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.sampling import SamplingConfig, sample
from rlhfkit.stages import sft
from testutil import make_test_model

NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lea", "Max", "Ned", "Ola"]
ANSWERS = {"Greet": "Hello there, friend.", "Thank": "You are very welcome.", "Warn": "Please be careful now."}




def demonstration(verb: str, name: str) -> dict[str, str]:
    """The answer depends on the prompt's first word only, so a tiny model learns it in a few steps."""
    return {"prompt": f"{verb} {name} for me.", "response": ANSWERS[verb]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    rows = [demonstration(v, n) for v in ANSWERS for n in NAMES]
    random.Random(0).shuffle(rows)
    write_jsonl(root / "demos.jsonl", rows)
    texts = [f"User: {r['prompt']}\nAssistant: {r['response']}" for r in rows]
    for arch in ("gpt2", "llama"):
        make_test_model(arch, root / arch, texts=texts, vocab_size=320, n_layer=2, d_model=64)
    return root


def overrides(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={data_dir / 'gpt2'}",
        f"data.train={data_dir / 'demos.jsonl'}",
        f"output_dir={out}",
        "data.max_length=48",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.log_every=1",
        *extra,
    ]


def config(data_dir: Path, out: Path, *extra: str) -> sft.Config:
    return load_config(sft.Config, None, overrides(data_dir, out, *extra))


def test_collate_masks_prompt_and_padding_and_keeps_eos(data_dir):
    tok = load_tokenizer(data_dir / "gpt2")
    examples = [
        encode_example(tok, "What color are the tea of red?", "The tea are red.")[:2],
        encode_example(tok, "Hi", "Yo")[:2],
    ]
    batch = sft_collate(tok.pad_token_id)(examples)
    for row, (ids, n_prompt) in enumerate(examples):
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[: len(ids)].tolist()[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == tok.eos_token_id  # EOS is a learned target
        assert (labels[len(ids) :] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == len(ids)
        assert (batch["input_ids"][row, len(ids) :] == tok.pad_token_id).all()


def test_pack_examples_keeps_examples_whole_and_restarts_positions():
    examples = [([1, 2, 3, 4], 2), ([5, 6, 7], 1), ([8, 9], 1), ([10, 11, 12, 13, 14], 3)]
    blocks = pack_examples(examples, block_size=8, seed=0)
    assert sorted(t for b in blocks for t in b.input_ids) == list(range(1, 15))
    for b in blocks:
        assert len(b.input_ids) <= 8
        starts = [i for i, p in enumerate(b.position_ids) if p == 0]
        for s, e in zip(starts, starts[1:] + [len(b.input_ids)], strict=True):
            segment = b.input_ids[s:e]
            ids, n_prompt = next(x for x in examples if x[0] == segment)  # a whole example, in order
            assert b.labels[s:e] == [IGNORE_INDEX] * max(1, n_prompt) + ids[max(1, n_prompt) :]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_loss_on_labelled_positions_equals_the_models_own_loss(data_dir, arch):
    tok = load_tokenizer(data_dir / arch)
    model = AutoModelForCausalLM.from_pretrained(data_dir / arch)
    examples = [encode_example(tok, r["prompt"], r["response"])[:2] for r in map(demonstration, ANSWERS, NAMES)]
    batch = sft_collate(tok.pad_token_id)(examples)
    ours = sft.lm_loss(model, batch)
    ours.backward()
    ours_grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    reference.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert torch.allclose(ours_grad, model.get_input_embeddings().weight.grad, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_loss_equals_unpacked_loss(data_dir, arch):
    """Position-id restarts must isolate the packed examples: same loss as training them one by one."""
    tok = load_tokenizer(data_dir / arch)
    # Large initial weights give sharp attention, so any leak between examples shows in the loss.
    model_config = AutoConfig.from_pretrained(data_dir / arch, initializer_range=0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config).eval()
    rows = [demonstration(v, n) for v in ANSWERS for n in NAMES[:4]]
    examples = [encode_example(tok, r["prompt"], r["response"], max_length=48)[:2] for r in rows]

    def total(batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return float(sft.lm_loss(model, batch)) * n, n

    with torch.no_grad():
        plain_sum, plain_n = total(sft_collate(tok.pad_token_id)(examples))
        packed = packed_collate(tok.pad_token_id)(pack_examples(examples, block_size=96))
        assert packed["input_ids"].shape[0] < len(examples)  # really packed
        packed_sum, packed_n = total(packed)
        leaky = {k: v for k, v in packed.items() if k != "position_ids"}  # no restarts: examples see each other
        leaky_sum, _ = total(leaky)
    assert packed_n == plain_n
    assert packed_sum == pytest.approx(plain_sum, rel=1e-4)
    assert abs(leaky_sum - plain_sum) > 1e-2 * plain_sum


def test_sft_learns_answers_and_eos(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["sft", *overrides(data_dir, out, "train.max_steps=60", "data.packing=true")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["valid_ppl"] < 2.0, results  # from ~300 (uniform over the vocab) to nearly deterministic
    assert results["truncated_examples"] == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] > 3 * metrics[-2]["loss"]

    model_dir = out / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    prompts = [demonstration(v, "Zed")["prompt"] for v in ANSWERS]  # a name never seen in training
    torch.manual_seed(0)
    s = sample(model, tok, [render_prompt(tok, p) for p in prompts], SamplingConfig(temperature=0.05, stop=[]))
    assert s.ended.all(), s.texts  # every answer ends with a sampled EOS
    assert s.texts == list(ANSWERS.values())


def test_sft_reports_truncated_demonstrations(data_dir, tmp_path, capsys):
    """Issue 11: demonstrations cut to data.max_length are counted, in the output and in results.json."""
    out = tmp_path / "run"
    assert main(["sft", *overrides(data_dir, out, "train.max_steps=1", "data.max_length=12")]) == 0
    n_demos = len((data_dir / "demos.jsonl").read_text().splitlines())  # every one is longer than 12 tokens
    assert json.loads((out / "results.json").read_text())["truncated_examples"] == n_demos
    warning = f"warning: {n_demos} of {n_demos} demonstrations are longer than data.max_length=12"
    assert warning in " ".join(capsys.readouterr().out.split())  # the console wraps long lines


def test_max_length_over_the_models_positions_is_lowered_to_them(data_dir, tmp_path, capsys):
    """The default data.max_length=512 on a 16-position model: examples are cut to 16 tokens (and
    counted), not an IndexError in the middle of the first epoch."""
    texts = [json.loads(line)["response"] for line in (data_dir / "demos.jsonl").read_text().splitlines()]
    model = make_test_model("gpt2", tmp_path / "short", texts=texts, vocab_size=320, max_positions=16)
    out = tmp_path / "run"
    args = [a for a in overrides(data_dir, out, "train.max_steps=1") if not a.startswith("data.max_length")]
    assert main(["sft", *args, f"model.path={model}"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "data.max_length=512 exceeds the 16 positions" in printed and "(model.config.n_positions)" in printed
    assert json.loads((out / "results.json").read_text())["truncated_examples"] > 0


def test_lora_merged_and_adapter_outputs_agree(data_dir, tmp_path):
    from peft import PeftModel

    common = ("model.lora.r=4", "train.max_steps=6", "train.lr=1e-2")
    merged_dir = sft.run(config(data_dir, tmp_path / "merged", *common))
    adapter_dir = sft.run(config(data_dir, tmp_path / "adapter", *common, "lora_save=adapter"))
    assert not (merged_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_config.json").exists()
    ids = torch.tensor([load_tokenizer(merged_dir)("User: Greet Ann for me.")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(data_dir / "gpt2").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        before, trained = base(ids).logits, merged(ids).logits
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()  # wraps `base` in place
        assert torch.allclose(trained, adapted(ids).logits, atol=1e-4)
    assert not torch.allclose(trained, before, atol=1e-2)  # LoRA really changed the model


def test_resume_after_a_crash_matches_an_uninterrupted_run(data_dir, tmp_path):
    args = ("train.max_steps=8", "train.save_every=4", "train.keep_checkpoints=3")
    full = sft.run(config(data_dir, tmp_path / "full", *args))
    crashed = tmp_path / "crashed"
    sft.run(config(data_dir, crashed, *args))
    ckpts = crashed / "checkpoints"  # pretend the run died right after the step-4 checkpoint
    shutil.rmtree(ckpts / "step-0000008")
    shutil.rmtree(crashed / "model")
    (ckpts / "latest").write_text("step-0000004")
    resumed = sft.run(config(data_dir, crashed, *args, "resume=true"))
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the killed run's rows after step 4 were dropped, not duplicated


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_conversational_demonstrations_use_the_chat_template_and_learn_only_the_reply(data_dir, tmp_path):
    tok = load_tokenizer(data_dir / "gpt2")
    tok.chat_template = CHAT_TEMPLATE
    model_dir = tmp_path / "chat-model"
    AutoModelForCausalLM.from_pretrained(data_dir / "gpt2").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet Ann for me."}]
    ids, n_prompt, _ = encode_example(tok, [Message(**m) for m in conversation], "Hello there, friend.")
    assert (
        tok.decode(ids[:n_prompt])
        == "<|system|>Be brief.<|endoftext|><|user|>Greet Ann for me.<|endoftext|><|assistant|>"
    )
    assert tok.decode(ids[n_prompt:]) == "Hello there, friend.<|endoftext|>"  # the turn's EOS is learned once

    demos = [json.loads(line) for line in (data_dir / "demos.jsonl").read_text().splitlines()]
    rows = [
        {"prompt": conversation[:1] + [{"role": "user", "content": d["prompt"]}], "response": d["response"]}
        for d in demos
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    sft.run(
        config(
            data_dir,
            tmp_path / "run",
            f"model.path={model_dir}",
            f"data.train={tmp_path / 'chat.jsonl'}",
            "train.max_steps=3",
        )
    )
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["sft", f"output_dir={tmp_path}", "model.path=x"]) == 2
    assert "data.train" in capsys.readouterr().err
    assert main(["sft", "--help"]) == 0
    assert "data.packing" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_adapter_of_a_padless_base_loads_on_the_original_base_with_plain_peft(data_dir, tmp_path, arch):
    """GPT-2 and Llama have no pad token: SFT pads with EOS (masked by length) instead of adding one,
    so the adapter fits the user's own, unresized base, and that plain model is the one trained."""
    from peft import PeftModel

    texts = [f"User: {d['prompt']}\nAssistant: {d['response']}" for d in map(demonstration, ANSWERS, NAMES)]
    base_dir = make_test_model(arch, tmp_path / "base", texts=texts, pad=False, vocab_size=320, n_layer=1, d_model=32)
    vocab = len(AutoTokenizer.from_pretrained(base_dir))
    valid = write_jsonl(tmp_path / "valid.jsonl", [demonstration(v, "Zed") for v in ANSWERS])
    cfg = config(data_dir, tmp_path / "out", f"model.path={base_dir}", f"data.valid={valid}", "model.lora.r=4",
                 "lora_save=adapter", "train.max_steps=4", "train.lr=1e-2")  # fmt: skip
    adapter_dir = sft.run(cfg)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    assert len(tok) == vocab and tok.pad_token == tok.eos_token  # nothing added to the vocabulary
    examples = [encode_example(tok, d["prompt"], d["response"])[:2] for d in map(json.loads, valid.open())]
    with torch.no_grad():
        loss = float(sft.lm_loss(model, sft_collate(tok.pad_token_id)(examples)))
    assert loss == pytest.approx(json.loads((tmp_path / "out" / "results.json").read_text())["valid_loss"], rel=1e-5)
