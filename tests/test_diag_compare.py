"""nlm compare: three cells, one recipe, one budget, one report."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, fails, last_json
from neurallm import config
from neurallm.cli import main
from neurallm.diagnostics import compare


def test_compare_trains_each_cell_and_writes_the_report(char_corpus, tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    args = ["compare", "shakespeare-char", "--steps", "4", "--valid-every", "2", "--out", str(out), "--no-progress",
            f"--data.corpus={char_corpus}", *TINY]
    assert main([*args, "--json"]) == 0
    report = last_json(capsys)
    assert list(report["cells"]) == ["rnn", "lstm", "gru"]
    for cell, r in report["cells"].items():
        assert r["steps"] == 4 and r["hidden_size"] == 16 and r["step_tokens_per_s"] > 0
        assert [p["step"] for p in r["curve"]] == [2, 4]  # validated every 2 steps (and at the end)
        assert json.loads((out / cell / "config.json").read_text())["model"]["cell"] == compare.common.CELLS[cell]
    sizes = {cell: r["parameters"] for cell, r in report["cells"].items()}
    assert sizes["rnn"] < sizes["gru"] < sizes["lstm"]  # the same sizes: 1, 3 and 4 gates' weights
    text = (out / "report.md").read_text()
    assert "| lstm | 16 |" in text and "4 steps per cell" in text and "![curves](curves.png)" in text
    assert (out / "curves.png").is_file() and (out / "gradients.png").is_file()
    # Run again: the finished runs are reported, not retrained (and not overwritten without --resume).
    fails(args, capsys, "holds a finished run; pass --resume")
    assert main([*args, "--resume", "--json"]) == 0
    assert last_json(capsys)["cells"]["gru"]["best_valid_loss"] == report["cells"]["gru"]["best_valid_loss"]


def test_matching_parameters():
    model = config.build({"model": {"cell": "lstm", "hidden_size": 100, "emb_size": 32, "vocab_size": 60}}).model
    target = compare.parameters(model)
    for cell in ("gru", "rnn_tanh"):
        hidden = compare.matched_hidden(model, cell, target)
        got = compare.parameters(config.replace(config.Recipe(model=model), model={"cell": cell, "hidden_size": hidden}).model)
        assert abs(got - target) / target < 0.02 and hidden > 100


def test_compare_refuses_a_tagging_recipe(capsys, tmp_path):
    fails(["compare", "ud-ewt-upos", "--steps", "1", "--out", str(tmp_path)], capsys, "trains language models")
    with pytest.raises(SystemExit):
        main(["compare", "ptb-small", "--match", "weights"])
