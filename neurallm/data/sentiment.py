"""Labelled sentences: Stanford Sentiment Treebank trees (SST-5) and ``text<TAB>label`` files (GLUE SST-2).

Both readers return ``Example`` objects, and every error names ``path:line``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from neurallm.data.conll import numbered_lines
from neurallm.errors import NlmError


@dataclass
class Example:
    text: str
    label: str
    line: int = 0  # 1-based line in its file; 0 when not read from a file


# SST trees: one per line, "(3 (2 It) (4 (2 's) ...))"; every node has a sentiment label 0-4.

_LABEL = re.compile(r"([0-4]) +")
_SPACES = re.compile(r" *")
_WORD = re.compile(r"[^()]+")  # a leaf's text; it may hold a space, as in "(2 8 1\/2)"
_BRACKETS = {"-LRB-": "(", "-RRB-": ")"}  # PTB writes brackets in the text this way, to keep trees parseable


class _Malformed(ValueError):
    def __init__(self, text: str, at: int, expected: str):
        found = repr(text[at:at + 12]) if at < len(text) else "the end of the line"
        super().__init__(f"malformed tree at column {at + 1}: found {found}, expected {expected}")


def read_trees(path: Path | str) -> list[Example]:
    """SST PTB-format trees: each tree's root label (0-4) and its leaves joined by spaces."""
    path = Path(path)
    examples = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            label, words = parse_tree(line)
        except _Malformed as e:
            raise NlmError(f"{path}:{number}: {e}") from None
        examples.append(Example(" ".join(words), label, number))
    return examples


def parse_tree(text: str) -> tuple[str, list[str]]:
    """The root label and the words (leaves) of one tree, brackets and escapes undone; ValueError if malformed."""
    words: list[str] = []
    start = len(text) - len(text.lstrip())
    try:
        label, end = _node(text, start, words)
    except RecursionError:  # SST trees nest a few dozen deep; this is not one
        raise _Malformed(text, start, "a tree nested less than a few hundred levels deep") from None
    if text[end:].strip():
        raise _Malformed(text, end, "the end of the line after the tree's last ')'")
    return label, words


def _node(text: str, at: int, words: list[str]) -> tuple[str, int]:
    """Parse the node that starts at ``text[at]``, adding its leaves to ``words``; its label and where it ends."""
    if not text.startswith("(", at):
        raise _Malformed(text, at, "'('")
    label = _LABEL.match(text, at + 1)
    if not label:
        raise _Malformed(text, at + 1, "a label 0-4 and a space")
    at = label.end()
    if not text.startswith("(", at):  # a leaf: "(2 word)"
        word = _WORD.match(text, at)
        if not word or not word.group().strip():
            raise _Malformed(text, at, "a word or '('")
        words.append(_unescape(word.group().strip()))
        at, expected = word.end(), "')'"
    else:  # an inner node: "(3 (2 a) (2 b))"
        while text.startswith("(", at):
            _, at = _node(text, at, words)
            at = _SPACES.match(text, at).end()
        expected = "'(' or ')'"
    if not text.startswith(")", at):
        raise _Malformed(text, at, expected)
    return label.group(1), at + 1


def _unescape(word: str) -> str:
    for written, meant in _BRACKETS.items():
        word = word.replace(written, meant)
    return re.sub(r"\\(.)", r"\1", word)  # PTB escapes "/" and "*" with a backslash


# TSV: "text<TAB>label", or named columns under a header (GLUE: "sentence<TAB>label", "index<TAB>sentence<TAB>label")

TEXT_COLUMNS = ("sentence", "text")


def read_tsv(path: Path | str, label_column: str = "label") -> list[Example]:
    """Labelled sentences from a tab-separated file.

    With a header (a first line naming a ``sentence`` or ``text`` column, or ``label_column``) the columns
    are found by name; without one each row is ``text<TAB>label``. The text is stripped of the space
    that GLUE leaves before the tab. Blank lines are skipped.
    """
    path = Path(path)
    examples = []
    header = None  # the header's column names, or None for a file without one
    text_at, label_at = 0, 1
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if number == 1 and (label_column in fields or any(name in fields for name in TEXT_COLUMNS)):
            header = fields
            text_at, label_at = _header_columns(path, fields, label_column)
            continue
        expected = len(header) if header else 2
        if len(fields) < expected or not fields[label_at].strip():
            raise NlmError(f"{path}:{number}: a row without a label ({len(fields)} tab-separated fields), "
                           f"expected {_shape(header)}")
        if len(fields) > expected:
            raise NlmError(f"{path}:{number}: {len(fields)} tab-separated fields, expected {_shape(header)}")
        examples.append(Example(fields[text_at].strip(), fields[label_at].strip(), number))
    return examples


def _header_columns(path: Path, header: list[str], label_column: str) -> tuple[int, int]:
    text = next((name for name in TEXT_COLUMNS if name in header), None)
    if text is None or label_column not in header:
        missing = f"no {label_column} column (unlabelled text?)" if text else f"no {' or '.join(TEXT_COLUMNS)} column"
        raise NlmError(f"{path}:1: header {' '.join(header)}: {missing}; expected a header naming "
                       f"{TEXT_COLUMNS[0]} and {label_column}, or rows text<TAB>label without one")
    return header.index(text), header.index(label_column)


def _shape(header: list[str] | None) -> str:
    return f"{len(header)} as in the header ({'<TAB>'.join(header)})" if header else "text<TAB>label"
