"""Stage 6, PPO: fine-tune the SFT policy against a reward, with a KL penalty to the SFT model.

Each step: take a batch of prompts -> sample responses (at a temperature, from the full softmax;
stop at EOS or a stop string) -> score them with the reward source -> per-token rewards (score at
the last token, -beta * KL to the reference model at every token) -> GAE advantages -> several
epochs of clipped minibatch updates of the policy and its value head. The math is in `rlhfkit.rl.core`; this file is
the loop, readable top to bottom in `train_ppo`.

`ppo.algorithm=rloo|grpo` runs the same loop critic-free: K = `ppo.num_generations` responses per
prompt, and instead of GAE on a value function each response's advantage is its return (score minus
beta * its summed KL, in kl.mode=reward) against the other responses to its prompt: the mean of the
others (RLOO) or the group's mean and std (GRPO); math in `rlhfkit.rl.group`. No value head is
trained, loaded or saved. The KL may instead be a k3 loss term (kl.mode=loss), as in GRPO.
A prompt's K responses share its tokens: they are sampled from one prefill of it, and the reference
pass and the update run it once per shared row (`ppo.share_prompt`, `Rollout.shared`).

The reference model is a frozen copy of the starting policy; with LoRA it is the same network with
the adapter switched off (no second copy in memory). Outputs: OUTPUT_DIR/model (merged policy),
metrics.jsonl (one row per step), samples.jsonl (responses every `log_samples_every` steps),
results.json (summary and why training stopped), checkpoints/ (for --resume).

Personalisation: a prompt with a `user` is asked as that user (`data.chat.with_user`, a system line
naming them) and the reward scores that same prompt, so a personalised reward model scores each
response as its user's (docs/personalization.md).

Several processes (`accelerate launch --num_processes N`, data-parallel): each samples and scores
its share of the rollout (whole prompts, 1/N of them), and every batch statistic (reward
normalisation, whitening, the KL controller's KL, the logged metrics) is all-reduced over the
global batch; each response is drawn from its own seeded generator, so N processes sample exactly
the responses one process would. Gradients are averaged across processes (DDP) with the loss
normalised by the global minibatch's tokens. Process 0 writes the outputs.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from rlhfkit.config import StrictModel, atomic_write_text, save_config
from rlhfkit.data.chat import asked_prompt, render_prompt
from rlhfkit.data.formats import read_records, text_to_json
from rlhfkit.engine.metrics import truncate_jsonl
from rlhfkit.engine.progress import Progress
from rlhfkit.engine.trainer import Engine, EngineConfig, NonFiniteError
from rlhfkit.errors import UserError
from rlhfkit.models.device import place
from rlhfkit.models.loading import ModelConfig, check_same_tokenizer, disable_dropout, load_causal_lm, save_model
from rlhfkit.models.sampling import ROLLOUT_TEMPERATURE, SamplingConfig, check_length_budget, sample
from rlhfkit.models.value import PolicyAndValue, load_critic, response_logits
from rlhfkit.rewards.base import RewardSource
from rlhfkit.rewards.build import RewardConfig, build_reward
from rlhfkit.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    Reduce,
    batch_mean,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_loss,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    nonfinite,
    per_token_rewards,
    policy_loss,
    score_scale,
    value_loss,
    zero_padding,
)
from rlhfkit.rl.group import grpo_advantages, rloo_advantages
from rlhfkit.rl.rollout import Rollout, pass_cost_on

# ------------------------------------------------------------------------------------ config


class AdaptiveKLConfig(StrictModel):
    target: float = Field(6.0, gt=0, description="KL per response (summed over tokens) that beta steers towards")
    horizon: int = Field(10000, gt=0, description="responses over which beta changes by at most 20%")


class KLConfig(StrictModel):
    kind: Literal["k1", "k2", "k3"] | None = Field(
        None,
        description="estimator: k1 = log(pi/pi_ref); k2 = (log(pi/pi_ref))^2 / 2; k3 = (r-1) - log r with "
        "r = pi_ref/pi; default: k1 in mode=reward, k3 in mode=loss (k1 is refused there: no gradient)",
    )
    beta: float = Field(0.05, ge=0, description="KL coefficient (the initial one if adaptive)")
    mode: Literal["reward", "loss"] = Field("reward", description="penalise KL in the reward, or as a loss term")
    adaptive: AdaptiveKLConfig | None = Field(None, description="adaptive beta (Ziegler et al.); null = fixed")

    @model_validator(mode="after")
    def _kind_fits_mode(self) -> KLConfig:
        """k1 as a loss has an expected gradient of zero on the policy's own samples
        (E_pi[grad log pi] = 0): the penalty would be logged but never pull the policy back."""
        if self.kind == "k1" and self.mode == "loss":
            raise ValueError(
                "kind=k1 with mode=loss: as a loss, k1's expected gradient on the policy's own samples is zero, "
                "so the KL term would not pull the policy towards the reference; use kind=k3 (the default for "
                "mode=loss) or k2, or mode=reward for k1"
            )
        return self

    @property
    def estimator(self) -> Literal["k1", "k2", "k3"]:
        """`kind`, or its default for the mode (left unset in the config, so that changing only the mode
        also changes the estimator)."""
        return self.kind or ("k3" if self.mode == "loss" else "k1")


class PPOConfig(StrictModel):
    batch_size: int = Field(64, gt=0, description="responses per rollout (prompts x ppo.num_generations)")
    mini_batch_size: int = Field(16, gt=0, description="responses per optimizer step")
    micro_batch_size: int = Field(
        0, ge=0, description="most responses per forward/backward (bounds memory); 0 = mini_batch_size"
    )
    epochs: int = Field(4, gt=0, description="passes over each rollout")
    clip: float = Field(0.2, gt=0, description="policy ratio clip range")
    value_clip: float = Field(0.2, gt=0, description="value clip range")
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_rewards: bool = False
    normalize_rewards: bool = Field(
        False, description="subtract the first rollout's mean, divide by its std (for sources not normalised)"
    )
    normalize_min_std: float = Field(
        1e-2, gt=0, description="floor of that std: a nearly constant first rollout must not scale scores by 1e6"
    )
    reward_clip: float | None = Field(None, gt=0, description="clip scores to +-this")
    missing_eos_penalty: float | None = Field(-1.0, description="score of a response that never ends; null = off")
    value_init: Literal["zero", "reward_model"] = Field(
        "zero", description="zero: value head on the policy; reward_model: separate critic from a reward model"
    )
    critic_path: str = Field("", description="reward-model folder for value_init=reward_model (default: the reward)")
    kl: KLConfig = KLConfig()
    algorithm: Literal["ppo", "rloo", "grpo"] = Field(
        "ppo",
        description="ppo: GAE on a value function; rloo: leave-one-out baseline; grpo: group-normalised "
        "advantages (rloo and grpo: no critic, ppo.num_generations responses per prompt)",
    )
    num_generations: int = Field(
        1, ge=1, description="responses per prompt (K; rloo/grpo need K >= 2); ppo.batch_size counts responses"
    )
    scale_advantages: bool = Field(True, description="grpo: divide by the group's std (false: only subtract the mean)")
    share_prompt: bool = Field(
        True,
        description="rloo/grpo: the reference pass and the update run a prompt's tokens once for its K responses "
        "(the same log-probs up to float rounding, from fewer tokens; not with flash_attention_2); off for "
        "remote-code models that ignore position_ids or 4D attention masks",
    )

    @model_validator(mode="after")
    def _algorithm(self) -> PPOConfig:
        """Critic-free algorithms need a group to compare with and have no value function to initialise."""
        k, algo = self.num_generations, self.algorithm
        if algo != "ppo" and k < 2:
            raise ValueError(
                f"algorithm={algo} compares each response with the other responses to its prompt: set "
                f"ppo.num_generations to 2 or more (it is {k})"
            )
        if algo == "ppo" and k != 1:
            raise ValueError(f"num_generations={k} is for algorithm=rloo or grpo; ppo samples one response per prompt")
        if self.batch_size % k:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_generations {k}")
        if algo != "ppo" and self.value_init != "zero":
            raise ValueError(f"value_init={self.value_init}: algorithm={algo} has no critic; leave value_init unset")
        return self

    @model_validator(mode="after")
    def _sizes(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}"
            )
        if self.micro_batch_size > self.mini_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} exceeds mini_batch_size {self.mini_batch_size}")
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.mini_batch_size


class StopConfig(StrictModel):
    max_steps: int = Field(100, gt=0, description="PPO steps (rollout + update)")
    reward_threshold: float | None = Field(None, description="stop once a rollout's mean reward reaches this")
    kl_ceiling: float | None = Field(None, gt=0, description="stop (reward hacking?) once KL per response exceeds this")


class PPOTrainConfig(EngineConfig):
    """The optimizer, schedule and checkpoints (the engine's settings), with PPO's defaults.

    Differs from the supervised stages: a smaller lr (1e-5) and Adam eps 1e-5 (PPO detail 12), a
    line printed every step, and no batch sizes or step counts here: those are `ppo.batch_size`,
    `ppo.mini_batch_size`, `ppo.micro_batch_size`, `ppo.epochs` and `stop.max_steps`.
    """

    lr: float = Field(1e-5, gt=0)
    adam_eps: float = 1e-5
    log_every: int = Field(1, gt=0, description="print a line every N steps (metrics.jsonl gets every step)")
    save_every: int = Field(0, ge=0, description="checkpoint every N PPO steps (0 = only at the end)")


class PPOSamplingConfig(SamplingConfig):
    temperature: float = Field(ROLLOUT_TEMPERATURE, gt=0, description="the log-probs use the same temperature")

    @model_validator(mode="after")
    def _full_distribution(self) -> PPOSamplingConfig:
        """The ratio and the KL use the log-probs of the full tempered softmax; tokens drawn from a
        top-k/top-p-filtered one come from another distribution (measured 2.5-3.9 nats/token apart),
        so PPO would optimise a ratio that is not the one it samples from. TRL fixes top_k=0, top_p=1."""
        if self.top_k != 0 or self.top_p != 1.0:
            raise ValueError(
                "top_k/top_p: PPO samples from the full softmax at `temperature` (its log-probs, ratio and KL are "
                "those of that distribution); set sampling.top_k=0 and sampling.top_p=1, and shape the "
                "distribution with sampling.temperature"
            )
        return self


class Config(StrictModel):
    output_dir: str = "runs/ppo"
    resume: bool = False
    prompts: str = Field("", description="prompts (JSONL or datasets folder, `path:split`): {id, prompt} or {prompt}")
    strict: bool = Field(False, description="unused columns are an error (default: ignored, named once in the log)")
    model: ModelConfig = ModelConfig()
    ref_model: str = Field("", description="reference model; empty = model.path (with LoRA: adapter disabled)")
    reward: RewardConfig = RewardConfig()
    sampling: PPOSamplingConfig = PPOSamplingConfig()
    ppo: PPOConfig = PPOConfig()
    stop: StopConfig = StopConfig()
    train: PPOTrainConfig = PPOTrainConfig()
    log_samples_every: int = Field(10, ge=0, description="write sample responses every N steps (0 = never)")
    log_samples: int = Field(4, gt=0, description="responses written each time (e.g. the whole batch, for gold curves)")


# ------------------------------------------------------------------------------- rollouts


def prompt_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of PPO step `step`: consecutive slices of a fresh permutation per pass over the file.

    A pure function of the step, so a resumed run takes the same prompts as an uninterrupted one.
    """
    first = step * batch_size
    perms: dict[int, Tensor] = {}
    out = []
    for pos in range(first, first + batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][i]))
    return out


def rollout_seeds(seed: int, step: int, rows: range) -> list[int]:
    """The seed of each response of PPO step `step`, by its position `rows` in the global rollout.

    A pure function of (seed, step, row): the same response is drawn whichever process samples it
    and in whatever batch, so N processes with 1/N of the rollout each sample what one process does,
    and a resumed run samples what an uninterrupted one did.
    """
    return [(seed * 1_000_003 + step) * 1_000_033 + row for row in rows]


def process_share(p: PPOConfig, num_processes: int) -> int:
    """Prompts each process samples per step; a UserError if the batch does not split evenly.

    Whole prompts per process: RLOO/GRPO compare a response with the other responses to its prompt,
    so a prompt's K responses must stay together.
    """
    prompts = p.batch_size // p.num_generations
    if prompts % num_processes:
        raise UserError(
            f"ppo.batch_size={p.batch_size} is {prompts} prompts x {p.num_generations} responses, which does not "
            f"split over {num_processes} processes (each samples whole prompts): make the number of prompts "
            f"(ppo.batch_size / ppo.num_generations) a multiple of {num_processes}"
        )
    if p.mini_batch_size % num_processes:
        raise UserError(
            f"ppo.mini_batch_size={p.mini_batch_size} (responses per optimizer step, over all processes) does not "
            f"split over {num_processes} processes: make it a multiple of {num_processes}"
        )
    return prompts // num_processes


def all_processes(ok: bool, reduce: Reduce | None) -> bool:
    """True only if `ok` holds on every process: a step is skipped everywhere or nowhere (a process
    that skipped alone would leave the others waiting in a collective)."""
    return ok if reduce is None else bool(reduce(torch.tensor(float(not ok))) == 0)


def shape_scores(raw: Tensor, ended: Tensor, cfg: PPOConfig, baseline: tuple[float, float]) -> Tensor:
    """Reward-source scores -> the scores PPO optimises: optional normalisation, clipping, and the EOS trick.

    The missing-EOS penalty comes last and replaces the score, so a response that rambles until the
    length limit is worth exactly that, whatever the reward model thinks of it (PPO detail 6).
    """
    scores = raw.clone()
    if cfg.normalize_rewards:
        scores = (scores - baseline[0]) / baseline[1]
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    return scores


@torch.no_grad()
def score_tokens(
    model: PolicyAndValue,
    hidden: Tensor | None,
    ref: Any,
    adapter_off: bool,
    ro: Rollout,
    temperature: float,
    chunk: int,
    first_minibatches: list[Tensor],
) -> None:
    """Log-probs (policy and reference), values and entropy of the sampled tokens, into `ro.tokens`.

    Computed once, before any update: these are the "old" policy's numbers that the clipped
    objective compares against. Logits are divided by the sampling temperature (PPO detail 3).
    The policy's come from `hidden`, its last hidden states recorded during generation (no second
    pass over its trunk); the reference model runs a forward pass, over at most `chunk` rows at a
    time (see `Rollout.micro_batches`). `adapter_off`: `ref` is the LoRA policy itself, run with its
    adapter disabled.

    `hidden=None` (mixed precision; call it under the accelerator's autocast): the policy runs the
    forward the update runs (`model(...)`, as in `ppo_loss`), and both models run in the
    micro-batches `_update` will cut from `first_minibatches` (the first epoch's). Why: under
    autocast, the sampling loop's float32 hidden states, and even the same forward over other
    batch-mates (other widths), give log-probs ~1e-3 from the update's, so the first update's ratio
    would start that far from 1; the same forward over the same rows makes it exactly 1.
    """
    B, T = ro.tokens["response_ids"].shape
    for key in ("logp", "ref_logp", "values", "entropy"):
        ro.tokens[key] = torch.zeros(B, T, device=ro.input_ids.device)
    groups = [torch.arange(B, device=ro.input_ids.device)] if hidden is not None else first_minibatches
    for index in (part for rows in groups for part in ro.micro_batches(rows, chunk)):
        ids, mask, start, tok = ro.rows(index)
        shared = ro.shared(index)
        width = tok["response_ids"].shape[1]
        if hidden is None:
            logits, values = model(ids, mask, start, shared)
        else:
            logits, values = model.heads(hidden[index, :width], ids, mask, start)
        ro.tokens["logp"][index, :width] = logprobs_from_logits(logits, tok["response_ids"], temperature)
        ro.tokens["values"][index, :width] = values
        ro.tokens["entropy"][index, :width] = entropy_from_logits(logits, temperature)
        with ref.disable_adapter() if adapter_off else nullcontext():
            ref_logits = response_logits(ref, ids, mask, start, shared)
        ro.tokens["ref_logp"][index, :width] = logprobs_from_logits(ref_logits, tok["response_ids"], temperature)


# ------------------------------------------------------------------------------ the loop


def train_ppo(cfg: Config, reward: RewardSource | None = None) -> dict[str, Any]:
    """Run PPO as configured; returns the summary written to results.json.

    `reward` replaces `cfg.reward` with a reward source built in Python (any object with
    `score(prompts, completions) -> tensor`), e.g. a function defined in a notebook.
    """
    from accelerate.utils import gather_object

    if not cfg.prompts:
        raise UserError("prompts: no prompts file given; set prompts=FILE.jsonl")
    out = Path(cfg.output_dir)
    engine = Engine(cfg.train, out, resume=cfg.resume)
    if engine.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise UserError(
            f"ppo runs data-parallel (DDP) only, not under {engine.accelerator.distributed_type.value}: its rollout "
            "samples from the whole policy in each process; launch it with configs/accelerate/ddp.yaml (or "
            "`accelerate launch --multi_gpu --num_processes N`)"
        )
    world, rank, reduce = engine.num_processes, engine.accelerator.process_index, engine.all_sum
    share = process_share(cfg.ppo, world)
    # On CPU, numbers below 1e-38 (saturated GELUs, masked attention) are ~100x slower and never matter:
    # flushing them to zero makes a PPO step up to 40% faster (process-wide, like the thread count).
    torch.set_flush_denormal(True)
    if engine.is_main:
        save_config(cfg, out)
    records = read_records(cfg.prompts, "prompts", strict=cfg.strict)
    # a prompt's `user` is part of what the policy reads and what the reward scores (personalisation)
    asked = [asked_prompt(r) for r in records]
    for warning in normalization_mismatches(cfg):
        engine.print(f"[yellow]warning: {warning}[/]")
    p = cfg.ppo
    temperature = cfg.sampling.temperature
    if reward is None:
        reward = build_reward(cfg.reward, engine.device)
    policy, tokenizer, ref, critic = load_models(cfg, engine.device)
    adapter_off = ref is policy  # LoRA: the reference is the policy with its adapter disabled
    check_length_budget(policy.config, cfg.sampling)
    if not adapter_off:  # a separate reference model reads the same prompts and responses
        check_length_budget(ref.config, cfg.sampling)
    updates_per_step = p.epochs * (p.batch_size // p.mini_batch_size)
    mixed = cfg.train.mixed_precision != "no"  # the rollout is then scored by the update's forward (score_tokens)
    critic_free = p.algorithm != "ppo"
    # K responses per prompt: its tokens run once for all of them (a 4D mask: not with flash attention)
    share_prompt = critic_free and p.share_prompt and cfg.model.attn_implementation != "flash_attention_2"
    model = PolicyAndValue(policy, critic, value=not critic_free)
    model = engine.setup(model, total_steps=cfg.stop.max_steps * updates_per_step)
    kl_ctl = (
        AdaptiveKLController(p.kl.beta, p.kl.adaptive.target, p.kl.adaptive.horizon)
        if p.kl.adaptive
        else FixedKLController(p.kl.beta)
    )

    # --- resume: weights, optimizer, schedule and RNG come back through the engine; the rest here
    state = engine.load_checkpoint() or {}
    step = int(state.get("ppo_step", 0))
    if "kl_ctl" in state:
        kl_ctl.load_state_dict(state["kl_ctl"])
    baseline: tuple[float, float] | None = tuple(state["baseline"]) if "baseline" in state else None  # type: ignore
    stop_reason: str | None = state.get("stop_reason")
    engine.metrics.truncate_after(step)  # rows a killed run logged after its last checkpoint (or an old run's)
    samples_log = out / "samples.jsonl"
    if engine.is_main:
        truncate_jsonl(samples_log, step)

    rendered = [render_prompt(tokenizer, a, cfg.sampling.prompt_template) for a in asked]
    n_params = sum(x.numel() for x in model.parameters())
    n_train = sum(x.numel() for x in model.parameters() if x.requires_grad)
    engine.print(
        f"ppo: {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trained), {len(records)} prompts, "
        f"reference = {'base with LoRA adapter disabled' if adapter_off else 'frozen copy'}, "
        + (
            f"{p.algorithm}: no critic, {p.num_generations} responses per prompt"
            if critic_free
            else f"{'critic from the reward model' if critic is not None else 'value head on the policy'}"
        )
    )
    last: dict[str, float] = {}
    # a bar on a terminal; the loop prints its own line every train.log_every steps
    bar = Progress(cfg.stop.max_steps, "ppo", every=0, initial=step, enabled=engine.is_main)
    try:
        while stop_reason is None and step < cfg.stop.max_steps:
            t0 = time.perf_counter()
            # 1. rollout: sample K = num_generations responses per prompt (rows grouped by prompt)
            #    (this process: its share of the step's prompts, rows `first` onwards of the global rollout)
            #    (K from each prompt's one prefill: `sample`'s num_samples repeats its KV cache)
            picked = prompt_indices(len(records), p.batch_size // p.num_generations, step, cfg.train.seed)
            mine = picked[rank * share : (rank + 1) * share]
            index = [i for i in mine for _ in range(p.num_generations)]
            first = rank * len(index)
            seeds = rollout_seeds(cfg.train.seed, step, range(first, first + len(index)))
            batch = sample(
                policy,
                tokenizer,
                [rendered[i] for i in mine],
                cfg.sampling,
                num_samples=p.num_generations,
                keep_hidden=not mixed,
                seeds=seeds,
            )
            hidden = None if mixed else batch.hidden.to(engine.device)  # type: ignore[union-attr]  (keep_hidden)

            # 2. score the responses
            raw = reward.score([asked[i] for i in index], batch.texts).float().cpu()
            if not all_processes(not nonfinite({"reward": raw}), reduce):
                engine.skip_step("non-finite reward")
                step += 1
                continue
            if baseline is None:  # the first rollout is the reference policy's: the scale of "normal"
                mean, std, measured = score_scale(raw, p.normalize_min_std, reduce)
                baseline = (mean, std)
                if p.normalize_rewards and measured < p.normalize_min_std:
                    engine.print(
                        f"[yellow]warning: the first rollout's scores are nearly constant (std {measured:.3g} < "
                        f"ppo.normalize_min_std {p.normalize_min_std}); normalising by the floor. The reward barely "
                        "tells these responses apart: check the reward source[/]"
                    )
            scores = shape_scores(raw, batch.ended, p, baseline).to(engine.device)

            # 3. log-probs, reference log-probs and values of the sampled tokens
            mask = batch.response_mask.bool().to(engine.device)
            ro = Rollout(
                input_ids=torch.cat([batch.prompt_ids, batch.response_ids], 1).to(engine.device),
                attention_mask=torch.cat([batch.prompt_mask, batch.response_mask], 1).to(engine.device),
                start=batch.prompt_ids.shape[1],
                tokens={"response_ids": batch.response_ids.to(engine.device), "mask": mask},
                pass_cost=pass_cost_on(engine.device),
                groups=torch.tensor(index) if share_prompt else None,
            )
            # every epoch's minibatches, drawn now (the same draws as epoch by epoch): with mixed
            # precision the rollout is scored in the first epoch's micro-batches
            # (each process cuts its rows: a minibatch is every process's share of it)
            minibatches = [
                torch.randperm(len(index), device=engine.device).split(p.mini_batch_size // world)
                for _ in range(p.epochs)
            ]
            with engine.accelerator.autocast():  # a no-op without mixed precision
                score_tokens(engine.unwrap(model), hidden, ref, adapter_off, ro, temperature, p.micro, minibatches[0])
            tok = ro.tokens

            # 4. per-token rewards, advantages, returns
            beta = kl_ctl.value
            rewards, kl = per_token_rewards(
                scores, tok["logp"], tok["ref_logp"], mask, beta if p.kl.mode == "reward" else 0.0, p.kl.estimator
            )
            if p.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
            if critic_free:
                tok["advantages"] = group_advantages(rewards.sum(1), mask, p)
                tok["returns"] = returns = torch.zeros_like(rewards)
            else:
                advantages, returns = gae(rewards, tok["values"], mask, p.gamma, p.lam)
                tok["advantages"], tok["returns"] = masked_whiten(advantages, mask, reduce=reduce), returns
            # every statistic is the global batch's (all processes' rows)
            reward_mean = batch_mean(raw, reduce)
            kl_per_response = float(batch_mean(kl.sum(1), reduce))
            metrics = {
                "reward": float(reward_mean),
                "reward_normalized": float((reward_mean - baseline[0]) / baseline[1]),
                "score": float(batch_mean(scores, reduce)),
                "kl": kl_per_response,
                **{
                    f"kl_{kind}": float(
                        batch_mean(zero_padding(kl_penalty(tok["logp"], tok["ref_logp"], kind), mask).sum(1), reduce)
                    )
                    for kind in ("k1", "k3")
                },
                "beta": beta,
                "entropy": float(masked_mean(tok["entropy"], mask, reduce=reduce)),
                "response_length": float(batch_mean(mask.sum(1).float(), reduce)),
                "ended": float(batch_mean(batch.ended.float(), reduce)),
                "prompts_truncated": batch.prompts_truncated
                if reduce is None
                else int(reduce(torch.tensor(batch.prompts_truncated))),
            }
            if not critic_free:
                metrics["explained_variance"] = float(explained_variance(tok["values"], returns, mask, reduce))
            bad = nonfinite({k: zero_padding(v, mask) for k, v in tok.items() if k != "mask"})
            if not all_processes(not bad, reduce):
                engine.skip_step(f"non-finite {', '.join(bad) or 'numbers in another process'} in the rollout")
                step += 1
                continue
            if cfg.log_samples_every and (step % cfg.log_samples_every == 0):
                prompts = [asked[i] for i in index]
                rows = list(zip(prompts, batch.texts, raw.tolist(), batch.ended.tolist(), strict=True))
                rows = gather_object(rows) if world > 1 else rows  # the global batch, in row order
                if engine.is_main:
                    _log_samples(samples_log, step + 1, rows[: cfg.log_samples])

            # stop before updating: the current policy is the one that reached the threshold / ceiling
            if cfg.stop.reward_threshold is not None and metrics["reward"] >= cfg.stop.reward_threshold:
                stop_reason = f"reward {metrics['reward']:.4g} reached stop.reward_threshold"
            elif cfg.stop.kl_ceiling is not None and kl_per_response > cfg.stop.kl_ceiling:
                stop_reason = f"KL {kl_per_response:.4g} exceeded stop.kl_ceiling"
                engine.print(
                    f"[yellow]warning: {stop_reason} = {cfg.stop.kl_ceiling}: the policy is drifting far from the "
                    "reference model, a sign of reward hacking; stopping (raise kl.beta or lower train.lr)[/]"
                )
            t_rollout = time.perf_counter() - t0

            # 5. epochs of clipped minibatch updates
            window: dict[str, list[float]] = {}
            if stop_reason is None:
                for epoch in range(p.epochs):
                    for rows in minibatches[epoch]:
                        stats = _update(engine, model, ro, rows, kl_ctl.value, temperature, p)
                        if stats is None:
                            continue
                        for k, v in stats.items():
                            window.setdefault(k, []).append(v)
                        if epoch == p.epochs - 1:
                            window.setdefault("approx_kl_last_epoch", []).append(stats["approx_kl"])
                kl_ctl.update(kl_per_response, p.batch_size)
            step += 1
            dt = time.perf_counter() - t0
            metrics.update({k: sum(v) / len(v) for k, v in window.items()})
            metrics.update(
                lr=engine.lr,
                time_rollout=t_rollout,
                time_step=dt,
                tokens_per_s=float(mask.sum() if reduce is None else reduce(mask.sum())) / dt,
            )
            last = metrics
            engine.log(last, step=step)
            bar.set_postfix(reward=f"{last['reward']:.3g}", kl=f"{last['kl']:.3g}")
            bar.update(step - bar.n)  # skipped steps count too
            if step % cfg.train.log_every == 0 or stop_reason is not None:
                engine.print(
                    f"step {step}/{cfg.stop.max_steps}: reward {last['reward']:.4g} kl {last['kl']:.3g} "
                    f"beta {last['beta']:.3g} entropy {last['entropy']:.3g} len {last['response_length']:.1f} "
                    f"({last['tokens_per_s']:.0f} tok/s)"
                )
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.stop.max_steps:
                _save(engine, model, step, kl_ctl, baseline, stop_reason)
    except NonFiniteError as e:
        raise UserError(f"ppo: {e}; no checkpoint was written after the last good step") from None
    bar.close()

    # --- outputs
    stop_reason = stop_reason or f"stop.max_steps={cfg.stop.max_steps} reached"
    _save(engine, model, step, kl_ctl, baseline, stop_reason)
    final = {k: v if math.isfinite(v) else str(v) for k, v in last.items()}  # JSON has no NaN (explained variance)
    results = {"steps": step, "stop_reason": stop_reason, "last": final, "model": str(out / "model")}
    whole = engine.whole_model()  # every process (a collective when sharded; ppo refuses sharding today)
    if engine.is_main:
        save_model(whole.policy, tokenizer, out / "model", keep_adapter=False)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    engine.accelerator.wait_for_everyone()
    engine.print(f"ppo: stopped after {step} steps ({stop_reason}); policy in {out / 'model'}")
    engine.accelerator.end_training()
    return results


def _update(
    engine: Engine,
    model: Any,
    ro: Rollout,
    rows: Tensor,
    beta: float,
    temperature: float,
    p: PPOConfig,
) -> dict[str, float] | None:
    """One optimizer step on the minibatch `rows`, in micro-batches of at most `ppo.micro_batch_size`
    rows of similar lengths (gradient accumulation, see `Rollout.micro_batches`); None if the step
    was skipped. The stats are the minibatch's: each micro-batch's weighted by its share of tokens.

    With several processes, `rows` is this process's share of the minibatch: the losses are shares of
    the *global* minibatch's tokens (times the number of processes, since DDP averages their
    gradients) and the stats are summed over processes. Processes may cut different numbers of
    micro-batches, so all but each one's last run forward and backward under `no_sync` (local
    accumulation) and the last one all-reduces the gradients, on every process, after a vote on
    finiteness: a non-finite loss anywhere skips the step everywhere (its gradients are dropped).
    """
    stats: dict[str, float] = {}
    reduce, world = engine.all_sum, engine.num_processes
    n_tokens = ro.tokens["mask"][rows].sum()
    n_tokens = n_tokens if reduce is None else reduce(n_tokens)
    parts = ro.micro_batches(rows, p.micro)
    finite = True
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if not (finite or last):
            continue  # the step is lost; only the last micro-batch still runs, for the all-reduce
        with nullcontext() if last else engine.accelerator.no_sync(model):
            loss, part_stats = ppo_loss(model, ro, part, n_tokens, beta, temperature, p)
            finite = finite and bool(torch.isfinite(loss))
            if last:
                finite = all_processes(finite, reduce)
            engine.backward(loss * world)
        share = float(ro.tokens["mask"][part].sum() / n_tokens)
        for k, v in part_stats.items():
            stats[k] = stats.get(k, 0.0) + share * v
    if not finite:
        engine.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        engine.skip_step("non-finite loss")
        return None
    if reduce is not None:
        summed = reduce(torch.tensor(list(stats.values()), dtype=torch.float64)).tolist()
        stats = dict(zip(stats, summed, strict=True))
    grad_norm = engine.optimizer_step()
    if grad_norm is None:
        return None
    return stats | {"grad_norm": grad_norm}


def ppo_loss(
    model: Any, ro: Rollout, rows: Tensor, n_tokens: Tensor, beta: float, temperature: float, p: PPOConfig
) -> tuple[Tensor, dict[str, float]]:
    """The PPO loss of the rows `rows`: clipped policy loss + vf_coef * clipped value loss (ppo only)
    (- entropy bonus, + KL loss in kl.mode=loss), scaled by the rows' share of the `n_tokens` tokens
    of their minibatch, so that the micro-batches' losses add up to exactly the minibatch's."""
    ids, mask, start, tok = ro.rows(rows)
    logits, values = model(ids, mask, start, ro.shared(rows))
    logp = logprobs_from_logits(logits, tok["response_ids"], temperature)
    pg_loss, pg_stats = policy_loss(logp, tok["logp"], tok["advantages"], tok["mask"], p.clip)
    loss, stats = pg_loss, {"policy_loss": pg_loss, **pg_stats}
    if p.algorithm == "ppo":
        vf_loss, vf_clipfrac = value_loss(values, tok["values"], tok["returns"], tok["mask"], p.value_clip)
        loss = loss + p.vf_coef * vf_loss
        stats.update(value_loss=vf_loss, value_clipfrac=vf_clipfrac)
    if p.ent_coef:
        loss = loss - p.ent_coef * masked_mean(entropy_from_logits(logits, temperature), tok["mask"])
    if p.kl.mode == "loss":
        loss = loss + beta * kl_loss(logp, tok["ref_logp"], tok["mask"], p.kl.estimator)
    return loss * tok["mask"].sum() / n_tokens, {k: float(v.detach()) for k, v in stats.items()}


def group_advantages(returns: Tensor, mask: Tensor, p: PPOConfig) -> Tensor:
    """RLOO/GRPO advantages of the responses' returns (batch,), the same for every token of a response:
    rows come in groups of `num_generations` consecutive responses to one prompt."""
    k = p.num_generations
    groups = torch.arange(len(returns) // k, device=returns.device).repeat_interleave(k)
    if p.algorithm == "rloo":
        advantages = rloo_advantages(returns, groups)
    else:
        advantages = grpo_advantages(returns, groups, scale=p.scale_advantages)
    return zero_padding(advantages[:, None].expand_as(mask), mask)


def normalization_mismatches(cfg: Config) -> list[str]:
    """One warning per reward model normalised on samples drawn unlike PPO's rollouts.

    Why: a reward model's gain/bias make the reference policy's samples score mean 0, std 1, but only
    for samples drawn the way it recorded (at T = 1.0, say, responses are longer and more varied
    than PPO's at T = 0.7); elsewhere the scores are off-centre and PPO's "0 = as good as the SFT
    model" and the reward clip mean something else.
    """
    from rlhfkit.rewards.model import RewardMeta

    ours = cfg.sampling.distribution()
    warnings = []
    for spec in cfg.reward.sources:
        meta = RewardMeta.read(spec.model) if spec.model else None
        theirs = meta.normalization.get("sampling") if meta else None
        if not theirs:
            continue
        differ = [f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in theirs if k in ours and theirs[k] != ours[k]]
        if differ:
            warnings.append(
                f"reward model {spec.model} was normalised on samples drawn with other settings than "
                f"`sampling` here ({'; '.join(differ)}), so PPO's responses will not score mean 0, std 1; "
                "retrain its normalisation with `rlhfkit rm` normalize.sampling set to these settings"
            )
    return warnings


def load_models(cfg: Config, device: Any) -> tuple[Any, Any, Any, Any]:
    """(policy, tokenizer, reference, critic or None).

    The reference is a frozen copy of the starting policy, except in LoRA mode, where it *is* the
    policy (run with its adapter disabled): one copy of the weights in memory instead of two.
    """
    policy, tokenizer = load_causal_lm(cfg.model)
    disable_dropout(policy)
    ref = policy
    if cfg.ref_model not in ("", cfg.model.path):
        check_same_tokenizer(tokenizer, cfg.ref_model, "ref_model", cfg.model.trust_remote_code)
    if cfg.model.lora is None or cfg.ref_model not in ("", cfg.model.path):
        ref_cfg = cfg.model.model_copy(update={"path": cfg.ref_model or cfg.model.path, "lora": None})
        ref = place(load_causal_lm(ref_cfg, tokenizer)[0].requires_grad_(False).eval(), device)
        disable_dropout(ref)
    critic = None
    if cfg.ppo.value_init == "reward_model":
        path = cfg.ppo.critic_path or next((s.model for s in cfg.reward.sources if s.model), "")
        if not path:
            raise UserError("ppo.value_init=reward_model: set ppo.critic_path (or use a reward model as the reward)")
        critic = load_critic(path, len(tokenizer), cfg.model)
    return policy, tokenizer, ref, critic


def _save(
    engine: Engine, model: Any, step: int, kl_ctl: Any, baseline: tuple[float, float] | None, stop: str | None
) -> None:
    """A checkpoint with PPO's own state; refuses to write non-finite weights (they would poison a resume)."""
    if not all(torch.isfinite(x).all() for x in model.parameters()):
        raise UserError("ppo: the model has non-finite weights; not writing a checkpoint")
    extra = {"ppo_step": step, "kl_ctl": kl_ctl.state_dict(), "stop_reason": stop}
    if baseline is not None:
        extra["baseline"] = list(baseline)
    engine.save_checkpoint(extra)


def _log_samples(path: Path, step: int, rows: list[tuple[Any, str, float, bool]]) -> None:
    """Append (prompt, response, reward, ended) rows to samples.jsonl."""
    with path.open("a", encoding="utf-8") as f:
        for prompt, text, score, end in rows:
            row = {"step": step, "prompt": text_to_json(prompt), "response": text, "reward": score, "ended": end}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(cfg: Config) -> Path:
    train_ppo(cfg)
    return Path(cfg.output_dir) / "model"
