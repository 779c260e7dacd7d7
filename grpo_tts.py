"""GRPO for an LLM TTS that emits speech tokens (SPEC §1 and §3), in one file.

    python grpo_tts.py                    # the toy TTS world: SFT TTS LM -> GRPO -> eval
    python grpo_tts.py --eval_only --init CKPT --test_data texts.jsonl --out_dir D

Each step (SPEC F1): the policy samples G speech-token sequences for each of B texts (with a
same-voice prompt, CosyVoice 2 layout) -> token2wav -> frozen judges score the audio (T1
reward ASR, T2 duration, T3 diversity, T4 speaker similarity) -> group-normalised
advantages -> clipped surrogate with a k3 KL to the SFT reference -> AdamW (μ updates, one
by default).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from common import cached_json, changed_flags, parse_args, peak_mem_mb, plot_curves, stamp
from common.audio import f0_gap, f0_stats, load_audio, log_mel, voiced_f0, write_wav
from common.data import Skips, corpus_error, error_rate, read_data, set_names
from common.logprob import token_logprobs
from common.models import sample
from common.toy import cache_root
from common.tts import (
    TTSLM,
    Cond,
    Token2Mel,
    conditions,
    load_judge,
    load_module,
    mel_to_wav,
    save_module,
    transcribe_with,
)


@dataclass
class Args:
    """GRPO for the LLM TTS (toy TTS world by default)."""

    data: str = ""
    """RL texts: a manifest with key, text, speaker and audio (or prompt_audio); empty = toy rl split"""
    dev_data: str = ""
    """dev manifest (the best checkpoint is chosen on its eval-ASR CER); empty = toy dev (toy runs only)"""
    test_data: list[str] = field(default_factory=list)
    """test manifests (repeatable); empty = toy test-seen and test-unseen (toy runs only)"""
    init: str = ""
    """TTS LM checkpoint (a folder from common.tts.save_module); empty = the toy SFT model"""
    out_dir: str = "runs/grpo_tts"
    """checkpoints, metrics.jsonl, plots, audio and summary.json go here"""
    eval_only: bool = False
    """only synthesise --test_data with --init and write out_dir/audio and summary.json"""
    prompt_audio: str = ""
    """default prompt voice for lines with no speaker peer or prompt_audio; empty = the first toy dev line"""
    prompt_text: str = ""
    """transcript of --prompt_audio"""
    # --- the frozen pieces (empty = the toy world's) ---
    tokenizer: str = ""
    """speech tokenizer folder (audio -> tokens, for prompts)"""
    token2mel: str = ""
    """token2wav's first half: tokens -> log-mel (Griffin-Lim does the rest)"""
    reward_asr: str = ""
    """reward ASR (T1) folder: ours (sft_tts.py) or a local Hugging Face Whisper"""
    eval_asr: str = ""
    """evaluation ASR folder (ours or a Whisper): reported CER/WER come from it, not the reward ASR"""
    speaker_model: str = ""
    """speaker encoder folder (T4 and the SIM metric)"""
    # --- GRPO (SPEC §1) ---
    steps: int = 100
    """policy updates"""
    batch_size: int = 16
    """B: texts per step (paper: 16; chosen on toy dev over 8, README)"""
    group_size: int = 8
    """G: samples per text (paper: 8)"""
    temperature: float = 1.0
    """sampling temperature T (paper: 1.0)"""
    top_k: int = 25
    """top-k of the rollout sampler (0 = off; 25 as CosyVoice 2 samples; chosen on toy dev over 0, README)"""
    top_p: float = 1.0
    """top-p sampling (1 = off)"""
    max_new_tokens: int = 200
    """length limit of a sampled token sequence (8 s at 25 Hz); hitting it means no eos"""
    lr: float = 5e-5
    """AdamW learning rate (paper: 1e-5 for 0.5B; 5e-5 chosen on toy dev against 1e-4, README)"""
    beta: float = 0.1
    """KL weight (Eq. G5); 0 skips loading the reference model"""
    eps_low: float = 0.2
    """lower clip range (Eq. G4)"""
    eps_high: float = 0.2
    """upper clip range (Eq. G4); DAPO's clip-higher uses 0.28"""
    mu: int = 1
    """inner updates per rollout (Eq. G7)"""
    scale: str = "group"
    """advantage scaling (Eq. G3): group | batch | none (Dr.GRPO)"""
    loss_agg: str = "grpo"
    """loss aggregation (Eq. G6): grpo | dapo | dr_grpo"""
    drop_zero_std: bool = False
    """leave groups whose rewards are all equal out of the loss (DAPO's dynamic sampling, simplified)"""
    # --- rewards (SPEC §3), r = sum_k w_k R_k (Eq. G2) ---
    w_acc: float = 1.0
    """weight of T1, 1 - CER of the reward ASR (clipped to [0, 1])"""
    w_dur: float = 0.0
    """weight of T2, -|len - group median| / group median (clipped at -1)"""
    w_div: float = 0.0
    """weight of T3, (token diversity + pitch diversity) / 2"""
    w_sim: float = 0.0
    """weight of T4, speaker similarity to the prompt (this project's extension; off as in the paper)"""
    pitch_scale: float = 50.0
    """T3: F0 std (Hz) that counts as full pitch diversity"""
    reward_on: str = "mel"
    """what the reward ASR reads: mel (token2mel's output; Griffin-Lim only adds phase) or wav"""
    # --- bookkeeping ---
    eval_every: int = 25
    """steps between dev evaluations (the best dev checkpoint is kept)"""
    audio_every: int = 50
    """steps between writing the fixed dev samples as WAV"""
    n_audio: int = 4
    """fixed dev texts written as WAV before, during and after RL"""
    eval_temperature: float = 0.0
    """evaluation decoding: 0 = greedy, else sampled with a fixed seed (and --top_k/--top_p)"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """CPU threads (0 = all cores)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """cpu or cuda"""
    bf16: bool = torch.cuda.is_available()
    """bf16 autocast in the update and the reward judges (default on CUDA; slow where a CPU emulates it)"""
    cuda_graph: bool = True
    """replay each rollout decode step as one CUDA graph (CUDA only; timings in BENCHMARKS.md)"""
    compile_sampler: bool = False
    """with --cuda_graph, torch.compile that step too (1.75x at 0.5B; each new shape recompiles, up to 8)"""
    resume: bool = True
    """continue from out_dir/last (saved at every dev evaluation) if it exists"""


# ------------------------------------------------------------------ synthesis and judges
@torch.no_grad()
def synthesize(lm: TTSLM, conds: list[Cond], a: Args, temperature: float, gen=None, repeat: int = 1):
    """Sample `repeat` outputs per condition (group-major: its rows are adjacent). Returns
    the outputs o_i as out-slice ids (speech tokens 0..K-1, eos = K; eos included when it
    came) and whether each ended with eos."""
    seqs, ended = [], []
    for s in range(0, len(conds), 64 // repeat or 1):
        ids, mask, _, _, _ = lm.batch([c.prompt_ids for c in conds[s : s + 64 // repeat or 1]])
        emb = lm.lm.get_input_embeddings()(ids)  # [B, P, d]: each prompt is run once for its `repeat` rows
        toks, lens, _ = sample(lm.lm, emb, mask, a.max_new_tokens, lm.eos_id, 0, temperature,
                               a.top_k, a.top_p, gen, vocab=lm.out_slice, group=repeat,
                               cuda_graph=a.cuda_graph and a.device.startswith("cuda"),
                               compiled=a.compile_sampler)
        for row, n in zip(toks.tolist(), lens.tolist(), strict=True):
            o = [t - lm.offset for t in row[:n]]
            seqs.append(o)
            ended.append(bool(o) and o[-1] == lm.n_speech)
    return seqs, ended


def speech_of(o: list[int], n_speech: int) -> torch.Tensor:
    return torch.tensor([t for t in o if t < n_speech], dtype=torch.long)


def judge_mels(t2m: Token2Mel, outs: list[list[int]], n_speech: int,
               voices: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """token2wav's first half for every output (voices: each one's prompt log-mel, read by a
    voice-conditioned token2mel); None where there is no audio at all."""
    speech = [speech_of(o, n_speech) for o in outs]
    have = [i for i, s in enumerate(speech) if len(s) > 0]
    mels = t2m.mel([speech[i] for i in have], [voices[i] for i in have])
    res: list[torch.Tensor | None] = [None] * len(outs)
    for i, m in zip(have, mels, strict=True):
        res[i] = m
    return res


def transcribe(asr: torch.nn.Module, mels: list[torch.Tensor | None], via_wav: bool) -> list[str]:
    """Transcripts of token2wav outputs ("" where there is no audio). via_wav (or a judge
    that reads audio, e.g. Whisper) goes through Griffin-Lim first."""
    have = [i for i, m in enumerate(mels) if m is not None]
    ms = [mels[i] for i in have]
    wavs = mel_to_wav(ms) if via_wav or getattr(asr, "reads_audio", False) else None
    if wavs is not None:
        ms = [log_mel(w) for w in wavs]
    hyps = [""] * len(mels)
    for i, h in zip(have, transcribe_with(asr, ms, wavs), strict=True):
        hyps[i] = h
    return hyps


# ------------------------------------------------------------------ rewards (SPEC §3)
def reward_accuracy(text: str, hyp: str) -> float:
    """T1: 1 - CER, clipped to [0, 1]. An empty transcript has CER 1, so it scores 0."""
    return min(max(1.0 - error_rate(text, hyp, "char"), 0.0), 1.0)


def reward_duration(lengths: list[int]) -> list[float]:
    """T2 over one group: -|(len_i - T_m) / T_m|, T_m the group's median, clipped at -1."""
    tm = statistics.median(lengths)
    return [max(-abs((n - tm) / tm), -1.0) for n in lengths]


def token_diversity(group: list[list[int]]) -> list[float]:
    """T3a: mean normalised edit distance of each output to the others of its group."""
    s = [" ".join(f"t{t}" for t in o) for o in group]
    out = []
    for i in range(len(s)):
        d = [error_rate(s[i], s[j]) * len(group[i]) / max(len(group[i]), len(group[j]))
             for j in range(len(s)) if j != i]
        out.append(min(sum(d) / max(len(d), 1), 1.0))
    return out


def pitch_diversity(wav: torch.Tensor, scale: float) -> float:
    """T3b: std of the voiced F0 (Hz) of the decoded audio, divided by scale, clipped to 1."""
    p = voiced_f0(wav)
    return min(float(p.std()) / scale, 1.0) if len(p) > 1 else 0.0


def mean(xs: list) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


FLOOR = {"acc": 0.0, "dur": -1.0, "div": 0.0, "sim": -1.0}  # each term's lowest value


def group_rewards(text: str, outs: list[list[int]], ended: list[bool], hyps: list[str],
                  mels: list, sims: list[float] | None, a: Args) -> list[dict[str, float]]:
    """Every reward term R_k for the G outputs of one text. An output without eos or
    without audio gets the floor of every term (the lowest reward) and `fail` = 1."""
    ok = [e and m is not None for e, m in zip(ended, mels, strict=True)]
    valid = [i for i in range(len(outs)) if ok[i]]
    active = ["acc", "dur"] + ["div"] * bool(a.w_div) + ["sim"] * (sims is not None)
    terms = [{**{k: FLOOR[k] for k in active}, "fail": 1.0} for _ in outs]
    dur = reward_duration([len(outs[i]) - 1 for i in valid]) if valid else []  # eos excluded
    if a.w_div:  # among the outputs that count, speech tokens only (each ends with eos)
        tok_div = token_diversity([outs[i][:-1] for i in valid])
        wavs = mel_to_wav([mels[i] for i in valid])  # Griffin-Lim only where T3 needs pitch
    for j, i in enumerate(valid):
        t = {"acc": reward_accuracy(text, hyps[i]), "dur": dur[j], "fail": 0.0}  # Eqs. T1, T2
        if a.w_div:  # Eq. T3: token + pitch diversity, each in [0, 1]
            t["div"] = 0.5 * (tok_div[j] + pitch_diversity(wavs[j], a.pitch_scale))
        if sims is not None:  # Eq. T4
            t["sim"] = sims[i]
        terms[i] = t
    return terms


def total_reward(t: dict[str, float], a: Args) -> float:
    w = {"acc": a.w_acc, "dur": a.w_dur, "div": a.w_div, "sim": a.w_sim, "fail": 0.0}
    return sum(w[k] * v for k, v in t.items())  # Eq. G2


# ------------------------------------------------------------------ GRPO (SPEC §1)
def group_advantages(r: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. G3 on rewards r [B, G] -> advantages [B, G] and a zero-std mask [B].
    NaN rewards get advantage 0 and do not enter their group's statistics."""
    ok = torch.isfinite(r)
    n = ok.sum(1, keepdim=True).clamp(min=1)
    rz = torch.where(ok, r, 0.0)
    mean = rz.sum(1, keepdim=True) / n  # [B, 1]
    std = ((torch.where(ok, r - mean, 0.0) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    zero_std = std.squeeze(1) < 1e-6  # all-equal group: Â = 0, never NaN
    if scale == "group":
        adv = (rz - mean) / (std + 1e-4)
    elif scale == "batch":
        adv = (rz - mean) / (r[ok].std() + 1e-4 if ok.sum() > 1 else 1.0)
    elif scale == "none":  # Dr.GRPO
        adv = rz - mean
    else:
        raise ValueError(f"--scale must be group, batch or none, not {scale!r}")
    return torch.where(ok & ~zero_std[:, None], adv, 0.0), zero_std


def grpo_loss(lp: torch.Tensor, lp_old: torch.Tensor, lp_ref: torch.Tensor | None,
              adv: torch.Tensor, mask: torch.Tensor, a: Args) -> tuple[torch.Tensor, dict[str, float]]:
    """Eqs. G4-G6. lp, lp_old, lp_ref, mask: [N, L] (N = B*G); adv: [N]. Returns the loss (-J)."""
    m = mask.float()
    ratio = torch.exp(lp - lp_old)  # [N, L]  Eq. G4 ρ
    A = adv[:, None]  # [N, 1]  one advantage for every token
    J = torch.min(ratio * A, torch.clamp(ratio, 1 - a.eps_low, 1 + a.eps_high) * A)  # Eq. G4 S
    kl = torch.zeros_like(lp)
    if lp_ref is not None:
        d = lp_ref - lp
        kl = torch.exp(d) - d - 1  # [N, L]  Eq. G5, k3 estimator, >= 0
        J = J - a.beta * kl  # Eq. G6
    if a.loss_agg == "grpo":  # (1/G) Σ_i (1/|o_i|) Σ_t J, averaged over groups
        obj = ((J * m).sum(1) / m.sum(1).clamp(min=1)).view(-1, a.group_size).mean(1).mean()
    elif a.loss_agg == "dapo":  # Σ_{i,t} J / Σ_i |o_i|
        obj = (J * m).sum() / m.sum().clamp(min=1)
    elif a.loss_agg == "dr_grpo":  # Σ_{i,t} J / (B·G·L_max)
        obj = (J * m).sum() / (a.batch_size * a.group_size * a.max_new_tokens)  # a constant, also when
        # --drop_zero_std leaves groups out; eos counts within max_new_tokens
    else:
        raise ValueError(f"--loss_agg must be grpo, dapo or dr_grpo, not {a.loss_agg!r}")
    tok = m.sum().clamp(min=1)
    ratio, kl = ratio.detach(), kl.detach()  # the rest is logging
    low = ((ratio < 1 - a.eps_low) & (A < 0)).float()
    high = ((ratio > 1 + a.eps_high) & (A > 0)).float()
    stats = {"kl": float((kl * m).sum() / tok), "clip_ratio/low_mean": float((low * m).sum() / tok),
             "clip_ratio/high_mean": float((high * m).sum() / tok)}
    stats["clip_ratio/region_mean"] = stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]
    return -obj, stats


def sequence_logprobs(lm: TTSLM, net: torch.nn.Module, prompts: list[list[int]], outs: list[list[int]],
                      a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_{i,t} = log π(o_{i,t} | x, o_{i,<t}) from `net` (policy or reference LM), teacher-
    forced through the fused kernel (SPEC F2) over the output slice (speech tokens + eos):
    the whole softmax at T = 1. The sampler draws from its top-k/top-p truncation; the ratio
    and the KL are of the untruncated π_θ, so ρ = 1 at μ = 1 all the same. `prompts` has one
    entry per group and `outs` is group-major; each prompt is run once and shared by its G
    outputs. Returns lp, entropy [N, L], 0 where padded."""
    with torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=a.bf16):
        hid = lm.output_hidden(net, prompts, outs)  # [Σ|o_i|, d]; the prompt is never a target
    y = torch.tensor([t for o in outs for t in o], dtype=torch.long, device=hid.device)
    lp, ent = token_logprobs(hid, lm.head(net), y, with_entropy=True)  # [Σ|o_i|]
    lens = torch.tensor([len(o) for o in outs], device=lp.device)
    valid = torch.arange(int(lens.max()), device=lp.device)[None] < lens[:, None]  # [N, L]
    return (torch.zeros(valid.shape, device=lp.device).masked_scatter(valid, lp),
            torch.zeros(valid.shape, device=lp.device).masked_scatter(valid, ent))


# ------------------------------------------------------------------ evaluation
def evaluate(lm: TTSLM, conds: list[Cond], judges: dict, a: Args, wav_dir: str | None = None) -> dict:
    """Synthesise every text (greedy, or seeded sampling), decode to audio and let the
    evaluation ASR and the speaker encoder judge it: CER, WER, SIM, duration ratio, no-eos, F0."""
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    outs, ended = synthesize(lm, conds, a, a.eval_temperature, gen)
    mels = judge_mels(judges["t2m"], outs, lm.n_speech, [c.prompt_mel for c in conds])
    have = [i for i, m in enumerate(mels) if m is not None]
    wavs: list = [None] * len(outs)
    for i, w in zip(have, mel_to_wav([mels[i] for i in have]), strict=True):
        wavs[i] = w
    hyps = [""] * len(outs)
    heard = transcribe_with(judges["eval_asr"], [log_mel(wavs[i]) for i in have], [wavs[i] for i in have])
    for i, h in zip(have, heard, strict=True):
        hyps[i] = h
    refs = [c.utt.text for c in conds]
    sims = judges["spk"].similarity([log_mel(wavs[i]) for i in have], [conds[i].prompt_mel for i in have])
    ratios = [(len(outs[i]) - 1) / conds[i].ref_len  # eos excluded; outputs cut off without it left out
              for i in have if ended[i] and conds[i].ref_len]
    f0s = [f0_stats(wavs[i]) for i in have]  # (median Hz, movement st) or None
    if wav_dir:
        for i in have:
            write_wav(os.path.join(wav_dir, f"{conds[i].utt.key}.wav"), wavs[i])
    per_voice = {}
    for v in sorted({c.voice for c in conds}):
        idx = [i for i, c in enumerate(conds) if c.voice == v]
        per_voice[v] = corpus_error([refs[i] for i in idx], [hyps[i] for i in idx], "char")["wer"]
    return {"cer": corpus_error(refs, hyps, "char")["wer"], "wer": corpus_error(refs, hyps)["wer"],
            "sim": float(sims.mean()) if len(have) else 0.0,
            "dur_ratio": mean(ratios), "no_eos": 1 - sum(ended) / len(ended), "n": len(conds),
            "cer_by_voice": per_voice, "f0_hz": mean([x[0] if x else None for x in f0s]),  # median F0
            "f0_iqr_st": mean([x[1] if x else None for x in f0s]),  # pitch movement
            "f0_gap_st": mean([f0_gap(x, conds[i].prompt_audio)  # to the prompt voice
                               for x, i in zip(f0s, have, strict=True)])}


def resynth_cer(conds: list[Cond], judges: dict) -> dict[str, float]:
    """The floor: the evaluation ASR on real audio, and on token2wav(tokens of real audio);
    the same two for the F0 gap to the prompt voice. None for a set without audio."""
    cs = [c for c in conds if c.utt.audio]
    if not cs:  # a text-only set has no floor
        return {"real": None, "resynth": None, "real_f0_gap_st": None, "resynth_f0_gap_st": None}
    real_wav = [load_audio(c.utt.audio) for c in cs]
    real = [log_mel(w) for w in real_wav]
    fake_wav = mel_to_wav(judges["t2m"].mel(judges["tok"].encode_batch(real), [c.prompt_mel for c in cs]))
    refs, asr = [c.utt.text for c in cs], judges["eval_asr"]
    return {"real": corpus_error(refs, transcribe_with(asr, real, real_wav), "char")["wer"],
            "resynth": corpus_error(refs, transcribe_with(asr, [log_mel(w) for w in fake_wav], fake_wav),
                                    "char")["wer"],
            "real_f0_gap_st": mean([f0_gap(f0_stats(w), c.prompt_audio)
                                    for w, c in zip(real_wav, cs, strict=True)]),
            "resynth_f0_gap_st": mean([f0_gap(f0_stats(w), c.prompt_audio)
                                       for w, c in zip(fake_wav, cs, strict=True)])}


@torch.no_grad()
def sampling_report(lm: TTSLM, conds: list[Cond], judges: dict, a: Args, g: int = 8) -> dict:
    """How much room GRPO has: T=1 sampled CER (reward ASR), best-of-g, within-group CER
    std, the share of groups with reward std > 0.05, and outputs without eos."""
    gen = torch.Generator(device=a.device).manual_seed(a.seed + 1)
    outs, ended = synthesize(lm, conds, a, 1.0, gen, repeat=g)
    voices = [conds[i // g].prompt_mel for i in range(len(outs))]
    hyps = transcribe(judges["reward_asr"], judge_mels(judges["t2m"], outs, lm.n_speech, voices),
                      a.reward_on == "wav")
    cer = torch.tensor([error_rate(conds[i // g].utt.text, h, "char") if ended[i] else 1.0
                        for i, h in enumerate(hyps)]).view(-1, g)  # [n, g]
    r = (1 - cer).clamp(0, 1)
    return {"sampled_cer": float(cer.mean()), "best_of_g_cer": float(cer.min(1).values.mean()),
            "group_cer_std": float(cer.std(1).mean()),
            "frac_groups_std_gt_0.05": float((r.std(1) > 0.05).float().mean()),
            "no_eos": 1 - sum(ended) / len(ended), "g": g}


# The code that judges the SFT start (with common/, where `conditions` is): its figures are
# cached under a hash of it, so a change to the RL loop or the loss does not make the next run
# judge the start again.
JUDGING = (synthesize, speech_of, judge_mels, transcribe, mean, evaluate, resynth_cer, sampling_report)


def plot(out_dir: str, log: list[dict], dev: list[dict]) -> None:
    plot_curves(os.path.join(out_dir, "curves.svg"), [
        ("reward", "mean reward", [r["step"] for r in log], [r["reward"] for r in log]),
        ("dev CER (eval ASR, greedy)", "CER", [r["step"] for r in dev], [r["cer"] for r in dev]),
        ("dev speaker similarity", "SIM", [r["step"] for r in dev], [r["sim"] for r in dev])])


def start_cache(a: Args, judged: list[Cond]) -> str:
    """Where the SFT start's figures are cached. They depend only on the checkpoints, the
    manifests (and the audio they point to), the decoding settings and the code that judges,
    so they are computed once and shared by every seed, ablation and resume from one start."""
    parts = [a.init, a.tokenizer, a.token2mel, a.reward_asr, a.eval_asr, a.speaker_model]
    common = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "common", f"{m}.py")
              for m in ("tts", "models", "data", "audio")]
    code = [*(inspect.getsource(f) for f in JUDGING), *(open(f).read() for f in common)]
    audio = sorted({f for c in judged for f in (c.utt.audio, c.prompt_audio) if f})
    key = json.dumps({"files": [stamp(p) for p in [*parts, a.dev_data, *a.test_data, *audio]],
                      "prompt_text": a.prompt_text,  # its audio, where used, is among `audio`
                      "settings": [a.max_new_tokens, a.eval_temperature,  # greedy ignores top-k/p and seed
                                   *((a.top_k, a.top_p) if a.eval_temperature > 0 else (0, 1.0)), a.reward_on,
                                   a.device, a.bf16, a.seed if a.eval_temperature > 0 else None,
                                   a.cuda_graph and a.device.startswith("cuda")],  # graphs draw other samples
                      "code": [hashlib.sha1(c.encode()).hexdigest() for c in code]})
    return os.path.join(cache_root(), "tts-eval", hashlib.sha1(key.encode()).hexdigest()[:16])


# ------------------------------------------------------------------ the loop
def main(a: Args) -> dict:
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    if a.device == "cpu":
        torch.set_num_threads(a.threads or os.cpu_count() or 1)
    t_start = time.time()
    if a.prompt_audio and not a.prompt_text:
        raise SystemExit("--prompt_audio needs --prompt_text: the LM reads the prompt's transcript first")
    given = [a.init, a.tokenizer, a.token2mel, a.reward_asr, a.eval_asr, a.speaker_model]
    if not all(given) or not (a.data or a.eval_only):  # what is not given comes from the toy world
        from sft_tts import build_tts_world

        w = build_tts_world()
        split = {s: os.path.join(w["world"], s, "manifest.jsonl")
                 for s in ("rl", "dev", "test-seen", "test-unseen")}
        a.init, a.tokenizer, a.token2mel = (a.init or w["tts_lm"], a.tokenizer or w["tokenizer"],
                                            a.token2mel or w["token2mel"])
        a.reward_asr, a.eval_asr = a.reward_asr or w["reward_asr"], a.eval_asr or w["eval_asr"]
        a.speaker_model = a.speaker_model or w["speaker"]
        a.data, a.dev_data = a.data or split["rl"], a.dev_data or split["dev"]
        a.test_data = a.test_data or [split["test-seen"], split["test-unseen"]]
        if not a.prompt_audio:  # the default voice: the first dev utterance
            first = read_data(split["dev"], Skips())[0]
            a.prompt_audio, a.prompt_text = first.audio, first.text
    os.makedirs(a.out_dir, exist_ok=True)
    lm: TTSLM = load_module(a.init, a.device)
    judges = {"tok": load_module(a.tokenizer), "t2m": load_module(a.token2mel, a.device),
              "reward_asr": load_judge(a.reward_asr, a.device),  # ours, or a local Whisper folder
              "eval_asr": load_judge(a.eval_asr, a.device),
              "spk": load_module(a.speaker_model, a.device)}
    skips = Skips()
    tests = {n: conditions(p, lm, judges["tok"], skips, a.prompt_audio, a.prompt_text)
             for n, p in zip(set_names(a.test_data), a.test_data, strict=True)}
    if a.eval_only:
        one = len(tests) == 1  # one set: audio/<key>.wav; several: audio/<set>/<key>.wav
        res = {name: evaluate(lm, c, judges, a, os.path.join(a.out_dir, "audio", "" if one else name))
               for name, c in tests.items()}
        with open(os.path.join(a.out_dir, "summary.json"), "w") as fh:
            json.dump({"init": a.init, "test": res, "skipped": skips.as_dict()}, fh, indent=1)
        return {"test": res}
    conds = conditions(a.data, lm, judges["tok"], skips, a.prompt_audio, a.prompt_text)
    if len(conds) < a.batch_size:  # B is the number of groups in a step (and in Dr.GRPO's constant)
        print(f"{a.data}: {len(conds)} usable texts, fewer than --batch_size; B = {len(conds)}")
        a.batch_size = len(conds)
    dev = conditions(a.dev_data, lm, judges["tok"], skips, a.prompt_audio, a.prompt_text)
    fixed = dev[: a.n_audio]  # the fixed texts a user listens to
    evaluate(lm, fixed, judges, a, os.path.join(a.out_dir, "audio", "step_0000"))
    cache = start_cache(a, [*dev, *(c for cs in tests.values() for c in cs)])
    sets = ", ".join(f"{n} ({len(c)} texts)" for n, c in tests.items())
    print(f"before RL: judging the SFT start on {sets}, the resynthesis floor and sampling on dev "
          f"({len(dev)} texts x 8), or reading them from {cache}-*.json")
    pre = cached_json(cache + "-start.json", lambda: {
        "before": {name: evaluate(lm, c, judges, a) for name, c in tests.items()},
        "floor": {name: resynth_cer(c, judges) for name, c in tests.items()},
        "dev": evaluate(lm, dev, judges, a)})
    trunc = (f"-k{a.top_k}" if a.top_k else "") + (f"-p{a.top_p}" if a.top_p < 1 else "")  # the sampler's
    room = cached_json(f"{cache}-sampling-s{a.seed}{trunc}.json", lambda: sampling_report(lm, dev, judges, a))
    before, floor, dev_log = pre["before"], pre["floor"], [{"step": 0, **pre["dev"]}]
    best_cer = dev_log[0]["cer"]
    print(f"before RL: dev CER {best_cer:.4f}; sampling on dev: {room}")
    state_path = os.path.join(a.out_dir, "last", "train_state.pt")
    resuming = a.resume and os.path.isfile(state_path)
    if not resuming:
        save_module(lm, os.path.join(a.out_dir, "best"))

    # Dropout off throughout: π_θ, π_old and π_ref must be the same function of θ, so that
    # ρ = 1 exactly at μ = 1 (Eq. G7) and the KL starts at 0.
    lm.eval().requires_grad_(True)
    ref = copy.deepcopy(lm.lm).eval().requires_grad_(False) if a.beta > 0 else None  # π_ref (Eq. G5)
    opt = torch.optim.AdamW(lm.parameters(), lr=a.lr, weight_decay=0.0)
    gen = torch.Generator(device=a.device).manual_seed(a.seed)  # rollout sampling
    B, G = a.batch_size, a.group_size
    log: list[dict] = []
    start = 1
    if resuming:  # continue exactly where the last dev evaluation left off
        ck = torch.load(state_path, weights_only=False)
        if changed := changed_flags(ck.get("args", {}), a):  # states before this check have none
            raise SystemExit(f"{state_path}: that run was started with other flags ({', '.join(changed)}); "
                             "give a new --out_dir, or --resume false to start over")
        lm.lm.load_state_dict(load_module(os.path.join(a.out_dir, "last")).lm.state_dict())
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        random.setstate(ck["random"])
        start, best_cer, dev_log, log = ck["step"] + 1, ck["best_cer"], ck["dev_log"], ck["log"]
        skips.restore(ck.get("skips", {}))  # the loop's non-finite rewards included
        t_start -= ck.get("time_s", 0.0)  # time_s and wall_s go on from the checkpoint's
        with open(os.path.join(a.out_dir, "metrics.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in log)
        print(f"resumed from {a.out_dir}/last at step {ck['step']}")

    def save_last(step: int) -> None:  # model, then the loop state inside it
        save_module(lm, os.path.join(a.out_dir, "last"))
        torch.save({"opt": opt.state_dict(), "gen": gen.get_state(), "random": random.getstate(),
                    "step": step, "best_cer": best_cer, "dev_log": dev_log, "log": log, "args": asdict(a),
                    "skips": skips.as_dict(), "time_s": time.time() - t_start},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    bar = tqdm(range(start, a.steps + 1), desc="grpo_tts", initial=start - 1, total=a.steps)
    for step in bar:
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        batch = [conds[i] for i in random.sample(range(len(conds)), B)]
        # 1. Rollout: G samples per text from π_old = π_θ (Eq. G1).
        t0 = time.time()
        outs, ended = synthesize(lm, batch, a, a.temperature, gen, repeat=G)  # B*G outputs o_i
        t_sample = time.time() - t0
        # 2. Frozen judges on token2wav's output, batched, no grad (SPEC F1), then rewards (Eq. G2).
        with torch.no_grad(), torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=a.bf16):
            voices = [c.prompt_mel for c in batch for _ in range(G)]  # the prompt's voice, for token2mel
            mels = judge_mels(judges["t2m"], outs, lm.n_speech, voices)
            hyps = transcribe(judges["reward_asr"], mels, a.reward_on == "wav")
            sims = None
            if a.w_sim:  # Eq. T4 reads token2mel's mel, as the reward ASR does
                have = [i for i, m in enumerate(mels) if m is not None]
                s = judges["spk"].similarity([mels[i] for i in have],
                                             [batch[i // G].prompt_mel for i in have])
                sims = [0.0] * len(outs)
                for i, v in zip(have, s.tolist(), strict=True):
                    sims[i] = v
        terms = []
        for b, c in enumerate(batch):
            g = slice(b * G, (b + 1) * G)
            terms += group_rewards(c.utt.text, outs[g], ended[g], hyps[g], mels[g],
                                   sims[g] if sims is not None else None, a)
        r = torch.tensor([total_reward(t, a) for t in terms]).view(-1, G)  # [B, G]
        for i in torch.nonzero(~torch.isfinite(r.flatten())).flatten().tolist():  # named, counted
            skips.warn(batch[i // G].utt.src, "non-finite reward (advantage 0)", f"sample {i % G}")
        t_reward = time.time() - t0 - t_sample
        # 3. Advantages (Eq. G3); all-equal groups give Â = 0 and are counted.
        adv, zero_std = group_advantages(r, a.scale)  # [B, G], [B]
        groups = torch.arange(len(batch))  # the update reads whole groups, each prompt once
        if a.drop_zero_std:
            groups = groups[~zero_std]
        rows = (groups[:, None] * G + torch.arange(G)).flatten()  # their samples, group-major
        stats: dict[str, float] = {}
        t1 = time.time()
        if len(rows) > 0:
            prompts = [batch[b].prompt_ids for b in groups]  # one per group; its G outputs share it
            keep = [outs[i] for i in rows]
            A = adv.flatten()[rows].to(a.device)  # [N]
            lmask = torch.arange(max(map(len, keep)), device=a.device)[None] < \
                torch.tensor([len(o) for o in keep], device=a.device)[:, None]  # [N, L]
            with torch.no_grad():  # ℓ(old) once, right after sampling (Eq. G7); ℓ(ref) for Eq. G5
                # μ = 1: π_old is π_θ itself (the policy runs in eval mode, no dropout), so ℓ(old) =
                # ℓ.detach() below, with no extra forward pass
                lp_old = sequence_logprobs(lm, lm.lm, prompts, keep, a)[0] if a.mu > 1 else None  # [N, L]
                lp_ref = sequence_logprobs(lm, ref, prompts, keep, a)[0] if ref is not None else None
            for _ in range(a.mu):  # μ inner updates on one rollout (Eq. G7)
                lp, ent = sequence_logprobs(lm, lm.lm, prompts, keep, a)  # [N, L]
                loss, stats = grpo_loss(lp, lp.detach() if lp_old is None else lp_old, lp_ref, A, lmask, a)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)  # the norm before clipping
                opt.step()
            stats["loss"] = loss.item()
            stats["grad_norm"] = float(gnorm)  # of the last inner update
            stats["entropy"] = float((ent.detach() * lmask).sum() / lmask.sum())
        t_update = time.time() - t1
        n_tok = sum(map(len, outs))
        means = {f"rewards/{k}/mean": sum(t[k] for t in terms if k in t) / max(sum(k in t for t in terms), 1)
                 for k in sorted({k for t in terms for k in t})}
        rec = {"step": step, "reward": float(r.nanmean()), "reward_std": float(r.std(1).nanmean()), **means,
               "frac_reward_zero_std": float(zero_std.float().mean()), **stats,
               "completions/mean_length": n_tok / len(outs), "completions/min_length": min(map(len, outs)),
               "completions/max_length": max(map(len, outs)),
               "completions/clipped_ratio": 1 - sum(ended) / len(ended),
               "sampling_tok_s": n_tok / max(t_sample, 1e-9), "reward_s": t_reward,
               "update_tok_s": a.mu * sum(len(outs[i]) for i in rows) / max(t_update, 1e-9),
               "peak_mem_mb": peak_mem_mb(a.device), "time_s": time.time() - t_start}
        log.append(rec)
        with open(os.path.join(a.out_dir, "metrics.jsonl"), "a" if log[:-1] else "w") as fh:
            fh.write(json.dumps(rec) + "\n")
        bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['rewards/acc/mean']:.3f}",
                        kl=f"{rec.get('kl', 0):.4f}", zero_std=f"{rec['frac_reward_zero_std']:.2f}")
        if step % a.audio_every == 0 or step == a.steps:
            evaluate(lm, fixed, judges, a, os.path.join(a.out_dir, "audio", f"step_{step:04d}"))
        if step % a.eval_every == 0 or step == a.steps:  # keep the best dev checkpoint
            d = evaluate(lm, dev, judges, a)
            dev_log.append({"step": step, **d})
            bar.write(f"step {step}  dev CER {d['cer']:.4f}  SIM {d['sim']:.3f}  reward {rec['reward']:.3f}")
            if d["cer"] < best_cer:
                best_cer = d["cer"]
                save_module(lm, os.path.join(a.out_dir, "best"))
            save_last(step)
    best = load_module(os.path.join(a.out_dir, "best"), a.device)
    after = {name: evaluate(best, c, judges, a) for name, c in tests.items()}
    summary = {"init": a.init, "final": os.path.join(a.out_dir, "best"), "before": before, "after": after,
               "resynth_cer": {k: v["resynth"] for k, v in floor.items()},
               "real_audio_cer": {k: v["real"] for k, v in floor.items()},
               "f0_gap_st_floor": {k: {"real": v["real_f0_gap_st"], "resynth": v["resynth_f0_gap_st"]}
                                   for k, v in floor.items()}, "sft_sampling_dev": room,
               "dev": dev_log, "steps": a.steps, "wall_s": round(time.time() - t_start, 1),
               "skipped": skips.as_dict(), "args": asdict(a)}
    with open(os.path.join(a.out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    plot(a.out_dir, log, dev_log)
    num = lambda x: "-" if x is None else f"{x:.3f}"  # a text-only set has no floor or duration ratio
    for name in before:
        b, f = before[name], after[name]
        print(f"{name:12s} CER {b['cer']:.4f} -> {f['cer']:.4f} (floor {num(floor[name]['resynth'])})  "
              f"SIM {b['sim']:.3f} -> {f['sim']:.3f}  dur {num(b['dur_ratio'])} -> {num(f['dur_ratio'])}  "
              f"no-eos {b['no_eos']:.3f} -> {f['no_eos']:.3f}  F0 gap to prompt {num(b['f0_gap_st'])} -> "
              f"{num(f['f0_gap_st'])} st")
    return summary


if __name__ == "__main__":
    main(parse_args(Args))
