"""Stage 2, supervised fine-tuning: teach a causal LM to answer prompts like the demonstrations.

Reads demonstrations (`{prompt, response}`, plain text or conversations, or TRL's `{text}`,
`{messages}` and `{prompt, completion}`), renders each prompt with the template (or the tokenizer's
chat template) and trains on the response tokens only: prompt tokens and padding have label −100,
and every response ends with EOS, so the model learns when to stop. A `{text}` is learned whole;
of `{messages}`, the last (assistant) message is the response. A demonstration longer than
`data.max_length` keeps the end of its prompt, the start of its response and the EOS
(`rlhfkit.data.chat.encode_example`); the run warns how many. Options: packing (`data.packing`,
whole examples per block, position ids restarted so examples do not see each other), LoRA
(`model.lora`), warmup + cosine schedule, gradient accumulation, held-out loss, checkpoints and `--resume`.

Output: `OUTPUT_DIR/model`, a plain `save_pretrained` folder: merged weights, or with
`lora_save=adapter` the LoRA adapter (loadable with `peft.PeftModel.from_pretrained(base, folder)`
on the original base: a tokenizer without a pad token pads with EOS here, every padded position
being masked by length, so no token is added and the embeddings keep the base's size).
`OUTPUT_DIR/results.json` has the held-out loss and perplexity, and how many demonstrations were cut.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.batching import IGNORE_INDEX, SFTExample, pack_examples, packed_collate, sft_collate, split_by_prompt
from rlhfkit.data.chat import PROMPT_TEMPLATE, encode_example
from rlhfkit.data.formats import Demonstration, read_records
from rlhfkit.engine.trainer import Engine, TrainConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import ModelConfig, fit_to_positions, load_causal_lm, save_model


class DataConfig(StrictModel):
    train: str = Field(
        "",
        description="demonstrations (JSONL or datasets folder, `path:split`): {prompt, response}, or TRL's "
        "{text}, {messages}, {prompt, completion}",
    )
    valid: str = Field("", description="held-out demonstrations (`path:split`); empty = split valid_fraction off")
    valid_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(
        512, gt=1, description="tokens per example; a longer one keeps the prompt's end and the response's start + EOS"
    )
    prompt_template: str = Field(PROMPT_TEMPLATE, description="'{prompt}' pattern, or 'chat' for the chat template")
    packing: bool = Field(False, description="concatenate examples into blocks of max_length tokens")
    strict: bool = Field(False, description="unused columns are an error (default: ignored, named once in the log)")


class SFTTrainConfig(TrainConfig):
    """SFT defaults, as class defaults so that overriding one field keeps the others."""

    lr: float = Field(1e-4, gt=0)
    epochs: float = Field(2.0, gt=0)
    warmup_steps: int = Field(20, ge=0)


class Config(StrictModel):
    output_dir: str = "runs/sft"
    resume: bool = False
    model: ModelConfig = ModelConfig()
    lora_save: Literal["merged", "adapter"] = Field("merged", description="with model.lora: what to save")
    data: DataConfig = DataConfig()
    train: SFTTrainConfig = SFTTrainConfig()


def encode_all(tokenizer: Any, demos: list[Demonstration], cfg: DataConfig) -> tuple[list[SFTExample], int]:
    """(examples, how many of them were longer than `data.max_length` and cut)."""
    encoded = [encode_example(tokenizer, d.prompt, d.response, cfg.prompt_template, cfg.max_length) for d in demos]
    return [(e.ids, e.response_start) for e in encoded], sum(e.truncated for e in encoded)


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, V) of the n positions whose next token is labelled, in row-major order; those tokens (n,)),
    with the LM head run on those positions only.

    Why: with a real vocabulary the LM head and its softmax are a large share of the compute and
    of the activation memory, and prompt tokens and padding need neither. A pre-hook on the output
    layer hands it only the hidden states whose next token is labelled, so the model's own forward
    (and any logit post-processing it does, e.g. soft-capping) runs unchanged on fewer rows.
    SFT's loss and DPO/KTO's response log-probs both read their logits here.

    Packed batches pass position ids and neither an attention mask nor a KV cache: only then does
    `transformers` turn the position restarts into the per-example (block-diagonal) causal mask.
    """
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t is scored on token t + 1
    head = getattr(model, "module", model).get_output_embeddings()  # `module`: under DDP
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][predicts], *args[1:]))
    try:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=None if "position_ids" in batch else batch["attention_mask"],
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).logits
    finally:
        hook.remove()
    return logits, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over labelled tokens (the LM head run on those positions only)."""
    logits, targets = labelled_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def run(cfg: Config) -> Path:
    if not cfg.data.train:
        raise UserError("data.train: no demonstrations given; set data.train=FILE.jsonl")
    out = Path(cfg.output_dir)
    engine = Engine(cfg.train, out, resume=cfg.resume)
    if engine.is_main:
        save_config(cfg, out)
    demos = read_records(cfg.data.train, "demonstrations", strict=cfg.data.strict)
    if cfg.data.valid:
        valid_demos = read_records(cfg.data.valid, "demonstrations", strict=cfg.data.strict)
    else:
        demos, valid_demos = split_by_prompt(demos, cfg.data.valid_fraction, cfg.train.seed)
    # Padding is masked by lengths throughout SFT, so EOS can pad: the vocabulary stays the base's.
    model, tokenizer = load_causal_lm(cfg.model, eos_pad=True)
    max_length, note = fit_to_positions(model.config, cfg.data.max_length, "data.max_length")
    if note:
        engine.print(f"[yellow]note: {note}[/]")
    data = cfg.data.model_copy(update={"max_length": max_length})
    train, train_cut = encode_all(tokenizer, demos, data)
    valid, valid_cut = encode_all(tokenizer, valid_demos, data)
    if train_cut or valid_cut:
        engine.print(
            f"[yellow]warning: {train_cut + valid_cut} of {len(train) + len(valid)} demonstrations are longer than "
            f"data.max_length={max_length} tokens and were cut (the prompt keeps its end, the response its "
            "start and EOS); raise data.max_length to train on them whole[/]"
        )
    pad = tokenizer.pad_token_id
    n_tokens = sum(len(ids) for ids, _ in train)
    if data.packing:
        dataset = pack_examples(train, max_length, seed=cfg.train.seed)
        collate = packed_collate(pad)
        fill = n_tokens / (len(dataset) * max_length)
        engine.print(f"packing: {len(train)} examples into {len(dataset)} blocks of {max_length} ({fill:.0%} full)")
    else:
        dataset, collate = train, sft_collate(pad)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine.print(
        f"sft: {cfg.model.path} ({n_trainable / 1e6:.2f}M trainable params{', LoRA' if cfg.model.lora else ''}), "
        f"{len(train)} train / {len(valid)} held-out demonstrations, {n_tokens:,} train tokens"
    )
    valid_collate = sft_collate(pad)

    def loss_fn(model, batch):
        return lm_loss(model, batch), {}

    def eval_fn(model) -> dict[str, float]:
        """Token-weighted loss over the whole held-out set (not a mean of batch means)."""
        total, count = 0.0, 0
        for i in range(0, len(valid), cfg.train.batch_size):
            batch = {k: v.to(engine.device) for k, v in valid_collate(valid[i : i + cfg.train.batch_size]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(lm_loss(model, batch)) * n
            count += n
        loss = total / max(1, count)
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    final = engine.fit(model, dataset, collate, loss_fn, eval_fn=eval_fn if valid else None, desc="sft")
    results = {
        "final_train_loss": final.get("loss"),
        "valid_loss": final.get("valid_loss"),
        "valid_ppl": final.get("valid_ppl"),
        "train_examples": len(train),
        "valid_examples": len(valid),
        "truncated_examples": train_cut + valid_cut,
        "steps": engine.step,
    }
    model_dir = out / "model"
    whole = engine.whole_model()  # every process: a collective when the weights are sharded
    if engine.is_main:
        save_model(whole, tokenizer, model_dir, merge_lora=cfg.lora_save == "merged", keep_adapter=False)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    engine.accelerator.wait_for_everyone()
    if valid:
        engine.print(f"held-out loss {results['valid_loss']:.4f} (perplexity {results['valid_ppl']:.2f})")
    engine.print(f"model in {model_dir}")
    engine.accelerator.end_training()
    return model_dir
