"""One training step of the toy TTS world's reward ASR and token2mel, fp32 against bf16
autocast (what the reverted trial da061c2's `sft_tts.py --bf16` did), at their stages' shapes:

    python bench/stage_bf16.py --threads 1

Random inputs of the stages' lengths (log-mels of 150-350 frames, 40-80 tokens); the
optimizer step included. Worth it only where /proc/cpuinfo lists avx512_bf16: elsewhere
the CPU emulates bf16 and the bf16 rows are many times slower.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.tts import CTCRecognizer, Token2Mel  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

asr = CTCRecognizer({"d": 144, "layers": 3, "conv_blocks": 3})  # the reward ASR's config
mels = [torch.randn(int(torch.randint(150, 350, ())), 80) for _ in range(16)]  # --judge_batch 16
ys = [torch.randint(0, 27, (30,)) for _ in mels]
t2m = Token2Mel({"n_tokens": 512, "d": 192, "blocks": 6, "voice": False})  # the default token2mel
t2m.mean, t2m.std = torch.zeros(80), torch.ones(80)
toks = [torch.randint(0, 512, (int(torch.randint(40, 80, ())),)) for _ in range(32)]  # --batch_size 32


def asr_loss() -> torch.Tensor:
    lp, hl = asr(mels)
    return F.ctc_loss(lp.transpose(0, 1), torch.cat(ys), hl, torch.tensor([len(y) for y in ys]),
                      blank=lp.shape[-1] - 1, zero_infinity=True)


def t2m_loss() -> torch.Tensor:
    x = torch.nn.utils.rnn.pad_sequence(toks, True)
    y = t2m(x, torch.tensor([len(t) for t in toks]), None)
    return F.l1_loss(y.float(), torch.zeros(y.shape))


for name, net, loss_fn in (("reward ASR", asr, asr_loss), ("token2mel", t2m, t2m_loss)):
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
