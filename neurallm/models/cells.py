"""Recurrent cells written out from their equations.

Weights use torch's layout, so the same tensors drive these cells and the fused
``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` kernels (tests check both give equal outputs and
gradients). The fused kernels are the fast path; these equations serve the tests, single
decoding steps on the CPU (where a fused call's set-up costs more than the step) and
anything that must look inside one step.

Shapes: x (batch, input), h and c (batch, hidden); ``w_ih`` (gates * hidden, input),
``w_hh`` (gates * hidden, hidden), biases (gates * hidden,).
"""

from __future__ import annotations

import torch

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def rnn_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity=torch.tanh):
    """Elman RNN: h' = f(W_ih x + b_ih + W_hh h + b_hh)."""
    return nonlinearity(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """LSTM (Hochreiter & Schmidhuber 1997, with a forget gate, Gers et al. 2000).

    i = σ(·), f = σ(·), g = tanh(·), o = σ(·)   (torch's gate order)
    c' = f ⊙ c + i ⊙ g                          the additive cell path that lets gradients flow
    h' = o ⊙ tanh(c')
    """
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (batch, 4 * hidden)
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_step(x, h, w_ih, w_hh, b_ih, b_hh):
    """GRU (Cho et al. 2014), torch's variant with the reset gate applied after W_hn.

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 - z) ⊙ n + z ⊙ h
    """
    xr, xz, xn = (x @ w_ih.T + b_ih).chunk(3, dim=1)
    hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def step(cell: str, x, state, weights):
    """One time step. ``state`` is (parts, batch, hidden): parts 2 (h, c) for LSTM, else 1."""
    if cell == "lstm":
        h, c = lstm_step(x, state[0], state[1], *weights)
        return torch.stack((h, c))
    if cell == "gru":
        return gru_step(x, state[0], *weights).unsqueeze(0)
    nonlinearity = torch.tanh if cell == "rnn_tanh" else torch.relu
    return rnn_step(x, state[0], *weights, nonlinearity=nonlinearity).unsqueeze(0)


def run(cell: str, x, state, weights, reverse: bool = False):
    """Unroll over time. x (batch, time, input) -> outputs (batch, time, hidden), final state."""
    steps = range(x.size(1) - 1, -1, -1) if reverse else range(x.size(1))
    outputs = [None] * x.size(1)
    for t in steps:
        state = step(cell, x[:, t], state, weights)
        outputs[t] = state[0]
    return torch.stack(outputs, dim=1), state
