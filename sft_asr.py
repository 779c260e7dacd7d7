"""SFT warm start for the LLM-ASR: cross-entropy on transcripts (+ CTC on the encoder),
trained until dev WER stops improving. This is the paper's starting point for RL.

    python sft_asr.py                       # the toy world (built and cached on first use)
    python sft_asr.py --data train.jsonl --dev_data dev.jsonl --whisper WHISPER_DIR --lm QWEN_DIR
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import cache_lock, parse_args
from common.data import Skips, corpus_error, length_batches, load_audio_items, read_data, set_names
from common.logprob import token_logprobs
from common.models import SpeechLLM, build_toy_asr, collate, load_qwen2_audio, load_real_asr, transcribe
from common.toy import build_toy_world, cache_root, vocabulary


@dataclass
class Args:
    """SFT warm start of the LLM-ASR (toy world by default)."""

    data: str = ""
    """train manifest (.jsonl) or Kaldi dir; empty = the toy world's train split"""
    dev_data: str = ""
    """dev manifest for early stopping; empty = the toy world's dev split"""
    test_data: list[str] = field(default_factory=list)
    """manifests to evaluate the best checkpoint on (repeatable); toy: test-seen, test-unseen"""
    whisper: str = ""
    """local Whisper folder for the encoder (real world)"""
    lm: str = ""
    """local causal-LM folder, e.g. Qwen2.5 (real world)"""
    qwen2_audio: str = ""
    """local Qwen2AudioForConditionalGeneration folder (real world; instead of --whisper/--lm)"""
    init: str = ""
    """start from this SpeechLLM checkpoint instead"""
    out_dir: str = "runs/sft_asr"
    """where checkpoints (best/, last/), dev_curve.jsonl and summary.json go"""
    batch_size: int = 16
    """utterances per step"""
    lr: float = 1e-3
    """peak learning rate (AdamW); halved after every 2 dev evaluations without improvement"""
    warmup: int = 100
    """linear warm-up steps"""
    ctc_weight: float = 1.0
    """weight of the auxiliary CTC loss on the encoder (toy world; 0 = off)"""
    eval_every: int = 200
    """steps between dev evaluations"""
    patience: int = 4
    """stop after this many dev evaluations without improvement"""
    min_steps: int = 600
    """no plateau counting before this step (early dev WER is noisy)"""
    max_minutes: float = 20.0
    """wall-clock budget for training"""
    max_steps: int = 0
    """stop after this many steps (0 = no limit; early stopping decides)"""
    max_seconds: float = 30.0
    """skip audio longer than this"""
    max_new_tokens: int = 48
    """decoding limit"""
    d_enc: int = 128
    """toy encoder width"""
    d_lm: int = 128
    """toy LM width"""
    stack: int = 4
    """encoder frames stacked per LM position (toy: 4 x 40 ms = 160 ms)"""
    ctc_embed: bool = True
    """toy: add CTC-posterior-weighted token embeddings to the audio embeddings (LegoSLM-style)"""
    conv_blocks: int = 2
    """toy encoder: residual conv blocks before the transformer"""
    enc_layers: int = 2
    """toy encoder transformer layers"""
    lm_layers: int = 2
    """toy LM (Qwen2) layers"""
    seed: int = 0
    """random seed"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """cpu or cuda"""
    bf16: bool = torch.cuda.is_available()
    """bf16 autocast on CUDA"""
    threads: int = 0
    """CPU threads (0 = all cores)"""
    resume: bool = True
    """continue from out_dir/last if it exists"""


def featurize(model: SpeechLLM, path: str, skips: Skips, max_seconds: float, progress=True):
    utts = read_data(path, skips)
    items = load_audio_items(utts, skips, max_seconds, progress)
    return [u for u, _ in items], [model.features(w) for _, w in items]


def evaluate(model: SpeechLLM, utts, feats, max_new_tokens: int) -> dict:
    hyps, _ = transcribe(model, feats, max_new_tokens=max_new_tokens)
    return corpus_error([u.text for u in utts], hyps)


def make_model(a: Args) -> SpeechLLM:
    if sum(map(bool, (a.init, a.qwen2_audio, a.whisper or a.lm))) > 1:
        raise SystemExit("give one of --init, --qwen2_audio, or --whisper with --lm")
    if a.init:
        return SpeechLLM.load(a.init)
    if a.qwen2_audio:
        return load_qwen2_audio(a.qwen2_audio)
    if a.whisper or a.lm:
        if not (a.whisper and a.lm):
            raise SystemExit("a real model needs both --whisper and --lm")
        return load_real_asr(a.whisper, a.lm)
    return build_toy_asr(vocabulary(), d_enc=a.d_enc, enc_layers=a.enc_layers, d_lm=a.d_lm,
                         lm_layers=a.lm_layers, stack=a.stack, ctc_embed=a.ctc_embed,
                         conv_blocks=a.conv_blocks, seed=a.seed)


def main(a: Args) -> dict:
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    if a.device == "cpu":
        torch.set_num_threads(a.threads or os.cpu_count() or 1)
    if not a.data:
        world = build_toy_world()
        a.data, a.dev_data = world["train"], a.dev_data or world["dev"]
        a.test_data = a.test_data or [world["test-seen"], world["test-unseen"]]
    os.makedirs(a.out_dir, exist_ok=True)
    model = make_model(a).to(a.device).train()
    skips = Skips()
    train_utts, train_feats = featurize(model, a.data, skips, a.max_seconds)
    dev_utts, dev_feats = featurize(model, a.dev_data or a.data, skips, a.max_seconds)
    targets = [model.target_ids(u.text) for u in train_utts]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    st = {"step": 0, "epoch": 0, "pos": 0, "best": float("inf"), "bad": 0, "lr_scale": 1.0,
          "elapsed": 0.0, "curve": []}
    last = os.path.join(a.out_dir, "last")
    if a.resume and os.path.isfile(os.path.join(last, "train_state.pt")):
        model = SpeechLLM.load(last, a.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
        ck = torch.load(os.path.join(last, "train_state.pt"), weights_only=False)
        opt.load_state_dict(ck["opt"])
        st = ck["state"]
        torch.set_rng_state(ck["rng"])
        print(f"resumed from {last} at step {st['step']}")
    lens = [n for _, n in train_feats]
    t0, done, window = time.time() - st["elapsed"], False, []
    bar = tqdm(desc="sft", initial=st["step"], unit="step")
    while not done:
        batches = length_batches(lens, a.batch_size, seed=a.seed * 1000 + st["epoch"])
        for bi in range(st["pos"], len(batches)):
            idx = batches[bi]
            lr = a.lr * st["lr_scale"] * min(1.0, (st["step"] + 1) / a.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            x, xl = collate([train_feats[i] for i in idx], a.device)  # [B, T, 80]
            tg = [targets[i] for i in idx]
            with torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=a.bf16):
                audio, al, (h, hl) = model.embed_audio(x, xl)  # [B, T', d]
                emb, mask, pos, pred = model.build_inputs(audio, al, tg)
                hid = model.hidden(emb, mask, pos)  # [B, L, d]
            y = torch.tensor([t for row in tg for t in row], device=a.device)  # [N]
            lp = token_logprobs(hid.flatten(0, 1)[pred], model.lm.get_output_embeddings().weight, y)
            loss = ce = -lp.mean()  # token-level cross-entropy
            if model.ctc_head is not None and a.ctc_weight > 0:
                ctc_lp = torch.log_softmax(model.ctc_head(h.float()), -1).transpose(0, 1)  # [T', B, V+1]
                flat = torch.tensor([t for row in tg for t in row[:-1]], device=a.device)
                ctc = F.ctc_loss(ctc_lp, flat, hl, torch.tensor([len(r) - 1 for r in tg]),
                                 blank=ctc_lp.shape[-1] - 1, zero_infinity=True)
                loss = ce + a.ctc_weight * ctc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            st["step"] += 1
            st["pos"] = bi + 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}", lr=f"{lr:.1e}")
            window.append(loss.item())
            out_of_time = time.time() - t0 > a.max_minutes * 60 or st["step"] == a.max_steps
            if st["step"] % a.eval_every == 0 or out_of_time:
                m = evaluate(model, dev_utts, dev_feats, a.max_new_tokens)
                st["elapsed"] = time.time() - t0
                st["curve"].append({"step": st["step"], "minutes": round(st["elapsed"] / 60, 2),
                                    "dev_wer": round(m["wer"], 4),
                                    "train_loss": round(sum(window) / len(window), 4)})
                window = []
                bar.write(f"step {st['step']}  dev WER {m['wer']:.4f}  ({st['elapsed'] / 60:.1f} min)")
                if m["wer"] < st["best"]:
                    st["best"], st["bad"] = m["wer"], 0
                    model.save(os.path.join(a.out_dir, "best"))
                elif st["step"] >= a.min_steps:  # a plateau: count it, halve the lr every 2nd
                    st["bad"] += 1
                    if st["bad"] % 2 == 0:
                        st["lr_scale"] *= 0.5
                model.save(last)
                torch.save({"opt": opt.state_dict(), "state": st, "rng": torch.get_rng_state()},
                           os.path.join(last, "train_state.pt"))
                if st["bad"] >= a.patience or out_of_time:
                    done = True
                    break
        else:
            st["epoch"] += 1
            st["pos"] = 0
    bar.close()
    with open(os.path.join(a.out_dir, "dev_curve.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in st["curve"])
    best = SpeechLLM.load(os.path.join(a.out_dir, "best"), a.device)
    results = {"dev": evaluate(best, dev_utts, dev_feats, a.max_new_tokens)}
    for name, path in zip(set_names(a.test_data), a.test_data, strict=True):
        utts, feats = featurize(best, path, skips, a.max_seconds)
        results[name] = evaluate(best, utts, feats, a.max_new_tokens)
    summary = {"best": os.path.join(a.out_dir, "best"), "steps": st["step"],
               "train_minutes": round(st["elapsed"] / 60, 2), "results": results,
               "skipped": skips.as_dict(), "args": asdict(a)}
    with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for name, m in results.items():
        print(f"{name:12s} WER {m['wer']:.4f} (sub {m['sub']:.4f} del {m['del']:.4f} ins {m['ins']:.4f})")
    return summary


def toy_warm_start() -> str:
    """The cached toy SFT checkpoint (trained on first use, about 13 min on 2 cores)."""
    a = Args()
    world = build_toy_world()
    recipe = {k: v for k, v in asdict(a).items() if k not in ("threads", "resume", "out_dir")}
    data = [open(world[s], "rb").read().decode() for s in ("train", "dev")]  # what SFT reads
    key = hashlib.sha1(json.dumps([data, recipe], sort_keys=True, default=str).encode()).hexdigest()[:10]
    a.out_dir = os.path.join(cache_root(), f"asr-sft-{key}")
    with cache_lock(a.out_dir):  # runs started side by side train it once
        if not os.path.isfile(os.path.join(a.out_dir, "summary.json")):
            main(a)
    return os.path.join(a.out_dir, "best")


if __name__ == "__main__":
    main(parse_args(Args))
