"""The reward model: a pretrained LM with a scalar head, and how it turns (prompt, completion) into
one number.

Two kinds, one interface:
- decoder (initialised from the SFT causal LM): the input is exactly what the policy sees,
  prompt template + response + EOS, right-padded with a pad token that is not EOS; the
  `*ForSequenceClassification` head reads the last non-pad token, i.e. the EOS (PPO detail 1).
- encoder (BERT-style, e.g. all-MiniLM-L6-v2): the input is the text pair
  ([CLS] rendered prompt [SEP] response [SEP]); the head reads the pooled [CLS] token.

The saved folder is a plain `save_pretrained` sequence classifier (`num_labels=1`; 1 + users when
personalised) plus `rlhfkit_reward.json`: the kind, the prompt template used in training, and how rewards were
normalised (gain/bias fitted so the reference policy's own samples score mean 0, std 1; PPO
detail 2). The normalisation is affine, so `save` folds it into the weights (`fold_normalization`):
the logits of plain `AutoModelForSequenceClassification` are the normalised reward. The metadata
says how much is folded (`folded_gain`, `folded_bias`: none in folders saved before folding), and
`score` applies only the rest, so rlhfkit gives the same numbers either way, never twice.

A personalised reward model (`rlhfkit rm personalize=true`, docs/personalization.md) has one more
output per user it learned (`users` in the metadata): column 0 is the pooled reward and user j's
reward is column 0 + column j, a per-user linear head on the shared features. The user comes with
the prompt (`data.chat.with_user`); the user line itself is never part of the model's input. An
unknown user, or none, gets column 0 alone: the pooled model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from rlhfkit.config import StrictModel, atomic_write_text
from rlhfkit.data.batching import Encoded, collate_sequences, segment_attention_mask
from rlhfkit.data.chat import PROMPT_TEMPLATE, encode_example, render_prompt, render_response, split_user
from rlhfkit.data.formats import Text
from rlhfkit.errors import UserError
from rlhfkit.models.device import place
from rlhfkit.models.loading import (
    BackboneOptions,
    disable_dropout,
    fuse_gelu,
    is_peft,
    load_tokenizer,
    prepare_for_training,
    pretrained_kwargs,
)
from rlhfkit.rl.core import score_scale

META_FILE = "rlhfkit_reward.json"
Kind = Literal["decoder", "encoder"]


class RewardMeta(StrictModel):
    kind: Kind
    prompt_template: str = PROMPT_TEMPLATE
    max_length: int = Field(512, gt=1)
    gain: float = Field(1.0, description="normalised reward = gain * raw head output + bias")
    bias: float = 0.0
    folded_gain: float = Field(1.0, description="the part in the weights: logits = folded_gain * raw + folded_bias")
    folded_bias: float = Field(0.0, description="= bias, or 0 where the model has no bias to fold it into (RMSNorm)")
    normalization: dict[str, Any] = Field(default_factory=dict, description="how gain/bias were fitted and folded")
    users: list[str] = Field(
        default_factory=list, description="users of a personalised model: output j+1 is users[j]'s delta"
    )

    @classmethod
    def read(cls, folder: str | Path) -> RewardMeta | None:
        path = Path(folder) / META_FILE
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as e:
            raise UserError(f"{path}: invalid reward-model metadata: {e}") from None


def detect_kind(config: Any) -> Kind:
    """Decoder if the architecture is a causal LM only; encoder if it also has a masked-LM form (BERT)."""
    from transformers.models.auto import modeling_auto as auto

    if config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise UserError(f"cannot tell whether a {config.model_type!r} model is a decoder or an encoder; set model.kind")


def load_backbone(
    path: str, kind: Kind | Literal["auto"] = "auto", opts: BackboneOptions | None = None, outputs: int = 1
) -> tuple[Any, Any, Kind]:
    """(sequence classifier with `outputs` outputs, tokenizer, kind) from any LM or reward-model folder,
    loaded as `opts` say (dtype, attention kernel, 4-bit, gradient checkpointing); `opts.lora` is
    the caller's to apply, once the head is initialised (`rlhfkit rm`). More than one output: a
    personalised reward model, pooled + one per user.

    Dropout is switched off: a reward must be a deterministic function of the text. GPT-2's GELU
    runs as one fused kernel (`fuse_gelu`), as in every model rlhfkit trains.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    opts = opts or BackboneOptions()
    trust_remote_code = opts.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load {path!r} ({e})") from None
    if kind == "auto":
        meta = RewardMeta.read(path)
        kind = meta.kind if meta is not None else detect_kind(config)
    if kind == "decoder":
        tokenizer = load_tokenizer(path, trust_remote_code)  # guarantees a pad token distinct from EOS
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            raise UserError(f"{path}: the encoder's tokenizer has no pad token")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=outputs, **pretrained_kwargs(opts))
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load {path!r} as a sequence classifier ({e})") from None
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head finds the last non-pad token with it
    disable_dropout(model)
    fuse_gelu(model)  # the same kernels as the policy's: reward models train and score as fast
    prepare_for_training(model, opts)
    return model, tokenizer, kind


def init_reward_head(model: torch.nn.Module) -> torch.nn.Linear:
    """Re-initialise the scalar head: weight ~ N(0, 1/√(d+1)), bias 0 (PPO detail 1), so initial
    rewards have unit-ish scale whatever the hidden size. Per-user outputs start at 0: a personalised
    model starts as the pooled one and learns each user's difference from it."""
    head = _score_head(model)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0].normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()
    return head


def _score_head(model: torch.nn.Module) -> torch.nn.Linear:
    n = model.config.num_labels
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not heads:
        raise UserError(f"{type(model).__name__}: no output layer with {n} outputs found")
    return heads[-1]


@torch.no_grad()
def fold_normalization(model: torch.nn.Module, probe: torch.Tensor, gain: float, bias: float) -> tuple[float, str]:
    """Write `gain * logit + bias` into the model's own weights; returns (the bias that found no
    place, where the bias went).

    The gain scales the head's weight (every output: a personalised model's user j reward is
    output 0 + output j, so scaling both scales it). The bias goes to output 0 only: into the head's
    bias (encoders); a decoder's head has none (transformers builds it without), so it goes into the
    final LayerNorm's bias instead, whose output only the head reads (GPT-2 and other LayerNorm
    decoders): moved by bias·W⁺e₀ (= bias·w/|w|² with one output), it adds exactly `bias` to
    output 0 and nothing to the others. RMSNorm decoders (Llama, Qwen2, Mistral)
    have no bias after their last layer: there the bias is returned, to stay in the metadata.
    `probe` (token ids, one row) checks the fold on a real forward; a mismatch undoes the norm move.
    """
    head = _score_head(model)
    head.weight.mul_(gain)
    if head.bias is not None:
        head.bias.mul_(gain)
        head.bias[0] += bias
        return 0.0, "score head weight and bias"
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.bias is not None]
    if bias == 0.0:
        return 0.0, "score head weight"
    if not norms:
        return bias, "score head weight (no bias after the last layer: the bias stays in the metadata)"
    before = model(input_ids=probe).logits[0].float()
    w = head.weight.to(norms[-1].bias.dtype)
    shift = bias * torch.linalg.pinv(w)[:, 0]
    norms[-1].bias.add_(shift)
    expected = before.clone()
    expected[0] += bias
    if (model(input_ids=probe).logits[0].float() - expected).abs().max() > 1e-3 * max(1.0, abs(bias)):
        norms[-1].bias.sub_(shift)  # that LayerNorm is not the last thing before the head
        return bias, "score head weight; the bias has no place to go (the last LayerNorm does not feed the head)"
    return 0.0, "score head weight and final LayerNorm bias"


def reward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Raw (unnormalised) reward of every sequence of a collated batch, shape (N,): one per row, or
    one per `ends` entry for groups collated with their shared prefix (`collate_shared_prefix`).
    Output 0, plus output `user` where the batch names a user's column (personalised models; 0 = pooled)."""
    if "segments" in batch:
        inner = model.get_base_model() if is_peft(model) else model  # a LoRA RM: the layers hold the adapter
        mask = segment_attention_mask(batch["segments"], next(model.parameters()).dtype)
        trunk = inner.base_model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
        )
        ends = batch["ends"]
        logits = inner.score(trunk.last_hidden_state[ends[:, 0], ends[:, 1]]).float()
    else:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits.float()
    if "user" not in batch:
        return logits[:, 0]
    user = batch["user"]
    return logits[:, 0] + torch.where(user > 0, logits.gather(1, user[:, None])[:, 0], 0.0)


BatchFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # a collated batch -> one row per sequence


class RewardModel:
    """A trained reward model: `score(prompts, completions)` gives normalised rewards, shape (N,)."""

    def __init__(self, model: Any, tokenizer: Any, meta: RewardMeta, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.batch_size = batch_size
        self.truncated = 0  # sequences `encode` has cut to meta.max_length (the rm stage reports them)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: Any = "cpu",
        batch_size: int = 32,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ) -> RewardModel:
        """A saved reward model for scoring, in `dtype` (bfloat16 halves the memory of a big one
        next to a big policy; the scores are returned in float32 either way)."""
        meta = RewardMeta.read(path)
        if meta is None:
            raise UserError(f"{path}: not a reward model trained by `rlhfkit rm` (no {META_FILE})")
        model, tokenizer, _ = load_backbone(str(path), meta.kind, BackboneOptions(dtype=dtype), 1 + len(meta.users))
        place(model, device).eval()
        return cls(model, tokenizer, meta, batch_size)

    def save(self, path: str | Path) -> Path:
        """Model + tokenizer + metadata, written to a temporary sibling and renamed (never half-saved).

        The normalisation is folded into the weights first (in memory too; `score` is unchanged):
        see `fold_normalization`."""
        import shutil

        if is_peft(self.model):  # a LoRA-trained head: saved merged, a plain classifier like any other
            self.model = self.model.merge_and_unload()
        scale, offset = self._logit_map()
        if (scale, offset) != (1.0, 0.0):
            device = next(self.model.parameters()).device
            probe = torch.tensor([self.encode("probe", "probe")["input_ids"]], device=device)
            was_training = self.model.training
            self.model.eval()
            residual, where = fold_normalization(self.model, probe, scale, offset)
            self.model.train(was_training)
            self.meta.folded_gain, self.meta.folded_bias = self.meta.gain, self.meta.bias - residual
            self.meta.normalization["folded_into"] = where
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / META_FILE, self.meta.model_dump_json(indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    # ---- inputs ---------------------------------------------------------------------------
    def encode(self, prompt: Text, completion: Text) -> Encoded:
        """Token ids exactly as in training (same template, EOS for decoders, text pair for encoders).

        A prompt for a user (`with_user`) is encoded without its user line; a personalised model's
        encoding carries the user's output column (`user`: 0 for the pooled model, i.e. no user or
        one it never learned).

        A sequence longer than `meta.max_length` is cut and counted in `self.truncated`: for a
        decoder the prompt keeps its end and the response its start and the EOS the score is read
        at (`encode_example`); for an encoder the tokenizer cuts the longer of the two texts.
        """
        user, prompt = split_user(prompt)
        enc = self._encode_text(prompt, completion)
        if self.meta.users:
            enc["user"] = [self.meta.users.index(user) + 1 if user in self.meta.users else 0]
        return enc

    def _encode_text(self, prompt: Text, completion: Text) -> Encoded:
        tok, template = self.tokenizer, self.meta.prompt_template
        if self.meta.kind == "decoder":
            example = encode_example(tok, prompt, completion, template, self.meta.max_length)
            self.truncated += example.truncated
            return {"input_ids": example.ids}
        prompt_text = render_prompt(tok, prompt, template)
        response = render_response(tok, prompt, completion, template).strip()
        enc = tok(prompt_text, response, verbose=False)  # whole first, to know whether it must be cut
        if len(enc["input_ids"]) > self.meta.max_length:
            self.truncated += 1
            enc = tok(prompt_text, response, truncation=True, max_length=self.meta.max_length)
        out = {"input_ids": enc["input_ids"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def collate(self, seqs: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate_sequences(seqs, self.tokenizer.pad_token_id)

    # ---- scoring --------------------------------------------------------------------------
    def _logit_map(self) -> tuple[float, float]:
        """(a, c) with normalised reward = a * logit + c: what the weights do not do yet. Exactly
        (1, 0) once all of it is folded, so such a model's reward is its logit, bit for bit."""
        a = self.meta.gain / self.meta.folded_gain
        return a, self.meta.bias - a * self.meta.folded_bias

    def raw_scores(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        """Head outputs before normalisation (what gain/bias are fitted on; a folded head's logits
        mapped back)."""
        logits = self._logits(prompts, completions)
        if (self.meta.folded_gain, self.meta.folded_bias) == (1.0, 0.0):
            return logits
        return (logits - self.meta.folded_bias) / self.meta.folded_gain

    @torch.no_grad()
    def _batched(self, prompts: Sequence[Text], completions: Sequence[Text], fn: BatchFn) -> torch.Tensor:
        """`fn` of every (prompt, completion), one row each, batched by similar length (less padding)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["input_ids"]))
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rows: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = {k: v.to(device) for k, v in self.collate([seqs[i] for i in idx]).items()}
            for i, row in zip(idx, fn(batch).float().cpu(), strict=True):
                rows[i] = row
        self.model.train(was_training)
        return torch.stack(rows) if rows else torch.zeros(0)

    def _logits(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        """The model's outputs as saved."""
        return self._batched(prompts, completions, lambda batch: reward_logits(self.model, batch))

    def features(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        """(n, hidden): what the score head reads for each answer (a decoder's final hidden state at
        the last real token; an encoder's pooled output), for cheap heads on top of this reward
        model (`rlhfkit.rewards.ensemble`, the loop's `select=disagreement`)."""
        head = _score_head(self.model)

        def read(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            seen: list[torch.Tensor] = []
            hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
            try:
                reward_logits(self.model, batch)
            finally:
                hook.remove()
            h = seen[-1]
            if h.ndim == 3:  # every position went through the head: take the last real token's
                h = h[torch.arange(len(h)), batch["attention_mask"].sum(-1) - 1]
            return h

        return self._batched(prompts, completions, read)

    def score(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        scale, offset = self._logit_map()
        return scale * self._logits(prompts, completions) + offset

    def fit_normalization(
        self, raw: torch.Tensor, source: str, min_std: float = 1e-2, sampling: dict[str, Any] | None = None
    ) -> bool:
        """Set gain/bias so that these raw rewards map to mean 0, std 1 (std floored at `min_std`).

        `sampling`: the settings the samples were drawn with, recorded so PPO can warn when it rolls
        out differently (mean 0, std 1 only holds on samples drawn the same way). Returns whether
        the floor applied, i.e. the scores were nearly constant.
        """
        mean, std, measured = score_scale(raw, min_std)
        self.meta.gain, self.meta.bias = 1.0 / std, -mean / std
        self.meta.normalization = {"source": source, "n": len(raw), "raw_mean": mean, "raw_std": measured}
        if sampling is not None:
            self.meta.normalization["sampling"] = sampling
        return measured < min_std

    def __repr__(self) -> str:
        return f"RewardModel({self.meta.kind}, gain={self.meta.gain:.4g}, bias={self.meta.bias:.4g})"
