#!/usr/bin/env bash
# The CUDA checks run on a lent GPU box (see BENCHMARKS.md). Assumes torch, transformers,
# jiwer, soundfile are installed there, and SPEECHRL_CACHE holds a small toy world built
# on a machine with the synthesizers (the GPU box has none):
#   SPEECHRL_CACHE=gpu_cache python -c "from common.toy import build_toy_world; \
#     build_toy_world({'train': 96, 'dev': 16, 'test-seen': 16, 'test-unseen': 16})"
set -uo pipefail
export SPEECHRL_CACHE=${SPEECHRL_CACHE:-gpu_cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== kernel parity on CUDA (eager and compiled, fp32 and bf16)"
timeout 240 python bench/kernel_check.py
echo "== sampler: the CUDA-graph decode step against eager and HF generate"
timeout 120 python bench/sampler_check.py
echo "== rollout benchmark, B=128, 64-token prompts, 128 new tokens (eager, dynamic, CUDA graph, HF)"
timeout 300 python bench/rollout.py --new 128 --reps 1
echo "== the update's teacher-forced pass: whole sequences against prefix sharing (toy TTS, Qwen2.5-0.5B)"
timeout 240 python bench/update.py --steps 3
echo "== log-prob benchmark, N=16384 V=151936 d=896 bf16"
timeout 300 python bench/logprob.py
W=$(ls -d "$SPEECHRL_CACHE"/toy-*)
echo "== SFT + GRPO smoke on CUDA in bf16 (tiny toy world $W)"
timeout 200 python sft_asr.py --data "$W/train/manifest.jsonl" --dev_data "$W/dev/manifest.jsonl" \
  --test_data "$W/test-seen/manifest.jsonl" --out_dir "$OUT/sft" --max_steps 30 --eval_every 15 \
  --batch_size 16 2>&1 | grep -v "it/s\|step/s" | tail -5
timeout 200 python grpo_asr.py --data "$W/train/manifest.jsonl" --dev_data "$W/dev/manifest.jsonl" \
  --test_data "$W/test-seen/manifest.jsonl" --init "$OUT/sft/best" --out_dir "$OUT/grpo" --steps 4 \
  --eval_every 2 2>&1 | grep -v "it/s" | tail -5
tail -n 1 "$OUT/grpo/metrics.jsonl"
