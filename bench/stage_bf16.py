"""One training step of the toy TTS world's reward ASR and token2mel, fp32 against bf16
autocast (what the reverted trial da061c2's `sft_tts.py --bf16` did), at their stages' shapes:

    python bench/stage_bf16.py --threads 1

Random inputs of the stages' lengths (log-mels of 150-350 frames, 40-80 tokens) through the
stages' own losses (`sft_tts.ctc_loss`, `sft_tts.token2mel_loss`), the optimizer step
included. Worth it only where /proc/cpuinfo lists avx512_bf16: elsewhere the CPU emulates
bf16 and the bf16 rows are many times slower.
"""
import argparse
import os
import random
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import sft_tts as S  # noqa: E402
from common.tts import CTCRecognizer, Token2Mel  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
rng = random.Random(0)
d = S.Args()

asr = CTCRecognizer({"d": 144, "layers": 3, "conv_blocks": 3})  # the reward ASR's config
speech = [(torch.randn(rng.randint(150, 350), 80),  # (log-mel, utterance): the judges' pairs
           SimpleNamespace(text="".join(rng.choice("abcdefgh ") for _ in range(30))))
          for _ in range(d.judge_batch)]
t2m = Token2Mel({"n_tokens": d.n_tokens, "d": d.t2m_d, "blocks": d.t2m_blocks, "voice": False})
t2m.mean, t2m.std = torch.zeros(80), torch.ones(80)
toks = [torch.randint(0, d.n_tokens, (rng.randint(40, 80),)) for _ in range(d.batch_size)]
triples = [(t, torch.randn(4 * len(t), 80), torch.zeros(160)) for t in toks]  # (tokens, mel, voice)

stages = (("reward ASR", asr, lambda: S.ctc_loss(asr, speech)),  # the stages' own losses
          ("token2mel", t2m, lambda: S.token2mel_loss(t2m, triples)))
for name, net, loss_fn in stages:
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    times = {}
    for bf16 in (False, True, False, True):  # interleaved, each after a warm-up step
        for i in range(args.steps + 1):
            if i == 1:
                t0 = time.time()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = loss_fn().float()
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.setdefault(bf16, []).append((time.time() - t0) / args.steps)
    fp32, bf = min(times[False]), min(times[True])
    print(f"{name}: fp32 {fp32:.3f} s a step, bf16 autocast {bf:.3f} s ({fp32 / bf:.2f}x), "
          f"{args.threads} thread(s)")
