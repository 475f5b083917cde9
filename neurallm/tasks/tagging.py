"""Sequence tagging: part-of-speech tags (accuracy over words) and named entities (entity-level
precision, recall and F1 with seqeval, in its conlleval-compatible default mode).

Span labels are trained in the recipe's scheme (bio or bioes) and scored in IOB2, as read.
"""

from __future__ import annotations

from pathlib import Path

from neurallm import config
from neurallm.data import conll
from neurallm.errors import NlmError
from neurallm.models.tagger import Tagger
from neurallm.tasks import common
from neurallm.tasks.sentences import EVAL_BATCH, Vocab, buckets, collate, examples_for


def read(path: Path, column: str) -> list[conll.Sentence]:
    """CoNLL-U (.conllu: a UPOS or XPOS column) or CoNLL columns (a column index, the last by default)."""
    path = Path(path)
    if path.suffix == ".conllu":
        return conll.read_conllu(path, column or "upos")
    try:
        index = int(column) if column else -1
    except ValueError:
        raise NlmError(f"task.column {column!r}: a CoNLL column file ({path}) takes a column index, "
                       "such as 3 or -1 (the last)") from None
    return conll.read_conll(path, tag_column=index)


def read_labelled(path: Path, task: config.TaskConfig):
    """-> (word lists, tag lists, the line each sentence starts on) of a labelled file; an empty file,
    or one that mixes tag schemes, is an error naming it."""
    sentences = read(path, task.column)
    if not sentences:
        raise NlmError(f"{path}: no sentences")
    if task.scheme != "none":
        conll.check_scheme(sentences, path)  # one scheme per file, or an error naming the line
    return [s.words for s in sentences], [s.tags for s in sentences], [s.line for s in sentences]


class Tagging(common.SentenceTask):
    kind = "tag"

    def read(self, path: Path):
        return read_labelled(path, self.recipe.task)

    def label_set(self, labels) -> list[str]:
        scheme = self.recipe.task.scheme
        return sorted({t for tags in labels for t in (conll.to_scheme(tags, scheme) if scheme != "none" else tags)})

    def encode_labels(self, vocab: Vocab, labels, path: Path, lines):
        return label_ids(vocab, labels, self.recipe.task.scheme, path, lines)

    def make_model(self, vocab: Vocab):
        return make_model(self.recipe, vocab)

    def metrics(self, model, vocab, words, labels, path, lines, examples=None) -> dict:
        return score(model, vocab, self.recipe, words, labels, path, lines, examples)

    def figure(self, metrics: dict) -> float:
        return 1.0 - metrics["f1" if "f1" in metrics else "accuracy"]


def make_model(recipe: config.Recipe, vocab: Vocab) -> Tagger:
    return Tagger(recipe.model, recipe.task, len(vocab.chars), vocab.labels, vocab.features)


def label_ids(vocab: Vocab, labels: list[list[str]], scheme: str, path, lines) -> list[list[int]]:
    """Label ids in the training scheme; a label the model does not know is an error naming its line."""
    out = []
    for tags, line in zip(labels, lines):
        if scheme != "none":
            try:
                conll.detect_scheme(tags)
            except NlmError as e:
                raise NlmError(f"{path}:{line}: {e}") from None
            tags = conll.to_scheme(tags, scheme)
        unknown = [i for i, t in enumerate(tags) if t not in vocab.label_index]
        if unknown:
            raise NlmError(f"{path}:{line}: label {tags[unknown[0]]!r} (word {unknown[0] + 1} of the sentence starting "
                           f"on this line) is not one the model knows ({', '.join(vocab.labels)})")
        out.append([vocab.label_index[t] for t in tags])
    return out


def predict(model, vocab: Vocab, sentences: list[list[str]], batch_size: int = EVAL_BATCH,
            examples=None) -> list[list[str]]:
    """Labels for each sentence (in the model's scheme), in the order given; batches by length.
    ``examples``: the sentences already encoded (examples_for), when scored again and again."""
    examples = examples or examples_for(model, vocab, sentences)
    out: list[list[str] | None] = [None] * len(sentences)
    device = next(model.parameters()).device
    for rows in buckets([len(e.words) for e in examples], batch_size):
        best = model.predict(collate([examples[i] for i in rows], device)).tolist()
        for i, ids in zip(rows, best):
            out[i] = [vocab.labels[k] for k in ids[:len(sentences[i])]]
    return out


def score(model, vocab: Vocab, recipe: config.Recipe, words, labels, path, lines, examples=None) -> dict:
    """Accuracy over words; for span labels also entity-level P/R/F1 and F1 per entity type."""
    scheme = recipe.task.scheme
    label_ids(vocab, labels, scheme, path, lines)  # every gold label is one the model knows
    was_training = model.training
    model.eval()
    guessed = predict(model, vocab, words, examples=examples)
    model.train(was_training)
    gold = [conll.to_scheme(t, "bio") for t in labels] if scheme != "none" else labels
    guessed = [conll.to_scheme(t, "bio") for t in guessed] if scheme != "none" else guessed
    right = sum(a == b for g, p in zip(gold, guessed) for a, b in zip(g, p))
    total = sum(len(g) for g in gold)
    found = {"accuracy": right / total, "words": total, "sentences": len(gold)}
    if scheme != "none":
        from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

        found.update(precision=precision_score(gold, guessed, zero_division=0),
                     recall=recall_score(gold, guessed, zero_division=0), f1=f1_score(gold, guessed, zero_division=0))
        report = classification_report(gold, guessed, output_dict=True, zero_division=0)
        found["per_type"] = {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                                 "support": int(v["support"])}
                             for k, v in report.items() if not k.endswith(" avg")}
    return {k: float(v) if isinstance(v, (float,)) or hasattr(v, "item") else v for k, v in found.items()}


def load(directory, device: str = "cpu"):
    return common.load(directory, make_model, "tag", device)
