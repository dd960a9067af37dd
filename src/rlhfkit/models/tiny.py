"""Tiny models built from configs, no download: the embedded default and the test fixtures.

Any `transformers` causal-LM family works with rlhfkit; these four cover the common layouts
(GPT-2: learned positions + LayerNorm; Llama/Mistral: RoPE + RMSNorm + SwiGLU; Qwen2: Llama with
attention biases).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from rlhfkit.config import StrictModel
from rlhfkit.models.loading import PAD_TOKEN

EOS_TOKEN = "<|endoftext|>"
Arch = Literal["gpt2", "llama", "qwen2", "mistral"]


class TinyModelConfig(StrictModel):
    arch: Arch = "gpt2"
    n_layer: int = Field(4, gt=0)
    d_model: int = Field(128, gt=0)
    n_head: int = Field(4, gt=0)
    max_positions: int = Field(256, gt=0)


def tiny_config(cfg: TinyModelConfig, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> Any:
    """A `transformers` config for `cfg.arch` with the given size; dropout off (RL needs none)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if cfg.arch == "gpt2":
        return GPT2Config(
            n_layer=cfg.n_layer,
            n_embd=cfg.d_model,
            n_head=cfg.n_head,
            n_positions=cfg.max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[cfg.arch]
    return cls(
        num_hidden_layers=cfg.n_layer,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_model * 3,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=max(1, cfg.n_head // 2),
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        **common,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: Any, seed: int = 0) -> Any:
    """A freshly initialised causal LM sized by `cfg`, matching `tokenizer`'s special tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        cfg,
        vocab_size=len(tokenizer),
        bos_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Any:
    """Train a byte-level BPE tokenizer (the `tokenizers` library) with EOS and a separate pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
