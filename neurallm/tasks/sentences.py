"""What taggers and classifiers share: the vocabularies of a labelled data set, and padded,
length-bucketed batches of sentences.

Bucketing: sentences are sorted by length and cut into batches, so a batch pads little; the
batches are then shuffled (training) or kept in order (evaluation, prediction).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from neurallm.errors import NlmError
from neurallm.models.encoder import PAD, UNK

MAX_LETTERS = 30  # a longer "word" (a URL, a run of dashes) is cut: its first letters carry what the features use
EVAL_BATCH = 64  # sentences a batch when scoring and predicting


@dataclass
class Vocab:
    """Word, character and label lists; index 0 and 1 of words and chars are padding and unknown."""

    words: list[str]
    chars: list[str]
    labels: list[str]
    lowercase: bool = False
    features: list[dict] | None = None  # character LMs whose states feed a tagger (models/lmfeatures.py)

    def __post_init__(self):
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.char_index = {c: i for i, c in enumerate(self.chars)}
        self.label_index = {t: i for i, t in enumerate(self.labels)}

    @classmethod
    def build(cls, sentences: list[list[str]], labels: list[str], max_vocab: int = 0, min_freq: int = 1,
              lowercase: bool = False) -> "Vocab":
        """Words of the training sentences (the most frequent ``max_vocab``, each seen ``min_freq`` times)."""
        counts = Counter(w.lower() if lowercase else w for s in sentences for w in s)
        words = [w for w, n in counts.most_common(max_vocab - 2 if max_vocab else None) if n >= min_freq]
        chars = sorted({c for s in sentences for w in s for c in w})
        return cls(["<pad>", "<unk>"] + words, ["<pad>", "<unk>"] + chars, sorted(labels), lowercase)

    def to_json(self) -> dict:
        return {"type": "labelled", "words": self.words, "chars": self.chars, "labels": self.labels,
                "lowercase": self.lowercase, **({"features": self.features} if self.features else {})}

    @classmethod
    def from_json(cls, data: dict, source: str = "vocab.json") -> "Vocab":
        try:
            return cls(list(data["words"]), list(data["chars"]), list(data["labels"]), bool(data["lowercase"]),
                       data.get("features"))
        except (KeyError, TypeError) as e:
            raise NlmError(f"{source}: not a tagger's or classifier's vocabulary ({e})") from None

    def save(self, path: Path) -> None:
        from neurallm.checkpoint import atomic_write, write_json

        atomic_write(path, lambda p: write_json(p, self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        from neurallm.checkpoint import read_json

        return cls.from_json(read_json(path), str(path))

    def word_ids(self, words: list[str]) -> list[int]:
        get = self.word_index.get
        return [get(w.lower() if self.lowercase else w, UNK) for w in words]

    def char_ids(self, words: list[str]) -> list[list[int]]:
        get = self.char_index.get
        return [[get(c, UNK) for c in w[:MAX_LETTERS]] or [UNK] for w in words]


@dataclass
class Example:
    """One sentence, encoded: word ids, letters of each word, and its label ids (tagger) or label id;
    with the same as tensors, made once (a batch then copies blocks, not Python lists)."""

    words: list[int]
    chars: list[list[int]]
    labels: list[int] | int | None = None
    extra: torch.Tensor | None = None  # (words, features): character-LM features, when the model reads them

    def __post_init__(self):
        self.word_tensor = torch.tensor(self.words)
        self.letters = torch.zeros(len(self.chars), max(map(len, self.chars)), dtype=torch.long)  # (words, longest)
        for j, c in enumerate(self.chars):
            self.letters[j, :len(c)] = torch.tensor(c)
        self.label_tensor = torch.tensor(self.labels) if isinstance(self.labels, list) else None


@dataclass
class Batch:
    words: torch.Tensor  # (batch, time)
    chars: torch.Tensor  # (batch, time, letters)
    lengths: torch.Tensor  # (batch,)
    mask: torch.Tensor  # (batch, time) bool: the real words
    labels: torch.Tensor | None = None  # (batch, time) for a tagger, (batch,) for a classifier
    extra: torch.Tensor | None = None  # (batch, time, features): language-model features, when used

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def encode(vocab: Vocab, words: list[str], labels=None) -> Example:
    return Example(vocab.word_ids(words), vocab.char_ids(words), labels)


def collate(examples: list[Example], device=None, unk: tuple[torch.Tensor, float] | None = None) -> Batch:
    """Pad a list of examples into one batch. ``unk``: (word ids seen once, probability) -- training
    replaces each occurrence of such a word by <unk> with that probability (Lample et al. 2016)."""
    n, time = len(examples), max(len(e.words) for e in examples)
    letters = max(len(c) for e in examples for c in e.chars)
    words = torch.zeros(n, time, dtype=torch.long)
    chars = torch.zeros(n, time, letters, dtype=torch.long)
    lengths = torch.tensor([len(e.words) for e in examples])
    for i, e in enumerate(examples):
        words[i, :len(e.words)] = e.word_tensor
        chars[i, :e.letters.size(0), :e.letters.size(1)] = e.letters
    mask = torch.arange(time).unsqueeze(0) < lengths.unsqueeze(1)
    if unk is not None:
        singletons, p = unk
        if p and singletons.numel():
            rare = torch.isin(words, singletons) & (torch.rand(words.shape) < p)
            words = words.masked_fill(rare, UNK)
    labels = None
    if examples[0].labels is not None:
        if isinstance(examples[0].labels, int):
            labels = torch.tensor([e.labels for e in examples])
        else:
            labels = torch.zeros(n, time, dtype=torch.long)
            for i, e in enumerate(examples):
                labels[i, :len(e.labels)] = e.label_tensor
    extra = None
    if examples[0].extra is not None:
        extra = torch.zeros(n, time, examples[0].extra.size(1))
        for i, e in enumerate(examples):
            extra[i, :len(e.words)] = e.extra
    batch = Batch(words, chars, lengths, mask, labels, extra)
    if device is not None and torch.device(device).type != "cpu":
        batch = Batch(*(t.to(device) if t is not None else None for t in
                        (batch.words, batch.chars, batch.lengths, batch.mask, batch.labels, batch.extra)))
    return batch


def with_features(model, examples: list[Example], sentences: list[list[str]], chunk: int = 256) -> list[Example]:
    """Fill in each example's character-LM features when the model reads them (a tagger with
    task.lm_features); a no-op otherwise. Outside autocast: training and prediction read the
    same features."""
    features = getattr(model, "features", None)
    if features is not None:
        with torch.autocast(next(model.parameters()).device.type, enabled=False):
            for start in range(0, len(examples), chunk):
                for e, x in zip(examples[start:start + chunk], features(sentences[start:start + chunk])):
                    e.extra = x
    return examples


def examples_for(model, vocab: Vocab, sentences: list[list[str]]) -> list[Example]:
    """Unlabelled sentences, encoded (with the features the model reads), for scoring and prediction."""
    return with_features(model, [encode(vocab, words) for words in sentences], sentences)


def buckets(lengths: list[int], batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Indices cut into batches of similar length. With a generator: ties broken at random and the
    batches shuffled (training); without: longest first, in a fixed order (evaluation)."""
    if generator is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    else:
        noise = torch.rand(len(lengths), generator=generator).tolist()
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], noise[i]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if generator is not None:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return groups


def num_batches(count: int, batch_size: int) -> int:
    return math.ceil(count / batch_size)


def singletons(examples: list[Example]) -> torch.Tensor:
    counts = Counter(w for e in examples for w in e.words)
    return torch.tensor(sorted(w for w, n in counts.items() if n == 1 and w != UNK), dtype=torch.long)


__all__ = ["PAD", "UNK", "Vocab", "Example", "Batch", "encode", "collate", "buckets", "num_batches", "singletons"]
