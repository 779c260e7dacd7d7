#!/usr/bin/env bash
# The CUDA checks, run on a lent GPU box in one call (see BENCHMARKS.md). Assumes torch and
# transformers are installed there, and SPEECHRL_CACHE holds what `bench/gpu_prep.py` built
# on a machine with the synthesizers and pip (the GPU box has neither): a tiny ASR toy world
# with an SFT start, a slice of the TTS world, and wheels of the other requirements. Each
# check has its own time limit; metrics come back under $OUT. Arguments pick sections
# (sampler rollout asr update tts kernel logprob trl probe), so that one lent session's minutes go
# where they are needed:  bash bench/gpu_check.sh sampler probe
set -uo pipefail
export SPEECHRL_CACHE=${SPEECHRL_CACHE:-gpu_cache}
OUT=${OUT:-/tmp/gpu_check}
python -m pip install -q --no-index --no-deps --find-links "$SPEECHRL_CACHE/wheels" \
  soundfile jiwer tqdm cffi pycparser click rapidfuzz
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
SECTIONS="$*"
want() { [ -z "$SECTIONS" ] || [[ " $SECTIONS " == *" $1 "* ]]; }  # no arguments: every section
if want sampler; then
  echo "== sampler: the CUDA-graph decode step, plain and compiled, against eager and HF generate"
  timeout 100 python bench/sampler_check.py
fi
if want rollout; then
  echo "== rollout benchmark, B=128, 64-token prompts, 256 new tokens (eager, dynamic, graph, compiled graph, HF)"
  timeout 240 python bench/rollout.py --reps 1
fi
W=$(ls -d "$SPEECHRL_CACHE"/toy-*)
if want asr; then
  for mode in "true true" "true false"; do
    set -- $mode
    echo "== grpo_asr.py on CUDA, bf16, --cuda_graph $1 --compile_sampler $2 (tiny toy world $W)"
    timeout 90 python grpo_asr.py --data "$W/train/manifest.jsonl" --dev_data "$W/dev/manifest.jsonl" \
      --test_data "$W/test-seen/manifest.jsonl" --init "$SPEECHRL_CACHE/sft/best" --out_dir "/tmp/grpo_$1_$2" \
      --steps 6 --eval_every 3 --cuda_graph $1 --compile_sampler $2 2>&1 | grep -v "it/s\|s/it" | tail -4
    mkdir -p "$OUT/grpo_asr_$1_$2" && cp /tmp/grpo_$1_$2/*.json* "$OUT/grpo_asr_$1_$2/"
  done
fi
if want update; then
  echo "== the update's teacher-forced pass: whole sequences against prefix sharing, MFU (toy TTS, Qwen2.5-0.5B)"
  timeout 150 python bench/update.py --steps 3
fi
T=$SPEECHRL_CACHE/tts
if want tts; then
  FIRST=$(head -1 $T/dev/manifest.jsonl)  # the default prompt voice: the first dev line's audio and text
  field() { echo "$FIRST" | python -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
  echo "== grpo_tts.py on CUDA, bf16, CUDA graphs (a slice of the TTS world)"
  timeout 100 python grpo_tts.py --data $T/rl/manifest.jsonl --dev_data $T/dev/manifest.jsonl \
    --test_data $T/test-seen/manifest.jsonl --init $T/tts_lm --tokenizer $T/tokenizer --token2mel $T/token2mel \
    --reward_asr $T/reward_asr --eval_asr $T/eval_asr --speaker_model $T/speaker \
    --prompt_audio "$T/dev/$(field audio)" --prompt_text "$(field text)" \
    --steps 4 --eval_every 2 --out_dir /tmp/grpo_tts 2>&1 | grep -v "it/s\|s/it" | tail -6
  mkdir -p "$OUT/grpo_tts" && cp /tmp/grpo_tts/*.json* "$OUT/grpo_tts/"
fi
if want kernel; then
  echo "== kernel parity on CUDA (log-prob and entropy, eager and compiled)"
  timeout 150 python bench/kernel_check.py
fi
if want logprob; then
  echo "== the log-prob benchmark"
  timeout 300 python bench/logprob.py
fi
if want trl; then
  echo "== one GRPO step against TRL's GRPOTrainer"
  python -m pip install -q --no-index --find-links "$SPEECHRL_CACHE/wheels" --find-links "$SPEECHRL_CACHE/wheels_trl" \
    trl datasets
  timeout 250 python bench/vs_trl.py --steps 2
fi
if want probe; then
  echo "== what the box has for bench/vs_trl.py"
  python -m pip list 2>/dev/null | grep -i -E "^(trl|datasets|accelerate|pyarrow|pandas|liger|peft) " || echo "none of trl's dependencies"
fi
