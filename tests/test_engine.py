"""The decoding engine: prefill + batched steps over state slots, batched sampling."""

import pytest
import torch

from neurallm.config import ModelConfig
from neurallm.engine import Engine
from neurallm.errors import NlmError
from neurallm.generate import Sampling, choose, distribution
from neurallm.models.lm import RNNLM


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, emb_size=12, hidden_size=16, dropout=0.0)
    return RNNLM(ModelConfig(**{**cfg, **kw})).eval()


def alone(model, prompt, n, sampling, seed):
    engine = Engine(model, slots=1)
    stream = engine.submit(engine.prefill(prompt, engine.start(0)), n, sampling, seed)
    return [e.token for e in engine.run(stream)]


SETTINGS = [Sampling(temperature=0), Sampling(), Sampling(temperature=0.7, top_k=5),
            Sampling(temperature=1.3, top_p=0.8), Sampling(top_k=8, top_p=0.5)]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_a_stream_gives_the_same_tokens_alone_or_among_31_others(cell):
    model = tiny(cell=cell, connection="residual", emb_size=16)
    requests = [([1 + i % 7, 2 + i % 5, 3 + i % 11][: 1 + i % 3], 6 + i % 9, SETTINGS[i % 5], 100 + i)
                for i in range(32)]
    engine = Engine(model, slots=32)
    streams = []
    got = {}
    # They join at different steps, and slots freed by short streams are reused by later ones.
    pending = list(requests)
    while pending or engine.streams:
        if pending and engine.free and len(engine.streams) < 1 + len(streams) // 2:
            prompt, n, sampling, seed = pending.pop(0)
            streams.append(engine.submit(engine.prefill(prompt, engine.start(0)), n, sampling, seed))
            continue
        for event in engine.step():
            got.setdefault(event.stream.id, []).append(event.token)
    for stream, (prompt, n, sampling, seed) in zip(streams, requests):
        assert got[stream.id] == alone(model, prompt, n, sampling, seed), (sampling, seed)
        assert len(got[stream.id]) == n and stream.reason == "length"


def test_greedy_steps_follow_the_whole_sequence_forward_pass():
    model = tiny(num_layers=2, connection="dense")
    prompt = [0, 5, 7, 9]
    out = alone(model, prompt[1:], 8, Sampling(temperature=0), 0)  # boundary 0 is pending at the start
    ids = list(prompt)
    with torch.no_grad():
        for token in out:
            features, _ = model(torch.tensor([ids]))
            assert token == int(model.log_probs(features[0, -1]).argmax())
            ids.append(token)


def test_a_finished_context_continues_like_one_long_generation():
    model = tiny()
    engine = Engine(model, slots=2)
    s = Sampling(temperature=0.9)
    whole = engine.submit(engine.prefill([4, 5], engine.start(0)), 20, s, seed=7)
    tokens = [e.token for e in engine.run(whole)]
    first = engine.submit(engine.prefill([4, 5], engine.start(0)), 12, s, seed=7)
    head = [e.token for e in engine.run(first)]
    second = engine.submit(first.context, 8, s)
    second.rng = first.rng  # the same generator carries on
    tail = [e.token for e in engine.run(second)]
    assert head + tail == tokens
    assert second.context.length == 3 + 20  # boundary, two prompt tokens, twenty generated


def test_prefill_in_pieces_equals_prefill_at_once():
    model = tiny()
    engine = Engine(model)
    once = engine.prefill([3, 4, 5, 6, 7], engine.start(0))
    pieces = engine.prefill([6, 7], engine.prefill([3, 4, 5], engine.start(0)))
    assert once.pending == pieces.pending == 7 and once.length == pieces.length == 6
    torch.testing.assert_close(once.state, pieces.state)


def test_batched_sampling_follows_the_reference_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g) * 3
    settings = [Sampling(temperature=0.8, top_k=4), Sampling(top_p=0.6), Sampling(temperature=2.0, top_k=6, top_p=0.7),
                Sampling(temperature=0)]
    rngs = [torch.Generator().manual_seed(i) for i in range(4)]
    counts = torch.zeros(4, 30)
    for _ in range(3000):
        counts[torch.arange(4), choose(logits, settings, rngs)] += 1
    for row, sampling in enumerate(settings):
        expected = distribution(torch.log_softmax(logits[row], -1), sampling).float()
        assert set(counts[row].nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
        torch.testing.assert_close(counts[row] / 3000, expected, atol=0.03, rtol=0)


def test_top_p_past_the_candidate_window_sorts_everything():
    flat = torch.zeros(1, 3000)  # 3000 equally likely tokens: a nucleus of 0.9 holds 2700 of them
    counts = torch.zeros(3000)
    rng = torch.Generator().manual_seed(0)
    for _ in range(4000):
        counts[choose(flat, [Sampling(top_p=0.9)], [rng])] += 1
    assert counts[2700:].sum() == 0 and counts.nonzero().numel() > 1024  # ties go to the lower ids


def test_slots_are_reused_and_bounded():
    model = tiny()
    engine = Engine(model, slots=2)
    a = engine.submit(engine.start(0), 1, Sampling(temperature=0))
    engine.submit(engine.start(0), 5, Sampling(temperature=0))
    with pytest.raises(NlmError, match="slots are busy"):
        engine.submit(engine.start(0), 5, Sampling())
    engine.step()
    assert a.done and engine.free == 1
    engine.submit(engine.start(0), 5, Sampling())
    assert engine.free == 0


def test_logprobs_and_alternatives_come_from_the_model():
    model = tiny()
    engine = Engine(model, slots=1)
    stream = engine.submit(engine.prefill([3], engine.start(0)), 1, Sampling(temperature=0), logprobs=3)
    (event,) = list(engine.run(stream))
    with torch.no_grad():
        features, _ = model(torch.tensor([[0, 3]]))
        reference = model.log_probs(features[0, -1])
    assert event.top[0][0] == event.token == int(reference.argmax())
    assert event.logprob == pytest.approx(float(reference.max()), abs=1e-5)
    assert [t for t, _ in event.top] == reference.topk(3).indices.tolist()


def test_an_adaptive_softmax_model_decodes():
    model = tiny(vocab_size=60, softmax="adaptive", adaptive_cutoffs=(10, 30))
    out = alone(model, [1, 2], 5, Sampling(top_k=5), 1)
    assert len(out) == 5 and all(0 <= t < 60 for t in out)


def test_decoding_steps_follow_weights_changed_in_place():
    """The single-step path keeps transposed copies of the weights; an update in place (an optimizer
    step) must be seen by the next step."""
    model = tiny()
    ids = torch.tensor([[0, 3, 4]])
    for _ in range(2):
        with torch.no_grad():
            steps, state = [], None
            for t in range(3):
                out, state = model(ids[:, t:t + 1], state)
                steps.append(out)
            whole, _ = model(ids)
            torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-6)
            for p in model.stack.parameters():
                p.mul_(1.5)


def test_windowed_cuts_on_a_large_vocabulary_follow_the_reference():
    """Top-k and top-p decided within a window of best tokens, and a nucleus wider than the window
    (decided by the full sort), all give distribution()'s probabilities."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5000, generator=g) * 4
    logits[2] = torch.randn(5000, generator=g) * 0.01  # nearly flat: the 0.9 nucleus holds ~4500 tokens
    settings = [Sampling(temperature=0.7, top_k=40, top_p=0.9), Sampling(top_p=0.6), Sampling(top_p=0.9)]
    rngs = [torch.Generator().manual_seed(i) for i in range(3)]
    counts = torch.zeros(3, 5000)
    for _ in range(2000):
        counts[torch.arange(3), choose(logits, settings, rngs)] += 1
    for row, sampling in enumerate(settings):
        expected = distribution(logits[row], sampling).float()
        assert set(counts[row].nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
        top = expected.topk(5).indices
        torch.testing.assert_close(counts[row, top] / 2000, expected[top], atol=0.04, rtol=0)
    assert counts[2].nonzero().numel() > 1024  # past the window


def test_a_draw_of_almost_one_stays_inside_the_cut():
    from neurallm.generate import _invert

    cdf = torch.tensor([[0.5, 1.0, 1.0, 1.0]])  # tokens 2 and 3 cut off (no mass)
    assert _invert(cdf, torch.tensor([1 - 2**-30], dtype=torch.float64)).tolist() == [1]
    assert _invert(cdf, torch.tensor([0.0], dtype=torch.float64)).tolist() == [0]


@pytest.mark.parametrize("temperature", [1.0, 0.3, 0.01])
def test_a_plain_draw_inverts_the_reference_distribution(temperature):
    """One uniform number per token: choose() lands where distribution()'s float64 CDF puts it."""
    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(3)) * 4
    setting = Sampling(temperature)
    cdf = distribution(logits[0], setting).cumsum(0)
    missed = 0
    for seed in range(200):
        drawn = choose(logits, [setting], [torch.Generator().manual_seed(seed)])[0].item()
        u = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        near = min(abs(u * cdf[-1] - cdf[max(expected - 1, 0)]), abs(u * cdf[-1] - cdf[expected])) < 1e-5
        missed += drawn != expected and not near
    assert missed == 0
