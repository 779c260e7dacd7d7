"""Which judge sees RL's change? Dev CER of the toy TTS world's SFT LM and of the given
checkpoints, greedy and one T = 1 sample per text, by the reward ASR on token2mel's mel,
the reward ASR on the decoded audio and the evaluation ASR on the decoded audio.

    python bench/tts_judge_gap.py runs/grpo_tts/last [more checkpoints]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import grpo_tts as g
from common.data import Skips, corpus_error
from common.tts import conditions, load_judge, load_module
from sft_tts import build_tts_world

torch.set_num_threads(1)
w = build_tts_world()
a = g.Args(device="cpu", bf16=False)
judges = {"tok": load_module(w["tokenizer"]), "t2m": load_module(w["token2mel"]),
          "reward_asr": load_judge(w["reward_asr"]), "eval_asr": load_judge(w["eval_asr"])}
dev_path = os.path.join(w["world"], "dev", "manifest.jsonl")
for ck in [w["tts_lm"], *sys.argv[1:]]:
    lm = load_module(ck)
    conds = conditions(dev_path, lm, judges["tok"], Skips())
    refs = [c.utt.text for c in conds]
    row = {}
    for name, temp in (("greedy", 0.0), ("T=1", 1.0)):
        gen = torch.Generator().manual_seed(0)
        outs, ended = g.synthesize(lm, conds, a, temp, gen)
        mels = g.judge_mels(judges["t2m"], outs, lm.n_speech, [c.prompt_mel for c in conds])
        for j, via in (("reward_mel", False), ("reward_wav", True), ("eval_wav", True)):
            asr = judges["reward_asr" if j.startswith("reward") else "eval_asr"]
            torch.manual_seed(0)
            hyps = g.transcribe(asr, mels, via)
            row[f"{name}/{j}"] = round(corpus_error(refs, hyps, "char")["wer"], 4)
        row[f"{name}/len"] = round(sum(map(len, outs)) / len(outs), 1)
    print(ck, row, flush=True)
