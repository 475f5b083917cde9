"""nlm diagnose dependency: distances to earlier occurrences, documents, the full/cut alignment, end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY, fails, last_json
from neurallm import config
from neurallm.diagnostics import common, dependency


def test_distances_restart_at_documents_and_skip_ignored_tokens():
    #      t: 0  1  2  3  4  5 | 6  7  8  9   (a document starts at 6; 0 and 1 are ignored)
    ids = [5, 6, 5, 0, 6, 5, 7, 1, 7, 5]
    d = dependency.distances(ids, [0, 6], ignored={0, 1})
    assert d.tolist() == [0, 0, 2, -1, 3, 3, 0, -1, 2, 0]
    assert dependency.distances(ids, [0], ignored=set())[9].item() == 4  # one stream: 5 last seen at 5


def test_bins_are_powers_of_two_up_to_the_longest_distance():
    assert dependency.bins(torch.tensor([0, -1, 1, 5, 2])) == [(1, 2), (2, 4), (4, 8)]
    assert dependency.bins(torch.tensor([0, -1])) == []
    assert dependency.bins(torch.tensor([10 ** 6]))[-1] == (dependency.LONGEST // 2, dependency.LONGEST)


def test_samples_are_repeats_in_the_bin_and_controls_outside_it():
    generator = torch.Generator().manual_seed(0)
    d = torch.tensor([0, 0, 1, -1, 3, 0, 2, 9, 0, 5, 6, 1, 0, 4])
    repeats, controls = dependency.sample(d, 2, 4, 10, generator)
    assert sorted(repeats.tolist()) == [4, 6]
    assert controls.tolist() == [5, 7, 8, 9, 10, 12, 13]  # none within 4 before, at least 2 tokens in
    few, _ = dependency.sample(d, 2, 4, 1, torch.Generator().manual_seed(0))
    assert few.numel() == 1 and few.item() in (4, 6)


def test_documents_start_at_wikitext_article_headings(tmp_path):
    from neurallm.data.tokenizers import WordTokenizer

    text = (" \n = First = \n \n a b a \n \n = = Section = = \n b c \n"
            " = Second = \n \n c a \n")
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(text, encoding="utf-8")
    tokenizer = WordTokenizer.train(text)
    data = config.DataConfig(corpus=str(tmp_path))
    ids, starts = dependency.read(data, "test", tokenizer, 1000)
    # The blank first line joins the first article; the section heading starts no document.
    assert [tokenizer.token(i) for i in ids[starts[1]:starts[1] + 4]] == ["=", "Second", "=", "<eos>"]
    assert starts == [0, ids.tolist().index(tokenizer.index["Second"]) - 1]
    d = dependency.distances(ids.tolist(), starts, {tokenizer.boundary, tokenizer.unk}).tolist()
    words = [tokenizer.token(i) for i in ids]
    assert words[6:9] == ["a", "b", "a"] and d[6:9] == [0, 0, 2]
    assert words[17:19] == ["b", "c"] and d[17:19] == [10, 0]  # a section heading ends no article
    assert words[-3:] == ["c", "a", "<eos>"] and d[-3:] == [0, 0, -1]  # the second article's first words
    short, starts = dependency.read(data, "test", tokenizer, 5)
    assert short.numel() == 5 and starts == [0]


@pytest.fixture
def lm(word_run, one_thread):
    return common.load_lm(word_run)


def test_a_cut_that_covers_the_whole_history_gives_the_full_probability(lm, word_corpus):
    model, recipe, tokenizer = lm
    data = config.replace(recipe, data={"corpus": str(word_corpus)}).data
    ids = common.text_ids(data, "valid", tokenizer, 200)
    full = dependency.full_logp(model, tokenizer.boundary, ids, torch.arange(ids.numel()))
    assert full.shape == ids.shape and (full < 0).all()
    some = dependency.full_logp(model, tokenizer.boundary, ids, torch.tensor([3, 150]))
    assert some[[3, 150]].tolist() == pytest.approx(full[[3, 150]].tolist(), abs=1e-5) and some.isnan().sum() == ids.numel() - 2
    for t in (1, 5, 69, 70, 150):  # the full pass reads windows of 70 tokens, state carried across
        cut = dependency.cut_logp(model, tokenizer.boundary, ids, torch.tensor([t]), k=t)
        assert cut.item() == pytest.approx(full[t].item(), abs=1e-5)
    # A shorter window is the full reading of just that window: ids[t] after [boundary, ids[t-k:t]].
    positions, k = torch.tensor([20, 33, 120]), 7
    cut = dependency.cut_logp(model, tokenizer.boundary, ids, positions, k)
    alone = [dependency.full_logp(model, tokenizer.boundary, ids[t - k:t + 1], torch.tensor([k]))[k].item()
             for t in positions.tolist()]
    assert cut.tolist() == pytest.approx(alone, abs=1e-5)
    assert (cut - full[positions]).abs().max() > 1e-4  # and dropping context changes the prediction
    empty = dependency.cut_logp(model, tokenizer.boundary, ids, torch.tensor([], dtype=torch.long), 3)
    assert empty.numel() == 0


def run(args, capsys) -> dict:
    from neurallm.cli import main

    assert main(["diagnose", "dependency", *args, "--json"]) == 0
    return last_json(capsys)


def test_end_to_end_on_a_word_model(word_run, word_corpus, tmp_path, capsys, one_thread):
    out = tmp_path / "dep"
    result = run([str(word_run), "--data", str(word_corpus), "--split", "valid", "--tokens", "600",
                  "--per-bin", "12", "--out", str(out)], capsys)
    written = json.loads((out / "dependency.json").read_text())
    assert written["models"] == result["models"]
    assert (result["data"], result["split"], result["tokens"], result["documents"]) == (str(word_corpus), "valid",
                                                                                         600, 1)
    m = result["models"]["word-run"]
    assert m["cell"] == "lstm" and m["checkpoint"] == str(word_run)
    los = [b["lo"] for b in m["bins"]]
    assert los == [2 ** i for i in range(len(los))] and len(los) >= 5
    assert all(b["hi"] == 2 * b["lo"] and 0 <= b["n"] <= 12 and b["control_n"] <= 12 for b in m["bins"])
    measured = [b for b in m["bins"] if b["n"] > 1 and b["control_n"] > 1]
    assert len(measured) >= 4
    for b in measured:
        assert b["boost"] == pytest.approx(b["repeat_gain"] - b["control_gain"])
        assert b["repeat_se"] >= 0 and b["repeat_logp"] < 0 and b["unigram_logp"] < 0
    assert all(b["repeat_gain"] is None for b in m["bins"] if b["n"] == 0)  # JSON has no NaN
    assert m["reach"] is None or m["reach"] in los
    if common.pyplot() is not None:
        assert (out / "dependency.png").stat().st_size > 0


def test_lines_name_the_stream_and_the_table(word_run, word_corpus, tmp_path, capsys, one_thread):
    from neurallm.cli import main

    assert main(["diagnose", "dependency", str(word_run), "--data", str(word_corpus), "--tokens", "300",
                 "--per-bin", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "documents: 1 stream" in out and "repeat gain" in out and "reach:" in out
    assert "dependency.json" in out


def test_identical_checkpoints_give_identical_figures(word_run, word_corpus, tmp_path, capsys, one_thread):
    copies = [tmp_path / "a" / "word-run", tmp_path / "b" / "word-run"]
    for copy in copies:
        shutil.copytree(word_run, copy)
    result = run([str(word_run), *map(str, copies), "--data", str(word_corpus), "--split", "test", "--tokens",
                  "400", "--per-bin", "8", "--out", str(tmp_path / "dep")], capsys)
    assert list(result["models"]) == [str(word_run), *map(str, copies)]  # one folder name: told apart by path
    first, *others = result["models"].values()
    assert result["same_tokens"] and all(o["bins"] == first["bins"] for o in others)  # same positions, same model
    fails(["diagnose", "dependency", str(word_run), str(word_run), "--out", str(tmp_path / "x")], capsys,
          "names one checkpoint twice")


def test_models_with_different_tokenizers_read_the_text_their_own_way(word_run, char_run, word_corpus, tmp_path,
                                                                    capsys, one_thread):
    from neurallm.cli import main

    assert main(["diagnose", "dependency", str(word_run), str(char_run), "--data", str(word_corpus),
                 "--tokens", "300", "--per-bin", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tokenizers differ" in out and "a token is a character" in out
    result = json.loads((tmp_path / "dependency.json").read_text())
    assert not result["same_tokens"] and result["models"]["char-run"]["tokenizer"] == "char"


def test_a_backward_model_is_refused(char_corpus, tmp_path, capsys, one_thread):
    from neurallm.cli import main

    back = tmp_path / "back"
    assert main(["train", "shakespeare-char", "--out", str(back), "--max-steps", "1", "--no-progress",
                 f"--data.corpus={char_corpus}", "--data.reverse=true", *TINY]) == 0
    capsys.readouterr()
    fails(["diagnose", "dependency", str(back), "--out", str(tmp_path / "dep")], capsys,
          "backward model .*forward models")
    assert not (tmp_path / "dep" / "dependency.json").exists()
