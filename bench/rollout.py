"""Benchmark: our rollout sampler (`common.models.sample`) against HF `generate` on the
same model, prompts, batch, length and sampling settings, side by side in one run.

    python bench/rollout.py            # CUDA if present (B=128, 64-token prompts, 256 new tokens)
    python bench/rollout.py --quick    # CPU-sized

Two model shapes, random weights from configs: the toy TTS LM (hidden 256, 4 layers) and
Qwen2.5-0.5B (hidden 896, 24 layers, V = 151,936). Prompts are left-padded input
embeddings, as the scripts use them; sampling at T = 1 with no top-k/top-p; no token
ends a sequence early, so both produce B x new tokens. B rows are B / G prompts with G
samples each (`--g`, GRPO's group; default 8): ours prefills each prompt once
(`group=G`), HF `generate` gets `num_return_sequences=G` (it expands the prompts before
its prefill); `--g 1` gives B distinct prompts. A third column ("dyn.") runs our
loop on the model's own forward and growing cache (`static_cache=False`), to show what the
static cache changes. On CUDA a fourth ("graph") replays each decode step, pick included,
as a CUDA graph (`cuda_graph=True`), and a fifth ("compiled") compiles that step with
inductor before capturing it (`compiled=True`; the warm-up call pays the compilation). Per
decode step they are set beside the weight-read roofline: every weight read once at the
GPU's memory bandwidth (the spec sheet's, from `HBM_TBS` by the device's name, or
`--tbs`). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models import sample  # noqa: E402

SHAPES = {
    "tts": dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2),
    "qwen2.5-0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}
# spec-sheet memory bandwidth, TB/s, by a part of the name torch reports; the first match wins
HBM_TBS = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "GH200": 4.0, "H200": 4.8,
           "A100-SXM4-80GB": 2.039, "A100-SXM4-40GB": 1.555, "A100 80GB PCIe": 1.935}


def hbm_tbs(name: str) -> float:
    """The spec-sheet memory bandwidth (TB/s) of a GPU by its torch name; 0.0 if unknown."""
    return next((v for k, v in HBM_TBS.items() if k in name), 0.0)


def timed(fn, device: str, reps: int) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def bench(name: str, b: int, prompt: int, new: int, device: str, dtype: torch.dtype, reps: int,
          g: int, tbs: float) -> dict:
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES[name])).to(device, dtype).eval()
    d = lm.config.hidden_size
    emb = torch.randn(b // g, prompt, d, device=device, dtype=dtype) * 0.02  # b // g prompts, g samples each
    mask = torch.ones(b // g, prompt, dtype=torch.long, device=device)
    mask[::2, : prompt // 4] = 0  # every other prompt left-padded by a quarter
    never = lm.config.vocab_size  # an id the model cannot emit: every row runs to `new` tokens

    def ours():
        sample(lm, emb, mask, new, eos_id=never, temperature=1.0, group=g)

    def ours_dynamic():  # the same loop on the model's own forward and growing cache
        sample(lm, emb, mask, new, eos_id=never, temperature=1.0, static_cache=False, group=g)

    def hf():
        lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
                    num_return_sequences=g)

    def ours_graph():  # each decode step replayed as a CUDA graph
        sample(lm, emb, mask, new, eos_id=never, temperature=1.0, cuda_graph=True, group=g)

    def ours_compiled():  # the same, the step compiled by inductor before the capture
        sample(lm, emb, mask, new, eos_id=never, temperature=1.0, cuda_graph=True, compiled=True, group=g)

    with torch.no_grad():
        t_ours, t_dyn = timed(ours, device, reps), timed(ours_dynamic, device, reps)
        t_graph = timed(ours_graph, device, reps) if device == "cuda" else None
        t_comp = timed(ours_compiled, device, reps) if device == "cuda" else None
        t_hf = timed(hf, device, reps)
    toks = b * new
    graph = {}
    if t_graph is not None:  # CUDA: beside the roofline of reading every weight once a step
        roofline_ms = 1e3 * sum(t.numel() * t.element_size() for t in lm.parameters()) / (tbs * 1e12)
        graph = {
            "graph_s": round(t_graph, 4), "graph_tok_s": round(toks / t_graph, 1),
            "graph_step_ms": round(1e3 * t_graph / new, 3), "hf_step_ms": round(1e3 * t_hf / new, 3),
            "speedup_graph": round(t_hf / t_graph, 3), "compiled_s": round(t_comp, 4),
            "compiled_tok_s": round(toks / t_comp, 1), "compiled_step_ms": round(1e3 * t_comp / new, 3),
            "speedup_compiled": round(t_hf / t_comp, 3), "roofline_tbs": tbs,
            "roofline_step_ms": round(roofline_ms, 3),
            "compiled_over_roofline": round(1e3 * t_comp / new / roofline_ms, 2)}
    return {**graph, "shape": name, "b": b, "g": g, "prompt": prompt, "new": new, "ours_s": round(t_ours, 4),
            "dynamic_s": round(t_dyn, 4), "hf_s": round(t_hf, 4), "tok_s": round(toks / t_ours, 1),
            "hf_tok_s": round(toks / t_hf, 1), "speedup": round(t_hf / t_ours, 3),
            "speedup_vs_dynamic": round(t_dyn / t_ours, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="CPU-sized run")
    p.add_argument("--new", type=int, default=0, help="new tokens per sequence (0 = by device)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (0 = by device)")
    p.add_argument("--g", type=int, default=8, help="samples per prompt (GRPO's G; B / G prompts)")
    p.add_argument("--tbs", type=float, default=0.0,
                   help="memory bandwidth for the roofline, TB/s (0 = the spec sheet's, by the GPU's name)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    tbs = a.tbs or hbm_tbs(name)
    if device == "cuda" and not tbs:
        p.error(f"no memory bandwidth known for {name!r}: pass --tbs")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        runs = [("tts", 128, 64, a.new or 256), ("qwen2.5-0.5b", 128, 64, a.new or 256)]
    else:
        runs = [("tts", 64, 32, a.new or 48), ("qwen2.5-0.5b", 8, 32, a.new or 24)]
    reps = a.reps or (3 if device == "cuda" else 2)
    rows = [bench(n, b, pr, nw, device, dtype, reps, a.g, tbs) for n, b, pr, nw in runs]
    where = name or f"CPU ({torch.get_num_threads()} threads)"
    print(f"rollout, sampling T=1, {dtype} on {where}, G = {a.g} samples per prompt")
    print(f"{'shape':14s} {'B':>4s} {'prompt':>6s} {'new':>4s} {'ours s':>8s} {'dyn. s':>8s} {'HF s':>8s} "
          f"{'ours tok/s':>11s} {'HF tok/s':>9s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['shape']:14s} {r['b']:4d} {r['prompt']:6d} {r['new']:4d} {r['ours_s']:8.3f} "
              f"{r['dynamic_s']:8.3f} {r['hf_s']:8.3f} {r['tok_s']:11.1f} {r['hf_tok_s']:9.1f} "
              f"{r['speedup']:8.3f}")
    for r in rows:
        if "graph_s" in r:
            print(f"{r['shape']:14s} CUDA graph: {r['graph_s']:.3f} s, {r['graph_tok_s']:.1f} tok/s, "
                  f"{r['graph_step_ms']:.2f} ms a step (HF {r['hf_step_ms']:.2f}), "
                  f"speedup {r['speedup_graph']:.3f}")
            print(f"{r['shape']:14s} compiled + graph: {r['compiled_s']:.3f} s, "
                  f"{r['compiled_tok_s']:.1f} tok/s, "
                  f"{r['compiled_step_ms']:.2f} ms a step, speedup {r['speedup_compiled']:.3f}, "
                  f"{r['compiled_over_roofline']:.1f}x the roofline "
                  f"({r['roofline_step_ms']:.3f} ms at {tbs} TB/s)")
    main_row = rows[-1]
    print(json.dumps({"device": where, "speedup": main_row["speedup"], "tok_s": main_row["tok_s"],
                      "speedup_compiled": main_row.get("speedup_compiled"),
                      "hf_tok_s": main_row["hf_tok_s"], "rows": rows}))


if __name__ == "__main__":
    main()
