"""Fused per-token log-probabilities from hidden states and the LM head (SPEC F2).

The naive way, ``log_softmax(h @ W.T).gather(y)``, materialises a [N, V] logits tensor
(and autograd keeps it, plus its softmax, for backward). With V = 151,936 and N = 16k
tokens that is ~10 GB in fp32. Here the forward walks over chunks of *rows* and keeps
only the per-row log-sum-exp and entropy; the backward *recomputes* the logits, walking
over chunks of the *vocabulary*, so each chunk writes its own rows of dW once (no [V, d]
accumulation per chunk) and only the small dh [N, d] accumulates. Peak extra memory is
one chunk of about CHUNK_ELEMS logits.

    lp, ent = token_logprobs(hidden, weight, targets, with_entropy=True)
    lp, kl = token_logprobs(hidden, weight, targets, ref=(ref_hidden, ref_weight))  # DiffRO, SPEC D3

The same pass gives the entropy and, against a frozen reference's hidden states and head,
the KL over the whole output distribution at each position (SPEC D3),
KL_n = sum_k p_nk (log p_nk - log q_nk); the reference's logits are recomputed per chunk too.

d lp_n / d z_n = onehot(y_n) - p_n;  d H_n / d z_n = -p_n (log p_n + H_n);
d KL_n / d z_n = p_n (log p_n - log q_n - KL_n)  (the reference gets no gradient).
"""
from __future__ import annotations

import os

import torch

# Rows per chunk: about 2^25 logits (128 MB in fp32) at a time, whatever V is.
CHUNK_ELEMS = 1 << 25


def _chunk_rows(n: int, v: int) -> int:
    """How many of n rows fit in one chunk when each row holds v logits."""
    return max(1, min(n, CHUNK_ELEMS // max(v, 1)))


def _acc(z: torch.Tensor) -> torch.Tensor:
    """Softmax precision: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (tests)."""
    return z if z.dtype == torch.float64 else z.float()


def _fwd_chunk(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, with_ent: bool,
               hr: torch.Tensor | None, wr: torch.Tensor | None):
    """Rows h [c, d]: (lp, entropy or 0, lse, the reference's lse or 0, KL or 0), each [c]."""
    z = _acc(h @ w.T)  # [c, V]; matmul in the input dtype, softmax in fp32
    lse = torch.logsumexp(z, dim=-1)  # [c]
    lp = (z.gather(1, y[:, None]).squeeze(1) - lse).clamp(max=0.0)  # [c]; rounding can give +1e-7
    zero = torch.zeros_like(lse)
    if not with_ent and hr is None:  # two fewer passes over [c, V]
        return lp, zero, lse, zero, zero
    p = torch.exp(z - lse[:, None])  # [c, V]
    ent = lse - (p * z).sum(-1) if with_ent else zero  # H = lse - E_p[z]
    if hr is None:
        return lp, ent, lse, zero, zero
    zr = _acc(hr @ wr.T)  # [c, V]: the reference's logits
    lse_r = torch.logsumexp(zr, dim=-1)  # [c]
    kl = (p * ((z - lse[:, None]) - (zr - lse_r[:, None]))).sum(-1)  # Eq. D3
    return lp, ent, lse, lse_r, kl


def _bwd_chunk(h, w_c, y_c, g_lp, g_ent, lse, ent, g_kl, hr, wr_c, lse_r, kl):
    """One vocabulary chunk w_c [Vc, d] (and the reference's wr_c); y_c [N] = target index
    inside the chunk (or -1)."""
    z = _acc(h @ w_c.T)  # recompute, [N, Vc]
    logp = z - lse[:, None]
    p = logp.exp()
    # d/dz of (g_lp * lp + g_ent * H) = g_lp (onehot - p) - g_ent p (log p + H); g_ent is
    # None when nothing downstream used the entropy (the scripts only log it)
    onehot = torch.arange(z.shape[1], device=z.device)[None] == y_c[:, None]  # [N, Vc]
    gp = g_lp[:, None] if g_ent is None else g_lp[:, None] + g_ent[:, None] * (logp + ent[:, None])
    if g_kl is not None:  # + g_kl p (log p - log q - KL), q the reference (recomputed)
        gp = gp - g_kl[:, None] * (logp - (_acc(hr @ wr_c.T) - lse_r[:, None]) - kl[:, None])
    gz = torch.where(onehot, g_lp[:, None], 0.0) - p * gp  # [N, Vc]
    gz = gz.to(h.dtype)
    return gz @ w_c, gz.T @ h  # [N, d] (to accumulate), [Vc, d] (this chunk's rows of dW)


_compiled: dict[str, object] = {}


def _maybe_compiled(fn, device: torch.device):
    """torch.compile the chunk math on CUDA (fuses softmax/gather/entropy); eager elsewhere.

    SPEECHRL_COMPILE=0 turns compilation off, =1 forces it on (CPU too)."""
    flag = os.environ.get("SPEECHRL_COMPILE")
    use = flag == "1" or (flag is None and device.type == "cuda")
    if not use:
        return fn
    key = f"{fn.__name__}:{device.type}"
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=True)
    return _compiled[key]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy, ref_hidden, ref_weight):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        n, v = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lp, ent, lse, lse_r, kl = (hidden.new_empty(n, dtype=acc) for _ in range(5))
        fwd = _maybe_compiled(_fwd_chunk, hidden.device)
        step = _chunk_rows(n, v if ref_hidden is None else 2 * v)  # the reference's logits too
        for s in range(0, n, step):
            sl = slice(s, s + step)
            hr = None if ref_hidden is None else ref_hidden[sl]
            lp[sl], ent[sl], lse[sl], lse_r[sl], kl[sl] = fwd(hidden[sl], weight, targets[sl], with_entropy,
                                                              hr, ref_weight)
        ctx.save_for_backward(hidden, weight, targets, lse, ent, ref_hidden, ref_weight, lse_r, kl)
        return lp, ent, kl

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_kl):
        hidden, weight, targets, lse, ent, ref_hidden, ref_weight, lse_r, kl = ctx.saved_tensors
        n, v = hidden.shape[0], weight.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype)
        g_ent = None if g_ent is None else g_ent.to(lse.dtype)
        g_kl = None if g_kl is None or ref_hidden is None else g_kl.to(lse.dtype)
        gh = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
        gw = torch.empty_like(weight)
        bwd = _maybe_compiled(_bwd_chunk, hidden.device)
        step = _chunk_rows(v, n if ref_hidden is None else 2 * n)  # vocabulary entries per chunk
        for s in range(0, v, step):
            w_c = weight[s : s + step]
            wr_c = None if ref_weight is None else ref_weight[s : s + step]
            y_c = torch.where((targets >= s) & (targets < s + w_c.shape[0]), targets - s, -1)
            gh_c, gw[s : s + step] = bwd(hidden, w_c, y_c, g_lp, g_ent, lse, ent,
                                         g_kl, ref_hidden, wr_c, lse_r, kl)
            gh += gh_c
        return (gh.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
                gw if ctx.needs_input_grad[1] else None, None, None, None, None)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   with_entropy: bool = False, ref: tuple[torch.Tensor, torch.Tensor] | None = None):
    """log p(targets | hidden) under logits = hidden @ weight.T, in float32, never [N, V] at once.

    hidden [N, d], weight [V, d], targets [N] (int64); `ref` = (ref_hidden [N, d_r],
    ref_weight [V, d_r]), a frozen reference at the same positions (it gets no gradient).
    Returns lp [N], then the entropy [N] if `with_entropy`, then KL(p || q) [N] over the
    whole vocabulary (SPEC D3) if `ref` is given: lp alone, or a tuple. In float32
    (float64 for float64 inputs, which the parity tests use).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N = {hidden.shape[0]}")
    ref_hidden, ref_weight = (None, None) if ref is None else (ref[0].detach(), ref[1].detach())
    if ref is not None and (ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]
                            or ref_hidden.shape[1] != ref_weight.shape[1]):
        raise ValueError(f"ref hidden {tuple(ref_hidden.shape)} and weight {tuple(ref_weight.shape)} do not "
                         f"match hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    lp, ent, kl = _TokenLogprobs.apply(hidden, weight, targets.long(), with_entropy, ref_hidden, ref_weight)
    out = (lp,) + ((ent,) if with_entropy else ()) + ((kl,) if ref is not None else ())
    return out if len(out) > 1 else lp


def naive_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """The reference the kernel must equal: full logits, log_softmax, gather."""
    logp = torch.log_softmax(_acc(hidden @ weight.T), dim=-1)  # [N, V]
    return logp.gather(1, targets[:, None].long()).squeeze(1)
