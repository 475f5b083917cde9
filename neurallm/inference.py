"""A checkpoint ready to decode: what generate, chat and serve hold for each model.

``Loaded`` ties a model to its tokenizer, chat format and decoding engine; ``StopText``
turns ids into text as they come and ends a reply at a stop string.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from neurallm import checkpoint, state
from neurallm.config import ChatConfig
from neurallm.engine import Context, Engine
from neurallm.errors import NlmError


@dataclass
class Loaded:
    name: str
    model: object  # a runner (runner.py): eager, quantized or exported
    recipe: object
    tokenizer: object
    engine: Engine

    @classmethod
    def open(cls, directory, device: str = "cpu", slots: int = 32, name: str | None = None) -> Loaded:
        runner, recipe, tokenizer = checkpoint.open_runner(directory, device=device)
        if recipe.data.reverse:
            raise NlmError(f"{directory}: a backward model (data.reverse): it reads text from its end, so it "
                           "cannot continue a prompt; nlm eval scores it, and taggers read its states")
        path = Path(str(directory))  # a stored model is named by its store name, a folder by its name
        name = name or (path.resolve().name if path.is_dir() else str(directory))
        return cls(name, runner, recipe, tokenizer, Engine(runner, slots=slots))

    @property
    def chat(self) -> ChatConfig:
        return self.recipe.chat

    @functools.cached_property
    def model_hash(self) -> str:
        return self.engine.model_hash

    @functools.cached_property
    def tokenizer_hash(self) -> str:
        return state.tokenizer_hash(self.tokenizer)

    def encode(self, text: str, source: str) -> list[int]:
        return self.tokenizer.encode(text, source=source)

    def start(self) -> Context:
        """A new text: nothing read, the boundary token pending."""
        return self.engine.start(self.tokenizer.boundary)

    def save_state(self, path, context: Context, tokens: list[int]):
        return state.save(path, context, tokens, self.model_hash, self.tokenizer_hash, self.recipe.model.cell)

    def load_state(self, path) -> tuple[Context, list[int]]:
        return state.load(path, self.model_hash, self.tokenizer_hash, self.engine.buffer, self.tokenizer.vocab_size)

    def chat_text(self, messages: list[dict], source: str = "messages") -> str:
        """The conversation as the model reads it, ending where the assistant's next reply begins."""
        fmt, parts = self.chat, []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                raise NlmError(f"{source}[{i}].content: expected a string")
            prefix = {"user": fmt.user, "assistant": fmt.assistant, "system": ""}.get(role)
            if prefix is None:
                raise NlmError(f"{source}[{i}].role: {role!r} (expected system, user or assistant)")
            parts.append(prefix + content + fmt.turn_end)
        return "".join(parts) + fmt.assistant


class StopText:
    """Ids to text as they come; ``push`` returns what can be shown now. Text that could be the
    start of a stop string is held back until it is clear; at a stop string ``stopped`` is set
    and the text ends before it."""

    def __init__(self, tokenizer, stops=(), after: str = ""):
        self.write = tokenizer.stream(after=after)
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.held += self.write(token)
        hits = [(self.held.find(s), s) for s in self.stops if s in self.held]
        if hits:
            at = min(hits)[0]
            self.stopped = True
            out, self.held = self.held[:at], ""
            return out
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
