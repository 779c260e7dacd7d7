"""Where a decode step of the rollout sampler spends its time on a GPU, at the issue's shape
(Qwen2.5-0.5B, B = 128 rows, a 64-token prompt, 128 new tokens, bf16): the decode step
eagerly and its token pick (`_pick`: log-softmax over the vocabulary and the draw) on their
own, then the step with its pick (and the noise drawn before each replay) as a CUDA graph
(what `sample(..., cuda_graph=True)` runs), and the same compiled by inductor before the
capture (`compiled=True`).

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
from bench.rollout import SHAPES, hbm_tbs  # noqa: E402
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
        logits = eager()  # [N, V]
        res["pick_ms"] = ms_per_call(lambda: _pick(logits, 1.0, 0, 1.0, None))
        step = _graph_step(m, w, None, cache, real, p, 1.0, 0, 1.0, None)
        res["graph_step_ms"] = ms_per_call(lambda: step(tok, pos, at))
        t0 = time.perf_counter()
        step = _graph_step(m, w, None, cache, real, p, 1.0, 0, 1.0, None, compiled=True)
        res["compile_s"] = time.perf_counter() - t0
        res["compiled_graph_step_ms"] = ms_per_call(lambda: step(tok, pos, at))
    params = sum(t.numel() for t in lm.parameters())
    tbs = hbm_tbs(torch.cuda.get_device_name()) if torch.cuda.is_available() else 0.0
    if tbs:  # every weight read once, bf16, at the GPU's spec-sheet bandwidth
        res["roofline_ms"] = 1e3 * params * 2 / (tbs * 1e12)
    for k, v in res.items():
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
