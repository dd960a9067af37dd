"""The model the chat page talks to: loaded once per server process, on the first message (not at
start-up, so a server without chat users never pays for it), and asked one conversation at a
time.

Generation is slow and CPU/GPU-bound, so the routes call `answer` from the thread pool: the event
loop keeps serving every other request (labelers' pages, logins) while the model writes. One lock
serialises generation, so concurrent chats queue instead of multiplying memory; another makes the
first load happen once however many chats start together.

torch and transformers are imported on first use: the labeling server itself needs neither.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError
from rlhfkit.feedback.service import ServiceError
from rlhfkit.feedback.settings import ServeConfig

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json", "tokenizer.json", "tokenizer_config.json")


class NoModel(ServiceError):
    """The chat page has no model to talk to (none configured, or it cannot be loaded)."""

    status = 503


def fingerprint(folder: Path) -> str:
    """A short hash of a model folder's weights and configuration: two answers with the same
    fingerprint came from the same model, even if a newer policy was saved to the same path."""
    h = hashlib.sha256()
    files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern) if f.is_file()})
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Answer:
    texts: list[str]
    model: str  # the folder, as configured
    fingerprint: str


class Playground:
    """The served chat model of one server process (see the module docstring)."""

    def __init__(self, config: ServeConfig) -> None:
        self.path = config.chat_model
        self.config = config
        self._loaded: tuple[Any, Any, str] | None = None  # model, tokenizer, fingerprint
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.path)

    def _load(self) -> tuple[Any, Any, str]:
        if not self.path:
            raise NoModel("no chat model is configured: start the server with chat_model=PATH (a policy folder)")
        with self._load_lock:
            if self._loaded is None:
                folder = Path(self.path)
                if not (folder / "config.json").is_file():
                    raise NoModel(
                        f"chat_model={self.path}: no model there (no config.json); point it at a policy folder"
                    )
                from rlhfkit.models.loading import ModelConfig, load_causal_lm

                try:
                    model, tokenizer = load_causal_lm(ModelConfig(path=self.path))
                except UserError as e:
                    raise NoModel(f"chat_model={self.path}: {e}") from None
                model.eval()
                self._loaded = (model, tokenizer, fingerprint(folder))
            return self._loaded

    def prompt(self, conversation: list[dict[str, str]], user: str | None = None) -> str:
        """The text the model continues: the whole conversation, rendered by the tokenizer's chat
        template (or as `User:`/`Assistant:` lines). With `chat_personal` the signed-in `user` asks
        it, as a personalised policy was trained (`data.chat.with_user`: a `User: NAME` line)."""
        from rlhfkit.data.chat import render_prompt, with_user
        from rlhfkit.data.formats import Message

        _, tokenizer, _ = self._load()
        messages = [Message(role=m["role"], content=m["content"]) for m in conversation]
        return render_prompt(tokenizer, with_user(messages, user if self.config.chat_personal else None))

    def answer(self, conversation: list[dict[str, str]], n: int = 1, user: str | None = None) -> Answer:
        """`n` answers to the conversation's last user message (`prompt` says what the model sees)."""
        import torch

        from rlhfkit.models.sampling import SamplingConfig, sample

        model, tokenizer, print_ = self._load()
        cfg = self.config
        sampling = SamplingConfig(
            max_new_tokens=cfg.chat_max_new_tokens,
            temperature=cfg.chat_temperature,
            top_p=cfg.chat_top_p,
            max_prompt_tokens=cfg.chat_max_prompt_tokens,
            batch_size=n,
        )
        prompt = self.prompt(conversation, user)
        with self._generate_lock, torch.no_grad():
            texts = sample(model, tokenizer, [prompt], sampling, num_samples=n).texts
        return Answer([t.strip() for t in texts], self.path, print_)
