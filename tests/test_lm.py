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


def test_linear_cross_entropy_matches_autograd_in_value_and_gradients():
    from neurallm.models.lm import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, dtype=torch.float64, generator=g)
    w = torch.randn(40, 8, dtype=torch.float64, generator=g)
    b = torch.randn(40, dtype=torch.float64, generator=g)
    x[0] *= 100  # a row whose target is ~e^-1000 likely: the exact (log-sum-exp) path
    targets = torch.randint(0, 40, (30,), generator=g)
    targets[0] = int((x[0] @ w.T + b).argmin())
    grads = []
    for fn in (lambda *a: LinearCrossEntropy.apply(*a, targets),
               lambda *a: torch.nn.functional.cross_entropy(torch.nn.functional.linear(*a), targets)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = fn(*leaves)
        (loss * 3).backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    assert grads[1][0] > 10  # the far row counts, finitely
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)


def test_fused_loss_gives_the_same_float32_gradients_with_tied_or_frozen_weights():
    model = make(tie_weights=True, emb_size=12).train()
    ids = torch.randint(0, 50, (3, 7))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        features, _ = model(ids[:, :-1], model.init_state(3))
        if fused:
            loss = model.loss(features, ids[:, 1:])
            assert loss.grad_fn.name().startswith("LinearCrossEntropy")
        else:
            loss = torch.nn.functional.cross_entropy(model.decoder(features).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and "embedding.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    model.decoder.bias.requires_grad_(False)  # a frozen operand gets no gradient
    model.zero_grad()
    features, _ = model(ids[:, :-1])
    model.loss(features, ids[:, 1:]).backward()
    assert model.decoder.bias.grad is None and model.embedding.weight.grad is not None


def test_training_loss_uses_the_fused_path_with_the_same_value():
    model = make(tie_weights=True, emb_size=12).train()
    ids = torch.randint(0, 50, (3, 7))
    features, _ = model(ids[:, :-1])
    fused = model.loss(features, ids[:, 1:])
    assert fused.grad_fn.name().startswith("LinearCrossEntropy")
    with torch.no_grad():
        plain = model.loss(features, ids[:, 1:])
    torch.testing.assert_close(fused.detach(), plain, atol=1e-6, rtol=1e-6)
    fused.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        fused.backward()  # a second pass would read the gradient left in the softmax buffer
