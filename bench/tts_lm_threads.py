"""Seconds per training step of the toy TTS LM at a given thread count: the measurement
behind sft_tts.py's side-by-side build (two processes at half the threads each beat one
process at all of them when a second thread gains little).

    python bench/tts_lm_threads.py --threads 2
    python bench/tts_lm_threads.py --threads 1
    python bench/tts_lm_threads.py --threads 1 & python bench/tts_lm_threads.py --threads 1   # side by side
    python bench/tts_lm_threads.py --threads 2 --bf16 false   # fp32 (default: bf16 where sft_tts.py uses it)

It builds (or finds) the toy TTS world's tokenizer, then times 40 training steps (after 5
warm-up steps) of a fresh LM on length-bucketed batches, as the LM stage trains: the output
loss and the prompt-token loss, bf16 autocast where sft_tts.py would use it, AdamW.
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import sft_tts as S  # noqa: E402
from common.data import Skips, length_batches, read_data  # noqa: E402
from common.toy import vocabulary  # noqa: E402
from common.tts import build_toy_tts  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
               help="bf16 autocast: auto = as sft_tts.py decides (on where the CPU has avx512_bf16)")
args = p.parse_args()
torch.set_num_threads(args.threads)
a = S.Args()
if args.bf16 != "auto":
    a.lm_bf16 = args.bf16 == "true"
w = S.build_tts_world(a, upto="tokenizer")
with open(w["tokens"]) as f:
    tokens = json.load(f)
train = [u for u in read_data(os.path.join(w["world"], "train", "manifest.jsonl"), Skips())
         if u.key in tokens["train"]]
lm = build_toy_tts(vocabulary(), a.n_tokens, a.lm_d, a.lm_layers, seed=0).train()
rng = random.Random(0)
ex = S.tts_examples(lm, train, tokens["train"], train, tokens["train"], rng)
lens = [len(p) + len(o) + rng.random() for p, o in ex]
batches = [[ex[i] for i in b] for b in length_batches(lens, a.batch_size, seed=1)]
opt = torch.optim.AdamW(lm.parameters(), lr=a.lm_lr)


def step(batch) -> None:
    with torch.autocast("cpu", torch.bfloat16, enabled=a.lm_bf16):
        loss = S.lm_nll(lm, batch, a.lm_prompt_loss)  # the LM stage's own loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


for b in batches[:5]:
    step(b)
t0 = time.time()
for b in batches[5 : 5 + args.steps]:
    step(b)
print(f"threads {args.threads}, bf16 autocast {a.lm_bf16}: {(time.time() - t0) / args.steps:.3f} s a step "
      f"({args.steps} steps of {a.batch_size})")
