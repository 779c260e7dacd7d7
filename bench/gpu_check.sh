#!/usr/bin/env bash
# The CUDA checks, run on a lent GPU box in one call (see BENCHMARKS.md). Assumes torch and
# transformers are installed there, and SPEECHRL_CACHE holds what `bench/gpu_prep.py` built
# on a machine with the synthesizers and pip (the GPU box has neither): a tiny ASR toy world
# with an SFT start, a slice of the TTS world, and wheels of the other requirements. Each
# check has its own time limit, most valuable first; metrics come back under $OUT.
set -uo pipefail
export SPEECHRL_CACHE=${SPEECHRL_CACHE:-gpu_cache}
OUT=${OUT:-/tmp/gpu_check}
python -m pip install -q --no-index --no-deps --find-links "$SPEECHRL_CACHE/wheels" \
  soundfile jiwer tqdm cffi pycparser click rapidfuzz
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== sampler: the CUDA-graph decode step against eager and HF generate"
timeout 90 python bench/sampler_check.py
echo "== rollout benchmark, B=128, 64-token prompts, 128 new tokens (eager, dynamic, CUDA graph, HF)"
timeout 170 python bench/rollout.py --new 128 --reps 1
W=$(ls -d "$SPEECHRL_CACHE"/toy-*)
for graph in true false; do
  echo "== grpo_asr.py on CUDA, bf16, --cuda_graph $graph (tiny toy world $W)"
  timeout 75 python grpo_asr.py --data "$W/train/manifest.jsonl" --dev_data "$W/dev/manifest.jsonl" \
    --test_data "$W/test-seen/manifest.jsonl" --init "$SPEECHRL_CACHE/sft/best" --out_dir "/tmp/grpo_$graph" \
    --steps 6 --eval_every 3 --cuda_graph $graph 2>&1 | grep -v "it/s\|s/it" | tail -4
  mkdir -p "$OUT/grpo_asr_$graph" && cp /tmp/grpo_$graph/*.json* "$OUT/grpo_asr_$graph/"
done
echo "== the update's teacher-forced pass: whole sequences against prefix sharing, MFU (toy TTS, Qwen2.5-0.5B)"
timeout 150 python bench/update.py --steps 3
T=$SPEECHRL_CACHE/tts
FIRST=$(head -1 $T/dev/manifest.jsonl)  # the default prompt voice: the first dev line's audio and text
field() { echo "$FIRST" | python -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
echo "== grpo_tts.py on CUDA, bf16, CUDA graphs (a slice of the TTS world)"
timeout 100 python grpo_tts.py --data $T/rl/manifest.jsonl --dev_data $T/dev/manifest.jsonl \
  --test_data $T/test-seen/manifest.jsonl --init $T/tts_lm --tokenizer $T/tokenizer --token2mel $T/token2mel \
  --reward_asr $T/reward_asr --eval_asr $T/eval_asr --speaker_model $T/speaker \
  --prompt_audio "$T/dev/$(field audio)" --prompt_text "$(field text)" \
  --steps 4 --eval_every 2 --out_dir /tmp/grpo_tts 2>&1 | grep -v "it/s\|s/it" | tail -6
mkdir -p "$OUT/grpo_tts" && cp /tmp/grpo_tts/*.json* "$OUT/grpo_tts/"
echo "== kernel parity on CUDA and the log-prob benchmark (measured 2026-11-26; last, as time allows)"
timeout 240 python bench/kernel_check.py
timeout 300 python bench/logprob.py
