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


def rnn_update(gx, gh, nonlinearity=torch.tanh):
    """Elman RNN: h' = f(W_ih x + b_ih + W_hh h + b_hh), from the two projections."""
    return nonlinearity(gx + gh)


def lstm_update(gx, gh, c):
    """LSTM (Hochreiter & Schmidhuber 1997, with a forget gate, Gers et al. 2000), from
    gx = W_ih x + b_ih and gh = W_hh h + b_hh, each (batch, 4 * hidden):

    i = σ(·), f = σ(·), g = tanh(·), o = σ(·)   (torch's gate order)
    c' = f ⊙ c + i ⊙ g                          the additive cell path that lets gradients flow
    h' = o ⊙ tanh(c')
    """
    return lstm_state(lstm_gates(gx, gh), c)


def lstm_gates(gx, gh):
    """The LSTM's gates (i, f, g, o), each (batch, hidden): apart so that probes can read them."""
    i, f, g, o = (gx + gh).chunk(4, dim=1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)


def lstm_state(gates, c):
    """The LSTM's new (h, c) from its gates and the cell c."""
    i, f, g, o = gates
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_update(gx, gh, h):
    """GRU (Cho et al. 2014), torch's variant with the reset gate applied after W_hn.

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 - z) ⊙ n + z ⊙ h
    """
    return gru_state(gru_gates(gx, gh), h)


def gru_gates(gx, gh):
    """The GRU's reset and update gates and candidate (r, z, n), each (batch, hidden)."""
    xr, xz, xn = gx.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    return r, torch.sigmoid(xz + hz), torch.tanh(xn + r * hn)


def gru_state(gates, h):
    """The GRU's new h from its gates and the old h."""
    _, z, n = gates
    return (1 - z) * n + z * h


def update(cell: str, gx, gh, state):
    """One time step from the input's and the state's projections (gx, gh: (batch, gates * hidden)).
    ``state`` is (parts, batch, hidden): parts 2 (h, c) for LSTM, else 1."""
    if cell == "lstm":
        return torch.stack(lstm_update(gx, gh, state[1]))
    if cell == "gru":
        return gru_update(gx, gh, state[0]).unsqueeze(0)
    return rnn_update(gx, gh, torch.tanh if cell == "rnn_tanh" else torch.relu).unsqueeze(0)


def step(cell: str, x, state, weights):
    """One time step of a cell with torch's weights (w_ih, w_hh, b_ih, b_hh)."""
    w_ih, w_hh, b_ih, b_hh = weights
    return update(cell, x @ w_ih.T + b_ih, state[0] @ w_hh.T + b_hh, state)


def run(cell: str, x, state, weights, reverse: bool = False):
    """Unroll over time. x (batch, time, input) -> outputs (batch, time, hidden), final state."""
    steps = range(x.size(1) - 1, -1, -1) if reverse else range(x.size(1))
    outputs = [None] * x.size(1)
    for t in steps:
        state = step(cell, x[:, t], state, weights)
        outputs[t] = state[0]
    return torch.stack(outputs, dim=1), state
