"""Benchmark: one full GRPO step (rollout + reward + update) of our TTS loop against TRL's
`GRPOTrainer`, on the same model, prompts, reward function, B, G and lengths, each in its
own subprocess (so each peak memory is its own).

    pip install trl                # bench-only dependency (measured with trl 1.16.0)
    python bench/vs_trl.py         # CUDA if present: B=16, G=8, 256 new tokens, bf16
    python bench/vs_trl.py --quick # CPU-sized: B=8, G=8, 64 new tokens, fp32

The model is the toy TTS LM (`build_toy_tts`: a Qwen2ForCausalLM, hidden 256, 4 layers,
108 words + 512 speech tokens + eos + sos) with random weights, seed 0, dropout off. The
prompts are CosyVoice-2-shaped (20 text ids, <sos>, 40-80 prompt speech ids), the same B
for both. Both sample the 512 speech tokens only (ours through its vocabulary slice, TRL
through `suppress_tokens` for every other id), so eos never comes and every completion
has exactly `--new` tokens in both (asserted). The reward is
one cheap Python function of the completion's speech ids for both (the share of ids in
the lower half of the codebook), so that the step measures the GRPO machinery, not a
judge. Both: T = 1, beta = 0.1 (a reference model), mu = 1, clip 0.2, the `grpo` loss
aggregation, group-scaled advantages, AdamW at lr 1e-4, grad-norm clip 1.

"Ours" runs the pieces of `grpo_tts.py`'s step: `common.models.sample` (static KV cache,
the speech slice only, each prompt prefilled once for its G rows), `group_advantages`,
`sequence_logprobs` (each prompt run once and its keys/values shared by its G completions,
then the fused log-prob kernel) for the reference and the policy, `grpo_loss`, one AdamW
step. TRL runs every prompt G times, in generation and in each log-prob pass.
"TRL" is `GRPOTrainer.train()` with `max_steps` = warm-up + timed steps; a callback times
each optimizer step (its generation happens inside it). TRL turns gradient checkpointing on
by default, ours keeps activations: the `trl` column turns it off (the same work as ours,
the ratios in the JSON line), the `trl-gc` column is TRL's default, for reference.

Time per step = median of the timed steps after one warm-up step. Memory: on CUDA the
peak of torch.cuda.max_memory_allocated (TRL's model is built on the CPU, so only its own
copies are on the GPU); on CPU the peak RSS during the steps (sampled every 5 ms) minus the
RSS just before the first step (model, reference model and data already built). The
last line is one JSON object with `speedup` = trl_step_s / ours_step_s and `mem_ratio` =
trl_peak / ours_peak.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.logprob import rss_mb  # noqa: E402
from common.tts import build_toy_tts  # noqa: E402

K = 512  # speech tokens
WORDS = [f"word{i}" for i in range(108)]


class PeakRSS:
    """CPU: the peak RSS over the measured region, sampled every 5 ms by a thread (the
    process's lifetime peak, ru_maxrss, would also count spikes before the region)."""

    def __init__(self) -> None:
        self.base = self.peak = rss_mb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def growth(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peak, rss_mb()) - self.base


def start_peak(device: str):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return None
    return PeakRSS()


def peak_mb(device: str, watch) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return watch.growth()


def step_times(step, device: str, n: int) -> list[float]:
    """Seconds of each of n calls of step() (synchronised on CUDA)."""
    times = []
    for _ in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def setup(a: argparse.Namespace, device: str):
    """The model (random weights, seed 0, no dropout) and the B prompts, the same for both."""
    lm = build_toy_tts(WORDS, K, dropout=0.0, seed=0).to(device)
    rng = random.Random(0)
    text = range(4, lm.offset)  # word ids (0-3 are specials)
    prompts = [[rng.choice(text) for _ in range(20)] + [lm.sos_id]
               + [lm.offset + rng.randrange(K) for _ in range(rng.randint(40, 80))] for _ in range(a.b)]
    return lm, prompts


def reward(speech_ids: list[int]) -> float:
    """The same cheap reward for both: the share of ids in the lower half of the codebook."""
    return sum(t < K // 2 for t in speech_ids) / max(len(speech_ids), 1)


def run_ours(a: argparse.Namespace) -> dict:
    from common.models import sample
    from grpo_tts import Args, group_advantages, grpo_loss, sequence_logprobs

    lm, prompts = setup(a, a.device)
    lm.eval().requires_grad_(True)
    ref = copy.deepcopy(lm.lm).eval().requires_grad_(False)
    ga = Args(batch_size=a.b, group_size=a.g, max_new_tokens=a.new, device=a.device, bf16=a.device == "cuda",
              beta=0.1, lr=1e-4)
    opt = torch.optim.AdamW(lm.parameters(), lr=ga.lr, weight_decay=0.0)
    gen = torch.Generator(a.device).manual_seed(0)

    def step() -> None:
        # rollout: G samples per prompt, speech tokens only (eos excluded: fixed length)
        ids, mask, _, _, _ = lm.batch(prompts)  # as grpo_tts.synthesize (which samples without autocast)
        toks, _, _ = sample(lm.lm, lm.lm.get_input_embeddings()(ids), mask, a.new, eos_id=-1,
                            temperature=1.0, generator=gen, vocab=(lm.offset, lm.offset + K), group=a.g,
                            cuda_graph=a.device == "cuda")  # as grpo_tts.py on CUDA
        outs = [[t - lm.offset for t in row] for row in toks.tolist()]  # [B*G] lists of L ids
        r = torch.tensor([reward(o) for o in outs]).view(a.b, a.g)  # [B, G]
        adv, _ = group_advantages(r, ga.scale)
        lmask = torch.ones(len(outs), a.new, dtype=torch.bool, device=a.device)  # [N, L]
        with torch.no_grad():
            lp_ref = sequence_logprobs(lm, ref, prompts, outs, ga)[0]  # each prompt run once per group
        lp, _ = sequence_logprobs(lm, lm.lm, prompts, outs, ga)  # [N, L]
        loss, _ = grpo_loss(lp, lp.detach(), lp_ref, adv.flatten().to(a.device), lmask, ga)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()

    watch = start_peak(a.device)
    times = step_times(step, a.device, 1 + a.steps)
    return {"variant": "ours", "step_s": statistics.median(times[1:]), "steps_s": times,
            "peak_mb": peak_mb(a.device, watch)}


def run_trl(a: argparse.Namespace, checkpointing: bool) -> dict:
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    lm, prompts = setup(a, "cpu")  # TRL loads its own copies from the saved folder
    v = lm.lm.config.vocab_size
    # a word-level tokenizer whose token "wI" is LM id I, so that TRL's string prompts
    # tokenize to exactly our prompt ids (no special tokens added)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(v)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=f"w{lm.tokenizer.pad_token_id or 0}",
                                  eos_token=f"w{lm.eos_id}")
    data = Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in p) for p in prompts] * (1 + a.steps)})

    def trl_reward(completion_ids, **_) -> list[float]:
        speech = [[t - lm.offset for t in c] for c in completion_ids]
        assert all(0 <= t < K for c in speech for t in c), "TRL sampled a non-speech id"
        return [reward(c) for c in speech]

    times: list[float] = []
    watch: list = [None]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            watch[0] = start_peak(a.device)

        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        # TRL builds the reference model by loading the policy's folder again
        lm.lm.save_pretrained(os.path.join(out, "model"))
        not_speech = [i for i in range(v) if not lm.offset <= i < lm.offset + K]  # as ours: speech only
        cfg = GRPOConfig(
            output_dir=out, per_device_train_batch_size=a.b * a.g, num_generations=a.g,
            steps_per_generation=1, gradient_accumulation_steps=1, max_completion_length=a.new,
            generation_kwargs={"min_new_tokens": a.new, "suppress_tokens": not_speech},
            model_init_kwargs={"dtype": torch.float32},
            temperature=1.0, top_k=0, top_p=1.0, beta=0.1, epsilon=0.2, num_iterations=1, loss_type="grpo",
            scale_rewards="group", learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", max_steps=1 + a.steps, logging_steps=1, report_to="none",
            gradient_checkpointing=checkpointing, save_strategy="no", use_cpu=a.device == "cpu",
            bf16=a.device == "cuda", disable_dropout=True, shuffle_dataset=False, seed=0,
            dataloader_num_workers=0, log_completions=False)
        trainer = GRPOTrainer(model=os.path.join(out, "model"), reward_funcs=trl_reward, args=cfg,
                              train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
        lengths = [r["completions/mean_length"] for r in trainer.state.log_history
                   if "completions/mean_length" in r]
    assert lengths and all(n == a.new for n in lengths), f"TRL completions not all {a.new} long: {lengths}"
    return {"variant": "trl-gc" if checkpointing else "trl", "step_s": statistics.median(times[1:]),
            "steps_s": times, "peak_mb": peak_mb(a.device, watch[0]), "mean_length": lengths}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="CPU-sized run")
    p.add_argument("--b", type=int, default=0, help="prompts per step (0 = by device)")
    p.add_argument("--g", type=int, default=8, help="samples per prompt")
    p.add_argument("--new", type=int, default=0, help="new tokens per sample (0 = by device)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one variant
    a = p.parse_args()
    a.device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    a.b = a.b or (16 if a.device == "cuda" else 8)
    a.new = a.new or (256 if a.device == "cuda" else 64)
    if a.one:
        print(json.dumps(run_ours(a) if a.one == "ours" else run_trl(a, checkpointing=a.one == "trl-gc")))
        return
    import trl
    rows = []
    for name in ("ours", "trl", "trl-gc"):
        cmd = [sys.executable, __file__, "--one", name, "--b", str(a.b), "--g", str(a.g), "--new", str(a.new),
               "--steps", str(a.steps)] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-3000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {json.dumps(rows[-1])}", flush=True)  # as each ends: a cut-short run keeps it
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"one GRPO step, toy TTS LM shape, B={a.b} G={a.g} new={a.new}, trl {trl.__version__}, on {where}")
    print(f"{'variant':8s} {'step s':>8s} {'peak MB':>9s}  steps (first = warm-up)")
    for r in rows:
        steps = [round(t, 2) for t in r["steps_s"]]
        print(f"{r['variant']:8s} {r['step_s']:8.3f} {r['peak_mb']:9.1f}  {steps}")
    by = {r["variant"]: r for r in rows}
    res = {"device": where, "b": a.b, "g": a.g, "new": a.new, "trl": trl.__version__,
           **{f"{k}_step_s": round(r["step_s"], 4) for k, r in by.items()},
           **{f"{k}_peak_mb": round(r["peak_mb"], 1) for k, r in by.items()}}
    if "ours" in by and "trl-gc" in by:
        res["speedup_vs_trl_default"] = round(by["trl-gc"]["step_s"] / by["ours"]["step_s"], 3)
        res["mem_ratio_vs_trl_default"] = round(by["trl-gc"]["peak_mb"] / max(by["ours"]["peak_mb"], 1e-3), 3)
    if "ours" in by and "trl" in by:
        res["speedup"] = round(by["trl"]["step_s"] / by["ours"]["step_s"], 3)
        res["mem_ratio"] = round(by["trl"]["peak_mb"] / max(by["ours"]["peak_mb"], 1e-3), 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
