"""The recurrent language model: embedding -> stack -> dropout -> decoder.

The decoder is a full softmax (optionally tied to the embedding, Press & Wolf 2017;
Inan et al. 2017) or an adaptive softmax (Grave et al. 2017), which on a 33k-word
vocabulary skips most of the output layer's work for the rare words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from neurallm.config import ModelConfig
from neurallm.errors import NlmError
from neurallm.models.stack import RecurrentStack, dropout, keep_mask


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits ``x @ weight.T + bias`` against ``targets``.

    The same value and gradients as ``F.cross_entropy(F.linear(x, weight, bias), targets)``,
    with the backward written out: the logits' gradient is the softmax minus the one-hot
    target, made in place in the softmax the forward kept. Autograd's path instead fills an
    N x V zero gradient, scatters into it and runs a log-softmax backward over two N x V
    tensors. On PTB (700 x 10k logits a step) this saves about 5 ms of a ~85 ms training step here.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets):
        logits = torch.addmm(bias, x, weight.t())
        probs = torch.softmax(logits, dim=1)
        nll = probs.gather(1, targets.unsqueeze(1)).squeeze(1).log_().neg_()
        far = (nll > 60).nonzero().squeeze(1)  # p < 1e-26: near float32's floor, take these rows exactly
        if far.numel():
            nll[far] = torch.logsumexp(logits[far], 1) - logits[far, targets[far]]
        ctx.save_for_backward(x, weight, probs, targets)
        ctx.spent = False
        return nll.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.spent:  # the softmax buffer became the gradient the first time
            raise RuntimeError("LinearCrossEntropy supports one backward pass (no retain_graph)")
        ctx.spent = True
        x, weight, grad, targets = ctx.saved_tensors
        grad[torch.arange(grad.size(0), device=grad.device), targets] -= 1  # softmax - one-hot, in place
        scale = grad_loss / x.size(0)  # goes on the small operands, not on the N x V gradient
        grad_x = (grad @ weight).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ (x * scale) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0).mul_(scale) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _full_precision(x: torch.Tensor):
    """No autocast: torch's adaptive softmax writes each cluster's bf16 log-probabilities into
    an fp32 result and fails ("index_copy_(): self and source expected to have the same dtype")."""
    return torch.autocast(x.device.type, enabled=False)


class RNNLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.bidirectional:
            raise NlmError("model.bidirectional: a language model cannot be bidirectional "
                           "(a model that sees the next word gives a meaningless perplexity)")
        if cfg.vocab_size < 2:
            raise NlmError(f"model.vocab_size: {cfg.vocab_size} (expected at least 2)")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        self.stack = RecurrentStack(cfg.cell, cfg.emb_size, cfg.hidden_size, cfg.num_layers,
                                    connection=cfg.connection, dropout_hidden=cfg.dropout_hidden,
                                    locked_dropout=cfg.locked_dropout, weight_drop=cfg.weight_drop)
        width = self.stack.output_size
        # A tied decoder reads vectors of the embedding's size; project when the last layer differs.
        self.proj = nn.Linear(width, cfg.emb_size) if cfg.tie_weights and width != cfg.emb_size else None
        features = cfg.emb_size if self.proj is not None else width
        if cfg.softmax == "adaptive":
            cutoffs = [c for c in cfg.adaptive_cutoffs if c < cfg.vocab_size]
            if not cutoffs:
                raise NlmError(f"model.adaptive_cutoffs: {list(cfg.adaptive_cutoffs)} leave no cluster below the "
                               f"vocabulary size {cfg.vocab_size}; give a smaller cutoff or use model.softmax=full")
            if features // cfg.adaptive_div_value ** len(cutoffs) < 1:
                raise NlmError(f"model.adaptive_div_value: {cfg.adaptive_div_value} ** {len(cutoffs)} clusters "
                               f"leaves the last cluster no dimensions of {features}")
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(features, cfg.vocab_size, cutoffs,
                                                         div_value=cfg.adaptive_div_value)
        else:
            self.decoder = nn.Linear(features, cfg.vocab_size)
            nn.init.zeros_(self.decoder.bias)
            if cfg.tie_weights:
                self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        return self.stack.init_state(batch, device=device or self.embedding.weight.device)

    def embed(self, ids):
        if not isinstance(self.embedding, nn.Embedding):  # a quantized table (quantize.py): no dropout
            return self.embedding(ids)
        weight = self.embedding.weight
        p = self.cfg.dropout_emb
        if self.training and p:
            # Embedding dropout: drop whole word types for this batch (Gal & Ghahramani 2016).
            weight = weight * keep_mask((weight.size(0), 1), p, weight)
        return F.embedding(ids, weight)

    def forward(self, ids, state=None, reference: bool = False):
        """ids (batch, time) -> features (batch, time, features), state."""
        x = dropout(self.embed(ids), self.cfg.dropout_input, self.training, self.cfg.locked_dropout)
        out, state = self.stack(x, state, reference=reference)
        out = dropout(out, self.cfg.dropout, self.training, self.cfg.locked_dropout)
        if self.proj is not None:
            out = self.proj(out)
        return out, state

    def loss(self, features, targets, reduction: str = "mean"):
        """Cross-entropy in nats. features (batch, time, F), targets (batch, time)."""
        flat, flat_targets = features.reshape(-1, features.size(-1)), targets.reshape(-1)
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            with _full_precision(flat):
                nll = -self.decoder(flat.float(), flat_targets).output
            return nll.mean() if reduction == "mean" else nll.view_as(targets)
        if reduction == "mean" and torch.is_grad_enabled() and flat.dtype == self.decoder.weight.dtype == \
                torch.float32 and not torch.is_autocast_enabled(flat.device.type):
            return LinearCrossEntropy.apply(flat, self.decoder.weight, self.decoder.bias, flat_targets)
        logits = self.decoder(flat).float()
        nll = F.cross_entropy(logits, flat_targets, reduction=reduction)
        return nll if reduction == "mean" else nll.view_as(targets)

    def log_probs(self, features):
        """features (..., F) -> log-probabilities over the vocabulary (..., V)."""
        flat = features.reshape(-1, features.size(-1))
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            with _full_precision(flat):
                out = self.decoder.log_prob(flat.float())
        else:
            out = F.log_softmax(self.decoder(flat).float(), dim=-1)
        return out.view(*features.shape[:-1], -1)
