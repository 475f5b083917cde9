"""``nlm chat``: a conversation in the terminal, the state carried from turn to turn.

A turn reads only its new tokens (the user's message in the checkpoint's chat format)
and streams the reply until the model ends its turn. ``Conversation`` is the logic,
``run`` the terminal around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time

import torch

from neurallm.errors import NlmError
from neurallm.generate import Sampling
from neurallm.inference import Loaded, StopText

HELP = """commands:
  /reset                 forget the conversation
  /save FILE             write the state to a file      /load FILE   continue from a state file
  /set temperature=0.8 top_k=40 top_p=0.95              change the sampling settings
  /stats                 speed of the last reply, tokens read so far
  /help                  this list                      /quit        leave (or Ctrl-D)
Ctrl-C stops a reply, not the session."""


class Conversation:
    def __init__(self, lm: Loaded, sampling: Sampling, max_tokens: int = 200, seed: int = 0):
        self.lm, self.sampling, self.max_tokens = lm, sampling, max_tokens
        self.rng = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.context, self.tokens = self.lm.start(), [self.lm.tokenizer.boundary]
        self.open_turn = False  # True after a reply cut short: its turn end is still to be written
        self.turns, self.last = 0, {}

    def reply(self, message: str, stop=lambda: False):
        """Yield the reply's text as it is generated; ``stop()`` returning True ends it early."""
        fmt = self.lm.chat
        text = (fmt.turn_end if self.open_turn else "") + fmt.user + message + fmt.turn_end + fmt.assistant
        ids = self.lm.encode(text, "your message")  # an error here leaves the conversation as it was
        started = time.perf_counter()
        self.context = self.lm.engine.prefill(ids, self.context)
        self.tokens += ids
        stream = self.lm.engine.submit(self.context, self.max_tokens, self.sampling)
        stream.rng = self.rng
        out = StopText(self.lm.tokenizer, [fmt.turn_end], after=fmt.assistant)
        first = None
        try:
            with contextlib.closing(self.lm.engine.run(stream)) as events:  # closing takes the stream out
                for event in events:
                    first = first or time.perf_counter()
                    self.tokens.append(event.token)
                    piece = out.push(event.token)
                    if piece:
                        yield piece
                    if out.stopped or stop():
                        break
            if not out.stopped:
                yield out.flush()
        finally:  # also when the reader stops early: the state and the tokens behind it agree
            self.context = stream.context
            self.open_turn = not out.stopped
            self.turns += 1
        end = time.perf_counter()
        self.last = {"prompt_tokens": len(ids), "reply_tokens": stream.generated, "seconds": end - started,
                     "first_token_ms": 1000 * ((first or end) - started),
                     "tokens_per_s": (stream.generated - 1) / (end - first) if first and stream.generated > 1 else 0.0}

    def save(self, path) -> None:
        self.lm.save_state(path, self.context, self.tokens)

    def load(self, path) -> None:
        self.context, self.tokens = self.lm.load_state(path)
        # A text that does not end a turn (a reply cut short, a state from nlm generate) gets its turn end first.
        tail = self.lm.tokenizer.decode(self.tokens[-8:])
        self.open_turn, self.turns = len(self.tokens) > 1 and not tail.endswith(self.lm.chat.turn_end), 0

    def set(self, assignments: list[str]) -> None:
        changes = {}
        for item in assignments:
            key, _, value = item.partition("=")
            kinds = {"temperature": float, "top_k": int, "top_p": float}
            if key not in kinds or not value:
                raise NlmError(f"/set {item}: expected temperature=X, top_k=N or top_p=X")
            try:
                changes[key] = kinds[key](value)
            except ValueError:
                raise NlmError(f"/set {item}: {value!r} is not a number") from None
        self.sampling = dataclasses.replace(self.sampling, **changes)

    def stats(self) -> str:
        s = self.last
        head = (f"last reply: {s['reply_tokens']} tokens, first after {s['first_token_ms']:.0f} ms, "
                f"then {s['tokens_per_s']:.0f} tokens/s; its prompt read {s['prompt_tokens']} new tokens\n") if s else ""
        t = self.sampling
        return (f"{head}{self.context.length} tokens behind the state, {self.turns} turns; "
                f"temperature={t.temperature} top_k={t.top_k} top_p={t.top_p}")


def run(conversation: Conversation, show_stats: bool = False) -> int:
    """The terminal loop: a prompt per turn, the reply streamed, commands after a slash."""
    fmt = conversation.lm.chat
    you = fmt.user.strip().rstrip(":") or "you"
    them = fmt.assistant.strip().rstrip(":") or conversation.lm.name
    try:
        import readline  # noqa: F401  (line editing and history for input(), where Python has it)
    except ImportError:
        pass
    print(f"chatting with {conversation.lm.name}; /help for commands, Ctrl-D to leave", flush=True)
    while True:
        try:
            line = input(f"{you}> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        try:
            if line.startswith("/"):
                if _command(conversation, line):
                    return 0
                continue
            interrupted = []
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
            try:
                sys.stdout.write(f"{them}> ")
                for piece in conversation.reply(line, stop=lambda: bool(interrupted)):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            finally:
                signal.signal(signal.SIGINT, previous)
            print(" [stopped]" if interrupted else "")
            if show_stats:
                print(conversation.stats())
        except NlmError as e:
            print(f"error: {e}", flush=True)


def _command(conversation: Conversation, line: str) -> bool:
    """Run a /command; True means leave."""
    name, *rest = line.split()
    if name in ("/quit", "/exit"):
        return True
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        conversation.reset()
        print("(conversation reset)")
    elif name in ("/save", "/load") and len(rest) == 1:
        getattr(conversation, name[1:])(rest[0])
        print(f"({'saved the state to' if name == '/save' else 'continuing from'} {rest[0]}; "
              f"{conversation.context.length} tokens behind it)")
    elif name == "/set" and rest:
        conversation.set(rest)
        print(f"({conversation.stats().splitlines()[-1]})")
    elif name == "/stats":
        print(conversation.stats())
    else:
        print(f"unknown command {line!r}\n{HELP}")
    return False
