import pytest
import torch

import common.logprob as L
from common.logprob import naive_token_logprobs, token_logprobs


def _case(n, v, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def _naive_entropy(h, w):
    logp = torch.log_softmax((h @ w.T).double(), -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("n, v, d", [(1, 2, 1), (7, 13, 5), (33, 1001, 17), (64, 50, 8)])
def test_values_and_grads_equal_naive(n, v, d, monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ELEMS", 3 * v)  # force several chunks of 3 rows
    h, w, y = _case(n, v, d)
    lp, ent = token_logprobs(h, w, y, with_entropy=True)
    ref = naive_token_logprobs(h, w, y)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, _naive_entropy(h, w), rtol=1e-5, atol=1e-6)
    assert (lp <= 0).all()
    # gradients of a mix of both outputs, against autograd through the naive version
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    gh, gw = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * g1).sum() + (_naive_entropy(h, w) * g2).sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_grads_when_only_one_output_is_used(monkeypatch):
    """The scripts take the entropy only to log it: its gradient arrives as None and the
    backward drops its term. Using only lp, or only the entropy, must still equal naive."""
    monkeypatch.setattr(L, "CHUNK_ELEMS", 3 * 101)
    h, w, y = _case(17, 101, 7)
    lp, ent = token_logprobs(h, w, y, with_entropy=True)
    g = torch.randn(17, dtype=torch.float64)
    for ours, ref in (((lp * g).sum(), (naive_token_logprobs(h, w, y) * g).sum()),
                      ((ent * g).sum(), (_naive_entropy(h, w) * g).sum())):
        got = torch.autograd.grad(ours, (h, w), retain_graph=True)
        for a, b in zip(got, torch.autograd.grad(ref, (h, w)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _naive_kl(h, w, hr, wr):
    logp = torch.log_softmax((h @ w.T).double(), -1)
    logq = torch.log_softmax((hr @ wr.T).double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("n, v, d", [(1, 2, 1), (7, 13, 5), (33, 1001, 17)])
def test_full_distribution_kl_equals_naive(n, v, d, monkeypatch):
    """SPEC D3 in the same pass: KL(p || q) over the whole vocabulary at each position
    against a reference's own hidden states and head (another width here), values and
    gradients of a mix of lp, entropy and KL against autograd through the naive version;
    the reference gets no gradient."""
    monkeypatch.setattr(L, "CHUNK_ELEMS", 3 * v)  # several chunks of rows and of the vocabulary
    h, w, y = _case(n, v, d)
    hr, wr, _ = _case(n, v, d + 2, seed=1)
    lp, ent, kl = token_logprobs(h, w, y, with_entropy=True, ref=(hr, wr))
    torch.testing.assert_close(kl, _naive_kl(h, w, hr, wr), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp, naive_token_logprobs(h, w, y), rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-9).all()
    g1, g2, g3 = (torch.randn(n, dtype=torch.float64) for _ in range(3))
    gh, gw = torch.autograd.grad((lp * g1 + ent * g2 + kl * g3).sum(), (h, w))
    naive_kl = _naive_kl(h, w, hr.detach(), wr.detach())
    ref = (naive_token_logprobs(h, w, y) * g1 + _naive_entropy(h, w) * g2 + naive_kl * g3).sum()
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    lp2, kl2 = token_logprobs(h, w, y, ref=(hr, wr))  # without the entropy: (lp, kl)
    torch.testing.assert_close(kl2, kl)
    assert hr.grad is None and wr.grad is None
    (kl2 * g3).sum().backward()  # the KL's gradient alone
    rh, rw = torch.autograd.grad((_naive_kl(h, w, hr.detach(), wr.detach()) * g3).sum(), (h, w))
    torch.testing.assert_close(h.grad, rh, rtol=1e-5, atol=1e-6)
    assert hr.grad is None and wr.grad is None


def test_kl_against_itself_is_zero():
    h, w, y = _case(9, 40, 6)
    _, kl = token_logprobs(h, w, y, ref=(h, w))
    torch.testing.assert_close(kl, torch.zeros(9, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="ref hidden"):
        token_logprobs(h, w, y, ref=(h[:5], w))


def test_float32_matches_float64_reference():
    h, w, y = _case(20, 300, 16, dtype=torch.float32)
    lp = token_logprobs(h, w, y)
    ref = naive_token_logprobs(h.double(), w.double(), y)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rh, rw = torch.autograd.grad(naive_token_logprobs(hd, wd, y).sum(), (hd, wd))
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)


def test_qwen_sized_vocab_and_bf16():
    # V = 151,936 (Qwen2.5): chunked, so the full logits never exist at once.
    h, w, y = _case(6, 151_936, 32, dtype=torch.bfloat16)
    lp = token_logprobs(h, w, y)
    assert lp.dtype == torch.float32 and lp.shape == (6,)
    ref = naive_token_logprobs(h.float(), w.float(), y)
    torch.testing.assert_close(lp, ref, rtol=2e-2, atol=5e-2)  # bf16 matmul
    lp.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()
    assert w.grad.shape == w.shape


def test_extreme_logits_never_positive():
    h = torch.tensor([[100.0], [-100.0]])
    w = torch.tensor([[1.0], [0.0], [-1.0]])
    lp = token_logprobs(h, w, torch.tensor([0, 2]))
    assert (lp <= 0).all() and torch.isfinite(lp).all()


def test_shape_errors():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
