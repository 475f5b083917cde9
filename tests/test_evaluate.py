"""Scoring: the windowed score equals one whole-sequence pass; text outside the vocabulary is
refused, skipped or counted as the user asked."""

import math

import pytest
import torch

from neurallm.cli import main
from neurallm.config import ModelConfig
from neurallm.data import tokenizers
from neurallm.errors import NlmError
from neurallm.evaluate import encode, token_nll
from neurallm.models.lm import RNNLM

from conftest import last_json


@pytest.mark.parametrize("cell, softmax", [("lstm", "full"), ("gru", "adaptive"), ("rnn_tanh", "full")])
def test_batch_one_score_equals_one_whole_sequence_forward(cell, softmax):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, vocab_size=40, emb_size=8, hidden_size=12, softmax=softmax, adaptive_cutoffs=(10,),
                      dropout=0.5)
    model = RNNLM(cfg).eval()
    ids = torch.randint(0, 40, (53,))
    windowed = token_nll(model, ids, batch_size=1, bptt=7)  # 8 windows, the state carried between them
    with torch.no_grad():
        features, _ = model(ids[:-1].unsqueeze(0))
        whole = -model.log_probs(features[0]).gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    assert windowed.shape == (1, 52)
    torch.testing.assert_close(windowed[0], whole, atol=1e-5, rtol=1e-5)


def test_characters_outside_the_vocabulary_error_or_skip():
    tok = tokenizers.train("char", "abc de\n")
    with pytest.raises(NlmError, match=r"book.txt: character 'é' at position 1 .* 7-character vocabulary.*--unknown skip"):
        encode(tok, "aébc", "book.txt")
    ids, counts = encode(tok, "aé bc1\n", "book.txt", unknown="skip")
    assert tok.decode(ids) == "a bc\n" and counts == {"skipped": 2}
    assert encode(tok, "abc", "x")[1] == {"skipped": 0}
    word = tokenizers.train("word", "a b c\n")
    with pytest.raises(NlmError, match="--unknown skip applies to character models"):
        encode(word, "a b", "x", unknown="skip")


def test_word_models_count_unknown_words():
    tok = tokenizers.train("word", "the cat sat\nthe dog\n")
    ids, counts = encode(tok, "the cow sat on the mat\n<unk> dog\n", "notes.txt")
    # cow, on, mat and the literal <unk>: 4 of 10 tokens (two <eos> included)
    assert counts == {"unknown": 4, "unknown_rate": 4 / 10} and len(ids) == 10


def test_eval_and_score_skip_exactly_the_unknown_characters(char_run, tmp_path, capsys):
    dirty = "ROMEO:\nWhat light through yönder window breaks?✓\n"
    removed = "ROMEO:\nWhat light through ynder window breaks?\n"  # the same text, without 'ö' and '✓'
    (tmp_path / "dirty.txt").write_text(dirty)
    (tmp_path / "removed.txt").write_text(removed)
    assert main(["eval", str(char_run), "--file", str(tmp_path / "dirty.txt")]) == 2
    assert "character 'ö' at position 27" in capsys.readouterr().err
    assert main(["eval", str(char_run), "--file", str(tmp_path / "removed.txt"), "--json"]) == 0
    expected = last_json(capsys)
    assert main(["eval", str(char_run), "--file", str(tmp_path / "dirty.txt"), "--unknown", "skip", "--json"]) == 0
    skipped = last_json(capsys)
    assert skipped["skipped"] == 2 and expected["skipped"] == 0
    assert skipped["tokens"] == expected["tokens"] == len(removed)
    assert skipped["nll"] == expected["nll"]
    assert main(["eval", str(char_run), "--file", str(tmp_path / "dirty.txt"), "--unknown", "skip"]) == 0
    assert "left out 2 characters outside the vocabulary" in capsys.readouterr().out
    assert main(["score", str(char_run), "--text", "Oh yé", "--unknown", "skip", "--json"]) == 0
    scored = last_json(capsys)
    assert scored["skipped"] == 1 and [t["token"] for t in scored["tokens"]] == list("Oh y")
    assert main(["score", str(char_run), "--text", "✓✓", "--unknown", "skip"]) == 2
    assert "--text: nothing to score (all 2 characters are outside the vocabulary)" in capsys.readouterr().err


def test_word_eval_reports_unknown_words(word_run, tmp_path, capsys):
    from neurallm import checkpoint

    _, _, tok = checkpoint.load(word_run)
    text = "the company said zyzzyva rose\nqwertyuiop <unk> fell\n"
    (tmp_path / "notes.txt").write_text(text)
    unknown = sum(1 for w in text.split() if w not in tok.index or w == "<unk>")
    assert main(["eval", str(word_run), "--file", str(tmp_path / "notes.txt"), "--json"]) == 0
    result = last_json(capsys)
    assert result["unknown"] == unknown >= 3 and result["tokens"] == len(text.split()) + 2
    assert result["unknown_rate"] == pytest.approx(unknown / result["tokens"])
    assert math.isfinite(result["perplexity"])
    assert main(["eval", str(word_run), "--file", str(tmp_path / "notes.txt")]) == 0
    assert f"{unknown} tokens are <unk>" in capsys.readouterr().out
