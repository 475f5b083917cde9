"""nlm compress / decompress: the range coder alone, round trips (online and with a prior, any
segment count), damaged and foreign files, and the output rules; dynamic evaluation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import TINY_LSTM, fails, last_json, need
from neurallm.cli import main
from neurallm.compress import codec, coder
from neurallm.compress.container import Header, unpack
from neurallm.compress.model import Settings
from neurallm.errors import NlmError

TINY = dict(hidden=16, emb=8, orders=(1, 2, 3), buckets=1024, window=8)
TINY_ARGS = ["--hidden", "16", "--window", "8", "--no-progress"]


@pytest.fixture(autouse=True)
def small_segments(monkeypatch, one_thread):
    monkeypatch.setattr(codec, "MIN_SEGMENT", 64)  # so that a few kB make several segments


def text(n: int) -> bytes:
    return need("tinyshakespeare", "input.txt").read_bytes()[:n]


def roundtrip(data: bytes, segments: int = 4, prior=None, **settings) -> bytes:
    blob = codec.compress(data, Settings(segments=segments, **{**TINY, **settings}), prior)
    assert codec.decompress(blob, "test", prior) == data
    return blob


@pytest.mark.parametrize("skew", [0.0, 0.999])
def test_coder_code_length_is_the_entropy(skew):
    """Eight streams of a known distribution: each codes to its information content within a few
    bytes, and the batched decoders give every symbol back, a stream ending early kept as it is."""
    g = torch.Generator().manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.full((256,), 0.3)).sample() if skew == 0 else None
    if probs is None:
        probs = torch.full((256,), (1 - skew) / 255)
        probs[7] = skew
    cum = coder.frequencies(probs.unsqueeze(0))[0]
    lengths = [2500] * 7 + [1200]
    streams = [torch.multinomial(probs, n, replacement=True, generator=g).tolist() for n in lengths]
    payloads = []
    for symbols in streams:
        enc = coder.Encoder()
        for s in symbols:
            enc.encode(int(cum[s]), int(cum[s + 1] - cum[s]), int(cum[-1]))
        payloads.append(enc.finish())
        information = -sum(math.log2(probs[s].item()) for s in symbols) / 8  # bytes the distribution itself asks
        assert abs(len(payloads[-1]) - information) < 8 + 0.001 * len(symbols), (len(payloads[-1]), information)
    decoders = coder.Decoders(payloads)
    cums = np.tile(cum, (len(lengths), 1))
    for t in range(max(lengths)):
        active = np.array([t < n for n in lengths])
        found = decoders.decode(cums, active)
        assert found[active].tolist() == [s[t] for s in streams if t < len(s)]


def test_decoders_check_and_move_only_active_segments():
    """A segment that has ended keeps its state and is not checked, whatever its code; an active one
    beside it, with another total, decodes on."""
    enc = coder.Encoder()
    enc.encode(2, 3, 9)
    decoders = coder.Decoders([b"\xff" * 8, enc.finish()])
    before = [a.copy() for a in (decoders.code, decoders.range, decoders.pos)]
    cum = np.array([[0, 1, 2, 3], [0, 2, 5, 9]])
    found = decoders.decode(cum, np.array([False, True]))
    assert found[1] == 1
    assert [a[0] for a in (decoders.code, decoders.range, decoders.pos)] == [a[0] for a in before]
    with pytest.raises(NlmError, match="damaged"):
        decoders.decode(cum, np.array([True, True]))


def test_decoders_refuse_a_code_past_its_interval():
    enc = coder.Encoder()
    enc.encode(0, 1, 2)  # the lower half of two
    with pytest.raises(NlmError, match="damaged"):
        coder.Decoders([b"\xff" * 8]).decode(np.array([[0, 1, 2]]), np.array([True]))
    assert coder.Decoders([enc.finish()]).decode(np.array([[0, 1, 2]]), np.array([True])).tolist() == [0]


def test_frequencies_keep_every_symbol_and_stay_in_range():
    probs = torch.softmax(torch.tensor([[50.0] + [0.0] * 255, [0.0] * 256]), 1)
    cum = coder.frequencies(probs)
    sizes = cum[:, 1:] - cum[:, :-1]
    assert sizes.min() >= 1 and cum[:, -1].max() < coder.MAX_TOTAL


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 3], ids=["empty", "one-byte", "all-bytes"])
def test_roundtrip_small(data):
    roundtrip(data)


@pytest.mark.parametrize("segments", [1, 3, 8])
def test_roundtrip_text_and_binary(segments):
    blob = roundtrip(text(3000), segments)
    assert len(blob) < 3000 * 0.8  # the model and counts learn something from 3 kB of English
    g = torch.Generator().manual_seed(1)
    roundtrip(torch.randint(0, 256, (2000,), generator=g, dtype=torch.uint8).numpy().tobytes(), segments)


def test_same_input_same_bytes():
    data = text(1500)
    settings = Settings(segments=3, **TINY)
    assert codec.compress(data, settings) == codec.compress(data, settings)
    assert codec.compress(data, settings) != codec.compress(data, Settings(segments=3, seed=1, **TINY))


def test_learning_from_every_segment_and_larger_models_roundtrip():
    roundtrip(text(1200), 4, learn_every=1)
    roundtrip(text(600), 2, layers=2, cell="gru")


@pytest.fixture(scope="module")
def byte_model(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("byte") / "byte-lm"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "150", "--no-progress",
                 f"--data.corpus={corpus}", "--data.tokenizer=byte", *TINY_LSTM]) == 0
    return out


def prior_of(path):
    from neurallm.compress.files import load_prior

    return load_prior(str(path))


def test_prior_roundtrip_and_it_helps(byte_model):
    data = text(1200)
    prior = prior_of(byte_model)
    with_prior = roundtrip(data, 2, prior)
    roundtrip(data, 2, prior, adapt=False)
    assert len(with_prior) < len(roundtrip(data, 2))


def test_prior_must_match(byte_model, char_run):
    data = text(800)
    blob = codec.compress(data, Settings(segments=2, **TINY), prior_of(byte_model))
    with pytest.raises(NlmError, match="give it with --model"):
        codec.decompress(blob, "f")
    lm, tokenizer, _ = prior_of(byte_model)
    with torch.no_grad():
        lm.decoder.bias.add_(0.01)
    with pytest.raises(NlmError, match="another prior model"):
        codec.decompress(blob, "f", (lm, tokenizer, "changed"))
    online = codec.compress(data, Settings(segments=2, **TINY))
    with pytest.raises(NlmError, match="without a prior"):
        codec.decompress(online, "f", prior_of(byte_model))
    with pytest.raises(NlmError, match="byte-level"):
        codec.compress(data, Settings(**TINY), prior_of(char_run))


def test_damage_is_detected():
    data = text(1200)
    blob = bytearray(codec.compress(data, Settings(segments=2, **TINY)))
    header_end = len(blob) - sum(unpack(bytes(blob), "f")[0].payloads)
    for pos, pattern in [(len(blob) - 100, "CRC-32|damaged"), (header_end - 10, "header is damaged")]:
        bad = bytearray(blob)
        bad[pos] ^= 0x20
        with pytest.raises(NlmError, match=pattern):
            codec.decompress(bytes(bad), "f")
    with pytest.raises(NlmError, match="cut short"):
        codec.decompress(bytes(blob[:-7]), "f")
    with pytest.raises(NlmError, match="past the end"):
        codec.decompress(bytes(blob) + b"\0", "f")
    with pytest.raises(NlmError, match="not a file written by nlm compress"):
        codec.decompress(b"\x1f\x8b\x08\x00 a gzip file", "f")
    with pytest.raises(NlmError, match="format version 9"):
        codec.decompress(b"NLMZ\x09" + bytes(blob[5:]), "f")


def test_other_platform_is_refused_unless_asked():
    data = text(500)
    header, payloads = unpack(codec.compress(data, Settings(segments=1, **TINY)), "f")
    header.platform = {**header.platform, "torch": "0.0.1"}
    blob = header.pack(payloads)
    with pytest.raises(NlmError, match="torch 0.0.1 there"):
        codec.decompress(blob, "f")
    assert codec.decompress(blob, "f", ignore_platform=True) == data  # the same arithmetic really: it decodes
    header.platform = {**header.platform, "threads": 0}
    with pytest.raises(NlmError, match="malformed header"):
        codec.decompress(header.pack(payloads), "f")
    header.platform["threads"] = 1
    more = [header.segments[0] - 1, 1]  # one segment more than the settings allow (a crafted header)
    crafted = Header(header.length, header.crc32, header.settings, more, [header.payloads[0], 0], None, codec.platform(1))
    with pytest.raises(NlmError, match="malformed header .2 segments, settings allow 1"):
        codec.decompress(crafted.pack([payloads[0], b""]), "f")
    header.settings = {**header.settings, "hidden": "many"}
    with pytest.raises(NlmError, match="malformed compression settings"):
        codec.decompress(header.pack(payloads), "f")


def test_cli_roundtrip_json_and_output_rules(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(text(1500))
    packed, back = tmp_path / "in.nlmz", tmp_path / "back.txt"
    assert main(["compress", str(src), str(packed), "--json", "--segments", "2", *TINY_ARGS]) == 0
    report = last_json(capsys)
    assert report["original_bytes"] == 1500 and report["compressed_bytes"] == packed.stat().st_size
    assert report["bits_per_byte"] == pytest.approx(8 * report["compressed_bytes"] / 1500)
    assert report["seconds"] > 0 and report["bytes_per_s"] > 0
    assert main(["decompress", str(packed), str(back), "--json", "--no-progress"]) == 0
    assert back.read_bytes() == src.read_bytes() and last_json(capsys)["original_bytes"] == 1500

    before = back.read_bytes()
    fails(["compress", str(src), str(back), *TINY_ARGS], capsys, "exists \\(--force replaces it\\)")
    assert back.read_bytes() == before
    fails(["compress", str(src), str(src), *TINY_ARGS], capsys, "is the input")
    fails(["compress", str(tmp_path / "nothing"), str(tmp_path / "x"), *TINY_ARGS], capsys, "no such file")
    fails(["compress", str(src), str(tmp_path / "no" / "x"), *TINY_ARGS], capsys, "no such folder")
    fails(["decompress", str(src), str(tmp_path / "y"), "--no-progress"], capsys, "not a file written by nlm compress")
    fails(["compress", str(src), str(tmp_path / "z"), "--no-adapt", *TINY_ARGS], capsys, "--no-adapt goes with --model")

    damaged = tmp_path / "damaged.nlmz"
    blob = bytearray(packed.read_bytes())
    blob[-30] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    fails(["decompress", str(damaged), str(back), "--force", "--no-progress"], capsys, "CRC-32|damaged")
    assert back.read_bytes() == before  # the old file is kept whole
    assert main(["decompress", str(packed), str(back), "--force", "--no-progress"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.txt", "damaged.nlmz", "in.nlmz", "in.txt"]
    assert src.read_bytes() == text(1500)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"abc")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(["compress", str(src), str(locked / "out"), *TINY_ARGS], capsys, "cannot write there")
    finally:
        locked.chmod(0o700)


def test_cli_with_prior(byte_model, tmp_path, capsys):
    src, packed, back = tmp_path / "in.txt", tmp_path / "in.nlmz", tmp_path / "back.txt"
    src.write_bytes(text(1200))
    assert main(["compress", str(src), str(packed), "--model", str(byte_model), "--json", "--no-progress",
                 "--window", "8"]) == 0
    assert last_json(capsys)["prior"] == str(byte_model)
    fails(["decompress", str(packed), str(back), "--no-progress"], capsys, "give it with --model")
    assert not back.exists()
    assert main(["decompress", str(packed), str(back), "--model", str(byte_model), "--no-progress"]) == 0
    assert back.read_bytes() == src.read_bytes()
    fails(["compress", str(src), str(tmp_path / "x"), "--model", str(byte_model), "--hidden", "8", "--no-progress"],
          capsys, "--hidden and --layers size a fresh model")


def test_byte_tokenizer_roundtrip():
    from neurallm.data.tokenizers import ByteTokenizer, from_json

    tok = from_json(ByteTokenizer().to_json())
    s = "naïve café — ok\n"
    assert tok.decode(tok.encode(s)) == s and len(tok.encode(s)) == len(s.encode())
    write = tok.stream()
    assert "".join(write(i) for i in tok.encode(s)) == s


@pytest.mark.parametrize("method, lr", [("sgd", "0.5"), ("rms", "0.01")])
def test_dynamic_evaluation_learns_a_repeated_text(char_run, tmp_path, capsys, method, lr):
    passage = text(400).decode()
    repeated = tmp_path / "repeated.txt"
    repeated.write_text(passage * 4, encoding="utf-8")
    assert main(["eval", str(char_run), "--file", str(repeated), "--dynamic", "--dynamic.lr", lr,
                 "--dynamic.method", method, "--dynamic.decay", "0.001", "--json"]) == 0
    result = last_json(capsys)
    assert result["static"]["tokens"] == result["tokens"] == len(passage) * 4
    assert result["nll"] < result["static"]["nll"] - 0.1  # it learned the passage it saw
    assert result["perplexity_reduction"] == pytest.approx(1 - result["perplexity"] / result["static"]["perplexity"])
    fails(["eval", str(char_run), "--file", str(repeated), "--dynamic", "--batch-size", "4"], capsys, "one stream")


def test_byte_level_lm_scores_in_bits_per_byte(byte_model, tmp_path, capsys):
    src = tmp_path / "some.txt"
    src.write_text("naïve text, any bytes\n", encoding="utf-8")
    assert main(["eval", str(byte_model), "--file", str(src), "--json"]) == 0
    result = last_json(capsys)
    assert result["tokens"] == len(src.read_bytes()) and result["bpc"] == pytest.approx(result["nll"] / math.log(2))


def test_adam_is_torch_adam():
    from neurallm.compress.model import Adam

    torch.manual_seed(0)
    ours, theirs = torch.randn(5, 3, requires_grad=True), None
    theirs = ours.detach().clone().requires_grad_(True)
    a, b = Adam([ours], 0.01), torch.optim.Adam([theirs], lr=0.01)
    for step in range(5):
        target = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        for p, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(ours, theirs, atol=1e-6)
