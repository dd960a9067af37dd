"""Offline preference optimisation: DPO (with IPO and hinge losses) and KTO, straight from pairs.

No reward model and no sampling: the policy is trained so that its log-likelihood ratio to a
frozen reference model, beta * log(pi/pi_ref), acts as the reward (math in `rlhfkit.rl.preference`).

Data: the pair files `rlhfkit rm` trains on (`data.pairs` {prompt, chosen, rejected, margin?}, from
`rlhfkit aggregate` or `rlhfkit cai label`), or `data.rankings` + `data.completions` (every ranking
gives all C(K,2) pairs). KTO uses the same files unpaired: every distinct chosen answer is a
desirable example, every distinct rejected one an undesirable example; and it takes unpaired rows
`{prompt, completion, label}` (`rlhfkit aggregate`'s kto.jsonl) as they are, where DPO pairs them up.

Sequences are encoded like SFT's (`rlhfkit.data.chat.encode_example`: prompt template, EOS, the
prompt keeps its end and the response its start when longer than `data.max_length`); the
log-probs are summed over response tokens only. DPO runs chosen and rejected through the model in
one forward pass (one batch of 2B sequences).

The reference is `ref_model` (same tokenizer required), else `model.path`, or with LoRA the same
network with its adapter switched off. Its log-probs are computed once, before training, and
stored in OUTPUT_DIR/reference_logps.pt: `--resume` reuses them, so the reference model is never
loaded again. Outputs: OUTPUT_DIR/model (a plain `save_pretrained` folder), results.json
(held-out loss, accuracy and reward margin; the same on the training pairs), metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.batching import IGNORE_INDEX, SFTExample, sft_collate, split_by_prompt
from rlhfkit.data.chat import encode_example
from rlhfkit.data.formats import Pair, Text, Unpaired, read_records, text_key
from rlhfkit.engine.trainer import Engine, TrainConfig
from rlhfkit.errors import UserError
from rlhfkit.models.device import place
from rlhfkit.models.loading import (
    ModelConfig,
    check_same_tokenizer,
    disable_dropout,
    fit_to_positions,
    load_causal_lm,
    save_model,
)
from rlhfkit.rl.preference import DPOLossKind, dpo_loss, kto_loss, kto_reference_point
from rlhfkit.stages.rm import PairDataConfig, load_pairs
from rlhfkit.stages.sft import labelled_logits

REFERENCE_FILE = "reference_logps.pt"


# ------------------------------------------------------------------------------------ config


class PreferenceTrainConfig(TrainConfig):
    """DPO/KTO defaults (small lr: the policy starts as a good SFT model and beta is small)."""

    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(8, gt=0, description="pairs (DPO) or examples (KTO) per micro-batch")
    warmup_steps: int = Field(10, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "linear"


class DPOOptions(StrictModel):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (lower = further)")
    loss: DPOLossKind = Field("sigmoid", description="sigmoid = DPO, ipo = IPO, hinge = SLiC")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed share of flipped labels (sigmoid)")
    use_margins: bool = Field(True, description="subtract the pairs' margins, where given, from beta * gap")

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> DPOOptions:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing (conservative DPO) needs loss=sigmoid, not loss={self.loss}")
        return self


class Config(StrictModel):
    output_dir: str = "runs/dpo"
    resume: bool = False
    model: ModelConfig = ModelConfig()
    ref_model: str = Field("", description="reference model; empty = model.path (with LoRA: adapter disabled)")
    lora_save: Literal["merged", "adapter"] = Field("merged", description="with model.lora: what to save")
    data: PairDataConfig = PairDataConfig()
    dpo: DPOOptions = DPOOptions()
    train: PreferenceTrainConfig = PreferenceTrainConfig()


class KTOOptions(StrictModel):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    desirable_weight: float = Field(1.0, gt=0, description="weight of desirable examples' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of undesirable examples' loss")


class KTOConfig(StrictModel):
    """KTO (Ethayarajh et al. 2024) on unpaired examples: each distinct chosen answer of the pair data is
    desirable, each distinct rejected one undesirable; unpaired rows {prompt, completion, label} (`rlhfkit aggregate`'s
    kto.jsonl, TRL's unpaired preference) are used as they are. The reference point is the batch's KL estimate
    from mismatched (prompt, answer) pairs. Reference log-probs are computed once, as in `rlhfkit dpo`."""

    output_dir: str = "runs/kto"
    resume: bool = False
    model: ModelConfig = ModelConfig()
    ref_model: str = Field("", description="reference model; empty = model.path (with LoRA: adapter disabled)")
    lora_save: Literal["merged", "adapter"] = Field("merged", description="with model.lora: what to save")
    data: PairDataConfig = PairDataConfig()
    kto: KTOOptions = KTOOptions()
    train: PreferenceTrainConfig = PreferenceTrainConfig()


# -------------------------------------------------------------------------------------- data


def read_pairs(d: PairDataConfig, seed: int, pair_unpaired: bool = True) -> tuple[list[Any], list[Any]]:
    """(train, held-out) pairs; a file without a usable record is an error naming it.

    `pair_unpaired=False` (KTO) keeps unpaired rows `{prompt, completion, label}` (e.g. `rlhfkit
    aggregate`'s kto.jsonl) as `Unpaired` records instead of pairing them up.
    """
    if not (d.pairs or d.rankings):
        raise UserError("data.pairs: no preference data given; set data.pairs=FILE.jsonl (or data.rankings)")

    def load(source: str) -> tuple[list[Any], Counter]:
        if d.rankings or pair_unpaired:
            return load_pairs(source, d.completions if d.rankings else "", d.strict)
        records = read_records(source, "pairs", strict=d.strict, pair_unpaired=False)
        return records, Counter(records=len(records))

    train, counts = load(d.pairs or d.rankings)
    if not train:
        raise UserError(f"{d.pairs or d.rankings}: no usable preference pairs ({dict(counts)})")
    if d.valid:
        return train, load(d.valid)[0]
    return split_by_prompt(train, d.valid_fraction, seed)


def sequence_logps(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Summed log-probs of each sequence's response tokens (label != −100), shape (batch,), float32;
    the LM head runs on response positions only (`labelled_logits`)."""
    logits, targets = labelled_logits(model, batch)
    token_logps = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # row of each labelled token, row-major
    return torch.zeros(len(batch["labels"]), device=token_logps.device).index_add_(0, rows, token_logps)


def reference_logps(ref: Any, examples: list[SFTExample], collate: Callable, batch_size: int, device: Any) -> Tensor:
    """Every example's summed response log-prob under the reference model (no gradient).

    A peft model is run with its adapter disabled: the base model is the reference, no second copy.
    """
    out = []
    adapter_off = ref.disable_adapter() if hasattr(ref, "peft_config") else torch.no_grad()
    with adapter_off, torch.no_grad():
        ref.eval()
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size]).items()}
            out.append(sequence_logps(ref, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class Prepared:
    """Policy, tokenizer, engine and encoder shared by `run` (DPO) and `run_kto`."""

    def __init__(self, cfg: Config | KTOConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.engine = Engine(cfg.train, self.out, resume=cfg.resume)
        if self.engine.is_main:
            save_config(cfg, self.out)
        self.policy, self.tokenizer = load_causal_lm(cfg.model)
        disable_dropout(self.policy)
        if cfg.ref_model and cfg.ref_model != cfg.model.path:
            check_same_tokenizer(self.tokenizer, cfg.ref_model, "ref_model", cfg.model.trust_remote_code)
        max_length, note = fit_to_positions(self.policy.config, cfg.data.max_length, "data.max_length")
        if note:
            self.engine.print(f"[yellow]note: {note}[/]")
        self.max_length = max_length
        self.collate = sft_collate(self.tokenizer.pad_token_id)
        self.truncated = 0

    def encode(self, prompt: Text, response: Text) -> SFTExample:
        e = encode_example(self.tokenizer, prompt, response, self.cfg.data.prompt_template, self.max_length)
        self.truncated += e.truncated
        return e.ids, e.response_start

    def reference(self, named: dict[str, list[SFTExample]]) -> dict[str, Tensor]:
        """Reference log-probs of each named list of examples: read from the run folder on `--resume`
        when they were made from the same reference and the same token ids, else computed once
        (reference loaded, used, freed) and stored there with that fingerprint."""
        path = self.out / REFERENCE_FILE
        device, cfg = self.engine.device, self.cfg
        adapter_off = cfg.model.lora is not None and cfg.ref_model in ("", cfg.model.path)
        name = f"{cfg.model.path} (LoRA adapter disabled)" if adapter_off else cfg.ref_model or cfg.model.path
        fingerprint = hashlib.sha256(json.dumps([name, named], sort_keys=True).encode()).hexdigest()
        if cfg.resume and path.exists():
            stored = torch.load(path)
            if stored["fingerprint"] == fingerprint:
                self.engine.print(f"reference log-probs from {path}")
                return stored["logps"]
            self.engine.print(f"[yellow]{path} was made for other data; computing the reference log-probs again[/]")
        if adapter_off:
            ref = place(self.policy, device)
        else:
            ref_cfg = cfg.model.model_copy(update={"path": cfg.ref_model or cfg.model.path, "lora": None})
            ref = place(load_causal_lm(ref_cfg, self.tokenizer)[0], device)
        self.engine.print(f"reference log-probs of {sum(map(len, named.values()))} sequences under {name}")
        with self.engine.accelerator.autocast():  # the policy's log-probs are computed under it too (a no-op without)
            logps = {k: reference_logps(ref, v, self.collate, cfg.train.batch_size, device) for k, v in named.items()}
        del ref
        if self.engine.is_main:
            torch.save({"fingerprint": fingerprint, "logps": logps}, path)
        self.engine.accelerator.wait_for_everyone()
        return logps

    def warn_truncated(self, total: int) -> None:
        if self.truncated:
            self.engine.print(
                f"[yellow]warning: {self.truncated} of {total} sequences are longer than data.max_length="
                f"{self.max_length} tokens and were cut (the prompt keeps its end, the response its start and EOS)[/]"
            )

    def fit(
        self,
        sets: dict[str, list[dict[str, Any]]],
        collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]],
        loss_fn: Callable[[Any, dict[str, Tensor]], tuple[Tensor, dict[str, float]]],
        stats_fn: Callable[[Any, dict[str, Tensor]], tuple[Tensor, ...]],
        summarize: Callable[..., dict[str, float]],
        desc: str,
    ) -> dict[str, Any]:
        """Train on sets["train"] (held-out stats on sets["valid"] at each eval), then score the
        trained model on the train set. `stats_fn` gives a batch's per-example tensors and
        `summarize(*tensors, prefix=...)` turns them, concatenated over batches, into figures."""
        engine, size = self.engine, self.cfg.train.batch_size

        def evaluate(model: Any, items: list[dict[str, Any]], prefix: str) -> dict[str, float]:
            parts = [
                stats_fn(model, {k: v.to(engine.device) for k, v in collate(items[i : i + size]).items()})
                for i in range(0, len(items), size)
            ]
            return summarize(*(torch.cat(t) for t in zip(*parts, strict=True)), prefix=prefix)

        final = engine.fit(
            self.policy, sets["train"], collate, loss_fn,
            eval_fn=(lambda model: evaluate(model, sets["valid"], "valid_")) if sets["valid"] else None, desc=desc,
        )  # fmt: skip
        model = engine.unwrap()
        model.eval()
        with torch.no_grad():
            on_train = evaluate(model, sets["train"], "train_")
        return {
            **{k: v for k, v in final.items() if k.startswith("valid_")},
            **on_train,
            "truncated_sequences": self.truncated,
            "steps": engine.step,
        }

    def finish(self, results: dict[str, Any]) -> Path:
        model_dir = self.out / "model"
        engine = self.engine
        whole = engine.whole_model()  # every process: a collective when the weights are sharded
        if engine.is_main:
            merge = self.cfg.lora_save == "merged"
            save_model(whole, self.tokenizer, model_dir, merge_lora=merge, keep_adapter=False)
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))
        engine.accelerator.wait_for_everyone()
        engine.print(f"model in {model_dir}")
        engine.accelerator.end_training()
        return model_dir


# --------------------------------------------------------------------------------------- DPO


def dpo_collate(base: Callable) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    """B pairs -> one batch of 2B sequences (the B chosen, then the B rejected) and per-pair tensors."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = base([i["chosen"] for i in items] + [i["rejected"] for i in items])
        for key in ("margin", "ref_chosen", "ref_rejected"):
            batch[key] = torch.tensor([i[key] for i in items], dtype=torch.float32)
        return batch

    return collate


def dpo_terms(model: Any, batch: dict[str, Tensor], opts: DPOOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) of a collated batch: one forward pass."""
    logps = sequence_logps(model, batch)
    n = batch["margin"].shape[0]
    margin = batch["margin"] if opts.use_margins else None
    return dpo_loss(
        logps[:n], logps[n:], batch["ref_chosen"], batch["ref_rejected"], opts.beta, opts.loss,
        opts.label_smoothing, margin,
    )  # fmt: skip


def pair_stats(losses: Tensor, chosen: Tensor, rejected: Tensor, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}loss": float(losses.mean()),
        f"{prefix}accuracy": float((chosen > rejected).float().mean()),
        f"{prefix}reward_margin": float((chosen - rejected).mean()),
        f"{prefix}chosen_reward": float(chosen.mean()),
        f"{prefix}rejected_reward": float(rejected.mean()),
    }


def run(cfg: Config) -> Path:
    train_pairs, valid_pairs = read_pairs(cfg.data, cfg.train.seed)
    p = Prepared(cfg)
    encoded = {
        name: ([p.encode(x.prompt, x.chosen) for x in pairs], [p.encode(x.prompt, x.rejected) for x in pairs])
        for name, pairs in (("train", train_pairs), ("valid", valid_pairs))
    }
    p.warn_truncated(2 * (len(train_pairs) + len(valid_pairs)))
    ref = p.reference(
        {f"{name}_{side}": seqs[i] for name, seqs in encoded.items() for i, side in enumerate(("chosen", "rejected"))}
    )
    sets = {
        name: [
            {
                "chosen": c,
                "rejected": r,
                "margin": x.margin or 0.0,
                "ref_chosen": float(ref[f"{name}_chosen"][i]),
                "ref_rejected": float(ref[f"{name}_rejected"][i]),
            }
            for i, (x, c, r) in enumerate(zip(pairs, *encoded[name], strict=True))
        ]
        for name, pairs in (("train", train_pairs), ("valid", valid_pairs))
    }
    collate = dpo_collate(p.collate)
    p.engine.print(
        f"dpo ({cfg.dpo.loss}, beta={cfg.dpo.beta}): {cfg.model.path}, {len(train_pairs)} train / "
        f"{len(valid_pairs)} held-out pairs"
    )

    def loss_fn(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        losses, chosen, rejected = dpo_terms(model, batch, cfg.dpo)
        stats = pair_stats(losses.detach(), chosen, rejected)
        del stats["loss"]
        return losses.mean(), stats

    def stats(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return dpo_terms(model, batch, cfg.dpo)

    results = p.fit(sets, collate, loss_fn, stats, pair_stats, "dpo")
    return p.finish({**results, "train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs)})


# --------------------------------------------------------------------------------------- KTO


def kto_examples(records: list[Pair | Unpaired]) -> list[tuple[Text, Text, bool]]:
    """(prompt, answer, desirable) for every distinct labelled answer, chosen and rejected answers of
    pairs included; an answer both chosen and rejected (the middle of a ranking) appears once with each label."""
    seen: dict[tuple[str, str, bool], tuple[Text, Text, bool]] = {}
    for x in records:
        labelled = ((x.completion, x.label),) if isinstance(x, Unpaired) else ((x.chosen, True), (x.rejected, False))
        for answer, good in labelled:
            seen.setdefault((text_key(x.prompt), text_key(answer), good), (x.prompt, answer, good))
    return list(seen.values())


def mismatched(examples: list[tuple[Text, Text, bool]]) -> list[tuple[Text, Text]]:
    """Each example's prompt with the answer of the next example that has another prompt (KTO's KL
    estimate needs answers that do *not* fit their prompt); its own answer if all share one prompt."""
    keys = [text_key(p) for p, _, _ in examples]
    out = []
    for i, (prompt, answer, _) in enumerate(examples):
        j = next((j % len(examples) for j in range(i + 1, i + len(examples)) if keys[j % len(examples)] != keys[i]), i)
        out.append((prompt, examples[j][1] if j != i else answer))
    return out


def kto_collate(base: Callable) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    """B examples -> one batch of 2B sequences (the B examples, then their B mismatched pairs)."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = base([i["example"] for i in items] + [i["mismatched"] for i in items])
        batch["desirable"] = torch.tensor([i["desirable"] for i in items])
        for key in ("ref", "ref_kl"):
            batch[key] = torch.tensor([i[key] for i in items], dtype=torch.float32)
        return batch

    return collate


def kto_terms(model: Any, batch: dict[str, Tensor], opts: KTOOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(per-example losses, implicit rewards, reference point) of a collated batch: one forward pass."""
    logps = sequence_logps(model, batch)
    n = batch["ref"].shape[0]
    z0 = kto_reference_point(logps[n:], batch["ref_kl"])
    losses, rewards = kto_loss(
        logps[:n], batch["ref"], batch["desirable"], z0, opts.beta, opts.desirable_weight, opts.undesirable_weight
    )
    return losses, rewards, z0


def kto_stats(losses: Tensor, rewards: Tensor, desirable: Tensor, prefix: str = "") -> dict[str, float]:
    good, bad = rewards[desirable], rewards[~desirable]
    stats = {f"{prefix}loss": float(losses.mean())}
    if len(good) and len(bad):
        stats[f"{prefix}reward_margin"] = float(good.mean() - bad.mean())
    return stats


def run_kto(cfg: KTOConfig) -> Path:
    train_records, valid_records = read_pairs(cfg.data, cfg.train.seed, pair_unpaired=False)
    p = Prepared(cfg)
    examples = {"train": kto_examples(train_records), "valid": kto_examples(valid_records)}
    encoded = {
        name: ([p.encode(q, a) for q, a, _ in ex], [p.encode(q, a) for q, a in mismatched(ex)])
        for name, ex in examples.items()
    }
    p.warn_truncated(2 * sum(len(ex) for ex in examples.values()))
    ref = p.reference(
        {f"{name}_{kind}": seqs[i] for name, seqs in encoded.items() for i, kind in enumerate(("own", "kl"))}
    )
    sets = {
        name: [
            {
                "example": e,
                "mismatched": m,
                "desirable": good,
                "ref": float(ref[f"{name}_own"][i]),
                "ref_kl": float(ref[f"{name}_kl"][i]),
            }
            for i, ((_, _, good), e, m) in enumerate(zip(ex, *encoded[name], strict=True))
        ]
        for name, ex in examples.items()
    }
    n_good = sum(good for _, _, good in examples["train"])
    p.engine.print(
        f"kto (beta={cfg.kto.beta}): {cfg.model.path}, {n_good} desirable / {len(examples['train']) - n_good} "
        f"undesirable train examples, {len(examples['valid'])} held-out"
    )
    collate = kto_collate(p.collate)

    def loss_fn(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        losses, rewards, z0 = kto_terms(model, batch, cfg.kto)
        stats = kto_stats(losses.detach(), rewards, batch["desirable"])
        del stats["loss"]
        return losses.mean(), {**stats, "kl": float(z0)}

    def stats(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        losses, rewards, _ = kto_terms(model, batch, cfg.kto)
        return losses, rewards, batch["desirable"]

    results = p.fit(sets, collate, loss_fn, stats, kto_stats, "kto")
    counts = {"train_examples": len(examples["train"]), "desirable_examples": n_good}
    return p.finish({**results, **counts, "valid_examples": len(examples["valid"])})
