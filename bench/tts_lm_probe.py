"""Probe the TTS LM SFT stage alone: builds (or finds) the toy TTS world up to its
tokenizer, then runs `sft_tts.build_tts_lm` with a short budget into runs/tts_lm_probe, and
prints seconds per step and the dev NLL curve. It skips token2wav and the judges, so it
answers "how fast does the TTS LM learn" in minutes instead of the full build's ~50.

    python bench/tts_lm_probe.py 8             # minutes of TTS LM training
    python bench/tts_lm_probe.py 8 semantic    # on the semantic tokens (sft_tts --tokens)

The LM lands in runs/tts_lm_probe[-semantic]/tts_lm; `grpo_tts.py --eval_only --init` on it
(with that world's --tokenizer and --token2mel) gives its greedy CER.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sft_tts as S  # noqa: E402
from common.data import Skips  # noqa: E402

a = S.Args(lm_minutes=float(sys.argv[1]) if len(sys.argv) > 1 else 8.0,
           tokens=sys.argv[2] if len(sys.argv) > 2 else "mel")
paths = S.build_tts_world(a, upto="tokenizer")
splits = {n: S.load_split(os.path.join(paths["world"], n, "manifest.jsonl"), Skips())
          for n in ("train", "dev")}
with open(paths["tokens"]) as f:
    tokens = json.load(f)
out = "runs/tts_lm_probe" + ("" if a.tokens == "mel" else f"-{a.tokens}")
os.makedirs(out, exist_ok=True)
rep = S.build_tts_lm(a, out, splits, tokens)
print(json.dumps({**rep, "s_per_step": round(60 * rep["minutes"] / rep["steps"], 3)}), flush=True)
