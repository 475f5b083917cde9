"""The language model: decoding step by step, carried state, tying, adaptive softmax, overfitting."""

import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.errors import NlmError
from neurallm.models.lm import RNNLM


def make(**kw) -> RNNLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, emb_size=12, hidden_size=12, num_layers=2, dropout=0.0)
    cfg.update(kw)
    return RNNLM(ModelConfig(**cfg))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_step_by_step_decoding_equals_whole_sequence(cell, softmax):
    model = make(cell=cell, softmax=softmax, adaptive_cutoffs=(10, 30), adaptive_div_value=2.0).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        whole, whole_state = model(ids)
        state, steps = None, []
        for t in range(ids.size(1)):
            out, state = model(ids[:, t:t + 1], state)
            steps.append(out)
        stepped = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, whole_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.log_probs(stepped), model.log_probs(whole), atol=1e-5, rtol=0)


def test_carrying_state_across_batches_equals_one_long_sequence():
    model = make(connection="highway").eval()
    ids = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        whole, _ = model(ids)
        state, pieces = None, []
        for start in range(0, 20, 7):
            out, state = model(ids[:, start:start + 7], state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=0)


def test_log_probs_are_normalised_and_agree_with_loss():
    for softmax in ("full", "adaptive"):
        model = make(softmax=softmax, adaptive_cutoffs=(10, 30), adaptive_div_value=2.0).eval()
        ids = torch.randint(0, 50, (2, 6))
        with torch.no_grad():
            features, _ = model(ids[:, :-1])
            logp = model.log_probs(features)
            torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
            picked = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            torch.testing.assert_close(model.loss(features, ids[:, 1:], reduction="none"), picked, atol=1e-5, rtol=0)


def test_tied_weights_share_one_tensor_and_project_when_sizes_differ():
    model = make(tie_weights=True)
    assert model.decoder.weight is model.embedding.weight
    wide = make(tie_weights=True, hidden_size=20)
    assert wide.proj is not None and wide.decoder.weight is wide.embedding.weight
    features, _ = wide(torch.randint(0, 50, (1, 3)))
    assert features.shape == (1, 3, 12)


def test_language_model_refuses_bidirectional():
    with pytest.raises(NlmError, match="bidirectional"):
        make(bidirectional=True)


@pytest.mark.parametrize("kw", [{}, {"softmax": "adaptive", "adaptive_cutoffs": (10,)},
                                {"connection": "dense", "cell": "gru"},
                                {"locked_dropout": True, "dropout_input": 0.1, "weight_drop": 0.1, "dropout_emb": 0.1}])
def test_model_overfits_one_batch(kw):
    model = make(emb_size=32, hidden_size=32, **kw)
    ids = torch.randint(0, 50, (4, 13))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(200):
        features, _ = model(ids[:, :-1])
        loss = model.loss(features, ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        features, _ = model(ids[:, :-1])
        final = model.loss(features, ids[:, 1:]).item()
    assert final < 0.3, final  # from ln(50) = 3.9 nats: the batch is memorised
