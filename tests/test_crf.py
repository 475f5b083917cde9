"""The linear-chain CRF against brute force over every path, on tiny cases."""

import itertools

import pytest
import torch

from neurallm.models.crf import CRF, ILLEGAL, constraints

BIO = ["O", "B-X", "I-X"]
BIOES = ["O", "B-X", "I-X", "E-X", "S-X"]
CASES = {"none": ["A", "B", "C"], "bio": BIO, "bioes": BIOES}
LENGTHS = [4, 1, 3, 2]  # rows of different lengths, padded to T = 4


def make(scheme="none", seed=0, lengths=LENGTHS, dtype=torch.float64):
    """A CRF with random scores, random emissions (B, T, K) and a prefix mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    labels = CASES[scheme]
    crf = CRF(len(labels), *constraints(labels, scheme)).to(dtype)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    emissions = torch.randn(len(lengths), max(lengths), len(labels), generator=g, dtype=dtype)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    return crf, emissions, mask


def legal(path, allowed):
    trans, start, end = allowed
    return bool(start[path[0]] and end[path[-1]] and all(trans[a, b] for a, b in itertools.pairwise(path)))


def path_score(crf, em, path):
    """Score of one path by hand from the raw parameters (no penalties), em (n, K)."""
    s = crf.start[path[0]] + crf.end[path[-1]] + sum(em[t, y] for t, y in enumerate(path))
    return s + sum(crf.transitions[a, b] for a, b in itertools.pairwise(path))


def legal_paths(scheme, n):
    labels = CASES[scheme]
    allowed = constraints(labels, scheme)
    return [p for p in itertools.product(range(len(labels)), repeat=n) if legal(p, allowed)]


@pytest.mark.parametrize("scheme", CASES)
def test_log_partition_matches_brute_force(scheme):
    # Brute force sums over the legal paths only: the penalty must make illegal ones vanish.
    crf, em, mask = make(scheme)
    with torch.no_grad():
        got = crf.log_partition(em, mask)
        for b, n in enumerate(LENGTHS):
            want = torch.logsumexp(torch.stack([path_score(crf, em[b], p) for p in legal_paths(scheme, n)]), 0)
            torch.testing.assert_close(got[b], want)


def test_score_by_hand():
    crf = CRF(3)
    with torch.no_grad():
        crf.transitions.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]))
        crf.start.copy_(torch.tensor([0.1, 0.2, 0.3]))
        crf.end.copy_(torch.tensor([10.0, 20.0, 30.0]))
    em = torch.arange(12.0).reshape(1, 4, 3) / 10  # em[t, k] = (3t + k) / 10
    tags = torch.tensor([[2, 0, 1, -100]])  # last step is padding; its tag is never read
    mask = torch.tensor([[True, True, True, False]])
    # start[2] + em[0,2] + em[1,0] + em[2,1] + trans[2,0] + trans[0,1] + end[1]
    want = 0.3 + (0.2 + 0.3 + 0.7) + (7.0 + 2.0) + 20.0
    torch.testing.assert_close(crf.score(em, tags, mask), torch.tensor([want]))


@pytest.mark.parametrize("scheme", ["none", "bioes"])
def test_probabilities_sum_to_one(scheme):
    crf, em, mask = make(scheme, seed=1)
    k = crf.num_tags
    for b, n in enumerate(LENGTHS):
        paths = torch.tensor(list(itertools.product(range(k), repeat=n)))  # (N, n): every path, legal or not
        tags = torch.cat([paths, torch.full((len(paths), 4 - n), -100)], 1)  # padded with junk tags
        rows = em[b].expand(len(paths), -1, -1)
        nll = crf.nll(rows, tags, mask[b].expand(len(paths), -1))
        assert (nll >= -1e-9).all()
        torch.testing.assert_close(torch.logsumexp(-nll, 0), torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("scheme", CASES)
def test_decode_matches_brute_force_argmax(scheme):
    crf, em, mask = make(scheme, seed=2)
    path = crf.decode(em, mask)
    assert path.dtype == torch.long and path.shape == mask.shape
    assert (path[~mask] == 0).all()  # padding holds 0
    with torch.no_grad():
        for b, n in enumerate(LENGTHS):
            paths = legal_paths(scheme, n)
            best = max(paths, key=lambda p: path_score(crf, em[b], p).item())
            assert path[b, :n].tolist() == list(best)


def test_decode_never_illegal_under_strong_emissions():
    labels = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]
    allowed = constraints(labels, "bioes")
    crf = CRF(len(labels), *allowed)
    # Emissions pull hard towards O I-PER E-LOC, illegal three times over.
    em = torch.zeros(1, 3, len(labels))
    em[0, 0, 0] = em[0, 1, 2] = em[0, 2, 7] = 50.0
    assert not legal(em[0].argmax(1).tolist(), allowed)
    assert crf.decode(em)[0].tolist() == [0, 5, 7]  # O B-LOC E-LOC: the best legal path
    g = torch.Generator().manual_seed(3)
    em = 50 * torch.randn(64, 7, len(labels), generator=g)
    lengths = torch.randint(1, 8, (64,), generator=g)
    mask = torch.arange(7) < lengths[:, None]
    for row, n in zip(crf.decode(em, mask).tolist(), lengths.tolist()):
        assert legal(row[:n], allowed)


def test_padding_does_not_change_results():
    crf, em, mask = make("bioes", seed=4)
    tags = crf.decode(em, mask)
    extra = torch.randn(em.shape[0], 3, em.shape[2], dtype=em.dtype)  # junk emissions at padded steps
    em2 = torch.cat([em, extra], 1)
    mask2 = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], 1)
    tags2 = torch.cat([tags, torch.randint(0, crf.num_tags, (mask.shape[0], 3))], 1)
    for f in (crf.log_partition, lambda e, m: crf.decode(e, m)[:, :4].double()):
        torch.testing.assert_close(f(em2, mask2), f(em, mask))
    for f in (crf.score, crf.nll):
        torch.testing.assert_close(f(em2, tags2, mask2), f(em, tags, mask))


def test_gradients():
    crf, em, mask = make("bio", seed=5, dtype=torch.float32)
    em.requires_grad_()
    tags = crf.decode(em, mask)
    crf.nll(em, tags, mask).sum().backward()
    for grad in (em.grad, crf.transitions.grad, crf.start.grad, crf.end.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert (em.grad[~mask] == 0).all()  # padded emissions get no gradient

    crf, em, mask = make("bio", seed=6, lengths=[3, 1, 2])
    tags = torch.tensor([[1, 2, 0], [0, 0, 0], [1, 1, 0]])
    params = {name: p.detach().clone().requires_grad_() for name, p in crf.named_parameters()}

    def nll(em, transitions, start, end):
        weights = {"transitions": transitions, "start": start, "end": end}
        return torch.func.functional_call(crf, weights, (em, tags, mask))

    assert torch.autograd.gradcheck(nll, (em.requires_grad_(), params["transitions"], params["start"], params["end"]))


def test_constraints():
    trans, start, end = constraints(BIO + ["B-Y", "I-Y"], "bio")
    o, bx, ix, by, iy = range(5)
    assert trans[bx, ix] and trans[ix, ix] and trans[o, bx] and trans[ix, by]
    assert not trans[o, ix] and not trans[by, ix] and not trans[iy, ix]
    assert start.tolist() == [True, True, False, True, False] and end.all()

    trans, start, end = constraints(BIOES, "bioes")
    o, b, i, e, s = range(5)
    assert [trans[b, j].item() for j in range(5)] == [False, False, True, True, False]
    assert trans[i].tolist() == trans[b].tolist()
    for x in (e, s, o):
        assert trans[x].tolist() == [True, True, False, False, True]
    assert start.tolist() == [True, True, False, False, True]
    assert end.tolist() == [True, False, False, True, True]

    assert all(m.all() for m in constraints(["NN", "VB"], "none"))
    for labels, scheme in ((["O", "E-X"], "bio"), (["O", "PER"], "bioes"), (["O"], "iobes")):
        with pytest.raises(ValueError):
            constraints(labels, scheme)


def test_penalty_is_a_buffer():
    crf = CRF(5, *constraints(BIOES, "bioes"))
    assert {n for n, _ in crf.named_parameters()} == {"transitions", "start", "end"}
    assert crf.transitions_penalty[0, 2] == ILLEGAL and crf.transitions_penalty[1, 2] == 0
    assert crf.double().transitions_penalty.dtype == torch.float64
    assert "transitions_penalty" in crf.state_dict()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32():
    crf, em, mask = make("bioes", seed=7, dtype=torch.float32)
    tags = crf.decode(em, mask)
    want = crf.nll(em, tags, mask), tags
    crf, em, mask = crf.cuda(), em.cuda(), mask.cuda()
    got = crf.nll(em, tags.cuda(), mask), crf.decode(em, mask)
    torch.testing.assert_close(got[0].cpu(), want[0])
    assert torch.equal(got[1].cpu(), want[1])
