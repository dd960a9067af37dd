"""Sampling: seeds, temperature / top-k / top-p against greedy decoding, length limits, stopping
at EOS and at stop strings, K samples per prompt, and `rlhfkit generate` for each architecture.

An untrained model gives varied, near-uniform samples; a "parrot" (the same tiny model overfit
on two dialogues for a few steps) makes EOS and stop strings happen deterministically.
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.data.formats import read_records
from rlhfkit.errors import UserError
from rlhfkit.models.loading import ModelConfig, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig, check_length_budget, draw, filter_logits, sample
from rlhfkit.models.value import response_logits
from testutil import ARCHS, make_test_model

PROMPTS = ["User: How do I make tea?\nAssistant:", "The quick brown fox", "User: Hi\nAssistant:"]
SAY_HI, SAY_MORE = "User: Say hi\nAssistant:", "User: Say more\nAssistant:"


def cfg(**kw) -> SamplingConfig:
    return SamplingConfig(**{"max_new_tokens": 10, "stop": [], **kw})


def seeded(model, tok, prompts, config, seed=0, k=1):
    torch.manual_seed(seed)
    return sample(model, tok, prompts, config, num_samples=k)


def rows(s):
    return [r[: int(m.sum())].tolist() for r, m in zip(s.response_ids, s.response_mask, strict=True)]


def greedy(model, tok, prompt, max_new_tokens):
    """Reference: one unpadded prompt, plain greedy decoding, cut after EOS."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[0, ids.shape[1] :].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {arch: load_causal_lm(ModelConfig(path=str(tiny_model_dir(arch)))) for arch in ARCHS}


@pytest.fixture(scope="module")
def parrot(tiny_model_dir):
    """Overfit on two dialogues: one ends with EOS, the other runs on into the next user turn."""
    model, tok = load_causal_lm(ModelConfig(path=str(tiny_model_dir("gpt2"))))
    texts = [SAY_HI + " hi there" + tok.eos_token, SAY_MORE + " more words\nUser: next one please"]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5
    return model, tok


def test_same_seed_same_samples_other_seed_differs(models):
    model, tok = models["gpt2"]
    a = seeded(model, tok, PROMPTS, cfg(), seed=1, k=2)
    b = seeded(model, tok, PROMPTS, cfg(), seed=1, k=2)
    c = seeded(model, tok, PROMPTS, cfg(), seed=2, k=2)
    assert a.texts == b.texts and torch.equal(a.response_ids, b.response_ids)
    assert a.texts != c.texts
    assert len(set(a.texts)) > 1  # temperature 1 on an untrained model: varied samples


@pytest.mark.parametrize("arch", ARCHS)
def test_per_response_seeds_make_a_response_independent_of_its_batch(models, arch):
    """`seeds`: each response comes from its own generator, so splitting the prompts over batches
    (or over processes, as PPO does) or reordering them draws the same responses; the global RNG
    plays no part."""
    model, tok = models[arch]
    seeds = [11, 12, 13, 14, 15, 16]
    whole = sample(model, tok, PROMPTS, cfg(max_new_tokens=8), num_samples=2, seeds=seeds)
    torch.manual_seed(123)
    one_by_one = sample(model, tok, PROMPTS, cfg(max_new_tokens=8, batch_size=1), num_samples=2, seeds=seeds)
    last = sample(model, tok, PROMPTS[2:], cfg(max_new_tokens=8), num_samples=2, seeds=seeds[4:])
    assert rows(one_by_one) == rows(whole) and rows(last) == rows(whole)[4:]
    assert len(set(whole.texts)) > 1  # not one deterministic answer
    other = sample(model, tok, PROMPTS, cfg(max_new_tokens=8), num_samples=2, seeds=[s + 100 for s in seeds])
    assert rows(other) != rows(whole)
    with pytest.raises(ValueError, match="5 seeds for 6 responses"):
        sample(model, tok, PROMPTS, cfg(), num_samples=2, seeds=seeds[:5])


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]]).expand(4000, 4)
    tokens = draw(probs, [torch.Generator().manual_seed(i) for i in range(4000)])
    counts = torch.bincount(tokens, minlength=4)
    assert counts[0] == counts[2] == 0 and abs(int(counts[1]) / 4000 - 0.25) < 0.03


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_limits_equal_greedy_decoding(models, arch):
    """top_k=1, a tiny top_p and a tiny temperature all reduce to greedy decoding; prompts of
    different lengths are left-padded in one batch, so this also checks padding is invisible."""
    model, tok = models[arch]
    expected = [greedy(model, tok, p, 8) for p in PROMPTS]
    for options in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-3)):
        assert rows(seeded(model, tok, PROMPTS, cfg(max_new_tokens=8, **options))) == expected, options
    assert rows(seeded(model, tok, PROMPTS, cfg(max_new_tokens=8))) != expected  # temperature 1 samples


def kept(logits):
    return torch.isfinite(logits).tolist()


def test_filter_logits_by_hand():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert kept(filter_logits(logits, 2, 1.0)) == [False, True, True, False]
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)  # 0 and 1 are off
    assert torch.equal(filter_logits(logits, 4, 1.0), logits)
    assert kept(filter_logits(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1, 1.0)) == [False, True, True, False]  # ties
    # probabilities 1/8, 1/2, 1/8, 1/4: the nucleus is the most likely tokens until their mass reaches top_p
    logits = torch.tensor([0.125, 0.5, 0.125, 0.25]).log()
    assert kept(filter_logits(logits, 0, 0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, 0, 0.7)) == [False, True, False, True]
    assert sum(kept(filter_logits(logits, 0, 0.8))) == 3  # 0.75 is short of 0.8: one of the 1/8s joins
    assert kept(filter_logits(logits, 0, 1e-9)) == [False, True, False, False]  # the top token always stays
    assert kept(filter_logits(logits, 2, 0.4)) == [False, True, False, False]  # top-k first, then top-p
    kept_values = filter_logits(logits, 0, 0.7)
    assert kept_values[1] == logits[1] and kept_values[3] == logits[3]  # kept logits are unchanged


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.9), (0, 0.3), (10, 0.6), (1, 0.5)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(top_k))
    expected = logits
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_logits(logits, top_k, top_p), expected)


def test_the_pad_token_is_never_sampled(models):
    """Even when the model puts nearly all its probability on it: pad is not a real token."""
    model, tok = models["gpt2"]
    ids = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False).input_ids
    head = model.get_output_embeddings().weight
    saved = head[tok.pad_token_id].clone()
    with torch.no_grad():
        last = model.get_decoder()(input_ids=ids).last_hidden_state[0, -1]
        head[tok.pad_token_id] = 100 * last / last.norm()
        try:
            assert int(model(input_ids=ids).logits[0, -1].argmax()) == tok.pad_token_id
            s = seeded(model, tok, PROMPTS[:1], cfg(max_new_tokens=1), k=16)
        finally:
            head[tok.pad_token_id] = saved
    assert (s.response_ids[:, 0] != tok.pad_token_id).all()


def test_top_k_limits_the_candidates_and_zero_means_off(models):
    model, tok = models["llama"]
    ids = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        order = torch.argsort(model(input_ids=ids).logits[0, -1], descending=True).tolist()

    def first_token_ranks(**options):
        s = seeded(model, tok, PROMPTS[:1], cfg(max_new_tokens=1, temperature=10.0, **options), k=64)
        return [order.index(int(t)) for t in s.response_ids[:, 0]]

    assert max(first_token_ranks(top_k=5)) < 5
    assert max(first_token_ranks(top_k=0)) >= 50  # no hidden default top-k of 50
    assert max(first_token_ranks(top_k=0, top_p=0.05)) < max(first_token_ranks(top_k=0))


def test_max_new_tokens_is_respected(models):
    model, tok = models["qwen2"]
    s = seeded(model, tok, PROMPTS, cfg(max_new_tokens=7), k=2)
    assert s.response_ids.shape == (6, 7)
    lengths = s.response_mask.sum(1)
    assert all(int(n) == 7 for n, ended in zip(lengths, s.ended, strict=True) if not ended)


def test_stops_at_eos(parrot):
    model, tok = parrot
    s = seeded(model, tok, [SAY_HI, SAY_MORE], cfg(max_new_tokens=16, temperature=0.3), k=2)
    for i in (0, 1):  # "Say hi" rows
        n = int(s.response_mask[i].sum())
        assert s.response_ids[i, n - 1] == tok.eos_token_id  # the mask ends at (and includes) EOS
        assert tok.decode(s.response_ids[i, :n]) == " hi there" + tok.eos_token
        assert bool(s.ended[i]) and s.texts[i] == "hi there"
        assert (s.response_ids[i, n:] == tok.pad_token_id).all()  # shorter than the other rows: padded
    assert s.response_mask[:2].sum(1).max() < s.response_mask[2:].sum(1).max()


def test_rows_that_end_leave_the_batch_and_the_others_go_on(parrot):
    """The "Say hi" rows end at EOS after a few tokens and leave the decoding batch (and its cache);
    the "Say more" row must go on exactly as if alone, with its hidden states still in its row."""
    model, tok = parrot
    torch.manual_seed(0)
    s = sample(model, tok, [SAY_HI, SAY_MORE, SAY_HI], cfg(max_new_tokens=16, temperature=0.3), keep_hidden=True)
    assert s.texts[0] == s.texts[2] == "hi there" and s.texts[1].startswith("more words\nUser: n")
    assert s.response_mask.sum(1).tolist()[0] < s.response_mask.sum(1).tolist()[1] == 16
    alone = seeded(model, tok, [SAY_MORE], cfg(max_new_tokens=16, temperature=0.3))
    assert alone.texts[0] == s.texts[1]
    ids = torch.cat([s.prompt_ids, s.response_ids], 1)
    mask = torch.cat([s.prompt_mask, s.response_mask], 1)
    with torch.no_grad():
        full = response_logits(model, ids, mask, s.prompt_ids.shape[1])
        kept = model.get_output_embeddings()(s.hidden)
    real = s.response_mask.bool()
    torch.testing.assert_close(kept[real], full[real], atol=1e-4, rtol=1e-4)


def test_stop_string_cuts_the_text_and_keeps_its_first_token(parrot):
    model, tok = parrot
    s = seeded(model, tok, [SAY_MORE], cfg(max_new_tokens=16, temperature=0.3, stop=["\nUser:"]))
    kept = rows(s)[0]
    assert s.texts == ["more words"] and bool(s.ended[0])
    # Tokens run through the one where the stop string begins (the policy learns to end its turn).
    assert tok.decode(kept) == " more words\n"
    assert len(tok.decode(kept[:-1])) <= len(" more words") < len(tok.decode(kept))
    # Without stop strings the same sample runs on into the next turn and has not ended.
    s = seeded(model, tok, [SAY_MORE], cfg(max_new_tokens=16, temperature=0.3))
    assert s.texts[0].startswith("more words\nUser: n") and not bool(s.ended[0])
    assert rows(s)[0][: len(kept)] == kept


def test_k_samples_are_grouped_by_prompt(parrot):
    model, tok = parrot
    prompts = [SAY_HI, SAY_MORE, "User: Say hi\nAssistant:"]
    # batch_size 4 with k=3: one prompt per generate call, three calls of different prompt widths.
    s = seeded(model, tok, prompts, cfg(max_new_tokens=16, temperature=0.3, stop=["\nUser:"], batch_size=4), k=3)
    assert len(s) == 9 and s.texts == ["hi there"] * 3 + ["more words"] * 3 + ["hi there"] * 3
    width = s.prompt_ids.shape[1]
    for i, prompt in enumerate(p for p in prompts for _ in range(3)):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert s.prompt_ids[i, width - len(ids) :].tolist() == ids  # left-padded: the prompt ends at the right
        assert s.prompt_mask[i].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
        assert (s.prompt_ids[i, : width - len(ids)] == tok.pad_token_id).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_k_samples_from_one_prefill_equal_k_copies_of_the_prompt(models, arch):
    """`num_samples=K` runs each prompt once and repeats its KV cache (PPO's K responses per prompt):
    the same responses, and the same hidden states they were sampled from, as K copies of the prompt."""
    model, tok = models[arch]
    seeds = list(range(20, 29))
    config = cfg(max_new_tokens=8, batch_size=9)
    shared = sample(model, tok, PROMPTS, config, num_samples=3, keep_hidden=True, seeds=seeds)
    copies = [p for p in PROMPTS for _ in range(3)]
    plain = sample(model, tok, copies, config, keep_hidden=True, seeds=seeds)
    assert rows(shared) == rows(plain) and len(set(shared.texts)) > 3
    assert torch.equal(shared.prompt_ids, plain.prompt_ids) and torch.equal(shared.prompt_mask, plain.prompt_mask)
    torch.testing.assert_close(shared.hidden, plain.hidden, rtol=0, atol=1e-5)


def test_sampling_keeps_the_training_mode_and_long_prompts_keep_their_end(models):
    model, tok = models["gpt2"]
    model.train()
    s = seeded(model, tok, ["word " * 50 + "end"], cfg(max_prompt_tokens=8, max_new_tokens=2))
    assert model.training
    model.eval()
    assert s.prompt_ids.shape[1] == 8
    assert s.prompt_ids[0].tolist() == tok("word " * 50 + "end", add_special_tokens=False)["input_ids"][-8:]


def test_prompts_cut_to_max_prompt_tokens_are_counted(models):
    """Issue 11: the cut was silent, while the reward model scores the whole prompt."""
    model, tok = models["gpt2"]
    long, short = "word " * 50 + "end", "Hi"
    s = seeded(model, tok, [long, short, long], cfg(max_prompt_tokens=8, max_new_tokens=2), k=2)
    assert s.prompts_truncated == 2  # prompts, not sampled rows
    assert seeded(model, tok, [short], cfg(max_prompt_tokens=8, max_new_tokens=2)).prompts_truncated == 0


def test_length_budget_fits_exactly_and_models_without_positions_pass(tiny_model_dir):
    from transformers import AutoConfig, MambaConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("gpt2"))  # 256 positions
    check_length_budget(config, cfg(max_prompt_tokens=200, max_new_tokens=56))
    with pytest.raises(UserError, match="exceeds the 256 positions"):
        check_length_budget(config, cfg(max_prompt_tokens=200, max_new_tokens=57))
    check_length_budget(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1), cfg(max_prompt_tokens=10**6))


@pytest.mark.parametrize(("arch", "field"), [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_generate_over_the_models_positions_is_a_clear_error_before_sampling(capsys, tmp_path, arch, field):
    """Issue 11: GPT-2 raised an IndexError mid-sampling; Llama silently ran past its positions."""
    model_dir = make_test_model(arch, tmp_path / arch, max_positions=32)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "tea", "prompt": "How do I make tea?"}\n{"id": "fox", "prompt": "The fox?"}\n')
    out = tmp_path / "gen"
    argv = [f"prompts={prompts}", f"output_dir={out}", f"model.path={model_dir}", "k=2"]
    assert main(["generate", *argv, "sampling.max_prompt_tokens=16", "sampling.max_new_tokens=40"]) == 2
    err = capsys.readouterr().err
    assert "sampling.max_prompt_tokens + sampling.max_new_tokens = 16 + 40 = 56 exceeds the 32 positions" in err
    assert f"(model.config.{field})" in err
    assert not (out / "completions.jsonl").exists()


def test_generate_stage_reports_truncated_prompts(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "tea", "prompt": "How do I make tea today?"}\n{"id": "hi", "prompt": "Hi"}\n')
    argv = [f"prompts={prompts}", f"output_dir={tmp_path / 'gen'}", f"model.path={tiny_model_dir('gpt2')}", "k=2"]
    assert main(["generate", *argv, "sampling.max_prompt_tokens=16", "sampling.max_new_tokens=2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "warning: 1 of 2 prompts are longer than sampling.max_prompt_tokens=16 tokens" in printed


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_stage_writes_completions(capsys, tmp_path, tiny_model_dir, arch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "tea", "prompt": "How do I make tea?"}\n\n'
        '{"id": "chat", "prompt": [{"role": "user", "content": "Hi"}]}\n'
        '{"id": "fox", "prompt": "Tell me about the fox."}\n',
        encoding="utf-8",
    )
    out = tmp_path / "gen"
    argv = [f"prompts={prompts}", f"output_dir={out}", f"model.path={tiny_model_dir(arch)}", "k=3"]
    assert main(["generate", *argv, "sampling.max_new_tokens=6", "sampling.batch_size=4", "limit=2"]) == 0
    records = read_records(out / "completions.jsonl", "completions")
    assert [r.prompt_id for r in records] == ["tea", "chat"]
    assert all(len(r.completions) == 3 for r in records)
    assert records[1].prompt[0].content == "Hi"  # conversations are kept as conversations
    assert (out / "config.yaml").exists()
    assert f"wrote 2 prompts x 3 completions to {out / 'completions.jsonl'}" in capsys.readouterr().out


def test_generate_stage_mixes_candidates_of_several_models(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "tea", "prompt": "How do I make tea?"}\n{"id": "fox", "prompt": "The fox?"}\n')
    base = [f"prompts={prompts}", f"model.path={tiny_model_dir('gpt2')}", "k=2", "sampling.max_new_tokens=6"]
    assert main(["generate", *base, f"output_dir={tmp_path / 'one'}"]) == 0
    other = tiny_model_dir("llama")
    assert main(["generate", *base, f"output_dir={tmp_path / 'mix'}", f"extra_models=[{other}]"]) == 0
    assert "wrote 2 prompts x 4 completions" in capsys.readouterr().out
    one = read_records(tmp_path / "one" / "completions.jsonl", "completions")
    mix = read_records(tmp_path / "mix" / "completions.jsonl", "completions")
    for a, b in zip(one, mix, strict=True):
        assert b.completions[:2] == a.completions  # the first model's samples come first, as alone
        assert len(b.completions) == 4
