"""Recipes and overrides: every shipped recipe loads; bad keys and values get clear errors."""

import math

import pytest
import torch

from neurallm import config
from neurallm.errors import NlmError
from neurallm.models.lm import RNNLM


def test_shipped_recipes_include_the_required_ones():
    assert {"ptb-small", "ptb-medium", "wikitext2-small", "wikitext2", "shakespeare-char"} <= set(config.list_recipes())


@pytest.mark.parametrize("name", config.list_recipes())
def test_every_recipe_loads(name):
    recipe = config.load_recipe(name)
    assert recipe.model.num_layers >= 1 and recipe.train.epochs >= 1
    assert recipe.data.corpus
    if recipe.task.kind != "lm":
        return _task_model_runs(recipe)
    # The model it describes builds and runs, at its corpus's real vocabulary size.
    vocab = {"char": 65, "bpe": recipe.data.bpe_vocab_size}.get(recipe.data.tokenizer) or \
        {"ptb": 10000, "wikitext-2": 33278}[recipe.data.corpus]
    model = RNNLM(config.replace(recipe, model={"vocab_size": vocab}).model)
    ids = torch.randint(0, vocab, (2, 6))
    features, _ = model(ids)
    loss = model.loss(features[:, :-1], ids[:, 1:])
    assert torch.isfinite(loss) and 0 < loss.item() < 2 * math.log(vocab)


def _task_model_runs(recipe):
    """A tagger's or classifier's recipe builds its model, whose loss on a padded batch is finite."""
    from neurallm.tasks import classification, tagging
    from neurallm.tasks.sentences import Vocab, collate, encode

    labels = ["B-PER", "I-PER", "E-PER", "S-PER", "O"] if recipe.task.scheme == "bioes" else ["A", "B", "C"]
    vocab = Vocab.build([["the", "cat"], ["sat", "on", "a", "mat"]], labels)
    recipe = config.replace(recipe, model={"vocab_size": len(vocab.words)})
    module = tagging if recipe.task.kind == "tag" else classification
    model = module.make_model(recipe, vocab)
    targets = [[0, 1], [2, 0, 1, 2]] if recipe.task.kind == "tag" else [0, 2]
    if recipe.task.scheme == "bioes":
        targets = [[4, 4], [4, 3, 4, 4]]  # O O, O S-PER O O: a legal path
    batch = collate([encode(vocab, w, y) for w, y in zip([["the", "cat"], ["a", "dog", "sat", "."]], targets)])
    assert torch.isfinite(model.loss(batch))


def test_overrides_are_typed():
    recipe = config.load_recipe("ptb-small", ["--model.hidden_size=650", "--train.lr", "1", "--model.tie_weights=false",
                                              "--model.adaptive_cutoffs=100,500"])
    assert recipe.model.hidden_size == 650 and recipe.train.lr == 1.0
    assert recipe.model.tie_weights is False and recipe.model.adaptive_cutoffs == (100, 500)


@pytest.mark.parametrize("override, message", [
    ("--model.hiden_size=3", r"unknown key model\.hiden_size"),
    ("--modle.hidden_size=3", r"unknown section \[modle\]"),
    ("--model.hidden_size=big", r"bad value for model\.hidden_size: 'big' \(expected an integer\)"),
    ("--model.cell=transformer", r"model\.cell.*one of lstm, gru, rnn_tanh, rnn_relu"),
    ("--model.dropout=1.5", r"model\.dropout"),
    ("--train.optimizer=lion", r"train\.optimizer"),
    ("--train.lr=inf", r"bad value for train\.lr: 'inf' \(expected a finite number\)"),
    ("--model.dropout=nan", r"bad value for model\.dropout: 'nan'"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(NlmError, match=message):
        config.load_recipe("ptb-small", [override])


def test_unknown_recipe_and_bad_toml(tmp_path):
    with pytest.raises(NlmError, match="unknown recipe 'nope'"):
        config.load_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden_size = 3\n")
    with pytest.raises(NlmError, match="not a valid TOML recipe"):
        config.load_recipe(str(bad))
