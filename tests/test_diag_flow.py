"""Gradient flow: the probe against hand-computed Jacobian products, decay and growth, depth."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neurallm import config
from neurallm.diagnostics import flow
from neurallm.models.lm import RNNLM


def lm(cell: str, layers: int = 1, connection: str = "none", size: int = 6, vocab: int = 11) -> RNNLM:
    recipe = config.build({"model": {"cell": cell, "num_layers": layers, "hidden_size": size, "emb_size": size,
                                     "vocab_size": vocab, "connection": connection, "dropout": 0.0}})
    torch.manual_seed(0)
    return RNNLM(recipe.model).eval()


def test_the_probe_equals_a_hand_computed_jacobian_product_of_a_tanh_rnn():
    model = lm("rnn_tanh")
    ids = torch.randint(0, 11, (3, 9))
    batch, warmup = torch.cat([ids, torch.randint(0, 11, (3, 1))], dim=1), 0
    norms = flow.measure(model, batch, warmup)["h"]  # (rows, layers, d)
    # By hand: g(T) = ∂J/∂h(T) = W_dec^T (softmax - onehot); g(k) = W_hh^T diag(1 - h(k+1)^2) g(k+1).
    _, states = flow.unroll(model, ids)
    h = torch.stack([s[0][0] for s in states], dim=1).detach()  # (rows, time, hidden)
    w_hh = model.stack.layers[0].weights(0)[1].detach()
    probs = torch.softmax(model.decoder(h[:, -1]), dim=1)
    probs[torch.arange(3), batch[:, -1]] -= 1
    g = probs @ model.decoder.weight.detach()
    expected = [g.norm(dim=1)]
    for t in range(ids.size(1) - 1, 0, -1):  # from h(t) back to h(t - 1)
        g = (g * (1 - h[:, t] ** 2)) @ w_hh
        expected.append(g.norm(dim=1))
    assert torch.allclose(norms[:, 0], torch.stack(expected, dim=1), rtol=1e-4, atol=1e-7)


def test_every_layer_and_distance_is_the_gradient_of_that_state():
    """measure() against autograd on the unrolled states themselves, for each layer, distance, h and c."""
    model = lm("lstm", layers=3, connection="residual")
    batch = torch.randint(0, 11, (2, 7))
    norms = flow.measure(model, batch, 2)
    with torch.no_grad():
        _, state = model(batch[:, :2])
    features, states = flow.unroll(model, batch[:, 2:-1], state)
    nll = model.loss(features[:, -1:], batch[:, -1:], reduction="none").sum()
    for k in range(len(states)):
        for layer in range(3):
            grad = torch.autograd.grad(nll, states[k][layer], retain_graph=True)[0]  # (parts, rows, hidden)
            d = len(states) - 1 - k
            assert torch.allclose(norms["h"][:, layer, d], grad[0].norm(dim=1), rtol=1e-4, atol=1e-8)
            assert torch.allclose(norms["c"][:, layer, d], grad[1].norm(dim=1), rtol=1e-4, atol=1e-8)


def linear_regime(cell: str, radius: float) -> RNNLM:
    """A tanh or ReLU RNN whose state stays at 0 (zero inputs and biases), so each step is the linear map
    W_hh, here ``radius`` times an orthogonal matrix: every step back multiplies the gradient by ``radius``."""
    model = lm(cell, size=8)
    with torch.no_grad():
        model.embedding.weight.zero_()
        w_ih, w_hh, b_ih, b_hh = model.stack.layers[0].weights(0)
        b_ih.zero_()
        b_hh.zero_()
        w_hh.copy_(radius * torch.linalg.qr(torch.randn(8, 8))[0])
    return model


def test_small_recurrent_weights_make_the_gradient_vanish_and_large_ones_make_it_grow():
    batch = torch.randint(0, 11, (4, 31))
    small = flow.profile(linear_regime("rnn_tanh", 0.5), batch, 0, 1000.0)
    assert small["rate_per_step"] == pytest.approx(0.5, rel=1e-3)
    assert small["decay_distance"] == math.ceil(math.log(1000) / math.log(2))  # 0.5^10 < 1e-3 < 0.5^9
    large = flow.profile(linear_regime("rnn_tanh", 1.5), batch, 0, 1000.0)
    assert large["rate_per_step"] == pytest.approx(1.5, rel=1e-3)
    assert large["decay_distance"] is None and large["growth"] == pytest.approx(1.5 ** 29, rel=1e-2)


def test_a_linear_rnn_passes_the_gradient_back_through_powers_of_w_hh():
    """A ReLU RNN with positive weights, inputs and states is linear: ∂J/∂h(k) = (W_hh^T)^(T-k) ∂J/∂h(T)."""
    model = lm("rnn_relu", size=5)
    with torch.no_grad():
        for w in model.stack.layers[0].weights(0):
            w.uniform_(0.01, 0.2)
        model.embedding.weight.uniform_(0.1, 1.0)
    batch = torch.randint(0, 11, (2, 8))
    norms = flow.measure(model, batch, 0)["h"][:, 0]
    _, states = flow.unroll(model, batch[:, :-1])
    top = states[-1][0][0]
    assert (top > 0).all()
    w_hh = model.stack.layers[0].weights(0)[1].detach()
    probs = torch.softmax(model.decoder(top.detach()), dim=1)
    probs[torch.arange(2), batch[:, -1]] -= 1
    g = probs @ model.decoder.weight.detach()
    for d in range(7):
        assert torch.allclose(norms[:, d], (g @ torch.linalg.matrix_power(w_hh, d)).norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("cell,connection", [("lstm", "residual"), ("gru", "highway"), ("rnn_tanh", "dense")])
def test_the_unrolled_stack_equals_the_fused_forward(cell, connection):
    model = lm(cell, layers=3, connection=connection)
    ids = torch.randint(0, 11, (2, 7))
    state = torch.randn_like(model.init_state(2)) * 0.5
    expected, _ = model(ids, state)
    got, states = flow.unroll(model, ids, state)
    assert torch.allclose(got, expected, atol=1e-5)
    assert len(states) == 7 and len(states[0]) == 3


def test_decay_distance_and_rate():
    assert flow.decay_distance([1.0, 0.1, 0.01, 0.001], 1000.0) == 3
    assert flow.decay_distance([1.0, 2.0], 1000.0) is None
    assert flow.rate_per_step([1.0, 0.5, 0.25, 0.125]) == pytest.approx(0.5)
    assert flow.bound_distance(0.5, 1000.0) == pytest.approx(math.log(1000) / math.log(2))
    assert flow.bound_distance(1.2, 1000.0) is None


def test_gradients_command_at_initialisation_and_for_a_checkpoint(word_corpus, word_run, tmp_path, capsys, one_thread):
    from neurallm.cli import main

    out = tmp_path / "g"
    assert main(["diagnose", "gradients", "--cell", "lstm", "--layers", "2", "--hidden", "8", "--data", str(word_corpus),
                 "--length", "12", "--rows", "3", "--warmup", "4", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result["models"]) == ["initial"] and len(result["models"]["initial"]["layers"]) == 2
    assert len(result["models"]["initial"]["curve"]) == 12
    assert set(result["models"]["initial"]["recurrent"][0]) == {"input", "forget", "cell", "output"}
    assert (out / "gradients.png").stat().st_size > 0
    assert json.loads((out / "gradients.json").read_text())["cell"] == "lstm"
    assert main(["diagnose", "gradients", str(word_run), "--data", str(word_corpus), "--length", "10", "--rows", "2",
                 "--warmup", "2", "--out", str(tmp_path / "g2")]) == 0
    text = capsys.readouterr().out
    assert "trained" in text and "initial" in text and "σ_max" in text


def test_depth_command(word_corpus, tmp_path, capsys, one_thread):
    from neurallm.cli import main

    assert main(["diagnose", "depth", "--layers", "2,3", "--connections", "none,residual", "--hidden", "8",
                 "--data", str(word_corpus), "--length", "6", "--rows", "2", "--warmup", "2", "--steps", "2",
                 "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["stacks"]) == {"2-none", "2-residual", "3-none", "3-residual"}
    stacks = result["stacks"]
    assert len(stacks["3-none"]["through_depth"]) == 3 and stacks["3-none"]["through_depth"][-1] == 1.0
    # The residual sum carries the top's gradient down whole (and more); without it, a share is lost per layer.
    assert stacks["3-residual"]["through_depth"][0] > 0.9 > stacks["3-none"]["through_depth"][0]
    assert (tmp_path / "depth.png").is_file()


def test_bad_input(word_corpus, tmp_path, capsys):
    from conftest import fails

    fails(["diagnose", "gradients", "--cell", "transformer", "--out", str(tmp_path)], capsys, "unknown cell 'transformer'")
    fails(["diagnose", "depth", "--layers", "4,2", "--out", str(tmp_path)], capsys, "--layers: '4,2'")
    fails(["diagnose", "depth", "--connections", "skip", "--data", str(word_corpus), "--out", str(tmp_path)],
          capsys, "--connections: 'skip'")
    fails(["diagnose", "gradients", "--cell", "rnn", "--data", str(word_corpus), "--length", "100000",
           "--out", str(tmp_path)], capsys, "a window needs")
