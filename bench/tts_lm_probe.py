"""Probe the TTS LM SFT stage alone: finds (or builds) the toy TTS world's tokenizer, then
runs `sft_tts.build_tts_lm` with the given sft_tts flags into runs/tts_lm_probe/<tag>, and
prints seconds per step and the dev NLL curve. It skips token2wav and the judges (and the
audio: the LM reads only the token cache), so it answers "how fast does the TTS LM learn"
in minutes instead of the full build's.

    python bench/tts_lm_probe.py --lm_steps 1000                # 1,000 steps of TTS LM training
    python bench/tts_lm_probe.py --lm_steps 1000 --tokens semantic
    # learning-rate / loss trials at equal steps (the cosine runs over the smaller of --lm_steps,
    # default 4,700, and --max_steps); --stop_after ends the probe early
    python bench/tts_lm_probe.py --threads 1 --max_steps 2370 --stop_after 600 --lm_lr 3e-3

The LM lands in runs/tts_lm_probe/<tag>/tts_lm; `grpo_tts.py --eval_only --init` on it
(with that world's --tokenizer and --token2mel) gives its greedy CER.
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import sft_tts as S  # noqa: E402
from common import parse_args  # noqa: E402
from common.data import Skips, read_data  # noqa: E402


@dataclasses.dataclass
class Probe(S.Args):
    """Probe the TTS LM stage (every sft_tts flag, plus the two below)."""

    stop_after: int = 0
    """end the probe after the dev check at this step (0 = run the stage to its end)"""
    tag: str = ""
    """folder name under runs/tts_lm_probe (empty: made from the flags that differ from the defaults)"""


a = parse_args(Probe)
if a.threads:
    torch.set_num_threads(a.threads)
base = S.Args(**{f.name: getattr(a, f.name) for f in dataclasses.fields(S.Args)})
# the mel tokenizer (k-means) does not depend on the step cap, the dev-check interval or the
# batch size, which are in every stage's cache key: find the default build's, not a new one
d = S.Args()
tok_args = base if a.tokens != "mel" else dataclasses.replace(base, max_steps=0, eval_every=d.eval_every,
                                                              batch_size=d.batch_size)
paths = S.build_tts_world(tok_args, upto="tokenizer")
splits = {n: (read_data(os.path.join(paths["world"], n, "manifest.jsonl"), Skips()), None)
          for n in ("train", "dev")}
with open(paths["tokens"]) as f:
    tokens = json.load(f)
changed = {f.name: getattr(a, f.name) for f in dataclasses.fields(Probe)
           if f.name not in ("tag", "threads") and getattr(a, f.name) != getattr(Probe(), f.name)}
tag = a.tag or "-".join(f"{k}={v}" for k, v in changed.items()) or "default"
out = os.path.join("runs", "tts_lm_probe", tag)
os.makedirs(out, exist_ok=True)


class Stop(Exception):
    pass


history: list = []
plain = S.train_until_plateau


def until(name, params, step_fn, dev_fn, *rest, **kw):
    """The stage's own loop, ended after the dev check at --stop_after."""
    def dev_then_stop():
        d = dev_fn()
        history.append({"step": a.eval_every * (len(history) + 1), "dev": round(d, 4)})
        if a.stop_after and history[-1]["step"] >= a.stop_after:
            raise Stop
        return d
    return plain(name, params, step_fn, dev_then_stop, *rest, **kw)


S.train_until_plateau = until
try:
    rep = S.build_tts_lm(base, out, splits, tokens)
    rep["s_per_step"] = round(60 * rep["minutes"] / rep["steps"], 3)
except Stop:
    rep = {"stopped": f"--stop_after {a.stop_after}", "history": history}
print(json.dumps({"flags": changed, **rep}), flush=True)
