"""Token-level labelled files: CoNLL-U, CoNLL column files, plain text; tag schemes (BIO, BIOES).

Every reader returns ``Sentence`` objects that remember the lines they were read from, so a file can
be written back byte for byte (``write_conll``), and every error names ``path:line``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import conllu

from neurallm.errors import NlmError

CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")
DOCSTART = "-DOCSTART-"


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]  # one per word; empty for unlabelled text
    line: int = 0  # 1-based line of the first token line in its file; 0 when not read from a file
    # What the file held, for writing it back: the sentence's own lines (columns and comments as read),
    # the lines before it (blank lines, -DOCSTART-), and for the last sentence the lines after it.
    lines: list[str] = field(default_factory=list, repr=False)
    before: list[str] = field(default_factory=list, repr=False)
    after: list[str] = field(default_factory=list, repr=False)


# Reading lines and blocks


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its line end), decoding line by line so an error names its line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise NlmError(f"{path}: no such file") from None
    except OSError as e:
        raise NlmError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NlmError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line: "
                               f"{raw[e.start:e.start + 1]!r})") from None
            yield number, text.rstrip("\n").removesuffix("\r")


def _blocks(path: Path, separator) -> Iterator[tuple[int, list[str], list[str]]]:
    """(first line number, lines before, block lines) for each run of lines that are not separators.

    The last item has an empty block and holds what follows the last sentence.
    """
    before: list[str] = []
    block: list[str] = []
    start = 0
    for number, line in numbered_lines(path):
        if separator(line):
            if block:
                yield start, before, block
                before, block = [], []
            before.append(line)
        else:
            if not block:
                start = number
            block.append(line)
    if block:
        yield start, before, block
        before = []
    yield 0, before, []


def _collect(items: Iterator[tuple[int, list[str], list[str]]], make) -> list[Sentence]:
    """Sentences from blocks; lines that belong to no sentence go to the next one, or after the last."""
    sentences: list[Sentence] = []
    pending: list[str] = []
    for start, before, block in items:
        sentence = make(start, block) if block else None
        if sentence is None:  # the end, or a block with no words in it (CoNLL-U comments only)
            pending += before + block
            continue
        sentence.before = pending + before
        pending = []
        sentences.append(sentence)
    if sentences:
        sentences[-1].after = pending
    return sentences


# CoNLL-U


def read_conllu(path: Path | str, column: str = "upos") -> list[Sentence]:
    """The syntactic words of a CoNLL-U file and one column as their tags (upos, xpos, or any other).

    Multiword-token lines (``3-4``) and empty nodes (``8.1``) are kept for writing back but not tagged:
    UD scores UPOS over the syntactic words of the gold tokenization.
    """
    path = Path(path)
    if column not in CONLLU_FIELDS[1:]:
        raise NlmError(f"CoNLL-U column {column!r}: expected one of {', '.join(CONLLU_FIELDS[1:])}")
    # conllu parses only up to the column we read; the rest stay in the kept lines.
    fields = CONLLU_FIELDS[:CONLLU_FIELDS.index(column) + 1]
    as_read = {name: (lambda values, i: values[i]) for name in fields[1:]}  # "_" stays "_", not None

    def make(start: int, block: list[str]) -> Sentence | None:
        first = _check_conllu(path, start, block)
        if first is None:
            return None
        try:
            tokens = conllu.parse_token_and_metadata("\n".join(block), fields=fields, field_parsers=as_read)
        except conllu.exceptions.ParseException as e:
            raise NlmError(f"{path}:{start}: {e}") from None
        words = [t for t in tokens if isinstance(t["id"], int)]
        if not words:
            raise NlmError(f"{path}:{first}: a sentence with no syntactic words (only multiword-token or "
                           "empty-node lines)")
        return Sentence([t["form"] for t in words], [t[column] for t in words], first, block)

    return _collect(_blocks(path, lambda line: not line.strip()), make)


_CONLLU_ID = re.compile(r"[1-9]\d*(-[1-9]\d*|\.[1-9]\d*)?|0\.[1-9]\d*")


def _check_conllu(path: Path, start: int, block: list[str]) -> int | None:
    """The line number of the block's first token line (None if it has none); ten columns on each.

    conllu itself accepts fewer columns, and splits on runs of spaces too, so it would mis-read them silently.
    """
    first = None
    for number, line in enumerate(block, start):
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) != len(CONLLU_FIELDS):
            raise NlmError(f"{path}:{number}: {len(columns)} tab-separated columns, expected {len(CONLLU_FIELDS)} "
                           f"(CoNLL-U: {' '.join(f.upper() for f in CONLLU_FIELDS)})")
        if not _CONLLU_ID.fullmatch(columns[0]):
            raise NlmError(f"{path}:{number}: ID {columns[0]!r}, expected a word number (3), a multiword "
                           "range (3-4) or an empty node (8.1)")
        first = first or number
    return first


# CoNLL column files (CoNLL-2003 and the like)


def read_conll(path: Path | str, tag_column: int = -1, word_column: int = 0) -> list[Sentence]:
    """A CoNLL column file: one token per line, columns split by tabs or spaces, a blank line after each sentence.

    Tabs separate the columns if the file's first token line has a tab (then a word may hold spaces), else
    runs of spaces. Every token line must have as many columns as that first one. ``-DOCSTART-`` lines
    and repeated blank lines are not sentences.
    """
    path = Path(path)
    first = next(((n, line) for n, line in numbered_lines(path) if not _is_conll_separator(line)), None)
    if first is None:
        return []
    first_number, first_line = first
    tab = "\t" in first_line
    count = len(_split(first_line, tab))
    for name, index in (("tag", tag_column), ("word", word_column)):
        if not -count <= index < count:
            raise NlmError(f"{path}:{first_number}: {count} columns, so there is no {name} column {index}")

    def make(start: int, block: list[str]) -> Sentence:
        rows = []
        for number, line in enumerate(block, start):
            rows.append(_split(line, tab))
            if len(rows[-1]) != count:
                raise NlmError(f"{path}:{number}: {len(rows[-1])} columns, expected {count} as on line "
                               f"{first_number}, the file's first token line")
        return Sentence([r[word_column] for r in rows], [r[tag_column] for r in rows], start, block)

    return _collect(_blocks(path, _is_conll_separator), make)


def _is_conll_separator(line: str) -> bool:
    return not line.strip() or line.split(maxsplit=1)[0] == DOCSTART


def _split(line: str, tab: bool) -> list[str]:
    return line.split("\t") if tab else line.split()


# Plain text to tag


def read_lines(path: Path | str) -> list[Sentence]:
    """Untagged text, one sentence per line, split at whitespace; blank lines are not sentences."""
    path = Path(path)
    return [Sentence(line.split(), [], number, [line]) for number, line in numbered_lines(path) if line.strip()]


def read_tokens(path: Path | str) -> list[Sentence]:
    """Untagged text, one token per line, a blank line after each sentence."""
    path = Path(path)

    def make(start: int, block: list[str]) -> Sentence:
        return Sentence([line.strip() for line in block], [], start, block)

    return _collect(_blocks(path, lambda line: not line.strip()), make)


# Writing


@contextmanager
def _output(out: Path | str | TextIO | None):
    """A text stream to write to: ``out`` itself, a file opened at that path, or standard output."""
    if out is None or hasattr(out, "write"):
        yield out or sys.stdout
        return
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        yield f


def write_tagged(sentences: Iterable[Sentence], out: Path | str | TextIO | None = None) -> None:
    """``word<TAB>tag`` lines, a blank line after each sentence: what a tagger prints."""
    with _output(out) as f:
        for sentence in sentences:
            if len(sentence.tags) != len(sentence.words):
                raise ValueError(f"{len(sentence.words)} words but {len(sentence.tags)} tags")
            f.writelines(f"{word}\t{tag}\n" for word, tag in zip(sentence.words, sentence.tags))
            f.write("\n")


def write_conll(sentences: Iterable[Sentence], out: Path | str | TextIO | None = None) -> None:
    """Sentences as they were read: every column, comment, blank and -DOCSTART- line, so a file read and
    written back is the same file (with LF line ends). A sentence not read from a file is written as
    ``word<TAB>tag`` lines and a blank line."""
    with _output(out) as f:
        for sentence in sentences:
            if not sentence.lines:
                write_tagged([sentence], f)
                continue
            f.writelines(line + "\n" for line in sentence.before + sentence.lines + sentence.after)


# Tag schemes


def _split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("O", "") for "O"; anything else is an error."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if prefix not in ("B", "I", "E", "S") or not dash or not kind:
        raise NlmError(f"tag {tag!r}: expected O or B-, I-, E-, S- and an entity type")
    return prefix, kind


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)``, end exclusive, from BIO (IOB1 or IOB2) or BIOES tags.

    Decoded as conlleval does: an entity starts at B- or S-, and at an I- or E- that follows O, a
    different type, or the end of an entity (E- or S-); it ends before anything that does not continue it.
    """
    found = []
    kind, start = None, 0  # the open entity
    for i, tag in enumerate(tags):
        prefix, this = _split_tag(tag)
        continues = kind == this and prefix in ("I", "E")
        if kind is not None and not continues:
            found.append((kind, start, i))
            kind = None
        if prefix != "O" and kind is None:
            kind, start = this, i
        if prefix in ("E", "S"):  # these close the entity they are in
            found.append((kind, start, i + 1))
            kind = None
    if kind is not None:
        found.append((kind, start, len(tags)))
    return found


def to_scheme(tags: list[str], scheme: str) -> list[str]:
    """The same entities in IOB2 (``bio``) or ``bioes`` tags; the input may be IOB1, IOB2 or BIOES."""
    if scheme not in ("bio", "bioes"):
        raise NlmError(f"tag scheme {scheme!r}: expected bio or bioes")
    out = ["O"] * len(tags)
    for kind, start, end in spans(tags):
        out[start:end] = [f"I-{kind}"] * (end - start)
        out[start] = f"B-{kind}"
        if scheme == "bioes":
            out[end - 1] = f"E-{kind}" if end - start > 1 else f"S-{kind}"
    return out


_SCHEMES = {"bioes": "BIOES (E- or S-)", "iob1": "IOB1 (an I- that opens an entity)"}


def _evidence(tags: list[str]) -> Iterator[tuple[int, str]]:
    """(index, scheme) for each tag that only one scheme allows: E-/S- (bioes), or an I- opening an
    entity (iob1: IOB2 and BIOES open every entity with B- or S-)."""
    previous, previous_kind = "O", ""
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag)
        if prefix in ("E", "S"):
            yield i, "bioes"
        elif prefix == "I" and (previous in ("O", "E", "S") or previous_kind != kind):
            yield i, "iob1"
        previous, previous_kind = prefix, kind


def detect_scheme(tags: list[str]) -> str:
    """bioes, iob1 or bio (IOB2, also for tags that fit several) for one sentence's tags."""
    seen = {scheme for _, scheme in _evidence(tags)}
    if len(seen) > 1:
        raise NlmError(f"tags {' '.join(tags)}: {' and '.join(_SCHEMES.values())} mixed")
    return seen.pop() if seen else "bio"


def check_scheme(sentences: Iterable[Sentence], path: Path | str) -> str:
    """The one tag scheme of a column file (bio, iob1 or bioes); a file that mixes them is an error.

    A tag's line is its sentence's first line plus its index: token lines are consecutive in column files.
    """
    first: dict[str, tuple[int, str]] = {}  # scheme -> (line, tag) where the file first showed it
    for sentence in sentences:
        for i, tag in enumerate(sentence.tags):
            try:
                _split_tag(tag)
            except NlmError as e:
                raise NlmError(f"{path}:{sentence.line + i}: {e}") from None
        for i, scheme in _evidence(sentence.tags):
            line, tag = sentence.line + i, sentence.tags[i]
            first.setdefault(scheme, (line, tag))
            other = "iob1" if scheme == "bioes" else "bioes"
            if other in first:
                was_line, was_tag = first[other]
                raise NlmError(f"{path}:{line}: {tag} is {_SCHEMES[scheme]}, but line {was_line} has {was_tag}, "
                               f"{_SCHEMES[other]}; expected one tag scheme per file")
    return next(iter(first), "bio")
