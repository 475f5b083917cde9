"""Taggers end to end on slices of UD English EWT and CoNLL-2003: training, resume, eval, predict, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fails, last_json, need, sentences
from neurallm.cli import main

# Small, no dropout, one batch holding the whole slice: a tagger must learn it by heart.
SMALL = ["--model.emb_size=32", "--model.hidden_size=32", "--model.num_layers=1", "--task.char_size=16",
         "--task.char_emb_size=8", "--model.dropout=0", "--model.dropout_input=0", "--model.dropout_hidden=0",
         "--model.dropout_emb=0", "--task.unk_replace=0", "--train.lr=0.02", "--train.schedule=constant",
         "--train.log_every=1000", "--train.save_every=5", "--train.epochs=1000"]


@pytest.fixture(scope="module")
def ud(tmp_path_factory):
    src = need("ud-english-ewt")
    out = tmp_path_factory.mktemp("ud")
    (out / "train.conllu").write_text(sentences(src / "en_ewt-ud-train.conllu", 24), encoding="utf-8")
    # Validated on what it trains on: the kept checkpoint is then the one that learnt the slice best.
    (out / "dev.conllu").write_text(sentences(src / "en_ewt-ud-train.conllu", 24), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    src = need("conll2003")
    out = tmp_path_factory.mktemp("ner")
    (out / "train.txt").write_text(sentences(src / "train.txt", 30), encoding="utf-8")
    (out / "valid.txt").write_text(sentences(src / "train.txt", 30), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def upos_run(ud, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs") / "upos"
    assert main(["tag", "train", "ud-ewt-upos", "--out", str(out), "--max-steps", "60", "--no-progress",
                 f"--data.corpus={ud}", "--train.batch_size=24", *SMALL]) == 0
    return out


def test_a_tagger_learns_a_small_batch_by_heart(upos_run, ud, capsys):
    assert main(["tag", "eval", str(upos_run), "--file", str(ud / "train.conllu"), "--json"]) == 0
    result = last_json(capsys)
    words = sum(1 for line in (ud / "train.conllu").read_text().splitlines()
                if line and line[0].isdigit() and line.split("\t")[0].isdigit())  # no multiword or empty nodes
    assert result["words"] == words and result["accuracy"] > 0.97


def test_predict_on_plain_text_and_tokens(upos_run, tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("The dog barks .\n\nI like green tea .\n", encoding="utf-8")
    assert main(["tag", "predict", str(upos_run), "--file", str(text), "--json", "--no-progress"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["words"] for r in rows] == [["The", "dog", "barks", "."], ["I", "like", "green", "tea", "."]]
    assert all(len(r["tags"]) == len(r["words"]) for r in rows) and rows[0]["tags"][-1] == "PUNCT"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("The\ndog\nbarks\n.\n\nI\nlike\ngreen\ntea\n.\n", encoding="utf-8")
    assert main(["tag", "predict", str(upos_run), "--file", str(tokens), "--input", "tokens", "--no-progress"]) == 0
    columns = capsys.readouterr().out
    blocks = [b.splitlines() for b in columns.strip().split("\n\n")]
    assert [[line.split("\t")[0] for line in b] for b in blocks] == [r["words"] for r in rows]
    assert [[line.split("\t")[1] for line in b] for b in blocks] == [r["tags"] for r in rows]


def test_tagger_resume_is_exact(ud, tmp_path, one_thread):
    args = ["tag", "train", "ud-ewt-upos", "--no-progress", f"--data.corpus={ud}", "--train.batch_size=8",
            *SMALL, "--task.unk_replace=0.3", "--model.dropout=0.2"]  # random draws the resume must restore
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*args, "--out", str(whole), "--max-steps", "7"]) == 0  # 3 batches an epoch: crosses epochs
    assert main([*args, "--out", str(split), "--max-steps", "5"]) == 0
    assert main([*args, "--out", str(split), "--max-steps", "7", "--resume"]) == 0
    a, b = (load_file(str(d / "resume" / "tensors.safetensors")) for d in (whole, split))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_ner_with_a_crf_scores_entities(ner, tmp_path, capsys, one_thread):
    out = tmp_path / "ner"
    assert main(["tag", "train", "conll2003-ner", "--out", str(out), "--max-steps", "60", "--no-progress",
                 f"--data.corpus={ner}", "--train.batch_size=30", *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["decoder"] == "crf" and config["task"]["scheme"] == "bioes"
    labels = json.loads((out / "tokenizer.json").read_text())["labels"]
    assert "S-PER" in labels or "S-LOC" in labels  # trained in BIOES
    assert main(["tag", "eval", str(out), "--file", str(ner / "train.txt"), "--json"]) == 0
    result = last_json(capsys)
    assert result["f1"] > 0.9 and set(result["per_type"]) <= {"PER", "LOC", "ORG", "MISC"}
    assert {"precision", "recall", "accuracy"} <= set(result)
    # Predictions are written in IOB2, as the data sets are.
    (tmp_path / "in.txt").write_text("EU rejects German call to boycott British lamb .\n", encoding="utf-8")
    assert main(["tag", "predict", str(out), "--file", str(tmp_path / "in.txt"), "--json", "--no-progress"]) == 0
    tags = json.loads(capsys.readouterr().out)["tags"]
    assert len(tags) == 9 and not any(t[:2] in ("E-", "S-") for t in tags)


def test_an_unknown_label_at_evaluation_names_its_line(upos_run, ud, tmp_path, capsys):
    lines = sentences(ud / "dev.conllu", 3).splitlines(keepends=True)
    bad_at = next(i for i, line in enumerate(lines) if line[:1].isdigit() and "\tNOUN\t" in line)
    lines[bad_at] = lines[bad_at].replace("\tNOUN\t", "\tNOUNISH\t", 1)
    bad = tmp_path / "bad.conllu"
    bad.write_text("".join(lines), encoding="utf-8")
    fails(["tag", "eval", str(upos_run), "--file", str(bad)], capsys, r"bad.conllu:\d+: label 'NOUNISH' \(word \d+ ")


def test_mixed_tag_schemes_are_refused_with_file_and_line(ner, tmp_path, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    text = sentences(ner / "train.txt", 30)
    # An IOB1 opening (I- after O) in a file whose other entities open with B-... and an S- tag later.
    text = text.replace(" B-PER\n", " S-PER\n", 1).replace(" B-LOC\n", " I-LOC\n", 1)
    (data / "train.txt").write_text(text, encoding="utf-8")
    (data / "valid.txt").write_text(sentences(ner / "valid.txt", 5), encoding="utf-8")
    fails(["tag", "train", "conll2003-ner", "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress",
           f"--data.corpus={data}", *SMALL], capsys, r"train.txt:\d+: .*one tag scheme per file")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_wrong_verb_for_a_recipe_or_checkpoint_is_named(upos_run, capsys):
    fails(["train", "ud-ewt-upos"], capsys, "use nlm tag train ud-ewt-upos")
    fails(["tag", "train", "ptb-small"], capsys, "task.kind is 'lm'")
    fails(["generate", str(upos_run)], capsys, "is a tagger, not a language model; use nlm tag eval")
    fails(["classify", "eval", str(upos_run)], capsys, r"is a tagger \(task.kind = 'tag'\), not a classifier")


@pytest.fixture(scope="module")
def char_lms(ud, tmp_path_factory, one_thread):
    """A forward and a backward character LM (data.reverse) on the words of the UD slice."""
    from neurallm.data import conll

    root = tmp_path_factory.mktemp("charlm")
    text = root / "text"
    text.mkdir()
    words = "".join(" ".join(s.words) + "\n" for s in conll.read_conllu(ud / "train.conllu"))
    (text / "train.txt").write_text(words, encoding="utf-8")
    (text / "valid.txt").write_text(words, encoding="utf-8")
    made = []
    for name, extra in (("fwd", []), ("bwd", ["--data.reverse=true"])):
        assert main(["train", "shakespeare-char-small", "--out", str(root / name), "--max-steps", "5",
                     "--no-progress", f"--data.corpus={text}", "--model.hidden_size=24", "--model.emb_size=8",
                     "--train.batch_size=4", "--train.bptt=32", *extra]) == 0
        made.append(root / name)
    return made


def test_character_lm_features_are_the_lms_states_and_travel_with_the_tagger(ud, char_lms, tmp_path, capsys,
                                                                           one_thread):
    import shutil

    from neurallm import checkpoint
    from neurallm.tasks import tagging

    fwd, bwd = char_lms
    # The backward LM reads text backwards: its own eval of the training text reverses it too.
    assert json.loads((bwd / "config.json").read_text())["data"]["reverse"] is True
    out = tmp_path / "tagger"
    assert main(["tag", "train", "ud-ewt-upos", "--out", str(out), "--max-steps", "3", "--no-progress",
                 f"--data.corpus={ud}", *SMALL, f"--task.lm_features={fwd},{bwd}"]) == 0
    tagger, recipe, vocab = tagging.load(out)
    words = ["The", "dog", "barks", "."]
    features = tagger.features([words])[0].float()  # (words, 24 + 24)
    assert features.shape == (4, 48)
    for lm_dir, part, text, places in ((fwd, slice(0, 24), "The dog barks .", [2, 6, 12, 14]),
                                       (bwd, slice(24, 48), ". skrab god ehT", [14, 10, 6, 0])):
        lm, _, tok = checkpoint.load(lm_dir)
        with torch.no_grad():
            states, _ = lm(torch.tensor([[tok.boundary] + tok.encode(text)]))
        # Forward: the state after each word's last letter; backward: after (reading back to) its first.
        assert torch.allclose(features[:, part], states[0, [p + 1 for p in places]].half().float())
    # The checkpoint holds the LMs: it tags with them gone.
    shutil.rmtree(fwd.parent)
    assert main(["tag", "eval", str(out), "--file", str(ud / "dev.conllu"), "--json"]) == 0
    assert last_json(capsys)["words"] > 0


def test_a_stored_tagger_is_listed_as_one_and_used_by_name(upos_run, ud, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NLM_HOME", str(tmp_path / "home"))
    assert main(["models", "add", str(upos_run), "pos"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    entry = next(e for e in (listed if isinstance(listed, list) else listed["models"]) if e["name"] == "pos")
    assert entry["kind"] == "tagger" and entry["validation"].startswith("acc ")
    assert main(["tag", "eval", "pos", "--file", str(ud / "dev.conllu"), "--json"]) == 0
    assert last_json(capsys)["accuracy"] > 0.97
