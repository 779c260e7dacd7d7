"""Benchmark: one GRPO step's rollout and judges on the cached toy TTS world, timed part by
part, with the batchings side by side in one run.

    python bench/tts_step_parts.py [--trials 3]
    PYTHONPATH=<another checkout> python bench/tts_step_parts.py   # the same at other code

Each trial samples a default GRPO batch (16 `rl` texts, G = 8, T = 1, top-k 25, a fixed
seed per trial) with `grpo_tts.synthesize`, then runs the step's judges: token2mel over
every output (`judge_mels`) and the reward ASR's greedy CTC (`transcribe`). Beside them,
token2mel at one batch of all outputs padded to the longest (the way before it ran by
length) and the reward ASR at 64, 32 and 16 a batch. The outputs' hash and the transcripts'
hash are printed, so runs at two commits can be checked to draw and hear the same. It reads
the cached toy TTS world, and builds it first if it is missing (over an hour on 2 cores; set
SPEECHRL_CACHE to read another cache).
One JSON line per trial.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_tts as g  # noqa: E402
from common.data import Skips  # noqa: E402
from common.tts import conditions, load_judge, load_module  # noqa: E402
from sft_tts import build_tts_world  # noqa: E402


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - t0, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    w = build_tts_world()
    a = g.Args()
    lm = load_module(w["tts_lm"]).eval()
    t2m, asr, tok = load_module(w["token2mel"]), load_judge(w["reward_asr"]), load_module(w["tokenizer"])
    conds = conditions(os.path.join(w["world"], "rl", "manifest.jsonl"), lm, tok, Skips())
    B, G = a.batch_size, a.group_size
    for trial in range(args.trials):
        batch = [conds[i] for i in random.Random(trial).sample(range(len(conds)), B)]
        gen = torch.Generator().manual_seed(trial)
        (outs, _), t_sample = timed(g.synthesize, lm, batch, a, a.temperature, gen, repeat=G)
        voices = [c.prompt_mel for c in batch for _ in range(G)]
        mels, t_mel = timed(g.judge_mels, t2m, outs, lm.n_speech, voices)
        have = [i for i, m in enumerate(mels) if m is not None]
        speech = [g.speech_of(outs[i], lm.n_speech) for i in have]
        ref, t_mel_one = timed(t2m.mel, speech, [voices[i] for i in have], batch_size=len(speech))
        diff = max(float((mels[i] - r).abs().max()) for i, r in zip(have, ref, strict=True))
        hyps, t_asr = timed(g.transcribe, asr, mels, False)
        r = {"trial": trial, "sample_s": t_sample, "token2mel_s": t_mel, "token2mel_one_batch_s": t_mel_one,
             "token2mel_max_abs_diff": diff, "reward_asr_s": t_asr}
        for bs in (64, 32, 16):
            h, r[f"reward_asr_{bs}_s"] = timed(asr.transcribe, [mels[i] for i in have], batch_size=bs)
            r[f"reward_asr_{bs}_same"] = h == [hyps[i] for i in have]
        lens = [len(o) for o in outs]
        r.update(mean_len=round(sum(lens) / len(lens), 1), max_len=max(lens),
                 outputs_md5=hashlib.md5(json.dumps(outs).encode()).hexdigest()[:10],
                 transcripts_md5=hashlib.md5("|".join(hyps).encode()).hexdigest()[:10])
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
