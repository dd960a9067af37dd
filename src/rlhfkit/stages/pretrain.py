"""Stage 1, pretraining: train a byte-level BPE tokenizer and a causal LM from scratch on text, or
continue pretraining an existing causal LM (`model.path`, any `AutoModelForCausalLM`; its
tokenizer is kept, so the result still fits everything built for the original).

Text files hold one document per paragraph (documents are separated by a blank line). With no
files given, the embedded default corpus is generated (offline, from a seed). Documents are
joined with EOS and cut into blocks of `data.block_size` tokens. The result is a plain
`save_pretrained` folder at `OUTPUT_DIR/model` (or `model_dir`), with held-out perplexity next to
the unigram baseline in `OUTPUT_DIR/results.json` (and, when continuing, the held-out loss before
training); the same numbers go into the model folder as `rlhfkit_pretrain.json`, so a model that
travels (like the demo's shipped base model) still says how good it was.
The default `train.lr` suits a tiny model from scratch; continuing a real model wants a far
smaller one (e.g. `train.lr=5e-5`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.engine.trainer import Engine, TrainConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import ModelConfig, load_causal_lm, load_tokenizer, model_positions, save_model
from rlhfkit.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

PRETRAIN_RESULTS = "rlhfkit_pretrain.json"  # the held-out numbers, saved with the model


class DataConfig(StrictModel):
    train_files: list[str] = Field(default_factory=list, description="text files; empty = embedded corpus")
    valid_files: list[str] = Field(default_factory=list, description="held-out text files")
    block_size: int = Field(128, gt=1)
    corpus_seed: int = Field(0, description="seed of the embedded default corpus")


class PretrainModelConfig(TinyModelConfig):
    """A new tiny model (the sizes), or an existing one to continue (`path`; the sizes are then its own)."""

    path: str = Field("", description="causal LM to continue pretraining (its tokenizer kept); empty = a new one")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Config(StrictModel):
    output_dir: str = "runs/pretrain"
    model_dir: str = Field("", description="where the final model is saved; empty = OUTPUT_DIR/model")
    resume: bool = False
    vocab_size: int = Field(4096, gt=256, description="of the new tokenizer (not used with model.path)")
    data: DataConfig = DataConfig()
    model: PretrainModelConfig = PretrainModelConfig()
    train: TrainConfig = TrainConfig(lr=2e-3, batch_size=32, max_steps=800, warmup_steps=50, log_every=20)


def read_documents(files: list[str]) -> list[str]:
    docs: list[str] = []
    for name in files:
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: text file not found") from None
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not valid UTF-8; re-save the file as UTF-8") from None
        docs.extend(d.strip() for d in text.split("\n\n") if d.strip())
    if not docs:
        raise UserError(f"{', '.join(files)}: no text found")
    return docs


def to_blocks(docs: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut the stream into equal blocks."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"only {len(ids)} tokens: fewer than one block of data.block_size={block_size}")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def unigram_perplexity(train: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of a model that ignores context (add-one smoothed token frequencies): the floor
    a language model must beat by a wide margin to have learned anything beyond word counts."""
    counts = Counter(train.flatten().tolist())
    total = train.numel() + vocab_size
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in valid.flatten().tolist())
    return math.exp(nll / valid.numel())


def held_out_loss(model: Any, blocks: torch.Tensor, batch_size: int, device: Any = "cpu") -> float:
    """Mean next-token loss over the blocks (exp of it = the held-out perplexity results.json reports)."""
    losses = []
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size].to(device)
            losses.append(float(model(input_ids=ids, labels=ids).loss) * len(ids))
    return sum(losses) / len(blocks)


def load_model(cfg: Config, tokenizer: Any) -> Any:
    """A new tiny model for `tokenizer`, or `model.path` (positions checked against the block size)."""
    if not cfg.model.path:
        return build_tiny_model(cfg.model, tokenizer, seed=cfg.train.seed)
    m = cfg.model
    model, _ = load_causal_lm(ModelConfig(path=m.path, dtype=m.dtype), tokenizer)
    limit = model_positions(model.config)
    if limit is not None and limit[0] < cfg.data.block_size:
        raise UserError(f"data.block_size={cfg.data.block_size} exceeds the {limit[0]} positions of {m.path}")
    return model


def run(cfg: Config) -> Path:
    if not cfg.model.path and cfg.model.max_positions < cfg.data.block_size:  # checked before anything is written
        raise UserError(f"model.max_positions={cfg.model.max_positions} < data.block_size={cfg.data.block_size}")
    out = Path(cfg.output_dir)
    engine = Engine(cfg.train, out, resume=cfg.resume)
    with engine.accelerator.main_process_first():
        if engine.is_main:
            save_config(cfg, out)
        train_files, valid_files = cfg.data.train_files, cfg.data.valid_files
        if not train_files:
            from rlhfkit.data.corpus import build_default_data

            paths = build_default_data(out / "data", seed=cfg.data.corpus_seed)
            train_files, valid_files = [str(paths["pretrain_train"])], [str(paths["pretrain_valid"])]
        train_docs = read_documents(train_files)
        valid_docs = read_documents(valid_files) if valid_files else train_docs[-max(1, len(train_docs) // 20) :]
        if not valid_files:
            train_docs = train_docs[: len(train_docs) - len(valid_docs)] or train_docs
        tok_dir = out / "tokenizer"
        # A resumed run must keep its tokenizer; a fresh run never reuses a stale one from the folder.
        if engine.is_main and not cfg.model.path and not (cfg.resume and (tok_dir / "tokenizer.json").exists()):
            train_tokenizer(train_docs, cfg.vocab_size).save_pretrained(tok_dir)
    # Blocks are never padded: EOS may stand in for a missing pad token, and the vocabulary stays.
    tokenizer = load_tokenizer(cfg.model.path or tok_dir, eos_pad=True)
    train_blocks = to_blocks(train_docs, tokenizer, cfg.data.block_size)
    valid_blocks = to_blocks(valid_docs, tokenizer, cfg.data.block_size)
    model = load_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    what = f"continuing {cfg.model.path}" if cfg.model.path else cfg.model.arch
    engine.print(
        f"pretrain: {what}, {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}, "
        f"{train_blocks.numel():,} train tokens, {valid_blocks.numel():,} held-out tokens"
    )

    def loss_fn(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss, {}

    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def eval_fn(model) -> dict[str, float]:
        loss = held_out_loss(model, valid_blocks, cfg.train.batch_size, engine.device)
        return {"valid_loss": loss, "valid_ppl": math.exp(loss)}

    before: dict[str, float] = {}
    if cfg.model.path:  # what continuing is measured against: the model's held-out loss on the new text
        model.to(engine.device).eval()
        with torch.no_grad():
            before = {"initial_valid_loss": eval_fn(model)["valid_loss"]}
        model.train()
        engine.print(f"held-out loss before training {before['initial_valid_loss']:.4f}")
    final = engine.fit(model, list(train_blocks), collate, loss_fn, eval_fn=eval_fn, desc="pretrain")
    baseline = unigram_perplexity(train_blocks, valid_blocks, len(tokenizer))
    results = {
        **before,
        "final_train_loss": final.get("loss"),
        "valid_loss": final["valid_loss"],
        "valid_ppl": final["valid_ppl"],
        "unigram_ppl": baseline,
        "params": n_params,
        "steps": engine.step,
    }
    model_dir = Path(cfg.model_dir) if cfg.model_dir else out / "model"
    whole = engine.whole_model()  # every process: a collective when the weights are sharded
    if engine.is_main:
        save_model(whole, tokenizer, model_dir)
        recipe = {"corpus_seed": cfg.data.corpus_seed, "block_size": cfg.data.block_size}
        atomic_write_text(model_dir / PRETRAIN_RESULTS, json.dumps({**results, **recipe}, indent=2))
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    engine.accelerator.wait_for_everyone()
    engine.print(
        f"held-out perplexity {results['valid_ppl']:.2f} (unigram baseline {baseline:.2f}); model in {model_dir}"
    )
    engine.accelerator.end_training()
    return model_dir
