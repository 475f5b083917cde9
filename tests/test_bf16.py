"""bfloat16 autocast, the default on CUDA, run on the CPU: training and scoring with a full and an
adaptive softmax, so the GPU is not the first place this path runs. (On a CPU without bf16
kernels the recurrence itself runs in fp32: see Layer.forward.)"""

import math

import pytest
import torch

from neurallm import checkpoint, config
from neurallm.config import ModelConfig
from neurallm.evaluate import token_nll
from neurallm.models.lm import RNNLM
from neurallm.train import train

from conftest import TINY

SOFTMAXES = [["--model.softmax=full"], ["--model.softmax=adaptive", "--model.adaptive_cutoffs=50,200"]]


@pytest.mark.parametrize("softmax", SOFTMAXES, ids=["full", "adaptive"])
def test_bf16_training_runs_and_learns(word_corpus, tmp_path, softmax):
    r = config.load_recipe("ptb-small", [f"--data.corpus={word_corpus}", *TINY, "--train.batch_size=16",
                                         "--train.bptt=20", "--train.max_steps=30", "--train.precision=bf16",
                                         "--model.tie_weights=false", *softmax])
    result = train(r, tmp_path / "run", show_progress=False)
    assert result["steps"] == 30 and math.isfinite(result["valid_loss"])
    losses = [rec["train_loss"] for rec in checkpoint.read_jsonl(tmp_path / "run" / "metrics.jsonl")
              if "train_loss" in rec]
    model, _, tok = checkpoint.load(tmp_path / "run")
    assert losses[0] > math.log(tok.vocab_size) - 0.5  # starts near a uniform guess ...
    assert losses[-1] < losses[0] - 1.0 and result["valid_loss"] < math.log(tok.vocab_size) - 1.0  # ... and learns
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_bf16_scores_stay_close_to_fp32(softmax):
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=300, emb_size=32, hidden_size=32, softmax=softmax,
                              adaptive_cutoffs=(50, 150))).eval()
    ids = torch.randint(0, 300, (200,))
    fp32 = token_nll(model, ids, batch_size=2, bptt=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = token_nll(model, ids, batch_size=2, bptt=16)
        features, _ = model(ids[:20].unsqueeze(0))
        logprobs = model.log_probs(features)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    # bf16 keeps 8 bits of mantissa: per-token scores within a few percent, the mean within 1%
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()
    assert abs(bf16.mean() - fp32.mean()) < 0.01 * fp32.mean()
    assert torch.isfinite(logprobs).all() and logprobs.shape == (1, 20, 300)
    torch.testing.assert_close(logprobs.float().exp().sum(-1), torch.ones(1, 20), atol=2e-2, rtol=0)


def test_bf16_training_step_with_the_fused_loss_off():
    """Under autocast the loss takes autograd's path (the fused loss is for float32 operands only)."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=100, emb_size=16, hidden_size=16)).train()
    x, y = torch.randint(0, 100, (4, 10)), torch.randint(0, 100, (4, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, _ = model(x)
        loss = model.loss(features, y)
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                              for p in model.parameters())
