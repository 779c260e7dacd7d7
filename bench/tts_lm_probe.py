"""Probe the TTS LM SFT stage alone: builds (or finds) the tokenizer stage of the toy TTS
world, then runs `sft_tts.build_tts_lm` with a short budget into runs/tts_lm_probe, and
prints seconds per step and the dev NLL curve. It skips token2wav and the judges, so it
answers "how fast does the TTS LM learn" in minutes instead of the full build's ~50.

    python bench/tts_lm_probe.py 8        # minutes of TTS LM training
"""
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import sft_tts as S  # noqa: E402
from common.data import Skips  # noqa: E402

a = S.Args(lm_minutes=float(sys.argv[1]) if len(sys.argv) > 1 else 8.0)
torch.manual_seed(a.seed)
world = os.path.dirname(os.path.dirname(S.build_toy_world(S.TTS_SIZES, snr_db=None)["train"]))
tok_dir = S.cached(a, world, "tokenizer")
need = not os.path.isfile(os.path.join(tok_dir, "done.json"))
names = ["train", "dev"] + (["test-seen", "test-unseen", "rl"] if need else [])
t0 = time.time()
splits = {n: S.load_split(os.path.join(world, n, "manifest.jsonl"), Skips()) for n in names}
if need:  # the same stage, and the same done.json, as build_tts_world writes
    os.makedirs(tok_dir, exist_ok=True)
    rep = S.build_tokenizer(a, tok_dir, splits)
    rep["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(tok_dir, "done.json"), "w") as f:
        json.dump({"args": asdict(a), "report": rep}, f, indent=1)
    print("tokenizer", json.dumps(rep), flush=True)
with open(os.path.join(tok_dir, "tokens.json")) as f:
    tokens = json.load(f)
os.makedirs("runs/tts_lm_probe", exist_ok=True)
rep = S.build_tts_lm(a, "runs/tts_lm_probe", splits, tokens)
print(json.dumps({**rep, "s_per_step": round(60 * rep["minutes"] / rep["steps"], 3)}), flush=True)
