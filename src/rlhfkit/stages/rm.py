"""Stage 5, reward model: learn a scalar score of (prompt, completion) from human preferences.

The model is a pretrained LM with a scalar head (`AutoModelForSequenceClassification`,
`num_labels=1`; one more per user with `personalize=true`): the SFT model (decoder; reward read at
the EOS token) or an encoder such as all-MiniLM-L6-v2 (reward read at [CLS]). The head starts as
N(0, 1/√(d+1)), bias 0; dropout is off.

Data, exactly one of:
- `data.pairs`: `{prompt, chosen, rejected, margin?}`; loss −log σ(r_c − r_r − margin). TRL's
  implicit-prompt pairs (`{chosen, rejected}` conversations or texts with a shared start: that start
  is the prompt) and unpaired preference (`{prompt, completion, label}`: every desirable completion
  of a prompt over every undesirable one) are read as pairs too.
- `data.rankings` + `data.completions`: every ranking gives all C(K,2) pairs of its prompt; ties
  are dropped, identical candidate texts skipped, rankings marked unusable skipped (all counted).
- `data.ratings`: `{prompt, completion, score}`; mean squared error against the score.
Pairs are grouped by prompt and a prompt's group is one batch element, so all its pairs are in
the same batch; a decoder runs the prompt tokens a group's sequences share once for all of them
(`share_prompt`, `data.batching.collate_shared_prefix`). A malformed pair (identical chosen and
rejected, empty text) stops the run with `file:line` before training starts; fix or remove that line.

`personalize=true` learns each user's preferences too (pairs with a `user`: the `labeler_pairs`
export, or rankings, whose labeler is the user; docs/personalization.md): one more output per user
on the shared backbone (user j's reward = output 0 + output j). Every pair is trained twice, as
its user's and pooled (output 0 alone), so output 0 is the pooled model unknown users fall back to.
`results.json` then has, per user, held-out accuracy with the user and pooled (`users`).

After training, rewards are normalised: gain and bias are fitted so that the reference (SFT)
policy's own samples on training prompts score mean 0, std 1 (`normalize.*`; by default the policy
is the model the decoder RM started from; without one, the training responses are used and the
metadata says so). Output: `OUTPUT_DIR/model` (load with `rlhfkit.rewards.model.RewardModel.load`),
`results.json` (held-out accuracy, margin, loss, data counts, sequences cut to `data.max_length`),
`metrics.jsonl` per step.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.batching import group_by_prompt, make_pair_group, pair_collate, rating_collate, split_by_prompt
from rlhfkit.data.chat import PROMPT_TEMPLATE, render_prompt, split_user, with_user
from rlhfkit.data.formats import (
    Pair,
    Rating,
    Text,
    read_records,
    text_key,
)
from rlhfkit.engine.trainer import Engine, TrainConfig
from rlhfkit.errors import UserError
from rlhfkit.labels.pairs import pairs_with_counts
from rlhfkit.models.device import place
from rlhfkit.models.loading import BackboneOptions, ModelConfig, apply_lora, fit_to_positions, load_causal_lm
from rlhfkit.models.sampling import (
    ROLLOUT_TEMPERATURE,
    SamplingConfig,
    check_length_budget,
    sample,
    truncation_warning,
)
from rlhfkit.rewards.losses import mean_margin, mse_loss, pairwise_accuracy, pairwise_loss
from rlhfkit.rewards.model import RewardMeta, RewardModel, init_reward_head, load_backbone, reward_logits


class RMModelConfig(BackboneOptions):
    """The policy's loading options (`lora`, `dtype`, `gradient_checkpointing`, ...) plus where the
    reward model starts from. With `lora`, an adapter and the score head train; the saved model is
    merged (a plain sequence classifier)."""

    path: str = Field("", description="SFT model folder (decoder) or an encoder such as all-MiniLM-L6-v2")
    kind: Literal["auto", "decoder", "encoder"] = "auto"


class PairDataConfig(StrictModel):
    """Where preference pairs come from: what `rlhfkit rm`, `dpo` and `kto` read alike."""

    pairs: str = Field(
        "",
        description="pairs {prompt, chosen, rejected, margin?}, or TRL's implicit-prompt {chosen, rejected} "
        "or unpaired {prompt, completion, label} (JSONL or datasets folder, `path:split`; DPO pairs unpaired "
        "rows up, KTO uses them as they are)",
    )
    rankings: str = Field("", description="rankings file {prompt_id, labeler, ranking}; needs data.completions")
    completions: str = Field("", description="the completions the rankings refer to")
    valid: str = Field("", description="held-out data in the training format (`path:split`); empty = split off")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts held out")
    max_length: int = Field(512, gt=1, description="tokens per sequence; longer ones are cut, counted in results.json")
    prompt_template: str = Field(PROMPT_TEMPLATE, description="must match the policy's (stored with the model)")
    strict: bool = Field(False, description="unused columns are an error (default: ignored, named once in the log)")

    @model_validator(mode="after")
    def _one_source(self) -> PairDataConfig:
        sources = [k for k in ("pairs", "rankings", "ratings") if k in type(self).model_fields]
        given = [k for k in sources if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of {' / '.join(f'data.{k}' for k in sources)}, not {' and '.join(given)}")
        if self.rankings and not self.completions:
            raise ValueError("data.rankings needs data.completions (the candidates that were ranked)")
        return self


class DataConfig(PairDataConfig):
    """The reward model also learns from scalar ratings (regression)."""

    ratings: str = Field("", description="ratings file {prompt, completion, score} (MSE regression)")


class NormalizeConfig(StrictModel):
    enabled: bool = True
    policy: str = Field("", description="reference (SFT) policy; empty = model.path when that is a causal LM")
    prompts: str = Field("", description="prompts file; empty = the training prompts")
    max_prompts: int = Field(64, gt=0)
    samples_per_prompt: int = Field(4, gt=0)
    seed: int = 0
    min_std: float = Field(1e-2, gt=0, description="floor of the raw scores' std (nearly constant scores)")
    sampling: SamplingConfig = Field(
        SamplingConfig(temperature=ROLLOUT_TEMPERATURE),
        description="how the reference samples are drawn: use PPO's sampling settings (PPO warns if they differ)",
    )


class RMTrainConfig(TrainConfig):
    """Reward-model defaults, as class defaults so that overriding one field keeps the others."""

    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(8, gt=0, description="prompts per micro-batch, each with all its pairs")
    warmup_steps: int = Field(10, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    eval_every: int = Field(50, ge=0, description="evaluate every N steps (0 = only at the end)")


class Config(StrictModel):
    output_dir: str = "runs/rm"
    resume: bool = False
    model: RMModelConfig = RMModelConfig()
    data: DataConfig = DataConfig()
    use_margins: bool = Field(True, description="use per-pair margins where the data gives them")
    share_prompt: bool = Field(
        True,
        description="decoders: run the tokens a prompt's sequences share once for all of them (same rewards, "
        "less work; one process, sdpa/eager attention); off for remote-code models that ignore position_ids or "
        "4D attention masks",
    )
    personalize: bool = Field(
        False, description="learn each pair's `user` too (a head per user), pooled for unknown users"
    )
    normalize: NormalizeConfig = NormalizeConfig()
    train: RMTrainConfig = RMTrainConfig()


# ---- data -----------------------------------------------------------------------------------
def load_pairs(source: str, completions: str = "", strict: bool = False) -> tuple[list[Pair], Counter]:
    """Pairs from a pairs file, or from a rankings file when `completions` (the ranked candidates) is
    given; with the counts of what was used and dropped. DPO and KTO read their pairs here too."""
    if completions:
        rankings = read_records(source, "rankings", strict=strict)
        return pairs_with_counts(rankings, read_records(completions, "completions", strict=strict))
    pairs = read_records(source, "pairs", strict=strict)
    return pairs, Counter(pairs=len(pairs))


def load_data(d: DataConfig, seed: int) -> tuple[list[Any], list[Any], Counter]:
    """(train, held-out, counts): pairs (from a pairs file or rankings) or ratings."""
    if d.ratings:
        train: list[Any] = read_records(d.ratings, "ratings", strict=d.strict)
        counts: Counter = Counter(ratings=len(train))
        if d.valid:
            return train, read_records(d.valid, "ratings", strict=d.strict), counts
        return *split_by_prompt(train, d.valid_fraction, seed), counts
    completions = d.completions if d.rankings else ""
    train, counts = load_pairs(d.pairs or d.rankings, completions, d.strict)
    if not train:
        raise UserError(f"{d.pairs or d.rankings}: no usable preference pairs ({dict(counts)})")
    if d.valid:
        return train, load_pairs(d.valid, completions, d.strict)[0], counts
    return *split_by_prompt(train, d.valid_fraction, seed), counts


def pair_terms(
    rewards: torch.Tensor, batch: dict[str, torch.Tensor], use_margins: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected, margin) of every pair in a collated batch of prompt groups."""
    chosen, rejected = rewards[batch["chosen_idx"]], rewards[batch["rejected_idx"]]
    return chosen, rejected, batch["margin"] if use_margins else torch.zeros_like(chosen)


def pair_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], use_margins: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """The engine's loss_fn for preference pairs: Bradley-Terry loss, plus accuracy and margin to log."""
    chosen, rejected, margin = pair_terms(reward_logits(model, batch), batch, use_margins)
    c, r = chosen.detach(), rejected.detach()
    stats = {"accuracy": float(pairwise_accuracy(c, r)), "margin": float(mean_margin(c, r))}
    return pairwise_loss(chosen, rejected, margin), stats


def rating_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return mse_loss(reward_logits(model, batch), batch["score"]), {}


def rating_metrics(predicted: torch.Tensor, target: torch.Tensor, prompt_keys: list[str]) -> dict[str, float]:
    """MSE, and pairwise accuracy/margin over ratings of the same prompt with different scores."""
    metrics = {"valid_loss": float(mse_loss(predicted, target))}
    by_prompt: dict[str, list[int]] = {}
    for i, k in enumerate(prompt_keys):
        by_prompt.setdefault(k, []).append(i)
    better, worse = [], []
    for rows in by_prompt.values():
        for i, j in combinations(rows, 2):
            if target[i] != target[j]:
                hi, lo = (i, j) if target[i] > target[j] else (j, i)
                better.append(hi)
                worse.append(lo)
    if better:
        chosen, rejected = predicted[better], predicted[worse]
        metrics["valid_accuracy"] = float(pairwise_accuracy(chosen, rejected))
        metrics["valid_margin"] = float(mean_margin(chosen, rejected))
    return metrics


# ---- personalisation ------------------------------------------------------------------------
def personal_pairs(pairs: list[Pair]) -> list[Pair]:
    """Every pair as its user's (`with_user`: scored by output 0 + the user's output) and pooled (the
    prompt as `RewardModel.encode` leaves it once the user line is off: output 0 alone): what
    `personalize=true` trains and holds out. Why both: without the pooled copies output 0 would be
    any share of the users' common taste; with them it is the pooled model unknown users get."""
    out: list[Pair] = []
    for p in pairs:
        if p.user is None:
            out.append(p)
            continue
        out.append(p.model_copy(update={"prompt": with_user(p.prompt, p.user)}))
        out.append(p.model_copy(update={"prompt": split_user(with_user(p.prompt, p.user))[1], "user": None}))
    return out


def user_accuracy(rm: RewardModel, pairs: list[Pair]) -> dict[str, dict[str, float]]:
    """Per user of the held-out pairs: their count, accuracy scored as that user, and pooled."""
    by_user: dict[str, list[Pair]] = {}
    for p in pairs:
        if p.user is not None:
            by_user.setdefault(p.user, []).append(p)
    out = {}
    for user, ps in sorted(by_user.items()):
        acc = {}
        for mode, who in (("accuracy", user), ("pooled_accuracy", None)):
            prompts = [with_user(p.prompt, who) for p in ps]
            chosen = rm.score(prompts, [p.chosen for p in ps])
            rejected = rm.score(prompts, [p.rejected for p in ps])
            acc[mode] = float(pairwise_accuracy(chosen, rejected))
        out[user] = {"pairs": len(ps), **acc}
    return out


# ---- normalisation --------------------------------------------------------------------------
def reference_policy(cfg: Config, kind: str) -> str:
    """The policy whose samples normalisation scores: `normalize.policy`, else the SFT model the
    decoder reward model starts from; "" when there is none."""
    starts_from_lm = kind == "decoder" and RewardMeta.read(cfg.model.path) is None  # i.e. from the SFT model
    return cfg.normalize.policy or (cfg.model.path if starts_from_lm else "")


def reference_samples(
    cfg: Config, kind: str, train_prompts: list[Text], device: Any = "cpu"
) -> tuple[list[Text], list[str], str] | None:
    """(prompts, the reference policy's samples drawn with `normalize.sampling`, description), or None
    when no policy is known."""
    n = cfg.normalize
    policy = reference_policy(cfg, kind)
    if not policy:
        return None
    prompts = [r.prompt for r in read_records(n.prompts, "prompts")] if n.prompts else list(train_prompts)
    random.Random(n.seed).shuffle(prompts)
    prompts = prompts[: n.max_prompts]
    m = cfg.model
    policy_cfg = ModelConfig(
        path=policy, dtype=m.dtype, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code
    )
    model, tokenizer = load_causal_lm(policy_cfg)
    place(model, device)
    torch.manual_seed(n.seed)
    rendered = [render_prompt(tokenizer, p, cfg.data.prompt_template) for p in prompts]
    samples = sample(
        model, tokenizer, rendered, n.sampling, num_samples=n.samples_per_prompt, desc="normalisation samples"
    )
    if samples.prompts_truncated:
        print(truncation_warning(samples.prompts_truncated, len(prompts), n.sampling, "normalize.sampling"))
    repeated = [p for p in prompts for _ in range(n.samples_per_prompt)]
    where = "given prompts" if n.prompts else "training prompts"
    return repeated, samples.texts, f"samples of {policy} on {len(prompts)} {where}"


def training_responses(train: list[Pair] | list[Rating]) -> tuple[list[Text], list[Text]]:
    """Every distinct (prompt, response) of the training data: chosen and rejected, or rated."""
    seen: dict[tuple[str, str], tuple[Text, Text]] = {}
    for x in train:
        for resp in (x.chosen, x.rejected) if isinstance(x, Pair) else (x.completion,):
            seen[(text_key(x.prompt), text_key(resp))] = (x.prompt, resp)
    return [p for p, _ in seen.values()], [r for _, r in seen.values()]


def normalize(rm: RewardModel, cfg: Config, train: list[Pair] | list[Rating], out: Path) -> str | None:
    """Fit gain/bias on the reference policy's samples (or on the training responses) and record them;
    returns a warning when the scores were nearly constant."""
    prompts = list({text_key(x.prompt): x.prompt for x in train}.values())
    ref = reference_samples(cfg, rm.meta.kind, prompts, device=next(rm.model.parameters()).device)
    if ref is not None:
        ref_prompts, ref_texts, source = ref
    else:
        ref_prompts, ref_texts = training_responses(train)
        source = "training responses (no reference policy: set normalize.policy to normalise on its samples)"
    raw = rm.raw_scores(ref_prompts, ref_texts)
    sampling = cfg.normalize.sampling.distribution() if ref is not None else None
    floored = rm.fit_normalization(raw, source, cfg.normalize.min_std, sampling)
    rows = [
        {"prompt": p if isinstance(p, str) else [m.model_dump() for m in p], "completion": c, "raw_reward": float(r)}
        for p, c, r in zip(ref_prompts, ref_texts, raw, strict=True)
    ]
    atomic_write_text(out / "normalization_samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if floored:
        return (
            f"the raw scores of {source} are nearly constant (std {rm.meta.normalization['raw_std']:.3g} < "
            f"normalize.min_std {cfg.normalize.min_std}): the model barely tells them apart; they are divided by "
            "the floor instead of their std"
        )
    return None


# ---- the stage ------------------------------------------------------------------------------
def run(cfg: Config) -> Path:
    d = cfg.data
    if not (d.pairs or d.rankings or d.ratings):
        raise UserError("data: no training data; set data.pairs, data.rankings (+ data.completions) or data.ratings")
    if not cfg.model.path:
        raise UserError("model.path: no model given; set it to the SFT model or an encoder folder")
    out = Path(cfg.output_dir)
    engine = Engine(cfg.train, out, resume=cfg.resume)
    if engine.is_main:
        save_config(cfg, out)

    # Data first: a bad line fails in seconds, not after loading a model.
    regression = bool(d.ratings)
    if cfg.personalize and regression:
        raise UserError("personalize=true learns from preference pairs with a `user`; data.ratings has none")
    train, valid, counts = load_data(d, cfg.train.seed)
    engine.print("data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    users = sorted({p.user for p in train if p.user is not None}) if cfg.personalize else []
    if cfg.personalize and not users:
        raise UserError(
            f"personalize=true: no pair of {d.pairs or d.rankings} names a `user`; use the server's labeler_pairs "
            "export or rankings (their labeler is the user)"
        )
    if users and RewardMeta.read(cfg.model.path) is not None:
        raise UserError(
            f"model.path: personalize=true starts from an LM (the SFT model or an encoder), not the "
            f"reward model {cfg.model.path}: it adds an output per user"
        )
    if users:
        engine.print(f"personalised for {len(users)} users: {', '.join(users[:10])}{' ...' if len(users) > 10 else ''}")

    # Model.
    model, tokenizer, kind = load_backbone(cfg.model.path, cfg.model.kind, cfg.model, outputs=1 + len(users))
    policy = reference_policy(cfg, kind) if cfg.normalize.enabled else ""
    if policy:  # normalisation samples after training: a budget the policy cannot hold must fail before it
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(policy, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"normalize.policy: cannot load {policy!r} ({e})") from None
        check_length_budget(config, cfg.normalize.sampling, "normalize.sampling")
    if RewardMeta.read(cfg.model.path) is None:  # a fresh head; an existing reward model keeps its trained one
        torch.manual_seed(cfg.train.seed)
        init_reward_head(model)
    if cfg.model.lora is not None:  # after the head's initialisation: the adapter trains it as it is
        model = apply_lora(model, cfg.model.lora, "SEQ_CLS")
    max_length, note = fit_to_positions(model.config, d.max_length, "data.max_length")
    if note:
        engine.print(f"[yellow]note: {note}[/]")
    meta = RewardMeta(kind=kind, prompt_template=d.prompt_template, max_length=max_length, users=users)
    rm = RewardModel(model, tokenizer, meta)
    pad = tokenizer.pad_token_id
    if regression:
        train_set: list[Any] = [(rm.encode(r.prompt, r.completion), r.score) for r in train]
        valid_set: list[Any] = [(rm.encode(r.prompt, r.completion), r.score) for r in valid]
        collate = rating_collate(pad)
    else:
        fit_train, fit_valid = (personal_pairs(train), personal_pairs(valid)) if users else (train, valid)
        train_set = [make_pair_group(g, rm.encode) for g in group_by_prompt(fit_train)]
        valid_set = [make_pair_group(g, rm.encode) for g in group_by_prompt(fit_valid)]
        # a 4D mask, and the trunk called directly: not with flash attention, nor under DDP (whose
        # gradient sync hooks into the wrapped model's forward)
        share = cfg.share_prompt and kind == "decoder" and cfg.model.attn_implementation != "flash_attention_2"
        collate = pair_collate(pad, share_prefix=share and engine.accelerator.num_processes == 1)
    truncated = rm.truncated  # read now: normalisation encodes more sequences
    if truncated:
        n_seqs = len(train_set) + len(valid_set) if regression else sum(len(g.sequences) for g in train_set + valid_set)
        engine.print(
            f"[yellow]warning: {truncated} of {n_seqs} training and held-out sequences are longer than "
            f"data.max_length={max_length} tokens and were cut; raise data.max_length to score them whole[/]"
        )
    n_params = sum(p.numel() for p in model.parameters())
    engine.print(
        f"rm: {kind} {cfg.model.path} ({n_params / 1e6:.2f}M params), "
        f"{len(train_set)} train / {len(valid_set)} held-out {'ratings' if regression else 'prompt groups'}"
    )

    loss_fn = rating_loss if regression else partial(pair_loss, use_margins=cfg.use_margins)

    def eval_fn(model) -> dict[str, float]:
        parts: list[tuple[torch.Tensor, ...]] = []
        for i in range(0, len(valid_set), cfg.train.batch_size):
            batch = {k: v.to(engine.device) for k, v in collate(valid_set[i : i + cfg.train.batch_size]).items()}
            rewards = reward_logits(model, batch)
            parts.append((rewards, batch["score"]) if regression else pair_terms(rewards, batch, cfg.use_margins))
        cols = [torch.cat(c) for c in zip(*parts, strict=True)]
        if regression:
            return rating_metrics(cols[0], cols[1], [text_key(r.prompt) for r in valid])
        chosen, rejected, margin = cols
        return {
            "valid_loss": float(pairwise_loss(chosen, rejected, margin)),
            "valid_accuracy": float(pairwise_accuracy(chosen, rejected)),
            "valid_margin": float(mean_margin(chosen, rejected)),
        }

    final = engine.fit(model, train_set, collate, loss_fn, eval_fn=eval_fn if valid_set else None, desc="rm")
    rm.model = engine.whole_model()  # every process: a collective when the weights are sharded
    if engine.is_main:
        if cfg.normalize.enabled:
            warning = normalize(rm, cfg, train, out)
            if warning:
                engine.print(f"[yellow]warning: {warning}[/]")
            engine.print(
                f"normalised on {rm.meta.normalization['source']}: gain {rm.meta.gain:.4g}, bias {rm.meta.bias:.4g}"
            )
        rm.save(out / "model")
        results = {
            **{k: v for k, v in final.items() if k.startswith("valid_")},
            "final_train_loss": final.get("loss"),
            "steps": engine.step,
            "kind": kind,
            "data": dict(counts),
            "truncated_sequences": truncated,
            "normalization": rm.meta.normalization,
        }
        if users:
            results["users"] = user_accuracy(rm, valid)
            for user, acc in results["users"].items():
                engine.print(
                    f"{user}: held-out accuracy {acc['accuracy']:.3f} personalised, "
                    f"{acc['pooled_accuracy']:.3f} pooled ({acc['pairs']} pairs)"
                )
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        if "valid_accuracy" in final:
            engine.print(f"held-out accuracy {final['valid_accuracy']:.3f}, mean margin {final['valid_margin']:.3f}")
    engine.accelerator.wait_for_everyone()
    engine.print(f"reward model in {out / 'model'}")
    engine.accelerator.end_training()
    return out / "model"
