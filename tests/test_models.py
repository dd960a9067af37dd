"""Model loading for three architectures, the pad token, LoRA, and save/load round trips checked
with plain `transformers` (what TRL or vLLM would do with our outputs)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rlhfkit.errors import UserError
from rlhfkit.models.loading import (
    LoraConfig,
    ModelConfig,
    disable_dropout,
    is_peft,
    load_causal_lm,
    load_tokenizer,
    save_model,
)
from rlhfkit.models.tiny import TinyModelConfig, build_tiny_model, tiny_config, train_tokenizer
from testutil import ARCHS, tokenizer_without_pad

CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TEXT = "User: How do I make tea?\nAssistant: Boil water."


def logits(model, tok, text=TEXT):
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def no_pad_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("no-pad")
    tok = tokenizer_without_pad([TEXT] * 4)
    assert tok.pad_token is None
    model = build_tiny_model(TinyModelConfig(arch="llama", n_layer=1, d_model=16, n_head=2), tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_load_each_architecture(tiny_model_dir, arch):
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir(arch))))
    assert type(model).__name__ == CLASSES[arch]
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    out = logits(model, tok)
    assert out.shape[-1] == model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert torch.isfinite(out).all()


def test_pad_token_is_added_when_missing(no_pad_dir):
    vocab = len(AutoTokenizer.from_pretrained(no_pad_dir))
    model, tok = load_causal_lm(ModelConfig(path=str(no_pad_dir)))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == vocab  # a new token, not EOS
    assert len(tok) == vocab + 1
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.config.pad_token_id == tok.pad_token_id
    # The padded batch runs, and the new row does not change the real tokens' predictions.
    enc = tok([TEXT, "Boil"], padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        batch = model(**enc).logits
    assert (enc.input_ids == tok.pad_token_id).any()
    torch.testing.assert_close(batch[0], logits(model, tok)[0], atol=1e-5, rtol=0)


def test_pad_equal_to_eos_is_replaced(tmp_path, no_pad_dir):
    tok = AutoTokenizer.from_pretrained(no_pad_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token_id != loaded.eos_token_id


def test_tokenizer_without_eos_and_bad_paths(tmp_path):
    tokenizer_without_pad([TEXT] * 4, eos=False).save_pretrained(tmp_path / "no-eos")
    with pytest.raises(UserError, match="the tokenizer has no EOS token; set eos_token"):
        load_tokenizer(tmp_path / "no-eos")
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError, match="model.path: no model given"):
        load_causal_lm(ModelConfig())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_round_trip_with_plain_transformers(tmp_path, tiny_model_dir, arch):
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir(arch))))
    with torch.no_grad():  # move off the initialisation so a silently re-initialised weight would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_model(model, tok, tmp_path / "saved")
    (tmp_path / "saved" / "stale.txt").write_text("from an older save")
    save_model(model, tok, tmp_path / "saved")  # overwriting replaces the whole folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temp folder left behind
    assert not (out / "stale.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    plain_tok = AutoTokenizer.from_pretrained(out)
    assert plain_tok.pad_token == tok.pad_token and plain_tok.eos_token == tok.eos_token
    saved = reloaded.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # equal up to float rounding: GPT-2's GELU runs as one fused kernel in our loaded models
    torch.testing.assert_close(logits(reloaded, plain_tok), logits(model, tok), rtol=0, atol=1e-6)


def test_gpt2_gelu_is_fused_in_memory_only(tmp_path, tiny_model_dir):
    from transformers.activations import NewGELUActivation

    path = tiny_model_dir("gpt2")
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    model, tok = load_causal_lm(ModelConfig(path=str(path)))
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    ids = tok(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    for m in (plain, model):  # the gradient too: PPO trains through it
        m.zero_grad()
        m(input_ids=ids).logits.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(model, tok), logits(plain, tok), rtol=0, atol=1e-6)
    save_model(model, tok, tmp_path / "saved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.activation_function == "gelu_new"


def test_save_round_trip_after_adding_a_pad_token(tmp_path, no_pad_dir):
    model, tok = load_causal_lm(ModelConfig(path=str(no_pad_dir)))
    out = save_model(model, tok, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tok)
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|pad|>"
    assert torch.equal(logits(reloaded, tok), logits(model, tok))


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir("qwen2")), lora=LoraConfig(r=4)))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give it an effect, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    return model, tok


def test_lora_wraps_and_trains_only_the_adapter(lora_model, tiny_model_dir):
    model, tok = lora_model
    assert is_peft(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    assert trainable and all("lora_" in n for n in trainable)
    assert 0 < sum(trainable.values()) < total / 2
    base, _ = load_causal_lm(ModelConfig(path=str(tiny_model_dir("qwen2"))))
    assert not torch.allclose(logits(model, tok), logits(base, tok), atol=1e-3)  # the adapter matters


def test_lora_saved_merged_gives_the_peft_models_logits(tmp_path, lora_model):
    model, tok = lora_model
    before = logits(model, tok)
    out = save_model(model, tok, tmp_path / "merged")
    assert is_peft(model) and torch.equal(logits(model, tok), before)  # the live model is not merged
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not is_peft(reloaded) and not (out / "adapter_config.json").exists()
    # W + BA in one matrix rounds differently from W x + B(A x): ~1e-5 apart on logits of ~0.1
    torch.testing.assert_close(logits(reloaded, tok), before, atol=1e-4, rtol=1e-4)


def test_lora_saved_as_adapter(tmp_path, lora_model, tiny_model_dir):
    from peft import PeftModel

    model, tok = lora_model
    out = save_model(model, tok, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").exists()
    base, _ = load_causal_lm(ModelConfig(path=str(tiny_model_dir("qwen2"))))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, out), tok), logits(model, tok))


DROPOUT_ARCHS = ("gpt2", "llama", "qwen2", "mistral", "bert")


def model_with_dropout(arch: str) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A tiny model whose config asks for dropout 0.3 everywhere it can: the four decoder layouts
    (causal LM) and a BERT encoder (the reward model's other kind, as a one-output classifier)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    tok = train_tokenizer([TEXT] * 4, vocab_size=280)
    if arch == "bert":
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.3,
            attention_probs_dropout_prob=0.3,
            num_labels=1,
        )
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config), tok
    config = tiny_config(TinyModelConfig(arch=arch, n_layer=1, d_model=16, n_head=2), len(tok), 0, 0, 1)
    if arch == "gpt2":
        config.resid_pdrop = config.attn_pdrop = config.embd_pdrop = 0.3
    else:  # Llama, Qwen2, Mistral: attention dropout is their only one
        config.attention_dropout = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tok


@pytest.mark.parametrize("arch", DROPOUT_ARCHS)
def test_disable_dropout_makes_training_mode_equal_eval_mode(arch):
    """Llama-style attention copies the config's rate into a float when it is built, so zeroing the
    config afterwards is not enough: the training-mode forward must really be dropout-free."""
    model, tok = model_with_dropout(arch)
    model.train()
    assert not torch.equal(logits(model, tok), logits(model, tok))  # dropout on: two passes differ
    disable_dropout(model)
    train_logits = logits(model, tok)
    assert torch.equal(train_logits, logits(model, tok))
    model.eval()
    assert torch.equal(train_logits, logits(model, tok))
    rates = {k: v for k, v in model.config.to_dict().items() if "dropout" in k or k.endswith("pdrop")}
    assert rates and all(v in (0.0, None) for v in rates.values()), rates  # a saved copy has no dropout either
