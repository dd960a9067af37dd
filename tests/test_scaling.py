"""Scaling out on one process: every inference stage places its models through `models.device`;
gradient checkpointing, attention kernels, 4-bit QLoRA and the reward model's LoRA and dtype.

The accelerator tests fake only torch's device check (`torch.cuda.is_available`) and the final
move of a module to CUDA (there is no GPU here): which models each stage loads, and where it asks
for them to go, are the stages' own code. bench/gpu_check.sh runs the same on a real GPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rlhfkit.errors import UserError
from rlhfkit.models.device import resolve_device
from rlhfkit.models.loading import LoraConfig, ModelConfig, load_causal_lm
from rlhfkit.models.sampling import SamplingConfig, sample
from rlhfkit.models.value import trunk_hidden
from rlhfkit.rewards.model import RewardMeta, RewardModel, init_reward_head, load_backbone
from testutil import make_test_model, write_prompts

PROMPTS = ["Is tea kind?", "How do I boil water?"]
RESPONSES = ["Tea is kind and warm.", "Boil it for three minutes."]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scaling")
    lm = make_test_model("gpt2", root / "lm", n_layer=2, d_model=32)
    model, tokenizer, kind = load_backbone(str(lm))
    torch.manual_seed(0)
    init_reward_head(model)
    rm = RewardModel(model, tokenizer, RewardMeta(kind=kind, max_length=64)).save(root / "rm")
    completions = root / "completions.jsonl"
    completions.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": p, "completions": ["kindly yes", "no"]}) + "\n"
            for i, p in enumerate(PROMPTS)
        )
    )
    return {"lm": lm, "rm": rm, "prompts": write_prompts(root / "prompts.jsonl", 2), "completions": completions}


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch says a CUDA device is there; a module moved to it stays on the CPU, and is recorded.
    Returns (every model `from_pretrained` loaded, the ids of the modules sent to CUDA)."""
    loaded: list[torch.nn.Module] = []
    on_cuda: set[int] = set()
    from_pretrained = PreTrainedModel.from_pretrained.__func__
    module_to = torch.nn.Module.to

    def record_load(cls, *args, **kwargs):
        model = from_pretrained(cls, *args, **kwargs)
        loaded.append(model)
        return model

    def record_move(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, str | torch.device) and torch.device(target).type == "cuda":
            on_cuda.add(id(self))
            return self
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(record_load))
    monkeypatch.setattr(torch.nn.Module, "to", record_move)
    return loaded, on_cuda


def run_inference_stages(files: dict[str, Path], out: Path, device: str) -> dict:
    """generate, eval (with a reward model), cai revise, cai label (a model judge and a reward judge)."""
    from rlhfkit.stages import cai, generate
    from rlhfkit.stages import eval as eval_stage

    lm, rm = str(files["lm"]), str(files["rm"])
    small = {"max_new_tokens": 4, "max_prompt_tokens": 24}
    generate.run(
        generate.Config(
            output_dir=str(out / "gen"), prompts=str(files["prompts"]), k=2, model=ModelConfig(path=lm),
            sampling=SamplingConfig(**small), device=device,
        )
    )  # fmt: skip
    results = eval_stage.run(
        eval_stage.Config(
            output_dir=str(out / "eval"), models={"a": lm, "b": lm}, prompts=str(files["prompts"]), gold=False,
            reward={"sources": [{"model": rm}]}, sampling=SamplingConfig(**small), bootstrap=10, device=device,
        )
    )  # fmt: skip
    cai_sampling = cai.CAISamplingConfig(**small)
    cai.run_revise(
        cai.ReviseConfig(
            output_dir=str(out / "revise"), prompts=str(files["prompts"]), model=ModelConfig(path=lm),
            sampling=cai_sampling, few_shot=0, device=device,
        )
    )  # fmt: skip
    for n, judge in enumerate([{"model": {"path": lm}, "max_tokens": 200}, {"reward": {"sources": [{"model": rm}]}}]):
        cai.run_label(
            cai.LabelConfig(
                output_dir=str(out / f"label{n}"), completions=str(files["completions"]), judge=judge, device=device
            )
        )
    return results


def test_every_inference_stage_puts_every_model_it_loads_on_the_accelerator(files, tmp_path, fake_cuda):
    loaded, on_cuda = fake_cuda
    results = run_inference_stages(files, tmp_path, "auto")
    # generate 1; eval the reference, 2 models and a reward model; revise 1; label a model judge, a reward model
    assert len(loaded) == 8
    assert [type(m).__name__ for m in loaded if id(m) not in on_cuda] == []
    assert results["device"] == "cuda"


def test_device_cpu_keeps_every_model_on_the_cpu_even_with_an_accelerator(files, tmp_path, fake_cuda):
    loaded, on_cuda = fake_cuda
    results = run_inference_stages(files, tmp_path, "cpu")
    assert len(loaded) == 8 and not on_cuda
    assert results["device"] == "cpu"


def test_auto_is_the_device_accelerate_trains_on_and_a_missing_accelerator_is_a_clear_error():
    from accelerate import PartialState

    assert resolve_device("auto") == PartialState().default_device
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda: no CUDA device"):
            resolve_device("cuda")


# ---- big-model options ------------------------------------------------------------------------


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)])
def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients(tiny_model_dir, lora):
    """Checkpointing is on (each layer's forward runs again in the backward, also through the
    trunk-only path PPO uses), and changes neither the loss nor any gradient; generation keeps its
    KV cache."""
    path = str(tiny_model_dir("llama"))
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        model, tok = load_causal_lm(ModelConfig(path=path, lora=lora, gradient_checkpointing=checkpointing))
        model.train()
        calls = []  # counted in a module's `forward` (torch runs no module hooks while it recomputes)
        mlp = model.get_decoder().layers[0].mlp
        mlp.forward = lambda *a, f=mlp.forward, n=calls, **k: n.append(1) or f(*a, **k)
        loss = lm_loss(model, ids)
        loss.backward()
        trunk_hidden(model.get_decoder(), ids, torch.ones_like(ids), 4).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), grads, len(calls)))
        if checkpointing:
            assert model.config.use_cache is False
            s = sample(model, tok, ["tea"], SamplingConfig(max_new_tokens=3, max_prompt_tokens=8))
            assert s.response_ids.shape[1] >= 1
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert (calls0, calls1) == (2, 4)  # two forwards; with checkpointing each runs again in its backward
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_attention_kernels_agree_and_a_missing_one_is_a_clear_error(tiny_model_dir):
    path = str(tiny_model_dir("qwen2"))
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    logits = {}
    for kernel in ("sdpa", "eager"):
        model, _ = load_causal_lm(ModelConfig(path=path, attn_implementation=kernel))
        assert model.config._attn_implementation == kernel
        logits[kernel] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match="attn_implementation=flash_attention_2: the flash-attn package"):
            load_causal_lm(ModelConfig(path=path, attn_implementation="flash_attention_2"))


QLORA_RUNS = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


@pytest.mark.skipif(QLORA_RUNS, reason="bitsandbytes and a GPU are here: the QLoRA test below runs instead")
def test_4bit_without_bitsandbytes_or_a_gpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(UserError, match="model.load_in_4bit: "):
        load_causal_lm(ModelConfig(path=str(tiny_model_dir("llama")), load_in_4bit=True, lora=LoraConfig(r=4)))


@pytest.mark.skipif(not QLORA_RUNS, reason="QLoRA needs bitsandbytes and a CUDA GPU (pip install 'rlhfkit[qlora]')")
def test_qlora_trains_only_the_adapter_on_4bit_weights(tiny_model_dir):
    model, _ = load_causal_lm(ModelConfig(path=str(tiny_model_dir("llama")), load_in_4bit=True, lora=LoraConfig(r=4)))
    assert model.is_loaded_in_4bit
    ids = torch.randint(0, 200, (2, 10), device="cuda")
    lm_loss(model, ids).backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


# ---- the reward model's LoRA and dtype --------------------------------------------------------


def test_reward_model_with_lora_trains_and_saves_a_plain_classifier(files, tmp_path):
    from rlhfkit.cli import main

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": f"kind {i}", "rejected": f"rude {i}"} for i, p in enumerate(PROMPTS * 8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    args = [f"model.path={files['lm']}", "model.lora={r: 4}", "model.gradient_checkpointing=true"]
    args += [f"data.pairs={pairs}", "train.max_steps=3", "train.batch_size=4", "normalize.enabled=false"]
    assert main(["rm", f"output_dir={out}", *args]) == 0
    saved = out / "model"
    assert not (saved / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(saved)  # merged: no peft needed
    base = AutoModelForSequenceClassification.from_pretrained(files["lm"], num_labels=1)
    moved = [n for n, p in plain.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert any("score" in n for n in moved) and any("attn" in n for n in moved)  # head and adapter both trained
    rm = RewardModel.load(saved)
    assert torch.isfinite(rm.score(PROMPTS, RESPONSES)).all()


def test_reward_model_loads_in_bfloat16(files):
    full = RewardModel.load(files["rm"])
    half = RewardModel.load(files["rm"], dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    scores = half.score(PROMPTS, RESPONSES)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, full.score(PROMPTS, RESPONSES), rtol=0.05, atol=0.05)


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    """bench/gpu_check.py's own assertions (ratio 1 at the first bf16 update, finite losses, eval on
    the resolved device) on a 2-layer model: the script a GPU machine runs is exercised here."""
    import subprocess
    import sys

    from testutil import subprocess_env

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["first_update_approx_kl"] < 1e-10 and report["ppo_tokens_per_s"] > 0
