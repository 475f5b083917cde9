"""Stacks: every connection type, both directions, forward and backward, fused and reference."""

import pytest
import torch

from neurallm.models.stack import RecurrentStack, keep_mask


@pytest.mark.parametrize("connection", ["none", "residual", "highway", "dense"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_stack_runs_forward_and_backward(cell, bidirectional, connection):
    torch.manual_seed(0)
    stack = RecurrentStack(cell, 6, 8, 3, bidirectional=bidirectional, connection=connection,
                           dropout_hidden=0.1, weight_drop=0.2)
    x = torch.randn(2, 5, 6, requires_grad=True)
    out, state = stack(x)
    dirs = 2 if bidirectional else 1
    assert out.shape == (2, 5, 8 * dirs)
    assert state.shape == (3, 2 if cell == "lstm" else 1, dirs, 2, 8)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in stack.parameters())


@pytest.mark.parametrize("connection", ["none", "residual", "highway", "dense"])
def test_stack_reference_path_matches_fused(connection):
    torch.manual_seed(0)
    stack = RecurrentStack("lstm", 8, 8, 3, bidirectional=True, connection=connection).double().eval()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    fused, fused_state = stack(x)
    ref, ref_state = stack(x, reference=True)
    torch.testing.assert_close(ref, fused, atol=1e-8, rtol=0)
    torch.testing.assert_close(ref_state, fused_state, atol=1e-8, rtol=0)


def test_connections_change_the_function():
    """Same layer weights, different wiring, different outputs: the connection is really applied."""
    torch.manual_seed(0)
    plain = RecurrentStack("gru", 8, 8, 2, connection="none").eval()
    residual = RecurrentStack("gru", 8, 8, 2, connection="residual").eval()
    residual.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 8)
    out_plain, _ = plain(x)
    out_residual, _ = residual(x)
    layer0, _ = plain.layers[0](x, plain.init_state(1)[0])
    # Layer 0's input is the stack input (same size), so residual adds it; layer 1 adds its input too.
    assert not torch.allclose(out_plain, out_residual)
    layer1_in = layer0 + x
    layer1_out, _ = plain.layers[1](layer1_in, plain.init_state(1)[1])
    torch.testing.assert_close(out_residual, layer1_out + layer1_in)


def test_dense_layers_read_everything_below():
    stack = RecurrentStack("lstm", 5, 4, 3, connection="dense")
    assert [layer.rnn.input_size for layer in stack.layers] == [5, 9, 13]


def test_weight_drop_only_in_training():
    torch.manual_seed(0)
    stack = RecurrentStack("lstm", 4, 4, 1, weight_drop=0.5)
    x = torch.randn(1, 6, 4)
    stack.eval()
    a, _ = stack(x)
    b, _ = stack(x)
    torch.testing.assert_close(a, b)
    stack.train()
    c, _ = stack(x)
    assert not torch.allclose(a, c)
    weight = stack.layers[0].rnn.weight_hh_l0
    assert weight.abs().min() > 0  # the stored weights are never zeroed


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.65])
def test_keep_mask_drops_at_rate_p_and_keeps_the_mean(p):
    torch.manual_seed(1)
    mask = keep_mask((400, 500), p, torch.empty(0))
    scale = mask.max().item()
    assert set(mask.unique().tolist()) == {0.0, scale} and abs(scale - 1 / (1 - p)) < 1e-4
    n = mask.numel()
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # within five standard deviations
    assert abs(mask.mean().item() - 1) < 5 * scale * (p * (1 - p) / n) ** 0.5
    torch.manual_seed(1)
    assert torch.equal(keep_mask((400, 500), p, torch.empty(0)), mask)  # the seed decides it
    odd = keep_mask((3, 7, 5), p, torch.empty(0, dtype=torch.float64))  # sizes not a multiple of 4
    assert odd.shape == (3, 7, 5) and odd.dtype == torch.float64
    state = torch.get_rng_state()
    first = keep_mask((50, 60), p, torch.empty(0))
    assert not torch.equal(keep_mask((50, 60), p, torch.empty(0)), first)  # a fresh mask each call
    torch.set_rng_state(state)
    assert torch.equal(keep_mask((50, 60), p, torch.empty(0)), first)  # the saved generator state replays it


@pytest.mark.parametrize("p", [3e-6, 1e-3, 0.999995])
def test_keep_mask_rates_the_bits_cannot_express(p):
    """Below about 0.01 and within 2^-16 of 1, 16 bits cannot hold p to 0.1%: bernoulli_ draws instead."""
    torch.manual_seed(2)
    n = 2_000_000
    mask = keep_mask((n,), p, torch.empty(0))
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1 / n
    kept = mask[mask > 0]
    assert kept.numel() == 0 or abs(kept[0].item() - 1 / (1 - p)) < 1e-3 / (1 - p)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_padded_rows_read_as_if_alone(cell):
    """A batch of right-padded sentences: each row's outputs equal those of the row run alone, in
    both directions (the backward one starts at the row's own end), and gradients reach every
    real position, none the padding."""
    torch.manual_seed(0)
    stack = RecurrentStack(cell, 5, 4, 2, bidirectional=True, connection="residual")
    x = torch.randn(3, 6, 5, requires_grad=True)
    lengths = torch.tensor([6, 2, 4])
    out, _ = stack(x, lengths=lengths)
    for row, n in enumerate(lengths.tolist()):
        alone, _ = stack(x[row:row + 1, :n])
        assert torch.allclose(out[row, :n], alone[0], atol=1e-6)
    mask = torch.arange(6) < lengths.unsqueeze(1)
    (out * mask.unsqueeze(2)).sum().backward()
    assert (x.grad.abs().sum(2) > 0).equal(mask)
    # The packed path (taken on CUDA) reads the same rows the same way.
    layer = stack.layers[0]
    fused, _ = layer(x, stack.init_state(3)[0], lengths=lengths)
    packed, _ = layer._packed(x, stack.init_state(3)[0], lengths, 0.0)
    assert torch.allclose((fused * mask.unsqueeze(2)), packed, atol=1e-6)
