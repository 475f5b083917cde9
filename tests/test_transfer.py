"""Transfer from a word language model (--init-from, Howard & Ruder 2018): the word table and the
forward direction start as the LM's, the model's shape is the LM's, discriminative rates and
gradual unfreezing, and resume; on slices of PTB (the LM), UD English EWT (a tagger) and SST-5 (a
classifier, whose trees hold capitalised words)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY, fails, head, last_json, need, sentences
from safetensors.torch import load_file

from neurallm import checkpoint, config, fit
from neurallm.cli import main
from neurallm.errors import NlmError
from neurallm.tasks import classification, tagging
from neurallm.tasks.sentences import Vocab, collate, encode

RECIPE = {"tag": "ud-ewt-upos", "classify": "sst5"}
TASK = {"tag": ["--task.char_size=16", "--task.char_emb_size=8"], "classify": []}  # the classifier: no char features
# No dropout, no word replacement, a constant rate: what changes a weight is the optimizer alone.
STILL = ["--model.dropout=0", "--model.dropout_input=0", "--model.dropout_hidden=0", "--task.unk_replace=0",
         "--train.lr=0.01", "--train.schedule=constant", "--train.epochs=1000", "--train.log_every=1000",
         "--train.save_every=1000"]


# ---- data and language models ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ptb(tmp_path_factory):
    """The PTB slice of conftest's word_corpus (300 / 40 / 40 lines), once for the module."""
    src = need("ptb")
    out = tmp_path_factory.mktemp("ptb-slice")
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (out / f"{split}.txt").write_text(head(src / f"ptb.{split}.txt", n), encoding="utf-8")
    return out


def train_lm(ptb, out, *extra: str):
    assert main(["train", "ptb-small", "--out", str(out), "--max-steps", "20", "--no-progress",
                 f"--data.corpus={ptb}", *TINY, "--model.num_layers=2", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def lm(ptb, tmp_path_factory, one_thread):
    """A 2 x 16 LSTM word LM (PTB is lower-cased)."""
    return train_lm(ptb, tmp_path_factory.mktemp("lms") / "lstm")


@pytest.fixture(scope="module")
def gru_lm(ptb, tmp_path_factory, one_thread):
    """Another shape: one GRU layer of 20 over 12-wide embeddings."""
    return train_lm(ptb, tmp_path_factory.mktemp("lms") / "gru", "--model.cell=gru", "--model.emb_size=12",
                    "--model.hidden_size=20", "--model.num_layers=1")


@pytest.fixture(scope="module")
def ud(tmp_path_factory):
    src = need("ud-english-ewt", "en_ewt-ud-train.conllu")
    out = tmp_path_factory.mktemp("ud")
    (out / "train.conllu").write_text(sentences(src, 24), encoding="utf-8")
    (out / "dev.conllu").write_text(sentences(src, 24), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def sst5(tmp_path_factory):
    src = need("sst5", "train.txt")
    out = tmp_path_factory.mktemp("sst5")
    (out / "train.txt").write_text(head(src, 20), encoding="utf-8")
    (out / "dev.txt").write_text(head(src, 20), encoding="utf-8")
    return out


def built(kind: str, data, lm_path, out, *overrides: str):
    """The task set up by a run's loop (data read, model built, the LM copied), not trained."""
    recipe = config.load_recipe(RECIPE[kind], [f"--data.corpus={data}", f"--task.init_from={lm_path}",
                                               *TASK[kind], *overrides])
    task = tagging.Tagging(recipe) if kind == "tag" else classification.Classification(recipe)
    loop = fit.Loop(task, out, show_progress=False)
    loop.close()
    return task


def lm_id(tokenizer, word: str):
    """The LM's id of a task word: the word itself, else its lower-cased form; None when it has neither."""
    return tokenizer.index.get(word, tokenizer.index.get(word.lower()))


CASES = {"tag-lstm": ("tag", "lm"), "classify-lstm": ("classify", "lm"), "tag-gru": ("tag", "gru_lm")}


@pytest.fixture(scope="module", params=list(CASES))
def transfer(request, ud, sst5, tmp_path_factory, one_thread):
    """-> (task, the LM, its tokenizer) for a tagger or classifier started from an LM."""
    kind, which = CASES[request.param]
    lm_path = request.getfixturevalue(which)
    task = built(kind, ud if kind == "tag" else sst5, lm_path, tmp_path_factory.mktemp("built") / request.param)
    model, _, tokenizer = checkpoint.load(lm_path)
    return task, model, tokenizer


# ---- what is copied -----------------------------------------------------------------------------

def test_the_word_table_takes_the_lms_vectors(transfer):
    task, lm_model, tokenizer = transfer
    table, theirs = task.model.encoder.embedding.weight, lm_model.embedding.weight
    found = through_lower = 0
    for word, i in task.vocab.word_index.items():
        if i < 2:  # padding and unknown keep their own
            continue
        j = lm_id(tokenizer, word)
        if j is None:
            assert not (theirs == table[i]).all(1).any(), word  # a random start of its own
            continue
        assert torch.equal(table[i], theirs[j]), word
        found += 1
        through_lower += word not in tokenizer.index
    assert task.transferred == {"words_found": found, "words": len(task.vocab.words) - 2}
    assert found >= 30 and through_lower > 0  # "The" takes the vector of "the"
    assert task.summary(fit.Progress())["init_from"] == {"checkpoint": task.recipe.task.init_from, **task.transferred}


def test_each_forward_layer_takes_the_lms_weights(transfer):
    task, lm_model, _ = transfer
    encoder = task.model.encoder
    assert len(encoder.stack.layers) == len(lm_model.stack.layers)
    chars = encoder.chars.output_size if encoder.chars is not None else 0
    for n, (mine, theirs) in enumerate(zip(encoder.stack.layers, lm_model.stack.layers)):
        m, t = dict(mine.rnn.named_parameters()), dict(theirs.rnn.named_parameters())
        assert set(t) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}
        for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            assert torch.equal(m[name], t[name]), (n, name)
        width = t["weight_ih_l0"].size(1)
        # Layer 0 reads the LM's embedding and the character features; above, both directions of the layer below.
        assert m["weight_ih_l0"].size(1) == width + (chars if n == 0 else encoder.stack.hidden_size)
        assert torch.equal(m["weight_ih_l0"][:, :width], t["weight_ih_l0"])
        assert not m["weight_ih_l0"][:, width:].any()  # what the LM had no counterpart for starts at zero
        for name, value in t.items():  # the backward direction keeps its own random start
            reverse = m[f"{name}_reverse"]
            assert reverse.any() and not torch.equal(reverse[..., :width] if name == "weight_ih_l0" else reverse,
                                                     value), (n, name)


def test_the_forward_direction_computes_what_the_lm_computed(transfer):
    task, lm_model, tokenizer = transfer
    model, vocab = task.model.eval(), task.vocab
    both = [w for w in vocab.words[2:] if lm_id(tokenizer, w) is not None]  # words of both vocabularies
    sentence, longer = both[:9], both[5:25]
    batch = collate([encode(vocab, longer), encode(vocab, sentence)])  # the sentence padded
    hidden = task.recipe.model.hidden_size
    with torch.no_grad():
        encoder = model.encoder
        top, _ = encoder.stack(encoder.features(batch.words, batch.chars), lengths=batch.lengths)
        out = encoder(batch.words, batch.chars, batch.lengths)
        for row, words in enumerate([longer, sentence]):
            ids = torch.tensor([[lm_id(tokenizer, w) for w in words]])
            expected, _ = lm_model.stack(lm_model.embedding(ids))  # (1, time, hidden): the LM's top layer
            assert (top[row, :len(words), :hidden] - expected[0]).abs().max() < 1e-5
            assert (out[row, :len(words), :hidden] - expected[0]).abs().max() < 1e-5
    assert top.size(2) == 2 * hidden


@pytest.fixture(scope="module")
def gru_tagger(gru_lm, ud, tmp_path_factory, one_thread):
    """A tagger trained a step from (a copy of) the GRU LM, that copy then deleted."""
    root = tmp_path_factory.mktemp("gru-tagger")
    lm_copy = root / "lm"
    shutil.copytree(gru_lm, lm_copy)
    out = root / "tagger"
    # The recipe (and the command line) ask for another shape: the LM's wins.
    assert main(["tag", "train", "ud-ewt-upos", "--out", str(out), "--max-steps", "1", "--no-progress",
                 f"--data.corpus={ud}", "--init-from", str(lm_copy), "--model.cell=rnn_tanh",
                 "--model.hidden_size=99", "--model.num_layers=3", *TASK["tag"]]) == 0
    shutil.rmtree(lm_copy)
    return out


def test_the_model_shape_is_the_lms(gru_tagger, gru_lm, ud, tmp_path, capsys):
    import json

    shape = json.loads((gru_lm / "config.json").read_text())["model"]
    saved = json.loads((gru_tagger / "config.json").read_text())["model"]
    keys = ("cell", "emb_size", "hidden_size", "num_layers", "connection")
    assert {k: saved[k] for k in keys} == {k: shape[k] for k in keys} == \
        {"cell": "gru", "emb_size": 12, "hidden_size": 20, "num_layers": 1, "connection": "none"}
    model, _, vocab = tagging.load(gru_tagger)  # the checkpoint stands alone: the LM is gone
    assert isinstance(model.encoder.stack.layers[0].rnn, torch.nn.GRU)
    assert model.encoder.embedding.weight.shape == (len(vocab.words), 12)
    assert model.encoder.stack.layers[0].rnn.weight_hh_l0.shape == (3 * 20, 20)
    assert main(["tag", "eval", str(gru_tagger), "--file", str(ud / "train.conllu"), "--json"]) == 0
    assert last_json(capsys)["words"] > 0
    # The same from the task before any step, for a classifier too.
    task = built("classify", sst_like(tmp_path), gru_lm, tmp_path / "c", "--model.emb_size=300",
                 "--model.hidden_size=300")
    assert (task.recipe.model.cell, task.recipe.model.emb_size, task.recipe.model.hidden_size,
            task.recipe.model.num_layers) == ("gru", 12, 20, 1)


def sst_like(tmp_path):
    """A two-row TSV folder: enough for a classifier to be set up."""
    data = tmp_path / "tiny-tsv"
    data.mkdir(exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("sentence\tlabel\nthe market fell\t0\nthe company rose\t1\n", encoding="utf-8")
    return data


def test_a_character_lm_or_a_tagger_is_refused_as_init_from(one_thread, char_run, gru_tagger, ud, tmp_path, capsys):
    args = ["tag", "train", "ud-ewt-upos", "--max-steps", "1", "--no-progress", f"--data.corpus={ud}", *TASK["tag"]]
    fails([*args, "--out", str(tmp_path / "a"), "--init-from", str(char_run)], capsys,
          r"init_from .*: a char-level language model; the encoder's word table needs a word-level one")
    fails([*args, "--out", str(tmp_path / "b"), "--init-from", str(gru_tagger)], capsys,
          r"is a tagger, not a language model")
    fails([*args, "--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "nowhere")], capsys,
          r"nowhere: no such checkpoint")
    assert not (tmp_path / "a" / "model.safetensors").exists()


# ---- rates per layer group ----------------------------------------------------------------------

def test_discriminative_rates_and_gradual_unfreezing(lm, ud, tmp_path):
    task = built("tag", ud, lm, tmp_path / "a", "--task.discriminative=2", "--task.unfreeze_steps=3")
    groups = task.groups()
    assert len(groups) == 4  # the word table, layer 0 and layer 1 forward, all that starts fresh
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in task.model.parameters())  # each parameter in one group
    names = {id(p): n for n, p in task.model.named_parameters()}
    assert [names[id(p)] for p in groups[0]] == ["encoder.embedding.weight"]
    for i in (0, 1):  # the LM's layers: the forward direction only
        assert {names[id(p)] for p in groups[1 + i]} == {f"encoder.stack.layers.{i}.rnn.{w}_l0"
                                                         for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    fresh = {names[id(p)] for p in groups[3]}
    assert {"output.weight", "output.bias", "encoder.stack.layers.0.rnn.weight_hh_l0_reverse"} <= fresh
    assert any(n.startswith("encoder.chars.") for n in fresh)
    for step, expected in [(0, [0, 0, 0, 1]), (2, [0, 0, 0, 1]), (3, [0, 0, 0.5, 1]), (5, [0, 0, 0.5, 1]),
                           (6, [0, 0.25, 0.5, 1]), (8, [0, 0.25, 0.5, 1]), (9, [0.125, 0.25, 0.5, 1]),
                           (1000, [0.125, 0.25, 0.5, 1])]:
        assert task.lr_factors(step) == pytest.approx(expected), step
    default = built("tag", ud, lm, tmp_path / "b")
    assert default.lr_factors(0) == pytest.approx([2.6 ** -3, 2.6 ** -2, 2.6 ** -1, 1])
    assert default.lr_factors(0) == default.lr_factors(10 ** 6)
    recipe = config.load_recipe("ud-ewt-upos", [f"--data.corpus={ud}", *TASK["tag"], "--task.unfreeze_steps=3"])
    assert tagging.Tagging(recipe).lr_factors(0) is None  # no LM: one rate for all


def test_gradual_unfreezing_really_leaves_lower_groups_alone(lm, ud, tmp_path, one_thread):
    args = ["tag", "train", "ud-ewt-upos", "--no-progress", f"--data.corpus={ud}", "--init-from", str(lm),
            "--train.batch_size=24", "--task.unfreeze_steps=2", *TASK["tag"], *STILL]
    start = {k: v.clone() for k, v in built("tag", ud, lm, tmp_path / "start", "--train.batch_size=24",
                                            "--task.unfreeze_steps=2", *STILL).model.state_dict().items()}
    # The LM's parts join one at a time; what starts fresh (head, characters, backward) trains from the start.
    depth = {"encoder.embedding.": 3, "encoder.stack.layers.0.rnn.weight_hh_l0": 2,
             "encoder.stack.layers.0.rnn.bias_ih_l0": 2, "encoder.stack.layers.1.rnn.weight_ih_l0": 1,
             "encoder.stack.layers.1.rnn.bias_hh_l0": 1, "output.": 0, "encoder.chars.": 0,
             "encoder.stack.layers.0.rnn.weight_hh_l0_reverse": 0}
    assert start["encoder.embedding.weight"].abs().sum() > 0
    for steps in (2, 4, 6, 7):
        out = tmp_path / f"steps-{steps}"
        assert main([*args, "--out", str(out), "--max-steps", str(steps)]) == 0
        after = {k[6:]: v for k, v in load_file(str(out / "resume" / "tensors.safetensors")).items()
                 if k.startswith("model.")}
        assert after.keys() == start.keys()
        for prefix, d in depth.items():
            names = [k for k in start if k == prefix or prefix.endswith(".") and k.startswith(prefix)]
            assert names, prefix
            changed = [k for k in names if not torch.equal(after[k], start[k])]
            if steps > d * 2:  # the group trained from step d * unfreeze_steps on
                assert changed, (steps, prefix)
            else:
                assert not changed, (steps, prefix, changed)


# ---- resume -------------------------------------------------------------------------------------

def test_a_resumed_run_keeps_its_trained_encoder(lm, ud, tmp_path, capsys, one_thread):
    args = ["tag", "train", "ud-ewt-upos", "--no-progress", f"--data.corpus={ud}", "--init-from", str(lm),
            "--train.batch_size=8", *TASK["tag"], *STILL, "--task.unk_replace=0.3", "--model.dropout=0.2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*args, "--out", str(whole), "--max-steps", "5"]) == 0  # 3 batches an epoch: crosses one
    capsys.readouterr()
    assert main([*args, "--out", str(split), "--max-steps", "3", "--json"]) == 0
    summary = last_json(capsys)
    _, _, tokenizer = checkpoint.load(lm)
    vocab = Vocab.load(split / "tokenizer.json")
    found = sum(lm_id(tokenizer, w) is not None for w in vocab.words[2:])
    assert summary["init_from"] == {"checkpoint": str(lm), "words_found": found, "words": len(vocab.words) - 2}
    third = load_file(str(split / "resume" / "tensors.safetensors"))
    fails([*args[:5], *args[7:], "--out", str(split), "--max-steps", "5", "--resume"], capsys,
          "resume it with the same value")  # without --init-from
    assert main([*args, "--out", str(split), "--max-steps", "5", "--resume"]) == 0
    a, b = (load_file(str(d / "resume" / "tensors.safetensors")) for d in (whole, split))
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    lm_model, _, _ = checkpoint.load(lm)
    copied = lm_model.stack.layers[0].rnn.weight_hh_l0
    assert not torch.equal(b["model.encoder.stack.layers.0.rnn.weight_hh_l0"], copied)  # trained on, not copied again
    assert not torch.equal(third["model.output.weight"], b["model.output.weight"])


# ---- language models that cannot start an encoder --------------------------------------------------

@pytest.mark.parametrize("connection", ["residual", "highway"])
def test_an_lm_with_skip_connections_is_refused(connection, ptb, sst5, tmp_path, one_thread):
    """The encoder's layers read other widths than the LM's, so its joins could not be reproduced."""
    lm_path = train_lm(ptb, tmp_path / "lm", f"--model.connection={connection}")
    with pytest.raises(NlmError, match=f"a stack with {connection} connections; transfer needs plain stacked layers"):
        built("classify", sst5, lm_path, tmp_path / "c")


def test_backward_models_are_character_models_and_do_not_generate(ptb, char_run, tmp_path, capsys):
    """Only a character model reads backwards (a word model would spell its words backwards), so a
    backward LM is never a word table for --init-from; and it cannot continue a prompt."""
    fails(["train", "ptb-small", "--out", str(tmp_path / "lm"), "--max-steps", "2", "--no-progress",
           f"--data.corpus={ptb}", *TINY, "--data.reverse=true"], capsys,
          r"data.reverse: True \(expected false unless data.tokenizer is char")
    config_file = char_run / "config.json"
    saved = json.loads(config_file.read_text())
    saved["data"]["reverse"] = True
    config_file.write_text(json.dumps(saved))
    fails(["generate", str(char_run), "--max-tokens", "3"], capsys, r"a backward model \(data.reverse\)")


@pytest.mark.parametrize("scheme", ["int8", "int4-weight"])
def test_a_quantized_lm_as_init_from_is_clearly_refused(scheme, lm, ud, tmp_path, capsys, one_thread):
    quantized = tmp_path / "q"
    assert main(["quantize", str(lm), "--scheme", scheme, "--out", str(quantized), "--max-increase", "1000"]) == 0
    capsys.readouterr()
    code = main(["tag", "train", "ud-ewt-upos", "--out", str(tmp_path / "t"), "--max-steps", "1", "--no-progress",
                 f"--data.corpus={ud}", "--init-from", str(quantized), *TASK["tag"]])
    assert code == 2 and "a quantized language model; give the checkpoint it was quantized from" in capsys.readouterr().err
