"""Loading and saving any causal LM from `transformers`, with optional LoRA.

Everything we write is a plain `save_pretrained` folder (safetensors), so `transformers`, TRL and
vLLM load our outputs without rlhfkit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from rlhfkit.config import StrictModel
from rlhfkit.errors import UserError

PAD_TOKEN = "<|pad|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoraConfig(StrictModel):
    r: int = Field(8, gt=0)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class BackboneOptions(StrictModel):
    """How a pretrained network is loaded and trained: shared by the policy (`model.*`) and the
    reward model (`rm`'s `model.*`), so a big policy, its reward model and its critic fit the same way."""

    path: str = Field("", description="local folder or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter instead of all weights")
    trust_remote_code: bool = False
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass: less memory, one more forward"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel; flash_attention_2 needs the flash-attn package and a CUDA GPU"
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: 4-bit NF4 base weights (bitsandbytes, CUDA only; pip install 'rlhfkit[qlora]')"
    )


class ModelConfig(BackboneOptions):
    path: str = Field("", description="local folder or hub id of a causal LM")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, eos_pad: bool = False) -> Any:
    """Load a tokenizer and make sure it has a pad token that is *not* EOS.

    Why: when pad == EOS, masking padding also masks the real EOS, and the model never learns to
    stop (PPO detail 5); a sequence classifier reads its score at the last token that is not pad,
    which would be the token before EOS. We add a dedicated `<|pad|>` token instead; the model's
    embeddings are resized to match in `load_causal_lm`.

    `eos_pad`: a tokenizer without a pad token pads with EOS instead, for a stage whose every use
    of padding goes through attention masks and labels built from lengths (SFT). Why: then the
    vocabulary and the embeddings stay the base model's, so a LoRA adapter loads on the user's
    original base with plain peft (a resized embedding would not fit it).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"{path}: cannot load a tokenizer ({e})") from None
    if tok.eos_token is None:
        raise UserError(f"{path}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    if eos_pad and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    elif tok.pad_token is None or (tok.pad_token_id == tok.eos_token_id and not eos_pad):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def check_same_tokenizer(tokenizer: Any, path: str, setting: str, trust_remote_code: bool = False) -> None:
    """Refuse a reference model whose tokenizer differs from the policy's.

    Why: the KL and the DPO/KTO log-ratios compare both models' log-probs of the *same token ids*;
    under another vocabulary those ids are other strings, and the numbers are silently meaningless.
    """
    other = load_tokenizer(path, trust_remote_code)
    if other.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{setting}: {path!r} has a different tokenizer from model.path ({len(other)} vs {len(tokenizer)} "
            "tokens or other ids); the reference must share the policy's tokenizer"
        )


def _fit_embeddings(model: Any, tokenizer: Any) -> None:
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(cfg: ModelConfig, tokenizer: Any | None = None, eos_pad: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) for any `AutoModelForCausalLM` architecture, LoRA applied if configured;
    `eos_pad` as in `load_tokenizer`."""
    from transformers import AutoModelForCausalLM

    if not cfg.path:
        raise UserError("model.path: no model given; set model.path=FOLDER_OR_HUB_ID")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.path, cfg.trust_remote_code, eos_pad)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **pretrained_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot load {cfg.path!r} as a causal LM ({e})") from None
    _fit_embeddings(model, tokenizer)
    fuse_gelu(model)
    prepare_for_training(model, cfg)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    return model, tokenizer


def pretrained_kwargs(opts: BackboneOptions, section: str = "model") -> dict[str, Any]:
    """`from_pretrained` arguments for `opts`: dtype, attention kernel and 4-bit quantisation.

    What cannot work here fails before any weights are read, naming the setting: flash-attention
    without its package, 4-bit without bitsandbytes or without a CUDA GPU (bitsandbytes' 4-bit
    kernels are CUDA kernels).
    """
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[opts.dtype],
        "trust_remote_code": opts.trust_remote_code,
        "attn_implementation": opts.attn_implementation,
    }
    if opts.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            f"{section}.attn_implementation=flash_attention_2: the flash-attn package is not installed "
            "(pip install flash-attn, on a CUDA machine); use sdpa (the default) or eager"
        )
    if opts.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                f"{section}.load_in_4bit: bitsandbytes is not installed (pip install 'rlhfkit[qlora]', on a CUDA "
                f"machine); or drop {section}.load_in_4bit"
            )
        if not torch.cuda.is_available():
            raise UserError(f"{section}.load_in_4bit: 4-bit weights need a CUDA GPU and none is visible here")
        compute = DTYPES[opts.dtype] if opts.dtype != "float32" else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # 4-bit weights are placed when loaded
    return kwargs


def prepare_for_training(model: Any, opts: BackboneOptions) -> None:
    """Gradient checkpointing and 4-bit preparation, before any LoRA adapter is added.

    Checkpointing acts only in training mode, so generation keeps its KV cache (the sampler asks for
    it explicitly); the config's `use_cache` is switched off so training forwards do not build one.
    The non-reentrant variant: it needs no input that requires grad, so it works with a frozen base
    under LoRA. A 4-bit model goes through peft's `prepare_model_for_kbit_training` (norms in
    float32, inputs that carry gradients), which enables checkpointing itself when asked.
    """
    if opts.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=opts.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif opts.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if opts.gradient_checkpointing:
        model.config.use_cache = False


def fuse_gelu(model: torch.nn.Module) -> None:
    """Compute GPT-2's GELU (`gelu_new`, the tanh approximation) with PyTorch's one fused kernel.

    Why: transformers writes `gelu_new` as six elementwise operations, each a pass over the MLP's
    widest activations, forward and backward; the fused `gelu(x, approximate="tanh")` is the same
    function (equal to float rounding) at about a third of the time: ~6% of a PPO step of the
    benchmark's small GPT-2 on CPU. Only the modules in memory change: the config and the saved
    model still say `gelu_new`.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())


def apply_lora(model: Any, lora: LoraConfig, task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM") -> Any:
    """Wrap a model with a trainable LoRA adapter (peft); the base weights stay frozen.

    `SEQ_CLS` (reward model, critic): the scalar score head trains in full along with the adapter.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


# Where a `transformers` config keeps the number of positions: GPT-2's name, then everyone else's.
POSITION_FIELDS = ("n_positions", "max_position_embeddings")


def model_positions(config: Any) -> tuple[int, str] | None:
    """(how many positions the model has, the config field that says so), or None without a limit."""
    field = next((f for f in POSITION_FIELDS if getattr(config, f, None) is not None), None)
    return (int(getattr(config, field)), field) if field else None


def fit_to_positions(config: Any, length: int, setting: str) -> tuple[int, str | None]:
    """A length cap (`setting`, e.g. "data.max_length") lowered to the model's positions if it asks
    for more, and the note to print when it was. Why lower it rather than fail: it is only a
    ceiling (the examples longer than it are cut and counted either way), and a 512 default must
    not crash a 256-position model mid-epoch with an IndexError (GPT-2) or train on positions a
    rotary model never saw (Llama)."""
    limit = model_positions(config)
    if limit is None or length <= limit[0]:
        return length, None
    return limit[0], (
        f"{setting}={length} exceeds the {limit[0]} positions of {config.name_or_path or 'the model'} "
        f"(model.config.{limit[1]}): sequences are cut to {limit[0]} tokens"
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs the same function for sampling and for training: no dropout (PPO detail 4); a reward
    must be a deterministic function of the text.

    Why more than `nn.Dropout` modules and the config: attention layers copy the config's rate into a
    plain float when they are built (Llama, Qwen2, Mistral: `self.attention_dropout`, handed to the
    attention kernel in training mode), so zeroing the config afterwards changes nothing. Every
    module's float `*dropout*` / `*pdrop` attribute is zeroed too, and the config's (read by modules
    that look it up at forward time, and by whoever loads the saved model).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d/2d/3d, AlphaDropout
            module.p = 0.0
        _zero_dropout_rates(module)
        if hasattr(module, "config"):
            _zero_dropout_rates(module.config)


def _zero_dropout_rates(owner: Any) -> None:
    """Set every float attribute of `owner` named like a dropout rate (`*dropout*`, `*pdrop`) to 0."""
    for name, value in list(vars(owner).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(owner, name, 0.0)


def save_model(
    model: Any, tokenizer: Any, out_dir: str | Path, merge_lora: bool = True, keep_adapter: bool = True
) -> Path:
    """Save a loadable folder; a LoRA model is merged into plain weights unless merge_lora=False.

    Merging rewrites the weights, so it works on a copy unless `keep_adapter=False` (the stage is
    over and the in-memory model is no longer needed): that saves a whole copy of the weights at
    the memory peak. Written to a temporary sibling and renamed, so a crash never leaves a
    half-saved model.
    """
    import copy
    import shutil

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if is_peft(model) and merge_lora:
        to_save = (copy.deepcopy(model) if keep_adapter else model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
