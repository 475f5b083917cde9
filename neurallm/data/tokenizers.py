"""Tokenizers: character, byte, word (Mikolov's PTB convention) and byte-level BPE.

Each has ``encode(text) -> list[int]``, ``decode(ids) -> str``, a ``boundary`` id that
starts every scored stream (so the first real token is predicted too), a streaming
decoder for generation, and a JSON form stored in the checkpoint.
"""

from __future__ import annotations

import json
from collections import Counter

from neurallm.errors import NlmError


class CharTokenizer:
    kind = "char"
    symbol_level = True  # scored in bits per character

    def __init__(self, chars: list[str]):
        self.vocab = list(chars)
        self.vocab_size = len(self.vocab)
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.boundary = self.index["\n"]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text) | {"\n"}))

    def encode(self, text: str, source: str = "text") -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            for pos, c in enumerate(text):
                if c not in self.index:
                    raise NlmError(f"{source}: character {c!r} at position {pos} is not in the model's "
                                   f"{len(self.vocab)}-character vocabulary") from None
            raise

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def token(self, i: int) -> str:
        return self.vocab[i]

    def stream(self, after: str = ""):
        return lambda i: self.vocab[i]

    def to_json(self) -> dict:
        return {"type": self.kind, "vocab": self.vocab}


class ByteTokenizer:
    """The 256 byte values of the text's UTF-8 encoding: every text, and every file, is in the
    vocabulary (what ``nlm compress`` takes as a prior). The boundary is the newline byte."""

    kind = "byte"
    symbol_level = True  # scored in bits per byte
    vocab_size = 256
    boundary = 10

    @classmethod
    def train(cls, text: str = "") -> "ByteTokenizer":
        return cls()

    def encode(self, text: str, source: str = "text") -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token(self, i: int) -> str:
        return bytes([i]).decode("latin-1") if i < 128 else f"<0x{i:02X}>"

    def stream(self, after: str = ""):
        """Emit text only once its bytes form whole UTF-8 characters (a broken sequence reads as U+FFFD)."""
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: decoder.decode(bytes([i]))

    def to_json(self) -> dict:
        return {"type": self.kind}


class WordTokenizer:
    """Whitespace words, one ``<eos>`` per line end; unknown words become ``<unk>``."""

    kind = "word"
    symbol_level = False
    EOS, UNK = "<eos>", "<unk>"

    def __init__(self, words: list[str]):
        self.vocab = list(words)
        self.vocab_size = len(self.vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.boundary = self.index[self.EOS]
        self.unk = self.index[self.UNK]

    @classmethod
    def train(cls, text: str, max_vocab: int = 0, min_freq: int = 1) -> "WordTokenizer":
        """The words of ``text``, at most ``max_vocab`` tokens in all (0: no cap), each seen ``min_freq`` times."""
        counts = Counter(w for line in text.splitlines() for w in line.split())
        counts.pop(cls.EOS, None)
        counts.pop(cls.UNK, None)
        # Most frequent first (ties by first appearance), so an adaptive softmax's head holds the common words.
        words = [w for w, n in counts.most_common(max_vocab - 2 if max_vocab else None) if n >= min_freq]
        return cls([cls.EOS, cls.UNK] + words)

    def encode(self, text: str, source: str = "text") -> list[int]:
        ids, unk, index = [], self.unk, self.index
        for line in text.splitlines():
            ids.extend(index.get(w, unk) for w in line.split())
            ids.append(self.boundary)
        if text and not text.endswith("\n"):
            ids.pop()  # no line end, no <eos>: a prompt continues the last line
        return ids

    def decode(self, ids) -> str:
        write = self.stream()
        return "".join(write(i) for i in ids)

    def token(self, i: int) -> str:
        return self.vocab[i]

    def stream(self, after: str = ""):
        """Words joined by single spaces, ``<eos>`` as a line end; ``after`` is the text already shown."""
        line_start = [not after or after[-1].isspace()]

        def write(i: int) -> str:
            if i == self.boundary:
                line_start[0] = True
                return "\n"
            text = self.vocab[i] if line_start[0] else " " + self.vocab[i]
            line_start[0] = False
            return text

        return write

    def to_json(self) -> dict:
        return {"type": self.kind, "vocab": self.vocab}


class BPETokenizer:
    """Byte-level BPE trained with the ``tokenizers`` library; lossless on any UTF-8 text."""

    kind = "bpe"
    symbol_level = False
    EOT = "<|endoftext|>"

    def __init__(self, backend):
        self.backend = backend
        self.boundary = backend.token_to_id(self.EOT)
        if self.boundary is None:
            raise ValueError(f"no {self.EOT} token")
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int = 8000) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(backend)

    def encode(self, text: str, source: str = "text") -> list[int]:
        # Encoding line by line keeps memory flat on big corpora; byte-level BPE never crosses "\n" anyway.
        lines = text.splitlines(keepends=True)
        ids: list[int] = []
        for start in range(0, len(lines), 10000):
            for enc in self.backend.encode_batch(lines[start:start + 10000], add_special_tokens=False):
                ids.extend(enc.ids)
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token(self, i: int) -> str:
        return self.backend.decode([i], skip_special_tokens=False)

    def stream(self, after: str = ""):
        """Emit text only once its bytes form whole UTF-8 characters."""
        from tokenizers.decoders import DecodeStream

        state = DecodeStream(skip_special_tokens=False)
        return lambda i: state.step(self.backend, i) or ""

    def to_json(self) -> dict:
        return {"type": self.kind, "tokenizer": json.loads(self.backend.to_str())}


KINDS = {"char": CharTokenizer, "byte": ByteTokenizer, "word": WordTokenizer, "bpe": BPETokenizer}


def train(kind: str, text: str, bpe_vocab_size: int = 8000, max_vocab: int = 0, min_freq: int = 1):
    """A tokenizer of ``kind`` trained on ``text`` (the caps apply to the word tokenizer, the size to BPE)."""
    if kind == "word":
        return WordTokenizer.train(text, max_vocab, min_freq)
    if kind == "bpe":
        return BPETokenizer.train(text, bpe_vocab_size)
    return KINDS[kind].train(text)


def from_json(data: dict, source: str = "tokenizer.json"):
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in KINDS:
        raise NlmError(f"{source}: unknown tokenizer type {kind!r} (expected char, byte, word or bpe)")
    try:
        if kind == "bpe":
            from tokenizers import Tokenizer

            return BPETokenizer(Tokenizer.from_str(json.dumps(data["tokenizer"])))
        return ByteTokenizer() if kind == "byte" else KINDS[kind](data["vocab"])
    except Exception as e:  # KeyError, TypeError, or the tokenizers library's own error
        raise NlmError(f"{source}: malformed {kind} tokenizer ({e})") from None

