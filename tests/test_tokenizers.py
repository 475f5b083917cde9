"""Tokenizers: round trips, PTB conventions, unknown characters, JSON form."""

import random

import pytest

from neurallm.data import tokenizers
from neurallm.errors import NlmError

from conftest import head, need

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. — café ✓\n"


def test_char_round_trip_and_unknown_character():
    tok = tokenizers.train("char", TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(NlmError, match=r"--prompt: character 'Z' at position 3"):
        tok.encode("FirZ", source="--prompt")


def test_bpe_round_trip_on_real_text_and_unseen_characters():
    text = head(need("tinyshakespeare", "input.txt"), 400)
    tok = tokenizers.train("bpe", text, bpe_vocab_size=400)
    assert tok.vocab_size == 400
    for sample in (text[:2000], TEXT, "unseen: 東京 ∑ 🙂\n\n  spaces  "):
        ids = tok.encode(sample)
        assert tok.decode(ids) == sample
    assert len(tok.encode(text)) < len(text) / 1.5  # merges were learned


def test_bpe_stream_decoding_waits_for_whole_characters():
    tok = tokenizers.train("bpe", TEXT * 3, bpe_vocab_size=300)
    ids = tok.encode("🙂 café")
    write = tok.stream()
    pieces = [write(i) for i in ids]
    assert "".join(pieces) == "🙂 café"
    assert all("\ufffd" not in p for p in pieces)


def test_word_tokenizer_follows_ptb_conventions():
    text = head(need("ptb", "ptb.train.txt"), 50)
    tok = tokenizers.train("word", text)
    ids = tok.encode(text)
    assert ids.count(tok.boundary) == 50  # one <eos> per line
    assert tok.decode(ids) == "".join(" ".join(line.split()) + "\n" for line in text.splitlines())
    assert tok.encode("the zzzz-never-seen\n") == [tok.index["the"], tok.unk, tok.boundary]
    assert tok.encode("the") == [tok.index["the"]]  # no line end, no <eos>
    assert tok.vocab[:2] == ["<eos>", "<unk>"]


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_json_round_trip(kind):
    tok = tokenizers.train(kind, TEXT * 3, bpe_vocab_size=300)
    again = tokenizers.from_json(tok.to_json())
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.vocab_size == tok.vocab_size
    assert again.boundary == tok.boundary


def test_malformed_tokenizer_json():
    with pytest.raises(NlmError, match="unknown tokenizer type"):
        tokenizers.from_json({"type": "sentencepiece"})
    with pytest.raises(NlmError, match="malformed char tokenizer"):
        tokenizers.from_json({"type": "char"})


def test_word_vocabulary_caps():
    text = "a a a a b b b c c d\ne e f\n"
    full = tokenizers.train("word", text)
    assert full.vocab == ["<eos>", "<unk>", "a", "b", "c", "e", "d", "f"]  # by count, ties by first appearance
    frequent = tokenizers.train("word", text, min_freq=2)
    assert frequent.vocab == ["<eos>", "<unk>", "a", "b", "c", "e"]
    assert frequent.decode(frequent.encode("d a f\n")) == "<unk> a <unk>\n"
    capped = tokenizers.train("word", text, max_vocab=4)
    assert capped.vocab == ["<eos>", "<unk>", "a", "b"]


@pytest.mark.parametrize("override, message", [
    ("--data.max_vocab=2", "data.max_vocab"), ("--data.min_freq=0", "data.min_freq"),
    ("--data.tokenizer=char", "data.max_vocab/min_freq")])
def test_bad_vocabulary_settings(override, message):
    from neurallm import config
    from neurallm.errors import NlmError

    extra = ["--data.min_freq=2"] if override == "--data.tokenizer=char" else []
    with pytest.raises(NlmError, match=message):
        config.load_recipe("ptb-small", [override, *extra])


def test_bpe_streaming_any_id_sequence_gives_the_decoded_text():
    """A sampler can emit any ids in any order; the stream must neither fail nor lose text
    (tokenizers 0.21.0's DecodeStream panicked on such sequences)."""
    tok = tokenizers.train("bpe", TEXT * 3, bpe_vocab_size=300)
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
        write = tok.stream()
        streamed = "".join(write(i) for i in ids)
        whole = tok.decode(ids)
        held = whole[len(streamed):]  # what the stream still holds: text that ends in an unfinished character
        assert whole.startswith(streamed) and (held == "" or "\ufffd" in held)
