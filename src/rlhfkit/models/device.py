"""Where a model runs outside the training `Engine`: the one owner of inference placement.

The trainers (pretrain, SFT, RM, DPO/KTO, PPO) are placed by `accelerate` through the `Engine`.
Every stage that holds a model only to run it (generate, eval, cai's reviser and judge, a reward
model or classifier used as a reward, the RM's normalisation samples) places it here, so that on a
machine with an accelerator no stage silently runs on the CPU. `device=auto` picks what accelerate
picks for a single process (CUDA, then Apple's MPS, then the CPU), so an inference stage and a
trainer on the same machine agree; `device=cpu|cuda|mps` overrides it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from rlhfkit.errors import UserError

Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICE_HELP = "where models run: auto = CUDA, then MPS, then CPU (as accelerate picks); or cpu, cuda, mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(setting: Device = "auto", field: str = "device") -> torch.device:
    """The torch device for `setting`; asking for an accelerator that is not there is a UserError
    naming `field` (a silent fallback to the CPU is what this module exists to prevent)."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{field}=cuda: no CUDA device is visible to torch here; use {field}=auto or {field}=cpu")
    if setting == "mps" and not _mps_available():
        raise UserError(f"{field}=mps: Apple's MPS backend is not available here; use {field}=auto or {field}=cpu")
    return torch.device(setting)


def place(model: Any, device: torch.device | str) -> Any:
    """`model` on `device`, returned. A 4-bit model (bitsandbytes) is left where loading put it:
    its weights are placed by `device_map` at load time and cannot be moved afterwards."""
    if getattr(model, "is_loaded_in_4bit", False):
        return model
    return model.to(device)


def model_device(model: Any) -> torch.device:
    """The device a model's inputs go to: that of its first parameter."""
    return next(model.parameters()).device
