"""Labelled sentences on the real SST files: tree and TSV readers, counts, and errors naming file and line."""

import re
from collections import Counter

import pytest

from neurallm.data import sentiment
from neurallm.errors import NlmError

from conftest import head, need


def test_sst5_dev_counts_match_the_readme():
    examples = sentiment.read_trees(need("sst5", "dev.txt"))
    assert len(examples) == 1101
    assert Counter(e.label for e in examples) == {"0": 139, "1": 289, "2": 229, "3": 279, "4": 165}
    assert examples[0].text == "It 's a lovely film with lovely performances by Buy and Accorsi ."
    assert examples[0].line == 1 and examples[-1].line == 1101


def test_sst2_dev_and_labelled_test_counts_match_the_readme():
    dev = sentiment.read_tsv(need("sst2", "dev.tsv"))
    assert len(dev) == 872 and Counter(e.label for e in dev) == {"1": 444, "0": 428}
    assert dev[0] == sentiment.Example("it 's a charming and often affecting journey .", "1", 2)  # header on line 1
    test = sentiment.read_tsv(need("sst2", "test_labeled.tsv"))  # index<TAB>sentence<TAB>label: read by name
    assert len(test) == 1821 and Counter(e.label for e in test) == {"1": 909, "0": 912}
    assert test[0] == sentiment.Example("uneasy mishmash of styles and genres .", "0", 2)


def test_sst2_dev_is_the_binary_sst5_dev():
    """GLUE's dev sentences are the non-neutral dev trees, lower-cased: the two readers agree on text and label."""
    trees = sentiment.read_trees(need("sst5", "dev.txt"))
    binary = {e.text.lower(): "0" if e.label in "01" else "1" for e in trees if e.label != "2"}
    assert {e.text: e.label for e in sentiment.read_tsv(need("sst2", "dev.tsv"))} == binary


def test_leaves_are_unescaped():
    label, words = sentiment.parse_tree(r"(3 (2 (2 -LRB-) (2 8 1\/2)) (3 (2 -RRB-) (2 \*\*\*)))")
    assert label == "3" and words == ["(", "8 1/2", ")", "***"]  # a leaf may hold a space
    texts = [e.text for e in sentiment.read_trees(need("sst5", "dev.txt"))]
    assert not any(w in t for t in texts for w in ("-LRB-", "-RRB-", "\\/"))
    assert sum(t.count("(") for t in texts) == sum(t.count(")") for t in texts) == 52  # as many as -LRB-
    assert sum(t.count("/") for t in texts) == 16  # as many as \/ in the file


def test_tsv_without_header(tmp_path):
    path = tmp_path / "plain.tsv"
    path.write_text("a fine film \t1\nawful\t0\n\n", encoding="utf-8")
    assert sentiment.read_tsv(path) == [sentiment.Example("a fine film", "1", 1), sentiment.Example("awful", "0", 2)]


def test_tsv_slice_of_train(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text(head(need("sst2", "train.tsv"), 200), encoding="utf-8")
    examples = sentiment.read_tsv(path)
    assert len(examples) == 199 and {e.label for e in examples} == {"0", "1"}
    assert [e.line for e in examples] == list(range(2, 201))


# Bad input: NlmError naming the file and line


def after_first_leaf(tree: str, insert: str) -> str:
    leaf = re.search(r"\([0-4] [^()]+\)", tree)
    return tree[:leaf.end()] + insert + tree[leaf.end():]


@pytest.mark.parametrize("damage, found", [
    (lambda tree: tree[:-1], r"the end of the line, expected '\(' or '\)'"),  # the root's ")" lost
    (lambda tree: tree + ")", r"'\)', expected the end of the line"),
    (lambda tree: tree.replace("(2 ", "(7 ", 1), r"'7 .*', expected a label 0-4 and a space"),
    (lambda tree: after_first_leaf(tree, " x"), r"'x .*', expected '\(' or '\)'"),
    (lambda tree: tree.replace(") (", ") ()", 1), r"'\).*', expected a label 0-4 and a space"),
])
def test_malformed_tree_names_file_and_line(tmp_path, damage, found):
    lines = head(need("sst5", "dev.txt"), 50).splitlines()
    lines[6] = damage(lines[6])
    path = tmp_path / "dev.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(NlmError, match=rf"dev.txt:7: malformed tree at column \d+: found {found}"):
        sentiment.read_trees(path)


def test_tsv_row_without_label_names_file_and_line(tmp_path):
    lines = head(need("sst2", "dev.tsv"), 30).splitlines(keepends=True)
    path = tmp_path / "dev.tsv"
    lines[9] = lines[9].split("\t")[0] + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(NlmError, match=r"dev.tsv:10: a row without a label \(1 tab-separated fields\), expected "
                                       r"2 as in the header \(sentence<TAB>label\)"):
        sentiment.read_tsv(path)
    lines[9] = "it 's fine\t\n"  # an empty label
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(NlmError, match=r"dev.tsv:10: a row without a label"):
        sentiment.read_tsv(path)
    plain = tmp_path / "plain.tsv"
    plain.write_text("good\t1\nno label here\n", encoding="utf-8")
    with pytest.raises(NlmError, match=r"plain.tsv:2: a row without a label .*expected text<TAB>label"):
        sentiment.read_tsv(plain)
    plain.write_text("good\t1\nbad\t0\textra\n", encoding="utf-8")
    with pytest.raises(NlmError, match=r"plain.tsv:2: 3 tab-separated fields, expected text<TAB>label"):
        sentiment.read_tsv(plain)


def test_unlabelled_tsv_is_an_error_at_its_header():
    with pytest.raises(NlmError, match=r"test.tsv:1: header index sentence: no label column"):
        sentiment.read_tsv(need("sst2", "test.tsv"))
