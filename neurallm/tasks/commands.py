"""``nlm tag`` and ``nlm classify``: train, eval and predict for taggers and classifiers.

Prediction streams: the input (a file or stdin) is read a chunk of sentences at a time, each
chunk predicted in length buckets and written in input order, so a file of any size runs in
bounded memory; a progress bar counts the file's bytes.
"""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

from neurallm import config, fit
from neurallm.errors import NlmError

CHUNK = 4096  # sentences read, predicted and written at a time


def _module(kind: str):
    if kind == "tag":
        from neurallm.tasks import tagging

        return tagging
    from neurallm.tasks import classification

    return classification


def train(kind: str, args, overrides: list[str]) -> dict:
    extra = [f"--task.init_from={args.init_from}"] if args.init_from else []
    for key, value in (("max_steps", args.max_steps), ("max_minutes", args.max_minutes), ("device", args.device)):
        if value is not None:
            extra.append(f"--train.{key}={value}")
    recipe = config.load_recipe(args.recipe, overrides + extra)
    module = _module(kind)
    task = module.Tagging(recipe) if kind == "tag" else module.Classification(recipe)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    return fit.run(task, out, resume=args.resume, show_progress=not args.no_progress)


def evaluate(kind: str, args) -> dict:
    from neurallm.tasks.common import split_file

    module = _module(kind)
    model, recipe, vocab = module.load(args.checkpoint, args.device)
    path = Path(args.file) if args.file else split_file(args.data or recipe.data.corpus, args.split)
    words, labels, lines = module.read_labelled(path, recipe.task)
    result = module.score(model, vocab, recipe, words, labels, path, lines)
    return {"checkpoint": str(args.checkpoint), "file": str(path), **result}


def _sentences(stream, tokens: bool):
    """Sentences of the input: one per line (words split on whitespace; blank lines skipped), or one
    token per line with a blank line after each sentence."""
    if not tokens:
        for line in stream:
            words = line.split()
            if words:
                yield words
        return
    words = []
    for line in stream:
        token = line.strip()
        if token:
            words.append(token.split()[0])
        elif words:
            yield words
            words = []
    if words:
        yield words


def _open_input(file: str | None):
    if file is None:
        return sys.stdin, None
    path = Path(file)
    if not path.is_file():
        raise NlmError(f"{path}: no such file")
    return open(path, encoding="utf-8", newline=""), path.stat().st_size


def predict(kind: str, args) -> int:
    from tqdm import tqdm

    module = _module(kind)
    model, recipe, vocab = module.load(args.checkpoint, args.device)
    stream, size = _open_input(args.file)
    bar = tqdm(total=size, unit="B", unit_scale=True, disable=size is None or args.no_progress,
               file=sys.stderr, leave=False)
    out = sys.stdout
    read = 0
    try:
        counted = _counting(stream, bar)
        sentences = _sentences(counted, args.input == "tokens")
        while chunk := list(islice(sentences, CHUNK)):
            read += len(chunk)
            if kind == "tag":
                _write_tags(out, chunk, module.predict(model, vocab, chunk, args.batch_size), args.json, recipe)
            else:
                _write_classes(out, chunk, module.predict(model, vocab, chunk, args.batch_size), vocab, args.json)
            out.flush()
    except UnicodeDecodeError as e:
        raise NlmError(f"{args.file or 'stdin'}: not UTF-8 text (after {read} sentences: {e.reason})") from None
    finally:
        bar.close()
        if stream is not sys.stdin:
            stream.close()
    return 0


def _counting(stream, bar):
    for line in stream:
        bar.update(len(line.encode("utf-8")))
        yield line


def _write_tags(out, chunk, tags, as_json: bool, recipe) -> None:
    from neurallm.data import conll

    for words, labels in zip(chunk, tags):
        if recipe.task.scheme != "none":
            labels = conll.to_scheme(labels, "bio")  # written in IOB2, as the data sets are
        if as_json:
            out.write(json.dumps({"words": words, "tags": labels}, ensure_ascii=False) + "\n")
        else:
            out.write("".join(f"{w}\t{t}\n" for w, t in zip(words, labels)) + "\n")


def _write_classes(out, chunk, probs, vocab, as_json: bool) -> None:
    for words, p in zip(chunk, probs.tolist()):
        label = vocab.labels[max(range(len(p)), key=p.__getitem__)]
        if as_json:
            out.write(json.dumps({"text": " ".join(words), "label": label,
                                  "probabilities": dict(zip(vocab.labels, p))}, ensure_ascii=False) + "\n")
        else:
            out.write(f"{label}\t" + " ".join(f"{lab}:{q:.4f}" for lab, q in zip(vocab.labels, p)) +
                      f"\t{' '.join(words)}\n")
