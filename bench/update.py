"""Benchmark: the teacher-forced pass of one GRPO update, every prompt + sample sequence run
whole (the plain way, as TRL does) against prefix sharing (each prompt run once, its keys and
values shared by its G samples: `common.models.prefix_shared_hidden`, what both GRPO scripts
use), with the samples in one pass padded to the longest (`one_pass`) or by length, 32 a
pass (`shared`, the scripts' way). Each variant runs in its own subprocess, so each peak
memory is its own.

    python bench/update.py           # CUDA if present: toy TTS LM and Qwen2.5-0.5B shapes, bf16
    python bench/update.py --quick   # CPU-sized: the toy TTS LM shape only, fp32
    python bench/update.py --quick --bf16   # the same under CPU bf16 autocast (grpo_tts --bf16 true)
    python bench/update.py --quick --spread # sampled lengths: uniform in [new/4, 7 new/4], mean new

One measured step = ℓ(ref) from a frozen copy without gradient + ℓ with forward and backward
(the fused log-prob kernel on the output rows of the head), as in `grpo_tts.py` at μ = 1.
Models: the toy TTS LM (hidden 256, 4 layers) and one with Qwen2.5-0.5B's hidden size,
layers and heads (896, 24, 14) over the same small vocabulary, random weights. Shapes: B
prompts of 61-101 tokens (CosyVoice-2-like: 20 text ids, <sos>, 40-80 prompt speech ids;
`--prompt N` makes it N on average, uniform in [2N/3, 4N/3], as an LLM-ASR's audio prompt of
hundreds of frames), G samples of `--new` tokens each. Time per step = median of the timed steps after one
warm-up. Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the peak RSS growth
over the steps (sampled every 5 ms). The last line is one JSON object with `speedup` =
whole_s / shared_s, `mem_ratio` = whole_peak / shared_peak and `by_length` = one_pass_s /
shared_s (of the first shape), and on
an H100/H200 the MFU of the shared (the scripts') step per shape: model FLOPs (8 x the
weights x the tokens run) per second over 989.4 TFLOP/s, the dense bf16 peak.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.vs_trl import peak_mb, start_peak, step_times  # noqa: E402
from common.logprob import token_logprobs  # noqa: E402
from common.tts import build_toy_tts  # noqa: E402

K = 512  # speech tokens
PEAK_TFLOPS_BF16 = 989.4  # H100 / H200 SXM, dense bf16: MFU is measured against it
SHAPES = {"tts": dict(d=256, layers=4, heads=4), "qwen2.5-0.5b": dict(d=896, layers=24, heads=14)}


def speech_range(n: int) -> tuple[int, int]:
    """A prompt's speech tokens: uniform in [2n/3, 4n/3] (n = 60: 40-80, CosyVoice-2-like)."""
    return n * 2 // 3, n * 4 // 3


def run(a: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = SHAPES[a.shape]
    lm = build_toy_tts([f"word{i}" for i in range(108)], K, d=cfg["d"], layers=cfg["layers"],
                       heads=cfg["heads"], dropout=0.0).to(a.device).eval()
    ref = copy.deepcopy(lm.lm).requires_grad_(False)
    lo, hi = speech_range(a.prompt)
    prompts = [[rng.randrange(4, lm.offset) for _ in range(20)] + [lm.sos_id]
               + [lm.offset + rng.randrange(K) for _ in range(rng.randint(lo, hi))] for _ in range(a.b)]
    n_out = [rng.randint(a.new // 4, a.new * 7 // 4) if a.spread else a.new for _ in range(a.b * a.g)]
    outs = [[rng.randrange(K + 1) for _ in range(n)] for n in n_out]  # group-major
    y = torch.tensor([t for o in outs for t in o], device=a.device)
    adv = torch.randn(len(y), device=a.device)

    def hidden(net: torch.nn.Module) -> torch.Tensor:  # [Σ|o_i|, d]
        if a.variant == "shared":  # the scripts' update: the outputs by length, 32 rows a pass
            return lm.output_hidden(net, prompts, outs)
        if a.variant == "one_pass":  # the same, every output padded to the longest in one pass
            return lm.output_hidden(net, prompts, outs, rows_per_pass=len(outs))
        ids, mask, pos, pred, _ = lm.batch([p for p in prompts for _ in range(a.g)], outs)
        h = net.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return h.flatten(0, 1)[pred]

    def step() -> None:
        with torch.autocast(a.device, torch.bfloat16, enabled=a.device == "cuda" or a.bf16):
            with torch.no_grad():
                lp_ref = token_logprobs(hidden(ref), lm.head(ref), y)
            lp = token_logprobs(hidden(lm.lm), lm.head(), y)
        (-(lp - lp_ref.detach()) * adv).mean().backward()
        lm.zero_grad(set_to_none=True)

    step()  # warm-up
    watch = start_peak(a.device)
    times = step_times(step, a.device, a.steps)
    res = {"s": statistics.median(times), "peak_mb": peak_mb(a.device, watch)}
    # Model FLOPs of the step: 2 per parameter per token in a forward, 4 in a backward; ℓ(ref)
    # is a forward, ℓ a forward and a backward, so 8 * params * tokens run (the layers' weights
    # and the output rows; attention scores, about 2% at these lengths, are left out).
    params = sum(w.numel() for n, w in lm.lm.named_parameters() if "embed" not in n and "lm_head" not in n)
    params += lm.head().numel()
    prompt_tokens = sum(map(len, prompts)) * (a.g if a.variant == "whole" else 1)
    res["tflop"] = 8 * params * (prompt_tokens + len(y)) / 1e12
    if a.device == "cuda" and any(h in torch.cuda.get_device_name() for h in ("H100", "H200")):
        res["mfu"] = res["tflop"] / res["s"] / PEAK_TFLOPS_BF16
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized run (the toy TTS LM shape)")
    p.add_argument("--b", type=int, default=8, help="prompts per step")
    p.add_argument("--g", type=int, default=8, help="samples per prompt")
    p.add_argument("--new", type=int, default=0, help="tokens per sample (0: 64 quick, 256 full)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--spread", action="store_true", help="output lengths uniform in [new/4, 7 new/4]")
    p.add_argument("--prompt", type=int, default=60,
                   help="mean prompt speech tokens, uniform in [2/3, 4/3] of that (after 20 text ids, <sos>)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on on CUDA)")
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)  # set in the subprocesses
    p.add_argument("--shape", default="tts", help=argparse.SUPPRESS)
    p.add_argument("--device", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.device = a.device or ("cpu" if a.quick or not torch.cuda.is_available() else "cuda")
    if a.variant:
        print(json.dumps(run(a)))
        return
    a.new = a.new or (64 if a.quick else 256)
    shapes = ["tts"] if a.device == "cpu" else ["tts", "qwen2.5-0.5b"]
    lo, hi = speech_range(a.prompt)
    print(f"device {a.device}, torch {torch.__version__}, B={a.b}, G={a.g}, "
          f"prompts {21 + lo}-{21 + hi}, new {a.new}, "
          f"bf16 autocast {a.device == 'cuda' or a.bf16}")
    print(f"{'shape':<14} {'variant':<9} {'s/step':>8} {'peak MB':>9}"
          + (f" {'TFLOP/s':>9} {'MFU':>6}" if a.device == "cuda" else ""))
    res = {}
    for shape in shapes:
        for variant in ("whole", "one_pass", "shared"):
            cmd = [sys.executable, __file__, "--variant", variant, "--shape", shape, "--device", a.device,
                   "--b", str(a.b), "--g", str(a.g), "--new", str(a.new), "--steps", str(a.steps),
                   "--prompt", str(a.prompt)]
            cmd += (["--bf16"] if a.bf16 else []) + (["--spread"] if a.spread else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                           .splitlines()[-1])
            res[shape, variant] = r
            mfu = f"{r['tflop'] / r['s']:>9.1f} {r['mfu']:>6.1%}" if "mfu" in r else ""
            print(f"{shape:<14} {variant:<9} {r['s']:>8.3f} {r['peak_mb']:>9.0f} {mfu}")
    def ratios(shape: str) -> tuple[float, float]:
        w, sh = res[shape, "whole"], res[shape, "shared"]
        return round(w["s"] / sh["s"], 3), round(w["peak_mb"] / max(sh["peak_mb"], 1e-9), 3)

    out = dict(zip(("speedup", "mem_ratio"), ratios(shapes[0]), strict=True))
    out["by_length"] = round(res[shapes[0], "one_pass"]["s"] / res[shapes[0], "shared"]["s"], 3)
    for shape in shapes[1:]:
        out[f"speedup_{shape}"], out[f"mem_ratio_{shape}"] = ratios(shape)
    for shape in shapes:
        if "mfu" in res[shape, "shared"]:
            out[f"mfu_{shape}"] = round(res[shape, "shared"]["mfu"], 4)  # the scripts' update
    out.update({"device": a.device, "b": a.b, "g": a.g, "prompt": a.prompt, "new": a.new, "spread": a.spread,
                "bf16": a.device == "cuda" or a.bf16})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
