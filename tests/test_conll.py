"""Token-level labelled files on slices of the real EWT and CoNLL-2003 files: counts, round trips, errors, tag schemes."""

import io
import re
import time
from collections import Counter
from pathlib import Path

import conllu
import pytest
from seqeval.metrics.sequence_labeling import get_entities

from neurallm.data import conll
from neurallm.data.conll import Sentence
from neurallm.errors import NlmError

from conftest import head, need


def ewt(split: str):
    return need("ud-english-ewt", f"en_ewt-ud-{split}.conllu")


def conll2003(split: str):
    return need("conll2003", f"{split}.txt")


def conllu_slice(path, lines: int = 300) -> str:
    """The first whole sentences within ``lines`` lines, and every sentence with an empty node (8.1)."""
    text = path.read_text(encoding="utf-8")
    start = head(path, lines)
    start = start[:start.rindex("\n\n") + 2]
    with_empty_nodes = [b + "\n\n" for b in text.split("\n\n") if re.search(r"^\d+\.\d+\t", b, re.MULTILINE)]
    return start + "".join(with_empty_nodes)


def hand_parse(text: str, column: int) -> list[tuple[list[str], list[str]]]:
    """Words and tags of CoNLL-U text, by splitting at tabs: the syntactic words only (IDs that are integers)."""
    out = []
    for block in text.split("\n\n"):
        rows = [line.split("\t") for line in block.splitlines() if line and not line.startswith("#")]
        rows = [r for r in rows if r[0].isdigit()]
        if rows:
            out.append(([r[1] for r in rows], [r[column] for r in rows]))
    return out


def written(sentences, writer=conll.write_conll) -> str:
    out = io.StringIO()
    writer(sentences, out)
    return out.getvalue()


# Counts on the full files (shared/data/README.md)


def test_ewt_dev_counts_match_the_readme():
    sentences = conll.read_conllu(ewt("dev"))
    assert len(sentences) == 2001
    assert sum(len(s.words) for s in sentences) == 25147
    assert all(len(s.words) == len(s.tags) for s in sentences)
    assert len({t for s in sentences for t in s.tags}) == 17  # the UPOS tag set
    # Multiword tokens (359) and empty nodes (4) are kept for writing back, but not tagged.
    kept = Counter(re.match(r"\d+([-.]?)", line).group(1) for s in sentences for line in s.lines if line[0].isdigit())
    assert kept["-"] == 359 and kept["."] == 4
    assert sum(len(s.words) for s in conll.read_conllu(ewt("dev"), "xpos")) == 25147


def test_ewt_sentence_line_is_its_first_token_line():
    path = ewt("dev")
    lines = path.read_text(encoding="utf-8").splitlines()
    sentences = conll.read_conllu(path)
    assert sentences[0].line == 5  # after the comments newdoc id, sent_id, newpar id and text
    for s in sentences:
        assert re.match(r"1(-\d+)?\t", lines[s.line - 1]) and lines[s.line - 2].startswith("# text = ")


def test_ewt_train_reads_in_seconds():
    path = ewt("train")
    started = time.perf_counter()
    sentences = conll.read_conllu(path)
    assert time.perf_counter() - started < 30  # about 3.5 s on 2 slow cores; conllu's default parsers take 8
    assert len(sentences) == 12544 and sum(len(s.words) for s in sentences) == 204577


def test_conll2003_valid_counts_match_the_readme():
    sentences = conll.read_conll(conll2003("valid"))
    assert len(sentences) == 3250
    assert sum(len(s.words) for s in sentences) == 51362
    entities = Counter(kind for s in sentences for kind, _, _ in conll.spans(s.tags))
    assert entities == {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}
    assert conll.check_scheme(sentences, conll2003("valid")) == "bio"
    first = sentences[0]
    assert (first.words[:3], first.tags[:3], first.line) == (["CRICKET", "-", "LEICESTERSHIRE"], ["O", "O", "B-ORG"], 3)
    assert conll.read_conll(conll2003("valid"), tag_column=1)[0].tags[:2] == ["NNP", ":"]  # the POS column


# Round trips


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_conll_files_round_trip_exactly(split, tmp_path):
    text = head(conll2003(split), 300)  # cut mid-sentence: the end must survive too
    path = tmp_path / f"{split}.txt"
    path.write_text(text, encoding="utf-8")
    sentences = conll.read_conll(path)
    assert written(sentences) == text
    assert sentences[0].before[0].startswith("-DOCSTART-")
    assert all(len(s.lines) == len(s.words) for s in sentences)


def test_conll_round_trip_keeps_tabs_blank_runs_and_trailing_lines(tmp_path):
    text = "\n\nEU\tNNP\tB-ORG\nrejects\tVBZ\tO\n\n\n\n-DOCSTART-\tO\t0\nNew York\tNNP\tB-LOC\n\n\n"
    path = tmp_path / "tabs.tsv"
    path.write_text(text, encoding="utf-8")
    sentences = conll.read_conll(path)
    assert [s.words for s in sentences] == [["EU", "rejects"], ["New York"]]  # tabs: a word may hold a space
    assert [s.line for s in sentences] == [3, 9]
    assert written(sentences) == text


@pytest.mark.parametrize("split", ["dev", "test", "train"])
def test_conllu_round_trips_and_matches_a_hand_parse(split, tmp_path):
    text = conllu_slice(ewt(split))
    assert "".join(tokens.serialize() for tokens in conllu.parse(text)) == text  # conllu's own round trip
    path = tmp_path / f"{split}.conllu"
    path.write_text(text, encoding="utf-8")
    for column, index in (("upos", 3), ("xpos", 4)):
        sentences = conll.read_conllu(path, column)
        assert [(s.words, s.tags) for s in sentences] == hand_parse(text, index)
        assert written(sentences) == text


def test_tagged_output_reads_back(tmp_path):
    sentences = [Sentence(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]), Sentence(["Peter"], ["B-PER"])]
    text = written(sentences, conll.write_tagged)
    assert text == "EU\tB-ORG\nrejects\tO\nGerman\tB-MISC\n\nPeter\tB-PER\n\n"
    assert written(sentences) == text  # sentences not read from a file are written the same way
    path = tmp_path / "out.tsv"
    conll.write_tagged(sentences, path)
    assert [(s.words, s.tags) for s in conll.read_conll(path)] == [(s.words, s.tags) for s in sentences]


def test_plain_text_for_prediction(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("EU rejects German call\n\n  \nPeter  Blackburn\n", encoding="utf-8")
    assert [(s.words, s.tags, s.line) for s in conll.read_lines(lines)] == [
        (["EU", "rejects", "German", "call"], [], 1), (["Peter", "Blackburn"], [], 4)]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("EU\nrejects\n\n\nPeter\n", encoding="utf-8")
    assert [(s.words, s.line) for s in conll.read_tokens(tokens)] == [(["EU", "rejects"], 1), (["Peter"], 5)]


# Bad input: NlmError naming the file and line


def damaged(tmp_path, text: str, line: int, edit) -> Path:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = edit(lines[line - 1])
    path = tmp_path / "damaged.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_conllu_wrong_column_count_names_file_and_line(tmp_path):
    text = conllu_slice(ewt("dev"))
    path = damaged(tmp_path, text, 11, lambda line: line.replace("\t_\t", "\t", 1))  # "7 : : PUNCT : _ 4 ..."
    with pytest.raises(NlmError, match=r"damaged.txt:11: 9 tab-separated columns, expected 10 \(CoNLL-U: ID FORM"):
        conll.read_conllu(path)
    path = damaged(tmp_path, text, 16, lambda line: line.replace("\t", "   "))  # spaces for tabs
    with pytest.raises(NlmError, match=r"damaged.txt:16: 1 tab-separated columns, expected 10"):
        conll.read_conllu(path)
    path = damaged(tmp_path, text, 6, lambda line: "x" + line)
    with pytest.raises(NlmError, match=r"damaged.txt:6: ID 'x2', expected a word number"):
        conll.read_conllu(path)
    with pytest.raises(NlmError, match="CoNLL-U column 'pos'"):
        conll.read_conllu(ewt("dev"), "pos")


def test_conll_wrong_column_count_names_file_and_line(tmp_path):
    text = head(conll2003("valid"), 300)
    path = damaged(tmp_path, text, 40, lambda line: line.split(" ", 1)[1])  # line 40 loses its word
    with pytest.raises(NlmError, match=r"damaged.txt:40: 3 columns, expected 4 as on line 3, the file's first token"):
        conll.read_conll(path)
    with pytest.raises(NlmError, match=r"valid.txt:3: 4 columns, so there is no tag column 4"):
        conll.read_conll(conll2003("valid"), tag_column=4)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"EU B-ORG\n\ncaf\xe9 O\n")
    with pytest.raises(NlmError, match=r"latin1.txt:3: not UTF-8 text"):
        conll.read_conll(path)
    with pytest.raises(NlmError, match=r"nowhere.txt: no such file"):
        conll.read_conll(tmp_path / "nowhere.txt")


def test_mixed_tag_schemes_name_file_and_line(tmp_path):
    sentences = conll.read_conll(conll2003("valid"))[:40]
    with_entities = [s for s in sentences if any(t != "O" for t in s.tags)]
    bioes, iob1 = with_entities[1], with_entities[5]
    bioes.tags = conll.to_scheme(bioes.tags, "bioes")
    iob1.tags = [t.replace("B-", "I-") for t in iob1.tags]  # IOB1 style: entities open with I-
    path = tmp_path / "mixed.txt"
    conll.write_tagged(sentences, path)
    read = conll.read_conll(path)
    # The first E-/S- tag of the BIOES sentence, and the first I- of the IOB1 one, by line.
    first_bioes = next(s.line + i for s in read if s.words == bioes.words for i, t in enumerate(s.tags) if t[0] in "ES")
    first_iob1 = next(s.line + i for s in read if s.words == iob1.words for i, t in enumerate(s.tags) if t[0] == "I")
    with pytest.raises(NlmError, match=rf"mixed.txt:{first_iob1}: I-\S+ is IOB1 .* but line {first_bioes} has "
                                       r"[ES]-\S+, BIOES .*expected one tag scheme per file"):
        conll.check_scheme(read, path)
    assert conll.check_scheme(read[: read.index(next(s for s in read if s.words == iob1.words))], path) == "bioes"
    bad = [Sentence(["EU", "rejects"], ["ORG", "O"], line=7)]
    with pytest.raises(NlmError, match=r"mixed.txt:7: tag 'ORG': expected O or B-, I-, E-, S-"):
        conll.check_scheme(bad, path)


# Tag schemes


def seqeval_spans(tags):
    return [(kind, start, end + 1) for kind, start, end in get_entities(tags)]  # seqeval's end is inclusive


def test_spans_agree_with_seqeval_on_a_hand_checked_example():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-MISC", "B-MISC", "O", "I-PER"]
    # By hand, as conlleval reads them: an I- after O, or after another type, opens an entity.
    expected = [("PER", 0, 2), ("LOC", 3, 5), ("ORG", 5, 6), ("MISC", 6, 7), ("MISC", 7, 8), ("PER", 9, 10)]
    assert conll.spans(tags) == expected == seqeval_spans(tags)
    bioes = ["S-PER", "B-LOC", "E-LOC", "E-ORG", "I-ORG", "O", "B-MISC", "I-MISC"]
    expected = [("PER", 0, 1), ("LOC", 1, 3), ("ORG", 3, 4), ("ORG", 4, 5), ("MISC", 6, 8)]
    assert conll.spans(bioes) == expected == seqeval_spans(bioes)
    assert conll.spans([]) == [] and conll.spans(["O"]) == []


def test_spans_agree_with_seqeval_on_the_valid_file():
    for s in conll.read_conll(conll2003("valid")):
        assert conll.spans(s.tags) == seqeval_spans(s.tags)
        bioes = conll.to_scheme(s.tags, "bioes")
        assert conll.spans(bioes) == seqeval_spans(bioes) == conll.spans(s.tags)


def test_bio_bioes_round_trip():
    sentences = conll.read_conll(conll2003("valid"))
    for s in sentences:
        bioes = conll.to_scheme(s.tags, "bioes")
        assert conll.to_scheme(bioes, "bio") == s.tags and conll.to_scheme(bioes, "bioes") == bioes
    tags = ["B-PER", "I-PER", "I-PER", "B-LOC", "O", "B-ORG", "B-ORG", "I-ORG"]
    assert conll.to_scheme(tags, "bioes") == ["B-PER", "I-PER", "E-PER", "S-LOC", "O", "S-ORG", "B-ORG", "E-ORG"]
    assert conll.detect_scheme(conll.to_scheme(tags, "bioes")) == "bioes" and conll.detect_scheme(tags) == "bio"
    with pytest.raises(NlmError, match="tag scheme 'iobes'"):
        conll.to_scheme(tags, "iobes")


def test_iob1_is_detected_and_converted():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]  # B- only between two entities of one type
    assert conll.detect_scheme(iob1) == "iob1"
    assert conll.to_scheme(iob1, "bio") == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    assert conll.to_scheme(iob1, "bioes") == ["B-PER", "E-PER", "S-PER", "O", "S-LOC", "S-ORG"]
    with pytest.raises(NlmError, match="mixed"):
        conll.detect_scheme(["S-PER", "O", "I-LOC"])
