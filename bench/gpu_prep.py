"""Build, on a machine with the synthesizers and pip, what `bench/gpu_check.sh` carries to a
GPU box that has neither: a tiny ASR toy world with a short SFT warm start, a slice of the
built TTS world (its frozen models and a few manifest lines with their audio), and wheels of
the requirements the box lacks (soundfile, jiwer, tqdm and their dependencies), and in
wheels_trl/ what `bench/vs_trl.py` needs there (trl, datasets and the few of their
dependencies the box lacked).

    python bench/gpu_prep.py   # into $SPEECHRL_CACHE (default gpu_cache/); carry it (about 63 MB)

The TTS slice needs the toy TTS world in the normal cache (`python sft_tts.py` builds it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.toy import build_toy_world  # noqa: E402

LINES = {"rl": 24, "dev": 8, "test-seen": 8}  # TTS manifest lines per split
WHEELS = ["soundfile", "jiwer", "tqdm"]  # and their dependencies, for the Pythons a box may have
# bench/vs_trl.py on the box: it had accelerate, pandas and pyarrow, not these (2026-11-27)
TRL_WHEELS = ["trl==1.16.0", "datasets", "dill", "multiprocess", "xxhash", "fsspec",
              "huggingface_hub>=1.31,<2", "psutil", "jinja2", "markupsafe"]


def main() -> None:
    out = os.environ.setdefault("SPEECHRL_CACHE", "gpu_cache")  # where everything for the box goes
    w = build_toy_world({"train": 96, "dev": 16, "test-seen": 16, "test-unseen": 16})
    sft = os.path.join(out, "sft")
    if not os.path.isdir(os.path.join(sft, "best")):
        subprocess.run([sys.executable, "sft_asr.py", "--data", w["train"], "--dev_data", w["dev"],
                        "--test_data", w["test-seen"], "--out_dir", sft, "--max_steps", "60",
                        "--eval_every", "30", "--batch_size", "16"], check=True)
        shutil.rmtree(os.path.join(sft, "last"))  # the optimizer state: not needed, and carry is small
    # the TTS world's frozen pieces and a few lines of it, from the normal cache
    os.environ.pop("SPEECHRL_CACHE")  # the built TTS world lives in the normal cache
    from sft_tts import build_tts_world

    tw = build_tts_world()
    tts = os.path.join(out, "tts")
    for name in ("tokenizer", "token2mel", "reward_asr", "eval_asr", "speaker", "tts_lm"):
        shutil.copytree(tw[name], os.path.join(tts, name), dirs_exist_ok=True)
    for split, n in LINES.items():
        src = os.path.join(tw["world"], split, "manifest.jsonl")
        os.makedirs(os.path.join(tts, split, "wav"), exist_ok=True)
        with open(src) as fh:
            rows = [json.loads(line) for line in fh][:n]
        for r in rows:
            dst = os.path.join("wav", os.path.basename(r["audio"]))
            shutil.copy(os.path.join(os.path.dirname(src), r["audio"]), os.path.join(tts, split, dst))
            r["audio"] = dst
        with open(os.path.join(tts, split, "manifest.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    for py in ("311", "312", "313"):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                        "--python-version", py, "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", os.path.join(out, "wheels"), *WHEELS],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", py, "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "-d", os.path.join(out, "wheels_trl"), *TRL_WHEELS], check=True)
    for f in os.listdir(os.path.join(out, "wheels")):  # big, and the lent box had them (2026-11-27)
        if f.startswith(("numpy-", "typing_extensions-")):
            os.remove(os.path.join(out, "wheels", f))
    print(f"{out}: ASR world {os.path.dirname(os.path.dirname(w['train']))}, SFT {sft}/best, TTS slice {tts}")


if __name__ == "__main__":
    main()
