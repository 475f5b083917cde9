"""Modules that hold weights quantized: int8, group-wise int4 and bf16 linear layers, an
embedding table, and a recurrent layer built from them. ``quantize.py`` decides which part of
a model gets which; these only store and compute.

Kernels: int8 runs fbgemm's dynamic linear (0.3 ms for a 33k x 200 output layer at batch 1
here, against 1.4 ms fp32); int4 runs torch's int4-packed CPU matmul with bf16 activations
(0.8 ms; its fp32-activation path is 13x slower), the weights padded to its tile sizes. bf16
weights compute in bf16 only where the CPU has bf16 instructions; elsewhere (this 2-core
machine: a bf16 matrix-vector product is 5x slower than fp32) they are widened once at load,
so bf16 saves disk, not time.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from neurallm import runtime
from neurallm.models import cells


def _fbgemm():
    """fbgemm's int8 kernels: this build's default engine (onednn) takes 10x longer for one row."""
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized (buffers, so state_dict holds them as stored)."""

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 64):
        """The layer holding ``weight`` (out, in) fp32, quantized, and ``bias``."""
        m = cls(*weight.shape, bias=bias is not None, group_size=group_size)
        m.fill(weight)
        if bias is not None:
            m.bias.copy_(bias)
        return m


class Int8Linear(QuantLinear):
    """y = x W^T + b with W int8, one scale per output row; fbgemm's dynamic kernel."""

    def __init__(self, out_features: int, in_features: int, bias: bool = True, group_size: int = 0):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None

    def fill(self, weight: torch.Tensor) -> None:
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        self.qweight.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127))
        self.scale.copy_(scale)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        if self._packed is None:
            _fbgemm()
            zeros = torch.zeros(self.qweight.size(0), dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated, the packed kernels are not
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(q, self.bias)
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._packed, True)
        return y.view(*shape[:-1], -1)


def _int4(weight: torch.Tensor, group: int):
    """Group-wise asymmetric int4: -> (codes 0..15 as uint8 (rows, cols), scale, low (rows, cols / group))."""
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.view(rows, cols), scale, low


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)  # (rows, cols / 2): two codes a byte


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).view(packed.size(0), -1)


class Int4Weights(nn.Module):
    """Group-wise int4 weights (rows, cols): two codes a byte, and a scale and offset per group.
    ``cols`` is padded with zeros to a multiple of the group size (weight = code * scale + low)."""

    def __init__(self, rows: int, cols: int, group: int):
        super().__init__()
        self.rows, self.cols, self.group = rows, cols, group
        padded = math.ceil(cols / group) * group
        self.register_buffer("packed", torch.zeros(rows, padded // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, padded // group))
        self.register_buffer("low", torch.zeros(rows, padded // group))

    def fill(self, weight: torch.Tensor) -> Int4Weights:
        padded = F.pad(weight.float(), (0, self.packed.size(1) * 2 - self.cols))
        codes, scale, low = _int4(padded, self.group)
        self.packed.copy_(_pack_nibbles(codes))
        self.scale.copy_(scale)
        self.low.copy_(low)
        return self

    def codes(self, rows=None) -> torch.Tensor:
        packed = self.packed if rows is None else self.packed[rows]
        return _unpack_nibbles(packed)

    def dequantize(self, rows=None) -> torch.Tensor:
        """-> float32 (n, cols) of all rows, or of ``rows`` (an index tensor)."""
        codes = self.codes(rows).float()
        scale = self.scale if rows is None else self.scale[rows]
        low = self.low if rows is None else self.low[rows]
        w = codes.view(codes.size(0), -1, self.group) * scale[..., None] + low[..., None]
        return w.view(codes.size(0), -1)[:, :self.cols]


class Int4Linear(QuantLinear):
    """Weight-only int4 linear: torch's int4-packed CPU kernel, bf16 activations; the output rows
    padded to a multiple of 16 and the inputs to the group size, as the kernel needs."""

    def __init__(self, out_features: int, in_features: int, bias: bool = True, group_size: int = 64):
        super().__init__()
        self.weights = Int4Weights(out_features, in_features, group_size)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel = None

    def fill(self, weight: torch.Tensor) -> None:
        self.weights.fill(weight)

    def dequantized(self) -> torch.Tensor:
        return self.weights.dequantize()

    def _prepare(self):
        w = self.weights
        rows = math.ceil(w.rows / 16) * 16
        codes = F.pad(w.codes().to(torch.int32), (0, 0, 0, rows - w.rows))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        # the kernel's weight is (code - 8) * scale + zero, so zero = low + 8 * scale; (groups, rows, 2)
        scale, low = F.pad(w.scale, (0, 0, 0, rows - w.rows)), F.pad(w.low, (0, 0, 0, rows - w.rows))
        scales_zeros = torch.stack((scale.t(), (low + 8 * scale).t()), -1).contiguous().bfloat16()
        return packed, scales_zeros, w.packed.size(1) * 2

    def forward(self, x):
        if self._kernel is None:
            self._kernel = self._prepare()
        packed, scales_zeros, cols = self._kernel
        shape = x.shape
        flat = F.pad(x.reshape(-1, shape[-1]), (0, cols - shape[-1])).bfloat16()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.weights.group, scales_zeros)
        y = y[:, :self.weights.rows].float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1)


class Bf16Linear(QuantLinear):
    def __init__(self, out_features: int, in_features: int, bias: bool = True, group_size: int = 0):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16) if bias else None)
        self._wide = None

    def fill(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x):
        if runtime.cpu_bf16_kernels() or x.device.type != "cpu":
            return F.linear(x.to(torch.bfloat16), self.weight, self.bias).float()
        if self._wide is None:  # no bf16 instructions: widen once (the values stay bf16's)
            self._wide = (self.weight.float().t().contiguous(), None if self.bias is None else self.bias.float())
        weight_t, bias = self._wide
        y = x.float() @ weight_t
        return y if bias is None else y + bias


LINEAR = {"int8": Int8Linear, "int4": Int4Linear, "bf16": Bf16Linear}


class QuantEmbedding(nn.Module):
    """An embedding table in int8 (a scale per row), int4 (group-wise) or bf16; rows are
    widened to float32 as they are looked up."""

    def __init__(self, num: int, dim: int, precision: str, group_size: int):
        super().__init__()
        self.precision = precision
        if precision == "int4":
            self.table = Int4Weights(num, dim, group_size)
        elif precision == "int8":
            self.table = Int8Linear(num, dim, bias=False)
        else:
            self.register_buffer("weight", torch.zeros(num, dim, dtype=torch.bfloat16))

    def fill(self, weight: torch.Tensor) -> QuantEmbedding:
        if self.precision in ("int4", "int8"):
            self.table.fill(weight)
        else:
            self.weight.copy_(weight)
        return self

    def dequantized(self) -> torch.Tensor:
        if self.precision == "int4":
            return self.table.dequantize()
        return self.table.dequantized() if self.precision == "int8" else self.weight.float()

    def forward(self, ids):
        flat = ids.reshape(-1)
        if self.precision == "int4":
            rows = self.table.dequantize(flat)
        elif self.precision == "int8":
            rows = self.table.qweight[flat].float() * self.table.scale[flat, None]
        else:
            rows = self.weight[flat].float()
        return rows.view(*ids.shape, -1)


class QuantLayer(nn.Module):
    """A recurrent layer with quantized matrices: the input projection for all time steps in one
    call, then the written-out cell (cells.update) with the state's projection per step."""

    def __init__(self, layer, precision: str, group_size: int):
        super().__init__()
        self.cell, self.directions = layer.cell, layer.directions
        make = LINEAR[precision]
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        for d in range(layer.directions):
            w_ih, w_hh, b_ih, b_hh = (w.detach() for w in layer.weights(d))
            self.ih.append(make.of(w_ih, b_ih, group_size))
            self.hh.append(make.of(w_hh, b_hh, group_size))

    def forward(self, x, state, reference: bool = False, weight_drop: float = 0.0):
        """x (batch, time, input), state (parts, dirs, batch, hidden) -> (batch, time, dirs * hidden), state."""
        outs, finals = [], []
        for d in range(self.directions):
            gx = self.ih[d](x)  # (batch, time, gates * hidden)
            s = state[:, d]
            steps = range(x.size(1) - 1, -1, -1) if d else range(x.size(1))
            out = [None] * x.size(1)
            for t in steps:
                s = cells.update(self.cell, gx[:, t], self.hh[d](s[0]), s)
                out[t] = s[0]
            outs.append(torch.stack(out, 1))
            finals.append(s)
        return torch.cat(outs, 2), torch.stack(finals, 1)
