"""A stack of recurrent layers: directions, connections between layers, dropouts.

Each layer owns a one-layer fused torch module (``nn.LSTM`` etc.), so the fast cuDNN /
oneDNN kernels run per layer while connections, locked dropout and weight-drop act
between and around them. ``reference=True`` runs the same weights through the
written-out equations in ``cells.py`` instead.

The recurrent state of the whole stack is one tensor:
(layers, parts, directions, batch, hidden), parts = 2 (h, c) for LSTM, 1 otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from neurallm import runtime
from neurallm.models import cells

FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
# The kernels behind those modules, called with one direction's weights:
# (input, state, weights, has_biases, layers, dropout, train, bidirectional, batch_first).
FUNCTIONS = {"lstm": torch.lstm, "gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}


def flip(x, lengths):
    """Each row of (batch, time, features) reversed within its length; the padding stays where it is."""
    t = torch.arange(x.size(1), device=x.device).unsqueeze(0)  # (1, time)
    n = lengths.to(x.device).unsqueeze(1)  # (batch, 1)
    index = torch.where(t < n, n - 1 - t, t)  # (batch, time)
    return x.gather(1, index.unsqueeze(2).expand_as(x))


def keep_mask(shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """A dropout mask of ``shape``: 0 with probability ``p``, else 1 / (1 - p), in ``like``'s dtype.

    On the CPU each element takes 16 random bits, four elements to one 64-bit draw of the
    generator: ``bernoulli_`` (and ``F.dropout``) draw once per element and take about three
    times as long here, a few percent of a PTB training step. ``p`` is then rounded to 1/65536,
    and the scale uses that exact keep rate, so the mask's mean stays 1. Where that rounding
    would move ``p`` by more than 0.1% (p below about 0.01, or within 2^-16 of 1), and off the
    CPU, ``bernoulli_`` draws the mask.
    """
    dropped = round(p * 65536)
    if like.device.type != "cpu" or not 0 < dropped < 65536 or abs(dropped / 65536 - p) > 1e-3 * p:
        return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
    keep = bits.view(torch.int16)[:n].view(shape) >= dropped - 32768
    return keep.to(like.dtype).mul_(65536 / (65536 - dropped))


def drop(x, p: float):
    """Standard dropout (training mode): the CPU's faster masks; elsewhere torch's fused kernel."""
    return x * keep_mask(x.shape, p, x) if x.device.type == "cpu" else F.dropout(x, p, True)


def dropout(x, p: float, training: bool, locked: bool):
    """Standard dropout, or locked (variational): one mask per sequence, shared over time."""
    if not training or p == 0:
        return x
    if locked:
        return x * keep_mask((x.size(0), 1, x.size(2)), p, x)  # (batch, 1, features)
    return drop(x, p)


class Layer(nn.Module):
    """One recurrent layer, one or two directions."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, bidirectional: bool):
        super().__init__()
        self.cell = cell
        extra = {"nonlinearity": cell[4:]} if cell.startswith("rnn_") else {}
        self.rnn = FUSED[cell](input_size, hidden_size, 1, batch_first=True, bidirectional=bidirectional, **extra)
        self.directions = 2 if bidirectional else 1

    def weights(self, direction: int) -> list[torch.Tensor]:
        suffix = "_l0_reverse" if direction else "_l0"
        return [getattr(self.rnn, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def forward(self, x, state, reference: bool = False, weight_drop: float = 0.0, lengths=None):
        """x (batch, time, input), state (parts, dirs, batch, hidden) -> (batch, time, dirs * hidden), state.
        ``lengths`` (batch,): right-padded sentences, each read to its own end (the backward direction
        starts there); outputs past a row's length, and the final state of a row shorter than the
        batch, hold no meaning."""
        if lengths is not None:
            if reference:
                raise ValueError("the reference equations read whole rows (no lengths)")
            # cuDNN runs both directions of a packed batch in one call; on the CPU each direction alone is faster.
            run = self._padded if x.device.type == "cpu" else self._packed
            return run(x, state, lengths, weight_drop)
        if reference:
            return self._reference(x, state)
        if x.size(1) == 1 and not self.training and x.device.type == "cpu":
            # A single decoding step on the CPU: oneDNN's fused RNN has a set-up cost per call
            # that outweighs one step's two small matmuls, so the written-out cell is faster.
            return self._reference(x, state, self._step_weights)
        call = self._call(weight_drop)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not runtime.cpu_bf16_kernels():
            # oneDNN has no bf16 recurrent kernel on CPUs without bf16 instructions: the
            # recurrence runs in fp32 there, the layers around it in bf16.
            with torch.autocast("cpu", enabled=False):
                return self._fused(call, x.float(), state.float())
        return self._fused(call, x, state)

    def _call(self, weight_drop: float):
        if weight_drop and self.training:
            # DropConnect on the hidden-to-hidden weights, one mask per forward pass (Merity et al. 2017).
            dropped = {name: drop(w, weight_drop) for name, w in self.rnn.named_parameters()
                       if name.startswith("weight_hh")}
            return lambda *args: functional_call(self.rnn, dropped, args)
        return self.rnn

    def _packed(self, x, state, lengths, weight_drop):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self._fused(self._call(weight_drop), packed, state)  # the state's rows keep x's order
        return pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0], final

    def _padded(self, x, state, lengths, weight_drop):
        """Each direction alone through the fused kernel: the forward one reads the rows as they are
        (their padding comes after every real word), the backward one each row reversed within its
        length. PyTorch's packed sequences would give the same outputs, but run a loop of small
        per-step operations on the CPU, about twice as slow for a tagger's batch."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not runtime.cpu_bf16_kernels():
            with torch.autocast("cpu", enabled=False):  # no bf16 recurrent kernel here (see forward)
                return self._padded(x.float(), state.float(), lengths, weight_drop)
        run = FUNCTIONS[self.cell]
        outs, finals = [], []
        for d in range(self.directions):
            weights = self.weights(d)
            if weight_drop and self.training:  # DropConnect, as in forward
                weights = [weights[0], drop(weights[1], weight_drop), *weights[2:]]
            inp = x if d == 0 else flip(x, lengths)
            hx = state[:, d].unsqueeze(1)  # (parts, 1 layer, batch, hidden)
            hx = (hx[0].contiguous(), hx[1].contiguous()) if self.cell == "lstm" else hx[0].contiguous()
            result = run(inp, hx, weights, True, 1, 0.0, self.training, False, True)
            out = result[0]
            outs.append(out if d == 0 else flip(out, lengths))
            finals.append(torch.stack(result[1:]).squeeze(1))  # (parts, batch, hidden)
        return torch.cat(outs, dim=2), torch.stack(finals, dim=1)

    def _fused(self, call, x, state):
        if self.cell == "lstm":
            out, (h, c) = call(x, (state[0].contiguous(), state[1].contiguous()))
            return out, torch.stack((h, c))
        out, h = call(x, state[0].contiguous())
        return out, h.unsqueeze(0)

    def _step_weights(self, direction: int) -> list[torch.Tensor]:
        """The weights for single decoding steps: the same values, each matrix stored transposed.
        ``x @ w.T`` with ``w.T`` contiguous runs a matrix-vector kernel about 3x faster for one row
        than with torch's (gates, input) layout. Cached until the weights change (``_version``
        counts in-place updates, such as an optimizer's)."""
        weights = self.weights(direction)
        key = [(w.data_ptr(), w._version) for w in weights]
        cache = self.__dict__.setdefault("_step_cache", {})
        if cache.get(direction, (None,))[0] != key:
            with torch.no_grad():
                prepared = [w.detach().t().contiguous().t() if w.dim() == 2 else w.detach() for w in weights]
            cache[direction] = (key, prepared)
        return cache[direction][1]

    def _reference(self, x, state, weights=None):
        weights = weights or self.weights
        outs, finals = [], []
        for d in range(self.directions):
            out, final = cells.run(self.cell, x, state[:, d], weights(d), reverse=bool(d))
            outs.append(out)
            finals.append(final)
        return torch.cat(outs, dim=2), torch.stack(finals, dim=1)


class Highway(nn.Module):
    """y = g ⊙ f(x) + (1 - g) ⊙ x with g = σ(W x + b) (Srivastava et al. 2015)."""

    def __init__(self, size: int):
        super().__init__()
        self.gate = nn.Linear(size, size)
        nn.init.constant_(self.gate.bias, -1.0)  # start by carrying the input through

    def forward(self, layer_out, layer_in):
        g = torch.sigmoid(self.gate(layer_in))
        return g * layer_out + (1 - g) * layer_in


class RecurrentStack(nn.Module):
    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int,
                 bidirectional: bool = False, connection: str = "none", dropout_hidden: float = 0.0,
                 locked_dropout: bool = False, weight_drop: float = 0.0):
        super().__init__()
        self.cell, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        self.directions = 2 if bidirectional else 1
        self.parts = 2 if cell == "lstm" else 1
        self.connection = connection
        self.dropout_hidden, self.locked, self.weight_drop = dropout_hidden, locked_dropout, weight_drop
        width = hidden_size * self.directions
        # Dense: layer i reads the input and all i layers below it; otherwise the layer just below.
        sizes = [input_size + width * i if connection == "dense" else (input_size if i == 0 else width)
                 for i in range(num_layers)]
        self.layers = nn.ModuleList(Layer(cell, sizes[i], hidden_size, bidirectional) for i in range(num_layers))
        # Residual and highway connections join a layer's input and output where their sizes agree.
        self.joins = [sizes[i] == width and connection in ("residual", "highway") for i in range(num_layers)]
        if connection == "highway":
            self.highways = nn.ModuleList(Highway(width) if j else nn.Identity() for j in self.joins)
        self.output_size = width

    def init_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(self.num_layers, self.parts, self.directions, batch, self.hidden_size,
                           device=device, dtype=dtype)

    def layer_input(self, below: list[torch.Tensor]) -> torch.Tensor:
        """What the next layer reads, from the stack's input and the outputs of the layers so far."""
        return torch.cat(below, dim=-1) if self.connection == "dense" else below[-1]

    def join(self, i: int, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Layer i's output joined with its input by the residual or highway connection (where sizes agree)."""
        if not self.joins[i]:
            return out
        return out + inp if self.connection == "residual" else self.highways[i](out, inp)

    def forward(self, x, state=None, reference: bool = False, lengths=None):
        """x (batch, time, input) -> (batch, time, dirs * hidden), state (layers, parts, dirs, batch, hidden).
        ``lengths`` (batch,): rows padded past their length (sentences), read to their own ends."""
        if state is None:
            state = self.init_state(x.size(0), x.device, x.dtype)
        finals, below = [], [x]
        for i, layer in enumerate(self.layers):
            inp = self.layer_input(below)
            padded = {} if lengths is None else {"lengths": lengths}  # (a quantized layer reads whole rows only)
            out, final = layer(inp, state[i], reference=reference, weight_drop=self.weight_drop, **padded)
            out = self.join(i, out, inp)
            if i < self.num_layers - 1:
                out = dropout(out, self.dropout_hidden, self.training, self.locked)
            finals.append(final)
            below.append(out)
        return below[-1], torch.stack(finals)
