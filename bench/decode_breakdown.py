"""Where a decode step of the rollout sampler spends its time on a GPU, at the issue's shape
(Qwen2.5-0.5B, B = 128 rows, a 64-token prompt, 128 new tokens, bf16): the decode step
eagerly, the same step replayed as a CUDA graph (what `sample(..., cuda_graph=True)` runs),
the same step torch.compile'd and then captured as a graph, and the token pick (`_pick`:
log-softmax over the vocabulary and a multinomial draw) that runs between replays.

    python bench/decode_breakdown.py     # on CUDA; one line per part, then one JSON line
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.rollout import SHAPES  # noqa: E402
from common.models import _decode, _graph_step, _pick, static_cache_decoder  # noqa: E402


def ms_per_call(fn, reps: int = 50) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return 1e3 * (time.perf_counter() - t0) / reps


def main() -> None:
    torch.manual_seed(0)
    dev, n, p, new = "cuda" if torch.cuda.is_available() else "cpu", 128, 64, 128  # CPU: a dry run
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["qwen2.5-0.5b"])).to(dev, torch.bfloat16).eval()
    m = static_cache_decoder(lm)
    w = lm.get_output_embeddings().weight  # [V, d]
    s = p + new
    cfg = lm.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = [tuple(torch.zeros(n, kv, s, hd, dtype=torch.bfloat16, device=dev) for _ in range(2))
             for _ in m.layers]  # [(keys, values) [N, H_kv, S, hd]] per layer
    real = torch.ones(n, s, dtype=torch.bool, device=dev)
    tok = torch.randint(0, w.shape[0], (n,), device=dev)
    at = p + new // 2  # a step half way through: attention over a half-written cache
    pos = torch.full((n, 1), at, device=dev)  # [N, 1]: every row at that slot's position
    res = {}
    with torch.no_grad():
        def eager():
            h = _decode(m, m.embed_tokens(tok[:, None]), pos, cache, at, real[:, None, : at + 1])[:, -1]
            return F.linear(h, w)

        res["eager_step_ms"] = ms_per_call(eager)
        step = _graph_step(m, w, None, cache, real, p)
        res["graph_step_ms"] = ms_per_call(lambda: step(tok, pos, at))
        logits = step(tok, pos, at)  # [N, V]
        res["pick_ms"] = ms_per_call(lambda: _pick(logits, 1.0, 0, 1.0, None))

        def gumbel():  # the same draw by the Gumbel-max trick, with its log-prob
            z = logits.float()
            t = (z - torch.empty_like(z).exponential_().log()).argmax(-1)
            return t, z.gather(1, t[:, None]).squeeze(1) - z.logsumexp(-1)

        res["pick_gumbel_ms"] = ms_per_call(gumbel)
        try:  # the fixed-shape step compiled by inductor (fused norms, rotary, residuals), then captured
            slot = torch.full((1,), at, device=dev)
            idx = torch.arange(s, device=dev)

            def fixed(tk: torch.Tensor, ps: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
                see = (real & (idx <= sl))[:, None]
                h = _decode(m, m.embed_tokens(tk[:, None]), ps, cache, sl, see)[:, -1]
                return F.linear(h, w)

            t0 = time.perf_counter()
            comp = torch.compile(fixed, dynamic=False)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    comp(tok, pos, slot)
            torch.cuda.current_stream().wait_stream(side)
            res["compile_s"] = time.perf_counter() - t0
            res["compiled_step_ms"] = ms_per_call(lambda: comp(tok, pos, slot))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=side):
                out = comp(tok, pos, slot)
            res["compiled_graph_step_ms"] = ms_per_call(g.replay)
            res["compiled_max_abs_diff"] = float((out.float() - logits.float()).abs().max())
        except Exception as e:  # a probe: report what failed and keep the other numbers
            res["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    params = sum(t.numel() for t in lm.parameters())
    res["roofline_ms"] = 1e3 * params * 2 / 3.35e12  # every weight read once, bf16, H100 SXM HBM3
    for k, v in res.items():
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
