"""PPO: the pieces around the math (rollout bookkeeping, value wrapper, reference model), and short
real runs on tiny GPT-2 / Llama / Qwen2 models, with and without LoRA. The learning test and the
kill-and-resume test have their own modules (test_ppo_learning.py, test_ppo_resume.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.errors import UserError
from rlhfkit.models.loading import BackboneOptions, LoraConfig, ModelConfig, apply_lora, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig, encode_prompts, sample
from rlhfkit.models.value import PolicyAndValue, load_critic, response_logits
from rlhfkit.rewards.base import FunctionReward
from rlhfkit.rl.core import logprobs_from_logits
from rlhfkit.rl.rollout import Rollout
from rlhfkit.stages.ppo import (
    Config,
    PPOConfig,
    normalization_mismatches,
    ppo_loss,
    prompt_indices,
    shape_scores,
    train_ppo,
)
from testutil import e_frequency, make_test_model, ppo_config, write_prompts


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo-models")
    return {arch: make_test_model(arch, root / arch) for arch in ("gpt2", "llama", "qwen2")}


@pytest.fixture()
def prompts(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl")


# ------------------------------------------------------------------------------- bookkeeping


def test_prompt_indices_cover_every_prompt_once_per_pass_and_depend_only_on_the_step():
    seen = [i for step in range(3) for i in prompt_indices(6, 2, step, seed=1)]
    assert sorted(seen) == list(range(6))  # one pass = 3 steps of 2
    assert prompt_indices(6, 2, 1, seed=1) == prompt_indices(6, 2, 1, seed=1)
    assert prompt_indices(6, 4, 1, seed=1)[:2] == seen[4:]  # a step may straddle two passes
    assert prompt_indices(6, 6, 0, seed=1) != prompt_indices(6, 6, 0, seed=2)


def test_shape_scores_normalises_clips_then_gives_unfinished_responses_the_penalty():
    raw = torch.tensor([3.0, -5.0, 1.0])
    ended = torch.tensor([True, True, False])
    cfg = PPOConfig(normalize_rewards=True, reward_clip=2.0, missing_eos_penalty=-1.0)
    # (3 - 1) / 2 = 1; (-5 - 1) / 2 = -3 -> clipped to -2; the unfinished one gets exactly -1
    assert shape_scores(raw, ended, cfg, baseline=(1.0, 2.0)).tolist() == [1.0, -2.0, -1.0]
    plain = PPOConfig(missing_eos_penalty=None)
    assert shape_scores(raw, ended, plain, baseline=(1.0, 2.0)).tolist() == raw.tolist()


def test_rollout_rows_drop_columns_that_are_padding_in_every_selected_row():
    # prompt width 3 (left-padded), response width 3 (right-padded); pad id 0
    ids = torch.tensor([[0, 0, 5, 7, 8, 0], [4, 5, 6, 7, 8, 9], [0, 5, 6, 7, 0, 0]])
    mask = (ids != 0).long()
    resp = ids[:, 3:]
    ro = Rollout(ids, mask, 3, {"response_ids": resp, "mask": mask[:, 3:].bool()})
    sub_ids, sub_mask, start, tok = ro.rows(torch.tensor([0, 2]))
    assert sub_ids.tolist() == [[0, 5, 7, 8], [5, 6, 7, 0]]  # first prompt column and last response column dropped
    assert start == 2
    assert tok["response_ids"].tolist() == [[7, 8], [7, 0]]
    assert sub_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    full_ids, _, full_start, _ = ro.rows(torch.tensor([1]))
    assert full_ids.tolist() == [ids[1].tolist()] and full_start == 3


def test_micro_batches_group_rows_of_similar_length():
    # prompts of 2 tokens, responses of 1, 8, 2, 7, 1, 8 tokens: a row costs 2 + the longest response
    lengths = [1, 8, 2, 7, 1, 8]
    response_mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths], dtype=torch.bool)
    attention = torch.cat([torch.ones(6, 2, dtype=torch.long), response_mask.long()], 1)
    ro = Rollout(torch.ones(6, 10, dtype=torch.long), attention, 2, {"mask": response_mask})
    rows = torch.arange(6)

    def split(max_rows, pass_cost):
        return [part.tolist() for part in replace(ro, pass_cost=pass_cost).micro_batches(rows, max_rows)]

    # one pass: 6 x 10 + 3 = 63 tokens; short and long apart: 3 x 4 + 3 + 3 x 10 + 3 = 48; more passes cost more
    assert split(6, 3) == [[0, 4, 2], [3, 1, 5]]
    assert split(6, 100) == [[0, 4, 2, 3, 1, 5]]  # a pass costs more than the padding it would save
    assert split(2, 3) == [[0, 4], [2], [3], [1, 5]]  # at most 2 rows: 9 + 7 + 12 + 23 = 51
    assert split(3, None) == [[0, 4, 2], [3, 1, 5]]  # no more passes than max_rows needs
    assert split(6, None) == [[0, 4, 2, 3, 1, 5]]
    assert split(4, None) == [[0, 4, 2], [3, 1, 5]]


def test_micro_batches_keep_a_prompts_rows_together_when_they_share_it():
    # groups of 3 responses to prompts 7, 8, 9 (rows 0-2, 3-5, 6-8); a shared row is 2 + its responses wide
    lengths = [1, 1, 2, 8, 7, 8, 2, 1, 1]
    response_mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths], dtype=torch.bool)
    attention = torch.cat([torch.ones(9, 2, dtype=torch.long), response_mask.long()], 1)
    groups = torch.tensor([7, 7, 7, 8, 8, 8, 9, 9, 9])
    ro = Rollout(torch.ones(9, 10, dtype=torch.long), attention, 2, {"mask": response_mask}, 3, groups)
    rows = torch.tensor([8, 0, 3, 1, 6, 4, 2, 5, 7])
    # widths 6, 6, 25 (in order of first appearance): the short prompts together (2 x 6 + 3), the long one alone
    assert [p.tolist() for p in ro.micro_batches(rows, 6)] == [[8, 6, 7, 0, 1, 2], [3, 4, 5]]
    # at most 2 rows: each prompt's rows in chunks of 2 (in `rows` order), each chunk in one micro-batch
    parts = [p.tolist() for p in ro.micro_batches(rows, 2)]
    assert sorted(i for p in parts for i in p) == list(range(9)) and all(len(p) <= 2 for p in parts)
    assert all(any(set(chunk) <= set(p) for p in parts) for chunk in ([8, 6], [0, 1], [3, 4]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prompt_rows_give_the_log_probs_and_gradients_of_plain_rows(models, arch):
    """RLOO/GRPO (`ppo.share_prompt`): a prompt's K responses run its tokens once, and the policy's
    and reference's log-probs, the loss and its gradient are those of one left-padded row per
    response. Prompts of different lengths (left padding), responses of different lengths (right
    padding), two identical responses (their shared prefix runs into the response), and partial groups."""
    torch.manual_seed(0)
    policy, tok = load_causal_lm(ModelConfig(path=str(models[arch])))
    model = PolicyAndValue(policy, value=False)
    prompts = ["Hello there, how", "a", "The quick brown fox jumps"]
    k = 3
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, stop=[])
    batch = sample(policy, tok, [p for p in prompts for _ in range(k)], cfg, seeds=list(range(len(prompts) * k)))
    response, response_mask = batch.response_ids.clone(), batch.response_mask.clone()
    response[1], response_mask[1] = response[0], response_mask[0]
    B, T = response.shape
    tokens = {"response_ids": response, "mask": response_mask.bool()}
    tokens.update({key: torch.randn(B, T) for key in ("logp", "ref_logp", "advantages")})
    shared = Rollout(
        torch.cat([batch.prompt_ids, response], 1),
        torch.cat([batch.prompt_mask, response_mask], 1),
        batch.prompt_ids.shape[1],
        tokens,
        groups=torch.arange(len(prompts)).repeat_interleave(k),
    )
    plain = replace(shared, groups=None)
    rows = torch.tensor([4, 0, 8, 1, 3, 6, 2, 5])  # row 7 left out: a partial group
    mask = tokens["mask"][rows]
    ids, attention, start, tok_rows = plain.rows(rows)
    layout = shared.shared(rows)
    assert layout.input_ids.shape[0] == len(prompts)
    assert (layout.segments >= 0).sum() < attention.sum()  # each prompt's tokens once
    with torch.no_grad():  # the reference's pass and the policy's (PolicyAndValue, as the update runs it)
        for forward in (lambda *a: response_logits(policy, *a), lambda *a: model(*a)[0]):
            expected, got = (
                logprobs_from_logits(forward(ids, attention, start, *extra), tok_rows["response_ids"], 0.7)[mask]
                for extra in ((), (layout,))
            )
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    p = PPOConfig(
        algorithm="grpo", num_generations=k, batch_size=9, mini_batch_size=9, ent_coef=0.01, kl={"mode": "loss"}
    )
    n_tokens = mask.sum()
    results = []
    for ro in (plain, shared):
        model.zero_grad()
        loss, stats = ppo_loss(model, ro, rows, n_tokens, 0.1, 0.7, p)
        loss.backward()
        results.append((loss.detach(), stats, [x.grad.clone() for x in model.parameters() if x.grad is not None]))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    assert stats_b == pytest.approx(stats_a, abs=1e-5)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_train_section_rejects_settings_ppo_does_not_use():
    with pytest.raises(UserError, match=r"train.batch_size: unknown setting; did you mean .*ppo.batch_size\?"):
        load_config(Config, None, ["train.batch_size=8"])
    with pytest.raises(UserError, match="multiple of mini_batch_size"):
        load_config(Config, None, ["ppo.batch_size=10", "ppo.mini_batch_size=4"])


# ------------------------------------------------------------------------- value wrapper


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_policy_logits_match_generation_and_values_start_at_zero(models, arch):
    """The training forward must see the sampled tokens exactly as generation did: same left padding,
    same position ids. Checked against the logits `generate` itself used."""
    model, tok = load_causal_lm(ModelConfig(path=str(models[arch])))
    ids, mask, _ = encode_prompts(tok, ["Hello there, how", "a", "The quick brown fox jumps"], 100)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=5,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], 1)
    logits, values = PolicyAndValue(model)(out.sequences, full_mask, ids.shape[1])
    torch.testing.assert_close(logits, torch.stack(out.logits, 1), atol=1e-5, rtol=0)
    assert values.shape == (3, 5) and values.abs().max() == 0  # zero-initialised head
    torch.testing.assert_close(response_logits(model, out.sequences, full_mask, ids.shape[1]), logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hidden_states_kept_by_sampling_give_the_logits_and_values_of_a_full_pass(models, arch, lora):
    """Several decoding batches (batch_size 2 for 5 prompts), prompts of different lengths, responses
    cut at a stop string: the kept states must still line up with every response token, and give
    the log-probs and values a full forward pass gives (what PPO's rollout relies on)."""
    model, tok = load_causal_lm(ModelConfig(path=str(models[arch]), lora=LoraConfig(r=4) if lora else None))
    if lora:  # move the adapter away from its zero init, so that it changes the output
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    net = PolicyAndValue(model)
    torch.nn.init.normal_(net.value_head.weight)
    prompts = ["Hello there, how", "a", "The quick brown fox jumps over", "tea", "Good answers are"]
    cfg = SamplingConfig(max_new_tokens=6, batch_size=2, stop=["e"], prompt_template="{prompt}")
    torch.manual_seed(0)
    samples = sample(model, tok, prompts, cfg, keep_hidden=True)
    assert (samples.response_mask.sum(1) < 6).any()  # some responses were cut short
    assert samples.hidden is not None and samples.hidden.shape[:2] == samples.response_ids.shape
    ids = torch.cat([samples.prompt_ids, samples.response_ids], 1)
    mask = torch.cat([samples.prompt_mask, samples.response_mask], 1)
    start = samples.prompt_ids.shape[1]
    with torch.no_grad():
        logits, values = net(ids, mask, start)
        kept_logits, kept_values = net.heads(samples.hidden, ids, mask, start)
    real = samples.response_mask.bool()
    torch.testing.assert_close(kept_logits[real], logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kept_values[real], values[real], atol=1e-4, rtol=1e-4)
    logp = logprobs_from_logits(logits, samples.response_ids, 0.7)
    kept_logp = logprobs_from_logits(kept_logits, samples.response_ids, 0.7)
    torch.testing.assert_close(kept_logp[real], logp[real], atol=1e-5, rtol=1e-5)
    assert sample(model, tok, prompts, cfg).hidden is None  # only kept when asked for


def test_lora_reference_is_the_base_model_with_the_adapter_off(models):
    base, tok = load_causal_lm(ModelConfig(path=str(models["llama"])))
    policy = apply_lora(load_causal_lm(ModelConfig(path=str(models["llama"])))[0], LoraConfig(r=4))
    with torch.no_grad():  # move the adapter away from its zero init, so it changes the output
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7, 8, 9]])
    mask = (ids != tok.pad_token_id).long()
    with policy.disable_adapter():
        ref = response_logits(policy, ids, mask, 3)
    torch.testing.assert_close(ref, response_logits(base, ids, mask, 3))
    assert (response_logits(policy, ids, mask, 3) - ref).abs().max() > 1e-3


def test_critic_from_a_reward_model_gives_its_scores_as_values(models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(str(models["gpt2"]), num_labels=1)
    torch.nn.init.normal_(rm.score.weight)
    rm.save_pretrained(rm_dir)
    policy, tok = load_causal_lm(ModelConfig(path=str(models["gpt2"])))
    critic = load_critic(str(rm_dir), len(tok))
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7, 8, 9]])
    mask = (ids != tok.pad_token_id).long()
    _, values = PolicyAndValue(policy, critic)(ids, mask, 3)
    # the value before response token t = the reward model's score of the prefix that ends just before it
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = rm.transformer(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    torch.testing.assert_close(values, rm.score(hidden).squeeze(-1)[:, 2:5])
    assert values.abs().min() > 0
    lora_critic = load_critic(str(rm_dir), len(tok), BackboneOptions(lora=LoraConfig(r=4)))
    trained = [n for n, p in lora_critic.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "score" in n for n in trained)
    assert any("score" in n for n in trained)
    AutoModelForSequenceClassification.from_pretrained(str(models["gpt2"]), num_labels=2).save_pretrained(
        tmp_path / "two"
    )
    with pytest.raises(UserError, match="exactly 1"):
        load_critic(str(tmp_path / "two"), len(tok))


# --------------------------------------------------------------------------------- real runs


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_runs_for_each_architecture(models, prompts, tmp_path, arch, lora):
    cfg = ppo_config(tmp_path / "out", models[arch], prompts, model={"lora": {"r": 4} if lora else None})
    results = train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert results["steps"] == 2 and "max_steps" in results["stop_reason"]
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # policy == reference before any update (up to the rounding of cached generation vs a full pass)
    assert abs(rows[0]["kl"]) < 1e-4 and rows[0]["kl_k3"] < 1e-6
    # ... and not after: measured 4e-3 to 3e-2 after one update, 1e-13 without one (rounding)
    assert rows[1]["kl_k3"] > 1e-4
    for key in ("reward", "kl_k1", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all(isinstance(s["response"], str) for s in samples)
    saved, _ = load_causal_lm(ModelConfig(path=str(tmp_path / "out" / "model")))  # merged, plain weights
    assert not hasattr(saved, "peft_config")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 2


def exact_kl(model_dir: Path, ref_dir: Path) -> float:
    """KL(policy || reference) summed over the whole vocabulary, averaged over the positions of fixed
    texts: a deterministic measure of how far a trained policy is from its reference (PPO's own
    `kl` metric is an estimate on fresh samples, too noisy to compare two short runs)."""
    policy, tok = load_causal_lm(ModelConfig(path=str(model_dir)))
    ref, _ = load_causal_lm(ModelConfig(path=str(ref_dir)))
    texts = ["User: Tell me about thing number 3\nAssistant: the tea is red and the cat", "User: hi\nAssistant: hello"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logp = torch.log_softmax(policy.eval()(**batch).logits, -1)
        ref_logp = torch.log_softmax(ref.eval()(**batch).logits, -1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)
    return float((kl * batch["attention_mask"]).sum() / batch["attention_mask"].sum())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_critic_from_a_reward_model_and_kl_as_a_loss_pulls_towards_the_reference(models, prompts, tmp_path, lora):
    """The same run with the KL loss off (beta 0) and on: on, the policy ends much closer to the
    reference. (k1 as a loss would not: its expected gradient is zero; it is refused.)"""
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(str(models["gpt2"]), num_labels=1).save_pretrained(rm_dir)
    kl = {}
    for beta in (0.0, 50.0):
        cfg = ppo_config(
            tmp_path / f"beta{beta}",
            models["gpt2"],
            prompts,
            model={"lora": {"r": 4} if lora else None},
            ppo={"value_init": "reward_model", "critic_path": str(rm_dir), "kl": {"mode": "loss", "beta": beta}},
            stop={"max_steps": 3},
            train={"lr": 1e-2},
        )
        assert cfg.ppo.kl.estimator == "k3"  # the default estimator as a loss
        results = train_ppo(cfg, reward=FunctionReward(e_frequency))
        assert results["steps"] == 3 and math.isfinite(results["last"]["value_loss"])
        kl[beta] = exact_kl(tmp_path / f"beta{beta}" / "model", models["gpt2"])
    # measured: full 0.107 -> 0.021, LoRA 0.0134 -> 0.0054
    assert kl[0.0] > 5e-3 and kl[50.0] < 0.6 * kl[0.0], kl


def test_kl_estimator_defaults_to_k3_as_a_loss_and_refuses_k1_there():
    assert load_config(Config, None, []).ppo.kl.estimator == "k1"
    assert load_config(Config, None, ["ppo.kl.mode=loss"]).ppo.kl.estimator == "k3"
    assert load_config(Config, None, ["ppo.kl.mode=loss", "ppo.kl.kind=k2"]).ppo.kl.estimator == "k2"
    with pytest.raises(UserError, match="k1.*expected gradient.*zero"):
        load_config(Config, None, ["ppo.kl.mode=loss", "ppo.kl.kind=k1"])


@pytest.mark.parametrize("setting", ["sampling.top_k=5", "sampling.top_p=0.9"])
def test_ppo_refuses_top_k_and_top_p(setting):
    """Tokens drawn from a filtered distribution, ratio and KL of the full one: refused, as TRL does."""
    with pytest.raises(UserError, match="top_k=0 and sampling.top_p=1"):
        load_config(Config, None, [setting])


@pytest.fixture()
def fresh_accelerator_state():
    """accelerate keeps one process-wide state and refuses a second mixed-precision setting in the
    same process: start from none and leave none behind (what accelerate's own test case does)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize(
    "algorithm", [{}, {"algorithm": "rloo", "num_generations": 2}, {"algorithm": "grpo", "num_generations": 4}]
)
def test_bf16_ratio_is_exactly_one_at_the_first_update(tmp_path, algorithm):
    """Under mixed precision the update's forward runs in bf16 autocast: the rollout's "old" numbers
    must come from that same forward, in the same micro-batches (in bf16 a row's result depends on
    how wide its batch-mates make the batch: 1e-3 apart at this model width), or the ratio is off by
    ~1e-3 before any update. Two minibatches of rows with prompts of different lengths, one epoch,
    and a learning rate (1e-30) far below the rounding step of any weight or activation: both
    updates see the rollout's policy, and the logged stats are theirs alone."""
    model_dir = make_test_model("gpt2", tmp_path / "gpt2-128", d_model=128)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "tea " * (1 + 2 * i)}) + "\n" for i in range(16)))
    cfg = ppo_config(
        tmp_path / "out",
        model_dir,
        prompts,
        ppo={"batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 2, "epochs": 1, **algorithm},
        stop={"max_steps": 1},
        train={"mixed_precision": "bf16", "lr": 1e-30},
    )
    train_ppo(cfg, reward=FunctionReward(e_frequency))
    [row] = read_metrics(tmp_path / "out" / "metrics.jsonl")
    # approx_kl: the mean over two minibatches of the mean over their <= 64 tokens of (r - 1) - log r,
    # ~ (log r)^2 / 2; below 1e-13, every token has |r - 1| < 1e-5
    assert row["approx_kl"] < 1e-13 and row["clipfrac"] == 0.0
    assert abs(row["kl"]) < 1e-12 and row["kl_k3"] < 1e-12  # the reference is scored the same way


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_micro_batch_losses_add_up_to_the_minibatch_loss_and_gradient(models, mode):
    """Gradient accumulation must be exact even when rows have different numbers of tokens."""
    torch.manual_seed(0)
    policy, _ = load_causal_lm(ModelConfig(path=str(models["gpt2"])))
    model = PolicyAndValue(policy)
    torch.nn.init.normal_(model.value_head.weight)
    B, P, T = 5, 3, 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    response = torch.randint(0, 200, (B, T))
    ids = torch.cat([torch.randint(0, 200, (B, P)), response], 1)
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)
    tokens = {"response_ids": response, "mask": mask}
    tokens.update({k: torch.randn(B, T) for k in ("logp", "ref_logp", "values", "advantages", "returns")})
    ro = Rollout(ids, attention, P, tokens)
    cfg = PPOConfig(ent_coef=0.01, kl={"mode": mode})
    rows = torch.tensor([4, 0, 2, 1, 3])
    n_tokens = mask[rows].sum()

    def loss_and_grads(parts):
        model.zero_grad()
        total = sum(ppo_loss(model, ro, part, n_tokens, 0.1, 0.7, cfg)[0] for part in parts)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = loss_and_grads([rows])
    split, split_grads = loss_and_grads(rows.split(2))
    torch.testing.assert_close(split, whole)
    assert len(split_grads) == len(whole_grads)
    for a, b in zip(split_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # float32 sums in another order (k3 has exp)


def test_reward_threshold_stops_before_updating(models, prompts, tmp_path):
    cfg = ppo_config(tmp_path / "out", models["gpt2"], prompts, stop={"max_steps": 5, "reward_threshold": -1.0})
    results = train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert results["steps"] == 1 and "reward_threshold" in results["stop_reason"]
    assert "policy_loss" not in results["last"]  # stopped on the rollout, no update applied


def test_ppo_over_the_policys_positions_is_a_clear_error_before_the_first_rollout(tmp_path, prompts):
    """Issue 11: the first rollout crashed with an IndexError (GPT-2)."""
    model_dir = make_test_model("gpt2", tmp_path / "short", max_positions=32)
    sampling = {"max_prompt_tokens": 16, "max_new_tokens": 24}
    cfg = ppo_config(tmp_path / "out", model_dir, prompts, sampling=sampling)
    with pytest.raises(UserError, match=r"16 \+ 24 = 40 exceeds the 32 positions .*\(model.config.n_positions\)"):
        train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_separate_reference_model_is_checked_against_the_budget_too(models, tmp_path, prompts):
    short = make_test_model("gpt2", tmp_path / "short", max_positions=32)
    sampling = {"max_prompt_tokens": 16, "max_new_tokens": 24}  # fits the policy's 256 positions
    cfg = ppo_config(tmp_path / "out", models["gpt2"], prompts, sampling=sampling, ref_model=str(short))
    with pytest.raises(UserError, match=r"16 \+ 24 = 40 exceeds the 32 positions"):
        train_ppo(cfg, reward=FunctionReward(e_frequency))


def test_ppo_logs_truncated_prompts(models, prompts, tmp_path):
    sampling = {"max_prompt_tokens": 4}
    cfg = ppo_config(tmp_path / "out", models["gpt2"], prompts, sampling=sampling, stop={"max_steps": 1})
    train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert read_metrics(tmp_path / "out" / "metrics.jsonl")[0]["prompts_truncated"] == 8  # every prompt of the batch


def test_kl_ceiling_stops_and_warns(models, prompts, tmp_path, capsys):
    cfg = ppo_config(
        tmp_path / "out", models["gpt2"], prompts, stop={"max_steps": 20, "kl_ceiling": 0.05}, train={"lr": 1e-2}
    )
    results = train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert results["steps"] < 20 and "kl_ceiling" in results["stop_reason"]
    assert results["last"]["kl"] > 0.05
    assert "reward hacking" in capsys.readouterr().out


class FlakyReward:
    """NaN scores for the first `bad` calls, then e_frequency."""

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def score(self, prompts, completions):
        self.calls += 1
        if self.calls <= self.bad:
            return torch.full((len(completions),), float("nan"))
        return FunctionReward(e_frequency).score(prompts, completions)


def test_a_nan_reward_skips_the_update_and_training_goes_on(models, prompts, tmp_path, capsys):
    cfg = ppo_config(tmp_path / "out", models["gpt2"], prompts, stop={"max_steps": 3})
    results = train_ppo(cfg, reward=FlakyReward(bad=1))
    assert "skipped (non-finite reward" in capsys.readouterr().out
    assert results["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [2, 3]


def test_nan_rewards_in_a_row_abort_without_writing_a_checkpoint(models, prompts, tmp_path):
    cfg = ppo_config(tmp_path / "out", models["gpt2"], prompts, stop={"max_steps": 10}, train={"max_bad_steps": 3})
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        train_ppo(cfg, reward=FlakyReward(bad=100))
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "out" / "model").exists()


class FlatThenSpread:
    """Scores that are nearly constant on the first rollout (std 2.4e-6), then spread over [0, 1]."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions):
        self.calls += 1
        if self.calls == 1:
            return 0.5 + 1e-6 * torch.arange(len(completions), dtype=torch.float32)
        return FunctionReward(e_frequency).score(prompts, completions) / 10


def test_normalising_by_a_nearly_constant_first_rollout_is_floored_and_warned(models, prompts, tmp_path, capsys):
    cfg = ppo_config(tmp_path / "out", models["gpt2"], prompts, ppo={"normalize_rewards": True}, stop={"max_steps": 3})
    train_ppo(cfg, reward=FlatThenSpread())
    assert "first rollout's scores are nearly constant" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    # scores in [0, 1] minus the first mean 0.5000035, over the floor 0.01: within +-50.0004 (over the
    # measured std: ~2e5)
    assert all(abs(r["reward_normalized"]) <= 50.001 for r in rows), [r["reward_normalized"] for r in rows]
    assert all(r["value_loss"] < 1e4 for r in rows)


def test_ppo_warns_when_the_reward_model_was_normalised_on_other_sampling(models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.rewards.model import META_FILE, RewardMeta

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(str(models["gpt2"]), num_labels=1).save_pretrained(rm_dir)

    def warnings(normalised_with: SamplingConfig, ppo_sampling: dict[str, Any]) -> list[str]:
        meta = RewardMeta(kind="decoder", normalization={"sampling": normalised_with.distribution()})
        (rm_dir / META_FILE).write_text(meta.model_dump_json())
        reward = {"sources": [{"model": str(rm_dir)}]}
        cfg = ppo_config(tmp_path, models["gpt2"], tmp_path, sampling=ppo_sampling, reward=reward)
        return normalization_mismatches(cfg)

    assert warnings(SamplingConfig(temperature=0.7, max_new_tokens=8), {"temperature": 0.7}) == []
    (warning,) = warnings(SamplingConfig(temperature=1.0, max_new_tokens=8), {"temperature": 0.7})
    assert "temperature 1.0 vs 0.7" in warning and str(rm_dir) in warning


def test_missing_prompts_file_is_a_clear_error(models, tmp_path):
    cfg = ppo_config(tmp_path / "out", models["gpt2"], tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        train_ppo(cfg, reward=FunctionReward(e_frequency))
