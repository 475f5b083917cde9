"""nlm diagnose gates: the step-by-step trace equals the model, the saturation figures, the files."""

import json
import re
from html.parser import HTMLParser

import pytest
import torch
from conftest import TINY, fails, last_json

from neurallm.cli import main
from neurallm.config import ModelConfig
from neurallm.diagnostics import gates
from neurallm.models.lm import RNNLM


@pytest.mark.parametrize("cell,connection", [("lstm", "residual"), ("gru", "residual"), ("lstm", "highway"),
                                             ("gru", "dense"), ("rnn_tanh", "residual")])
def test_trace_equals_the_fused_forward(cell, connection):
    torch.manual_seed(0)
    # emb == hidden: both layers join their input (the bottom one too), dense widens the top one's input.
    model = RNNLM(ModelConfig(cell=cell, vocab_size=13, emb_size=8, hidden_size=8, num_layers=2,
                              connection=connection, dropout=0.5, dropout_hidden=0.5)).eval()
    if connection == "highway":  # away from carrying the input through, so that the layer's part shows
        torch.nn.init.normal_(model.stack.highways[1].gate.bias)
    outputs = []
    for layer in model.stack.layers:
        layer.register_forward_hook(lambda _, __, result: outputs.append(result[0]))
    ids = torch.randint(0, 13, (3, 12))
    state = torch.randn_like(model.init_state(3))
    with torch.no_grad():
        _, final = model(ids, state)

    records, traced = gates.trace(model, ids, state)
    for record, out in zip(records, outputs):
        torch.testing.assert_close(record["h"], out, atol=1e-5, rtol=0)
    torch.testing.assert_close(traced, final, atol=1e-5, rtol=0)  # LSTM: h and c of every layer
    assert set(records[0]) == {"lstm": {"input", "forget", "output", "c", "h"}, "gru": {"reset", "update", "h"},
                               "rnn_tanh": {"h"}}[cell]
    for name in gates.GATES.get(cell, {}):
        assert 0 < records[1][name].min() and records[1][name].max() < 1


def test_saturation_fractions_by_hand():
    tally = gates.Tally(2)
    values = torch.tensor([[0.05, 0.95], [0.95, 0.99], [0.5, 0.91], [0.1, 0.9]])  # 0.1 and 0.9: not saturated
    tally.add(values[:1])
    tally.add(values[1:])  # chunk by chunk as over a corpus
    assert tally.unit_left().tolist() == [0.25, 0.0]
    assert tally.unit_right().tolist() == [0.25, 0.75]
    figures = tally.figures()
    assert figures["left_saturated"] == pytest.approx(1 / 8) and figures["right_saturated"] == pytest.approx(4 / 8)
    assert figures["mean"] == pytest.approx(values.double().mean().item())
    assert (figures["mostly_left"], figures["mostly_right"]) == (0, 1)
    assert tally.counts.sum() == 8 and tally.counts[47] == 2 and tally.counts[49] == 1  # 0.95 twice; 0.99


def test_rows_measure_each_token_once_after_a_warmup():
    ids = torch.arange(1250)
    data, warmup = gates.cut_rows(ids)
    assert warmup == gates.WARMUP and data.size(0) == 2
    measured = data[:, warmup:].flatten().tolist()
    assert measured == list(range(warmup, 1250))  # every token past the first warm-up, once, in order
    start = data[1, warmup].item()
    assert torch.equal(data[1, :warmup], ids[start - warmup:start])  # a row's warm-up: the text just before it


@pytest.fixture(scope="module")
def lstm_run(corpus, tmp_path_factory):
    """conftest's char_run (a tiny character LSTM, 2 x 16, 8 steps), trained once for the module."""
    out = tmp_path_factory.mktemp("gates") / "char-run"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "8", "--no-progress",
                 f"--data.corpus={corpus}", *TINY]) == 0
    return out


class Page(HTMLParser):
    """The text of each <pre> block of a page, and the spans' tooltips."""

    def __init__(self):
        super().__init__()
        self.blocks, self.titles, self.inside = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.blocks.append("")
            self.inside = True
        if tag == "span" and self.inside:
            self.titles.append(dict(attrs)["title"])

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "pre"

    def handle_data(self, data):
        if self.inside:
            self.blocks[-1] += data


def read_page(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_char_lstm_writes_the_figures_the_page_and_the_plots(lstm_run, tmp_path, capsys, one_thread):
    out = tmp_path / "gates"
    text = "ROMEO:\nIs it so? 'Tis, sir.\n\nJULIET:\nAy, my lord"
    assert main(["diagnose", "gates", str(lstm_run), "--out", str(out), "--text", text, "--json"]) == 0
    result = last_json(capsys)
    assert result["cell"] == "lstm" and result["layer"] == 1 and result["activation"] == "tanh(c)"
    assert result["tokens"] > 1000 and result["passage_tokens"] == len(text)
    assert len(result["units"]) == gates.AUTO_UNITS == len(set(result["units"]))
    assert result["unit_variance"] == sorted(result["unit_variance"], reverse=True)  # the most active first
    assert set(result["gates"]) == {"input", "forget", "output"}
    for figures in result["gates"].values():
        assert 0 < figures["mean"] < 1 and len(figures["per_layer"]) == 2
        assert 0 <= figures["left_saturated"] + figures["right_saturated"] <= 1
    assert json.loads((out / "gates.json").read_text())["gates"] == result["gates"]
    for name in ("gates.png", "heatmap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = read_page(out / "gates.html")
    assert page.blocks == [text] * len(result["units"])  # every character, in order, newlines kept
    assert len(page.titles) == len(text) * len(result["units"]) and page.titles[0].startswith(f"unit {result['units'][0]}: ")


def test_lines_and_the_default_passage(lstm_run, tmp_path, capsys, one_thread):
    out = tmp_path / "gates"
    assert main(["diagnose", "gates", str(lstm_run), "--out", str(out), "--units", "0,15", "--layer", "0",
                 "--chars", "50", "--tokens", "300"]) == 0
    printed = capsys.readouterr().out
    assert "forget" in printed and "heat map: layer 0, units 0, 15 (as chosen)" in printed and "gates.html" in printed
    result = json.loads((out / "gates.json").read_text())
    assert result["passage_tokens"] == 50 and result["tokens"] == 300 and result["units"] == [0, 15]
    assert len(read_page(out / "gates.html").blocks[0]) == 50


def train(tmp_path, corpus, cell: str):
    out = tmp_path / f"{cell}-run"
    assert main(["train", "shakespeare-char", "--out", str(out), "--max-steps", "3", "--no-progress",
                 f"--model.cell={cell}", f"--data.corpus={corpus}", *TINY]) == 0
    return out


def test_gru_and_a_passage_that_html_must_escape(char_corpus, tmp_path, capsys, one_thread):
    for split in ("train", "valid"):  # characters the page must escape, in the model's vocabulary
        path = char_corpus / f"{split}.txt"
        path.write_text('A <b> & "c" tag.\n' + path.read_text(encoding="utf-8"), encoding="utf-8")
    run = train(tmp_path, char_corpus, "gru")
    out = tmp_path / "gates"
    text = 'x <b>y<b> & "z" &amp;\n'
    (tmp_path / "passage.txt").write_text(text, encoding="utf-8")
    assert main(["diagnose", "gates", str(run), "--out", str(out), "--file", str(tmp_path / "passage.txt"),
                 "--units", "2", "--json"]) == 0
    result = last_json(capsys)
    assert result["cell"] == "gru" and result["activation"] == "h" and set(result["gates"]) == {"reset", "update"}
    raw = (out / "gates.html").read_text(encoding="utf-8")
    tags = set(re.findall(r"</?([A-Za-z0-9!]+)", raw))  # the text's <b> is no tag
    assert tags == {"!DOCTYPE", "html", "head", "meta", "title", "style", "body", "h1", "p", "h2", "pre", "span"}
    assert ">&lt;</span>" in raw and ">&amp;</span>" in raw and ">&quot;</span>" in raw
    assert read_page(out / "gates.html").blocks == [text]
    assert (out / "gates.png").is_file() and (out / "heatmap.png").is_file()


def test_rnn_has_no_gates_and_draws_the_heat_map(char_corpus, tmp_path, capsys, one_thread):
    run = train(tmp_path, char_corpus, "rnn_tanh")
    out = tmp_path / "gates"
    assert main(["diagnose", "gates", str(run), "--out", str(out), "--chars", "80"]) == 0
    printed = capsys.readouterr().out
    assert "has no gates" in printed
    result = json.loads((out / "gates.json").read_text())
    assert result["gates"] == {} and result["activation"] == "h" and result["passage_tokens"] == 80
    assert (out / "heatmap.png").is_file() and (out / "activations.png").is_file() and not (out / "gates.png").exists()


def test_word_model_draws_words(word_run, tmp_path, capsys, one_thread):
    out = tmp_path / "gates"
    assert main(["diagnose", "gates", str(word_run), "--out", str(out), "--chars", "40", "--tokens", "500",
                 "--json"]) == 0
    result = last_json(capsys)
    assert result["passage_tokens"] == 40 and result["tokens"] == 500
    block = read_page(out / "gates.html").blocks[0]
    assert len(block.split()) >= 30 and "\n" in block  # words, one <eos> a line end
    assert (out / "heatmap.png").is_file()


def test_bad_input_is_one_clear_line(lstm_run, tmp_path, capsys):
    base = ["diagnose", "gates", str(lstm_run), "--out", str(tmp_path / "gates"), "--tokens", "100"]
    fails([*base, "--units", "3,16"], capsys, r"--units: unit 16 is out of range \(layer 1 has 16 units, 0 .. 15\)")
    fails([*base, "--units", "three"], capsys, r"--units: 'three'")
    fails([*base, "--layer", "2"], capsys, r"--layer 2: the model has 2 layers")
    fails([*base, "--layer", "-3"], capsys, r"--layer -3")
    fails([*base, "--text", "Hello <world>"], capsys, r"--text: character '<' at position 6 is not in the model's")
    fails([*base, "--text", "a", "--file", str(tmp_path)], capsys, r"--text and --file")
    fails([*base, "--file", str(tmp_path / "none.txt")], capsys, r"none.txt: no such file")
    assert not (tmp_path / "gates").exists()  # nothing written before the input was checked
