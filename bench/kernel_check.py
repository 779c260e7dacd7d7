"""Check the fused log-prob kernel on this machine's accelerator: values and gradients
against the naive version, eager and torch.compile'd, fp32 and bf16. Not a test (tests
never need a GPU); run it on a CUDA box:  python bench/kernel_check.py"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common.logprob as L  # noqa: E402


def check(device: str, dtype: torch.dtype, compiled: bool, entropy: bool = True, kl: bool = False,
          n=1000, v=151_936, d=256) -> float:
    """Max relative error of log-probs (and entropies, unless `entropy` is off: the forward
    then skips that work and the backward has no entropy term; and with `kl` the
    full-distribution KL to a reference, SPEC D3) and their gradients."""
    os.environ["SPEECHRL_COMPILE"] = "1" if compiled else "0"
    L._compiled.clear()
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    hr = (torch.randn(n, d, generator=g) * 0.5).to(device, dtype)
    wr = (torch.randn(v, d, generator=g) * 0.05).to(device, dtype)
    out = L.token_logprobs(h, w, y, with_entropy=entropy, ref=(hr, wr) if kl else None)
    out = out if isinstance(out, tuple) else (out,)
    lp, ent, k = out[0], out[1] if entropy else None, out[-1] if kl else None
    (lp.sum() + (0.1 * ent.sum() if entropy else 0) + (0.3 * k.sum() if kl else 0)).backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = L.naive_token_logprobs(hd, wd, y)
    logp = torch.log_softmax(hd @ wd.T, -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ref_kl = (logp.exp() * (logp - torch.log_softmax(hr.double() @ wr.double().T, -1))).sum(-1)
    (ref.sum() + (0.1 * ref_ent.sum() if entropy else 0) + (0.3 * ref_kl.sum() if kl else 0)).backward()
    assert lp.dtype == torch.float32 and bool((lp <= 0).all())

    def rel(a, b):
        return float((a.detach().double() - b).abs().max() / b.abs().max().clamp(min=1e-12))

    err = max(rel(lp, ref), rel(ent, ref_ent) if entropy else 0.0, rel(k, ref_kl) if kl else 0.0,
              rel(h.grad, hd.grad), rel(w.grad, wd.grad))
    print(f"{device} {str(dtype):15s} compiled={compiled!s:5s} entropy={entropy!s:5s} kl={kl!s:5s} "
          f"max relative error {err:.2e}")
    return err


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(torch.__version__, torch.cuda.get_device_name() if dev == "cuda" else "cpu")
    for compiled in (False, True):
        for entropy, kl in ((True, False), (False, False), (True, True)):
            assert check(dev, torch.float32, compiled, entropy, kl) < 1e-4
            assert check(dev, torch.bfloat16, compiled, entropy, kl) < 3e-2
    print("kernel check passed")
