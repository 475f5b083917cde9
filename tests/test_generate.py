"""Sampling rules and the id generator."""

import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.errors import NlmError
from neurallm.generate import Sampling, distribution, generate, sample
from neurallm.models.lm import RNNLM

LOGPROBS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def draws(sampling, n=400):
    rng = torch.Generator().manual_seed(0)
    return {sample(LOGPROBS, rng, sampling) for _ in range(n)}


def test_greedy_top_k_top_p_limit_the_support():
    assert draws(Sampling(temperature=0)) == {0}
    assert draws(Sampling()) == {0, 1, 2, 3}
    assert draws(Sampling(top_k=2)) == {0, 1}
    assert draws(Sampling(top_p=0.79)) == {0, 1}  # 0.5 + 0.3 reaches 0.79
    assert draws(Sampling(top_p=0.81)) == {0, 1, 2}
    assert draws(Sampling(top_p=0.1)) == {0}  # the most likely id is always kept


def test_temperature_sharpens():
    rng = torch.Generator().manual_seed(0)
    cold = sum(sample(LOGPROBS, rng, Sampling(temperature=0.2)) == 0 for _ in range(500))
    hot = sum(sample(LOGPROBS, rng, Sampling(temperature=2.0)) == 0 for _ in range(500))
    assert cold > 450 and hot < 300


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_sampling_settings(bad):
    with pytest.raises(NlmError):
        Sampling(**bad)


def test_greedy_generation_follows_the_full_forward_pass():
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=30, emb_size=8, hidden_size=8, dropout=0.0)).eval()
    prompt = [1, 5, 7]
    out = list(generate(model, prompt, 6, Sampling(temperature=0), torch.Generator()))
    ids = list(prompt)
    with torch.no_grad():
        for token in out:
            features, _ = model(torch.tensor([ids]))
            assert token == int(model.log_probs(features[0, -1]).argmax())
            ids.append(token)
    assert len(out) == 6


def test_a_tiny_temperature_is_greedy():
    logprobs = torch.log_softmax(torch.randn(50, generator=torch.Generator().manual_seed(3)), -1)
    rng = torch.Generator().manual_seed(0)
    for temperature in (5e-324, 1e-46, 1e-30, 1e-6):
        assert sample(logprobs, rng, Sampling(temperature=temperature)) == int(logprobs.argmax())


def test_cut_distributions_are_renormalised():
    probs = LOGPROBS.exp().double()
    torch.testing.assert_close(distribution(LOGPROBS, Sampling(top_k=2)),
                               torch.tensor([0.5, 0.3, 0, 0], dtype=torch.float64) / 0.8)
    torch.testing.assert_close(distribution(LOGPROBS, Sampling(top_p=0.81)),
                               torch.tensor([0.5, 0.3, 0.15, 0], dtype=torch.float64) / 0.95)
    torch.testing.assert_close(distribution(LOGPROBS, Sampling()), probs)
    hot = distribution(LOGPROBS, Sampling(temperature=2.0))
    torch.testing.assert_close(hot, probs.sqrt() / probs.sqrt().sum())  # p^(1/T), renormalised
    both = distribution(LOGPROBS, Sampling(top_k=3, top_p=0.7))  # top-k first, then the nucleus of what is left
    torch.testing.assert_close(both, torch.tensor([0.5, 0.3, 0, 0], dtype=torch.float64) / 0.8)
    greedy = distribution(LOGPROBS, Sampling(temperature=0))
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_k_keeps_exactly_k_among_ties():
    tied = torch.log(torch.tensor([0.1, 0.3, 0.3, 0.3]))
    probs = distribution(tied, Sampling(top_k=2))
    assert (probs > 0).sum() == 2
    assert probs.tolist() == [0.0, 0.5, 0.5, 0.0]  # the lower ids win the tie
    assert draws(Sampling(top_k=2), 200) <= {0, 1}
    rng = torch.Generator().manual_seed(0)
    assert {sample(tied, rng, Sampling(top_k=2)) for _ in range(200)} == {1, 2}
