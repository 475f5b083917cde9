"""Sentence classifiers end to end on slices of SST-2 and SST-5: learning a slice by heart, the four
poolings, padding, eval on files and folder splits, predict (file, stdin, JSON), bad input."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch
from conftest import fails, head, last_json, need

from neurallm import config
from neurallm.cli import main
from neurallm.tasks import classification
from neurallm.tasks.sentences import Vocab, collate, encode

# Small, no dropout, one batch holding the whole slice: a classifier must learn it by heart.
SMALL = ["--model.emb_size=32", "--model.hidden_size=32", "--model.num_layers=1", "--model.dropout=0",
         "--model.dropout_input=0", "--model.dropout_hidden=0", "--task.unk_replace=0", "--train.lr=0.01",
         "--train.schedule=constant", "--train.ema=0", "--train.valid_every=0", "--train.log_every=1000",
         "--train.save_every=1000", "--train.epochs=1000"]


def tsv_rows(path) -> list[tuple[str, str]]:
    """(text, label) of a headed SST-2 TSV."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(t.strip(), y) for t, y in (line.split("\t") for line in lines if line.strip())]


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    src = need("sst2", "train.tsv")
    out = tmp_path_factory.mktemp("sst2")
    text = head(src, 41)  # the header and 40 rows
    (out / "train.tsv").write_text(text, encoding="utf-8")
    # Validated on what it trains on: the kept checkpoint is then the one that learnt the slice best.
    (out / "dev.tsv").write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def sst2_run(sst2, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs") / "sst2"
    assert main(["classify", "train", "sst2", "--out", str(out), "--max-steps", "30", "--no-progress",
                 f"--data.corpus={sst2}", "--train.batch_size=40", *SMALL]) == 0
    return out


def test_a_classifier_learns_a_small_slice_by_heart(sst2_run, sst2, capsys):
    rows = tsv_rows(sst2 / "train.tsv")
    assert len(rows) == 40 and {y for _, y in rows} == {"0", "1"}
    assert main(["classify", "eval", str(sst2_run), "--file", str(sst2 / "train.tsv"), "--json"]) == 0
    result = last_json(capsys)
    assert result["sentences"] == 40 and result["accuracy"] > 0.95
    assert result["file"] == str(sst2 / "train.tsv")
    # Without --file: the dev split of the corpus the model was trained on (here the folder).
    assert main(["classify", "eval", str(sst2_run)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dev.tsv: accuracy \d+\.\d\d% over 40 sentences", out), out
    summary = json.loads((sst2_run / "config.json").read_text())
    assert summary["task"]["kind"] == "classify" and summary["task"]["pooling"] == "max"


# ---- the model itself: poolings and padding -----------------------------------------------------

def small_model(sst2, pooling: str, seed: int = 0):
    from neurallm.data import sentiment

    examples = sentiment.read_tsv(sst2 / "train.tsv")
    words = [e.text.split() for e in examples]
    vocab = Vocab.build(words, sorted({e.label for e in examples}))
    recipe = config.load_recipe("sst2", [f"--task.pooling={pooling}", *SMALL])
    recipe = config.replace(recipe, model={"vocab_size": len(vocab.words)})
    torch.manual_seed(seed)
    model = classification.make_model(recipe, vocab)
    data = [encode(vocab, w, vocab.label_index[e.label]) for w, e in zip(words, examples)]
    return model, vocab, data


@pytest.mark.parametrize("pooling", ["last", "max", "mean", "attention"])
def test_each_pooling_trains_and_gives_probabilities(sst2, pooling, one_thread):
    model, vocab, data = small_model(sst2, pooling)
    batch = collate(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    model.train()
    for _ in range(6):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    model.eval()
    probs = model.predict(batch)
    assert probs.shape == (40, 2) and torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(40), atol=1e-5)
    # The same figures through the task's own batching (length buckets, input order kept).
    again = classification.predict(model, vocab, [[vocab.words[i] for i in e.words] for e in data], batch_size=7)
    assert torch.allclose(again, probs, atol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "max", "mean", "attention"])
def test_padding_does_not_change_a_sentence(sst2, pooling, one_thread):
    model, _, data = small_model(sst2, pooling, seed=1)
    model.eval()
    short = next(e for e in data if 3 <= len(e.words) <= 5)
    long = max(data, key=lambda e: len(e.words))
    assert len(long.words) > len(short.words) + 3
    alone = model.predict(collate([short]))
    padded = model.predict(collate([long, short, long]))  # the short one padded to the long one's length
    assert torch.allclose(alone[0], padded[1], atol=1e-6), (alone, padded)
    assert torch.allclose(model.predict(collate([long]))[0], padded[0], atol=1e-6)


def test_last_pooling_reads_each_rows_own_last_word(sst2, one_thread):
    model, _, data = small_model(sst2, "last", seed=2)
    model.eval()
    short = next(e for e in data if 3 <= len(e.words) <= 5)
    long = max(data, key=lambda e: len(e.words))
    batch = collate([long, short])
    with torch.no_grad():
        out = model.encoder(batch.words, batch.chars, batch.lengths)
        pooled = model.pool(out, batch)
        one = collate([short])
        alone = model.encoder(one.words, one.chars, one.lengths)
    half = out.size(2) // 2
    n = len(short.words)
    # Forward direction: the state after the row's own last word; backward: after reading back to the first.
    assert torch.allclose(pooled[1, :half], alone[0, n - 1, :half], atol=1e-6)
    assert torch.allclose(pooled[1, half:], alone[0, 0, half:], atol=1e-6)
    assert torch.allclose(pooled[0, :half], out[0, len(long.words) - 1, :half])
    assert not torch.allclose(pooled[1, :half], out[1, -1, :half])  # not the padded row's last position


# ---- SST-5 trees --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sst5(tmp_path_factory):
    src = need("sst5", "train.txt")
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    # Five trees of each root label 0..4 to train (and validate), the next two of each to test.
    train, test = [], []
    for label in "01234":
        mine = [line for line in lines if line.startswith(f"({label} ")]
        train += mine[:5]
        test += mine[5:7]
    out = tmp_path_factory.mktemp("sst5")
    (out / "train.txt").write_text("".join(train), encoding="utf-8")
    (out / "dev.txt").write_text("".join(train), encoding="utf-8")
    (out / "test.txt").write_text("".join(test), encoding="utf-8")
    return out


def test_sst5_trees_train_and_evaluate_on_a_folder_split(sst5, tmp_path, capsys, one_thread):
    out = tmp_path / "sst5"
    assert main(["classify", "train", "sst5", "--out", str(out), "--max-steps", "30", "--no-progress", "--json",
                 f"--data.corpus={sst5}", "--train.batch_size=25", *SMALL]) == 0
    result = last_json(capsys)
    assert result["steps"] == 30 and 0 <= result["valid_error"] <= 1
    assert json.loads((out / "tokenizer.json").read_text())["labels"] == ["0", "1", "2", "3", "4"]
    assert main(["classify", "eval", str(out), "--file", str(sst5 / "train.txt"), "--json"]) == 0
    learnt = last_json(capsys)
    assert learnt["sentences"] == 25 and learnt["accuracy"] > 0.9
    assert main(["classify", "eval", str(out), "--split", "test", "--data", str(sst5), "--json"]) == 0
    test = last_json(capsys)
    assert test["file"] == str(sst5 / "test.txt") and test["sentences"] == 10 and 0 <= test["accuracy"] <= 1


# ---- predict ------------------------------------------------------------------------------------

def test_predict_writes_label_probabilities_and_text(sst2_run, sst2, tmp_path, capsys):
    rows = tsv_rows(sst2 / "train.tsv")[:4]
    text = tmp_path / "in.txt"
    text.write_text("\n".join(t for t, _ in rows[:2]) + "\n\n   \n" + "\n".join(t for t, _ in rows[2:]) + "\n",
                    encoding="utf-8")
    assert main(["classify", "predict", str(sst2_run), "--file", str(text), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # blank lines skipped
    for line, (sentence, gold) in zip(lines, rows):
        label, probs, words = line.split("\t")
        assert words == " ".join(sentence.split()) and label == gold  # it learnt these
        shown = dict(p.split(":") for p in probs.split(" "))
        assert list(shown) == ["0", "1"] and all(re.fullmatch(r"\d\.\d{4}", v) for v in shown.values())
        assert abs(sum(map(float, shown.values())) - 1) < 2e-4 and max(shown, key=lambda k: float(shown[k])) == label
    assert main(["classify", "predict", str(sst2_run), "--file", str(text), "--json", "--no-progress"]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in objects] == [" ".join(t.split()) for t, _ in rows]
    assert [o["label"] for o in objects] == [y for _, y in rows]
    for o in objects:
        assert set(o) == {"text", "label", "probabilities"} and set(o["probabilities"]) == {"0", "1"}
        assert abs(sum(o["probabilities"].values()) - 1) < 1e-5
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)


def test_predict_reads_stdin(sst2_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a gorgeous , witty film\n\nthe worst movie of the year\n"))
    assert main(["classify", "predict", str(sst2_run), "--json"]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in objects] == ["a gorgeous , witty film", "the worst movie of the year"]
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in objects)


# ---- bad input ----------------------------------------------------------------------------------

def test_a_row_without_a_label_names_file_and_line(sst2_run, tmp_path, capsys):
    bad = tmp_path / "nolabel.tsv"
    bad.write_text("sentence\tlabel\ngood fun\t1\nno label here\n", encoding="utf-8")
    fails(["classify", "eval", str(sst2_run), "--file", str(bad)], capsys, r"nolabel.tsv:3: a row without a label")
    bad.write_text("good fun\t1\nan empty label\t \n", encoding="utf-8")  # no header, a tab and no label
    fails(["classify", "eval", str(sst2_run), "--file", str(bad)], capsys, r"nolabel.tsv:2: a row without a label")


def test_a_row_with_empty_text_names_file_and_line(sst2_run, tmp_path, capsys):
    bad = tmp_path / "empty.tsv"
    bad.write_text("sentence\tlabel\ngood fun\t1\n\t0\n", encoding="utf-8")
    fails(["classify", "eval", str(sst2_run), "--file", str(bad)], capsys, r"empty.tsv:3: empty sentence")


def test_a_label_the_model_does_not_know_names_file_and_line(sst2_run, tmp_path, capsys):
    bad = tmp_path / "seven.tsv"
    bad.write_text("sentence\tlabel\ngood fun\t1\n\nawful\t7\n", encoding="utf-8")
    fails(["classify", "eval", str(sst2_run), "--file", str(bad)], capsys,
          r"seven.tsv:4: label '7' is not one the model knows \(0, 1\)")


def test_missing_and_undecodable_files_are_clear_errors(sst2_run, tmp_path, capsys):
    missing = tmp_path / "nowhere.tsv"
    fails(["classify", "eval", str(sst2_run), "--file", str(missing)], capsys, r"nowhere.tsv: no such file")
    fails(["classify", "predict", str(sst2_run), "--file", str(missing)], capsys, r"nowhere.tsv: no such file")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a good film\nun film tr\u00e8s dr\u00f4le\n".encode("latin-1"))
    fails(["classify", "predict", str(sst2_run), "--file", str(latin), "--no-progress"], capsys,
          r"latin1.txt: not UTF-8 text")
    tsv = tmp_path / "latin1.tsv"
    tsv.write_bytes("sentence\tlabel\ngood\t1\ntr\u00e8s dr\u00f4le\t1\n".encode("latin-1"))
    fails(["classify", "eval", str(sst2_run), "--file", str(tsv)], capsys, r"latin1.tsv:3: not UTF-8 text")


def test_a_tagger_verb_is_refused_for_a_classifier(sst2_run, capsys):
    fails(["tag", "eval", str(sst2_run)], capsys, r"is a classifier \(task.kind = 'classify'\), not a tagger")
