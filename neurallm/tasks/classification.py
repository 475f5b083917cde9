"""Sentence classification: SST-2 (GLUE TSV files) and SST-5 (the SST trees, root labels),
or any TSV of text, tab, label; accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from neurallm import config
from neurallm.data import sentiment
from neurallm.errors import NlmError
from neurallm.models.classifier import Classifier
from neurallm.tasks import common
from neurallm.tasks.sentences import EVAL_BATCH, Vocab, buckets, collate, examples_for


def read(path: Path) -> list[sentiment.Example]:
    """A TSV of text and label (header optional), or PTB-format sentiment trees (their root labels)."""
    path = Path(path)
    examples = sentiment.read_tsv(path) if path.suffix == ".tsv" else sentiment.read_trees(path)
    for e in examples:
        if not e.text.split():
            raise NlmError(f"{path}:{e.line}: empty sentence")
    return examples


def read_labelled(path: Path, task: config.TaskConfig | None = None):
    """-> (word lists, labels, the line of each) of a labelled file; an empty one is an error naming it."""
    examples = read(path)
    if not examples:
        raise NlmError(f"{path}: no examples")
    return [e.text.split() for e in examples], [e.label for e in examples], [e.line for e in examples]


class Classification(common.SentenceTask):
    kind = "classify"

    def read(self, path: Path):
        return read_labelled(path)

    def units(self, examples) -> int:
        return len(examples)

    def label_set(self, labels) -> list[str]:
        return sorted(set(labels))

    def encode_labels(self, vocab: Vocab, labels, path: Path, lines):
        return label_ids(vocab, labels, path, lines)

    def make_model(self, vocab: Vocab):
        return make_model(self.recipe, vocab)

    def metrics(self, model, vocab, words, labels, path, lines, examples=None) -> dict:
        return score(model, vocab, self.recipe, words, labels, path, lines, examples)


def make_model(recipe: config.Recipe, vocab: Vocab) -> Classifier:
    return Classifier(recipe.model, recipe.task, len(vocab.chars), len(vocab.labels))


def label_ids(vocab: Vocab, labels: list[str], path, lines) -> list[int]:
    out = []
    for label, line in zip(labels, lines):
        if label not in vocab.label_index:
            raise NlmError(f"{path}:{line}: label {label!r} is not one the model knows ({', '.join(vocab.labels)})")
        out.append(vocab.label_index[label])
    return out


def predict(model, vocab: Vocab, sentences: list[list[str]], batch_size: int = EVAL_BATCH,
            examples=None) -> torch.Tensor:
    """(sentences, classes) probabilities, in the order given; batches by length."""
    examples = examples or examples_for(model, vocab, sentences)
    out = torch.zeros(len(sentences), len(vocab.labels))
    device = next(model.parameters()).device
    for rows in buckets([len(e.words) for e in examples], batch_size):
        out[rows] = model.predict(collate([examples[i] for i in rows], device)).cpu()
    return out


def score(model, vocab: Vocab, recipe: config.Recipe, words, labels, path, lines, examples=None) -> dict:
    gold = torch.tensor(label_ids(vocab, labels, path, lines))
    was_training = model.training
    model.eval()
    guessed = predict(model, vocab, words, examples=examples).argmax(1)
    model.train(was_training)
    return {"accuracy": (guessed == gold).double().mean().item(), "sentences": len(labels)}


def load(directory, device: str = "cpu"):
    return common.load(directory, make_model, "classify", device)
