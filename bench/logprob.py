"""Benchmark: per-token log-probs (+ backward) at a Qwen2.5 vocabulary, ours against the
naive `log_softmax(h @ W.T).gather(y)` (and Liger's fused linear cross-entropy when CUDA
and liger-kernel are present), side by side in one run.

    python bench/logprob.py            # CUDA if present: N=16,384, V=151,936, d=896, bf16
    python bench/logprob.py --quick    # CPU-sized: same V, N=512, fp32

Each variant runs in its own subprocess, so peak memory is its own: on CUDA the peak of
torch.cuda.max_memory_allocated above what the inputs hold; on CPU the growth of peak RSS
(ru_maxrss) over the RSS before the measured region. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_variant(name: str, n: int, v: int, d: int, dtype: str, device: str, iters: int) -> dict:
    from common.logprob import naive_token_logprobs, token_logprobs

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(n, d, device=device) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(v, d, device=device) * 0.02).to(dt).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    if name == "naive":
        def fn():
            return naive_token_logprobs(h, w, y)
    elif name == "ours":
        def fn():
            return token_logprobs(h, w, y)
    elif name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def fn():
            return -ce(w, h, y)
    else:
        raise ValueError(name)

    def step():
        out = fn()
        out.float().sum().backward()
        h.grad = w.grad = None

    step()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / iters * 1000
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"variant": name, "ms": ms, "peak_mb": max(peak, 0.0)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="CPU-sized run (N=512, fp32)")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--v", type=int, default=151_936)
    p.add_argument("--d", type=int, default=896)
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one variant
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    n = a.n or (16_384 if device == "cuda" else 512)
    iters = a.iters or (10 if device == "cuda" else 3)
    if a.one:
        print(json.dumps(run_variant(a.one, n, a.v, a.d, dtype, device, iters)))
        return
    variants = ["naive", "ours"]
    if device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            variants.append("liger")
        except ImportError:
            print("liger-kernel not installed: no Liger column (pip install liger-kernel)")
    rows = []
    for name in variants:
        cmd = [sys.executable, __file__, "--one", name, "--n", str(n), "--v", str(a.v), "--d", str(a.d),
               "--iters", str(iters)] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} threads)"
    print(f"token log-probs, forward + backward: N={n} V={a.v} d={a.d} {dtype} on {dev_name}")
    print(f"{'variant':8s} {'ms':>10s} {'peak MB':>10s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['ms']:10.1f} {r['peak_mb']:10.1f}")
    by = {r["variant"]: r for r in rows}
    res = {"device": dev_name, "n": n, "v": a.v, "d": a.d, "dtype": dtype,
           **{f"{k}_ms": round(r["ms"], 2) for k, r in by.items()},
           **{f"{k}_peak_mb": round(r["peak_mb"], 1) for k, r in by.items()}}
    if "naive" in by and "ours" in by:
        res["speedup"] = round(by["naive"]["ms"] / by["ours"]["ms"], 3)
        res["mem_ratio"] = round(by["naive"]["peak_mb"] / max(by["ours"]["peak_mb"], 1e-3), 2)
    if "liger" in by and "ours" in by:
        res["speedup_vs_liger"] = round(by["liger"]["ms"] / by["ours"]["ms"], 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
