"""The written-out cell equations match torch's fused kernels, in values and gradients."""

import pytest
import torch

from neurallm.models.stack import Layer

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_reference_equations_match_fused_kernel(cell, bidirectional):
    torch.manual_seed(0)
    layer = Layer(cell, 5, 7, bidirectional).double()
    parts = 2 if cell == "lstm" else 1
    dirs = 2 if bidirectional else 1
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    state = torch.randn(parts, dirs, 3, 7, dtype=torch.float64, requires_grad=True)

    results = []
    for reference in (False, True):
        layer.zero_grad()
        x.grad = state.grad = None
        out, final = layer(x, state, reference=reference)
        # A loss that weighs every output and final-state element differently.
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + (final ** 2).sum()
        loss.backward()
        grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone(), state.grad.clone()]
        results.append((out.detach(), final.detach(), grads))

    (out_f, fin_f, grads_f), (out_r, fin_r, grads_r) = results
    assert out_f.shape == (3, 6, 7 * dirs)
    torch.testing.assert_close(out_r, out_f, atol=1e-8, rtol=0)
    torch.testing.assert_close(fin_r, fin_f, atol=1e-8, rtol=0)
    for g_r, g_f in zip(grads_r, grads_f):
        assert g_f.abs().sum() > 0  # the gradient reached every tensor
        torch.testing.assert_close(g_r, g_f, atol=1e-8, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_reference_matches_in_float32(cell):
    torch.manual_seed(1)
    layer = Layer(cell, 4, 8, False)
    x = torch.randn(2, 10, 4)
    state = torch.zeros(2 if cell == "lstm" else 1, 1, 2, 8)
    fused, _ = layer(x, state)
    ref, _ = layer(x, state, reference=True)
    torch.testing.assert_close(ref, fused, atol=1e-5, rtol=0)
