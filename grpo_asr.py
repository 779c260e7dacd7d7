"""GRPO for an LLM-based speech recogniser (SPEC §1 and §2), in one file.

    python grpo_asr.py                    # the toy world: SFT warm start -> GRPO -> eval
    python grpo_asr.py --eval_only --init CKPT --test_data A.jsonl --out_dir D
    python grpo_asr.py --select hard --select_out rl.jsonl      # RL data sets D0-D3
    python grpo_asr.py --data train.jsonl --test_data test.jsonl --init WARM_START_DIR
    python grpo_asr.py --data train.jsonl --test_data test.jsonl --qwen2_audio QWEN2_AUDIO_DIR

Each step (SPEC F1): the frozen encoder embeds B utterances once -> the policy samples G
transcripts per utterance -> rule-based rewards -> group-normalised advantages -> clipped
surrogate with a k3 KL to the SFT reference -> one AdamW update of the LM.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
import unicodedata
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from common import changed_flags, parse_args, peak_mem_mb, plot_curves
from common.data import (
    Skips,
    Utt,
    corpus_error,
    edit_ops,
    error_rate,
    load_audio_items,
    normalize,
    read_data,
    set_names,
)
from common.logprob import token_logprobs
from common.models import SpeechLLM, collate, load_qwen2_audio, sample, transcribe
from common.toy import KEYWORDS, build_toy_world


@dataclass
class Args:
    """GRPO for the LLM-ASR (toy world by default)."""

    data: str = ""
    """RL manifest (.jsonl) or Kaldi dir; empty = the toy world's rl split"""
    dev_data: str = ""
    """dev manifest (best checkpoint is chosen on it); empty = toy dev"""
    test_data: list[str] = field(default_factory=list)
    """test manifests (repeatable); empty = toy test-seen and test-unseen"""
    init: str = ""
    """warm-start SpeechLLM checkpoint; empty = the cached toy SFT model (trained if missing)"""
    qwen2_audio: str = ""
    """local Qwen2AudioForConditionalGeneration folder: the policy itself, instead of --init"""
    out_dir: str = "runs/grpo_asr"
    """checkpoints, metrics.jsonl, plots and summary.json go here"""
    eval_only: bool = False
    """only evaluate --init on --test_data and write out_dir/summary.json"""
    # --- RL data construction (SPEC §2, D0-D3) ---
    select: str = ""
    """write an RL manifest and exit: random (D0), hard (D1), short (D2), keyword (D3)"""
    select_out: str = ""
    """where --select writes its manifest"""
    select_n: int = 1000
    """utterances --select keeps (at most)"""
    second: str = ""
    """D1's second recogniser: a SpeechLLM checkpoint; empty = the policy's own CTC head"""
    hard_own_errors: bool = False
    """D1 extension: also take utterances the SFT model's greedy output gets wrong"""
    max_duration: float = 2.5
    """D2's duration cap in seconds (the paper uses 20 s on real speech)"""
    # --- GRPO (SPEC §1) ---
    steps: int = 1200
    """policy updates (toy dev WER was still falling at 1200)"""
    batch_size: int = 8
    """B: utterances per step (paper: 32)"""
    group_size: int = 8
    """G: samples per utterance (paper: 12)"""
    temperature: float = 1.0
    """sampling temperature T"""
    top_k: int = 0
    """top-k sampling (0 = off)"""
    top_p: float = 1.0
    """top-p sampling (1 = off)"""
    max_new_tokens: int = 32
    """length limit of a sampled transcript"""
    lr: float = 1e-4
    """AdamW learning rate of the LM (paper: 1e-5 for 7B; 1e-4 on the toy world, see README)"""
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
    # --- rewards (SPEC §2), r = sum_k w_k R_k (Eq. G2) ---
    unit: str = "word"
    """accuracy unit: word (1-WER) or char (1-CER, for unspaced scripts)"""
    w_acc: float = 1.0
    """weight of A1, 1 - WER"""
    w_halluc: float = 1.0
    """weight of A2, -1 for a hallucination"""
    w_keyword: float = 0.0
    """weight of A3, (keyword precision + recall) / 2"""
    w_exact: float = 0.0
    """weight of exact match (GRPO-ASR)"""
    w_edit: float = 0.0
    """weight of minus the edit distance in words (GRPO-ASR)"""
    loop_n: int = 4
    """A2: longest n-gram checked for loops"""
    loop_repeats: int = 3
    """A2: an n-gram this many times in a row is a loop"""
    ins_ratio: float = 1.5
    """A2: runaway if len(hyp) > ins_ratio * len(ref) + ins_extra words"""
    ins_extra: int = 2
    """A2: see ins_ratio"""
    ins_frac: float = 0.5
    """A2: runaway if insertions > ins_frac * len(ref)"""
    # --- bookkeeping ---
    eval_every: int = 50
    """steps between dev evaluations (the best dev checkpoint is kept)"""
    max_seconds: float = 30.0
    """skip audio longer than this"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """CPU threads (0 = all cores)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """cpu or cuda"""
    bf16: bool = torch.cuda.is_available()
    """bf16 autocast for the policy forward on CUDA"""
    cuda_graph: bool = True
    """replay each rollout decode step as one CUDA graph (CUDA only; timings in BENCHMARKS.md)"""
    compile_sampler: bool = False
    """with --cuda_graph, torch.compile that step too (1.75x at 0.5B; each new shape recompiles, up to 8)"""
    resume: bool = True
    """continue from out_dir/last (saved at every dev evaluation) if it exists"""


# ------------------------------------------------------------------ rewards (SPEC §2)
def reward_accuracy(ref: str, hyp: str, unit: str = "word") -> float:
    """A1: R1 = 1 - WER (or 1 - CER). WER can exceed 1, so R1 can be negative."""
    return 1.0 - error_rate(ref, hyp, unit)


def _scripts(text: str) -> set[str]:
    """Unicode scripts of the letters in text: LATIN, CJK, CYRILLIC, ..."""
    return {unicodedata.name(c, "?").split()[0] for c in text if c.isalpha()}


def has_loop(words: list[str], max_n: int, repeats: int) -> bool:
    """Some n-gram (n <= max_n) occurs `repeats` or more times in a row."""
    for n in range(1, max_n + 1):
        for i in range(len(words) - n * repeats + 1):
            gram = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


def is_hallucination(ref: str, hyp: str, a: Args) -> bool:
    """A2: a repeated n-gram loop not in the reference, runaway insertions, or another script."""
    r, h = normalize(ref).split(), normalize(hyp).split()
    if has_loop(h, a.loop_n, a.loop_repeats) and not has_loop(r, a.loop_n, a.loop_repeats):
        return True
    if len(h) > a.ins_ratio * len(r) + a.ins_extra:
        return True
    if edit_ops(ref, hyp)["ins"] > a.ins_frac * max(len(r), 1):
        return True
    return bool(_scripts(hyp) - _scripts(ref)) if _scripts(ref) else False


def keyword_scores(keywords: list[str], hyp: str, lexicon: set[str]) -> tuple[float, float]:
    """A3: recall = |K found in hyp| / |K|; precision = |hyp keyword words in K| / |hyp keyword
    words| (0 when the hypothesis holds no keyword at all: nothing found earns nothing)."""
    words = normalize(hyp).split()
    padded = f" {' '.join(words)} "
    recall = sum(f" {k} " in padded for k in keywords) / len(keywords)
    k_words = {w for k in keywords for w in k.split()}
    said = [w for w in words if w in lexicon]
    precision = sum(w in k_words for w in said) / len(said) if said else 0.0
    return precision, recall


def rewards(utt: Utt, hyp: str, a: Args, lexicon: set[str]) -> dict[str, float]:
    """Every reward term R_k for one sample (Eq. G2 weights them)."""
    r = {"acc": reward_accuracy(utt.text, hyp, a.unit),  # Eq. A1
         "halluc": -float(is_hallucination(utt.text, hyp, a)),  # Eq. A2
         "exact": float(normalize(utt.text) == normalize(hyp)),
         "edit": -float(sum(edit_ops(utt.text, hyp)[k] for k in ("sub", "del", "ins")))}
    if utt.keywords:  # Eq. A3: utterances without keywords get no R3 term
        p, rc = keyword_scores(utt.keywords, hyp, lexicon)
        r["keyword"] = (p + rc) / 2
    return r


def reward_means(terms: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each reward term over the samples that have it (R3 only where keywords exist)."""
    keys = sorted({k for t in terms for k in t})
    return {f"rewards/{k}/mean": sum(t[k] for t in terms if k in t) / sum(k in t for t in terms)
            for k in keys}


def total_reward(r: dict[str, float], a: Args) -> float:
    w = {"acc": a.w_acc, "halluc": a.w_halluc, "keyword": a.w_keyword, "exact": a.w_exact,
         "edit": a.w_edit}
    return sum(w[k] * v for k, v in r.items())  # Eq. G2


# ------------------------------------------------------------------ GRPO (SPEC §1)
def group_advantages(r: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. G3 on rewards r [B, G] -> advantages [B, G] and a zero-std mask [B].
    NaN rewards (bad input) get advantage 0 and do not enter their group's statistics."""
    ok = torch.isfinite(r)
    n = ok.sum(1, keepdim=True).clamp(min=1)
    rz = torch.where(ok, r, 0.0)
    mean = rz.sum(1, keepdim=True) / n  # [B, 1]
    var = (torch.where(ok, r - mean, 0.0) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()  # unbiased, as TRL's
    zero_std = std.squeeze(1) < 1e-6  # all-equal group: Â = 0, never NaN
    if scale == "group":
        adv = (rz - mean) / (std + 1e-4)
    elif scale == "batch":
        adv = (rz - mean) / (r[ok].std() + 1e-4 if ok.sum() > 1 else 1.0)
    elif scale == "none":  # Dr.GRPO
        adv = rz - mean
    else:
        raise ValueError(f"--scale must be group, batch or none, not {scale!r}")
    adv = torch.where(ok & ~zero_std[:, None], adv, 0.0)
    return adv, zero_std


def grpo_loss(lp: torch.Tensor, lp_old: torch.Tensor, lp_ref: torch.Tensor | None,
              adv: torch.Tensor, mask: torch.Tensor, a: Args,
              group_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Eqs. G4-G6. lp, lp_old, lp_ref, mask: [N, L] (N = B*G); adv: [N]. Returns the loss (-J)."""
    m = mask.float()
    ratio = torch.exp(lp - lp_old)  # [N, L]  Eq. G4 ρ
    A = adv[:, None]  # [N, 1]  one advantage for every token
    surr = torch.min(ratio * A, torch.clamp(ratio, 1 - a.eps_low, 1 + a.eps_high) * A)  # Eq. G4 S
    J = surr
    kl = torch.zeros_like(lp)
    if lp_ref is not None:
        d = lp_ref - lp
        kl = torch.exp(d) - d - 1  # [N, L]  Eq. G5, k3 estimator, >= 0
        J = surr - a.beta * kl  # Eq. G6
    if a.loss_agg == "grpo":  # (1/G) Σ_i (1/|o_i|) Σ_t J, averaged over groups
        per_seq = (J * m).sum(1) / m.sum(1).clamp(min=1)  # [N]
        obj = per_seq.view(-1, group_size).mean(1).mean()
    elif a.loss_agg == "dapo":  # Σ_{i,t} J / Σ_i |o_i|
        obj = (J * m).sum() / m.sum().clamp(min=1)
    elif a.loss_agg == "dr_grpo":  # Σ_{i,t} J / (B·G·L_max)
        obj = (J * m).sum() / (a.batch_size * group_size * a.max_new_tokens)  # a constant, also when
        # --drop_zero_std leaves groups out
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


def reference_model(lm: torch.nn.Module) -> torch.nn.Module:
    """π_ref: a frozen copy of the starting (SFT) LM. The audio front end is frozen and
    shared, so only the LM is copied."""
    return copy.deepcopy(lm).eval().requires_grad_(False)


def sequence_logprobs(model: SpeechLLM, lm, audio: torch.Tensor, audio_lens: torch.Tensor,
                      seqs: list[list[int]], a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_{i,t} = log π(o_{i,t} | x, o_{i,<t}) from `lm` (policy or reference), teacher-forced,
    through the fused kernel (SPEC F2). `audio` [B', T', d] holds one utterance per group and
    `seqs` its G samples each (group-major): each utterance's prompt runs once and is shared
    by its G samples. Returns lp [N, L] and entropy [N, L], 0 where padded."""
    with torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=a.bf16):
        hid = model.output_hidden(audio, audio_lens, seqs, lm)  # [sum |o_i|, d]; lm's own token table
    y = torch.tensor([t for s in seqs for t in s], device=audio.device)  # [sum |o_i|]
    head = lm.get_output_embeddings().weight  # [V, d]
    lp, ent = token_logprobs(hid, head, y, with_entropy=True)  # [sum |o_i|]
    lens = torch.tensor([len(s) for s in seqs], device=audio.device)
    valid = torch.arange(int(lens.max()), device=audio.device)[None] < lens[:, None]  # [N, L]
    out_lp = torch.zeros(valid.shape, device=audio.device, dtype=lp.dtype).masked_scatter(valid, lp)
    out_ent = torch.zeros_like(out_lp).masked_scatter(valid, ent)
    return out_lp, out_ent  # [N, L] each


# ------------------------------------------------------------------ evaluation and RL data
def featurize(model: SpeechLLM, path: str, skips: Skips, a: Args):
    items = load_audio_items(read_data(path, skips), skips, a.max_seconds, progress=True)
    for u, w in items:
        u.duration = u.duration or w.shape[0] / 16_000
    return [u for u, _ in items], [model.features(w) for _, w in items]


def evaluate(model: SpeechLLM, utts: list[Utt], feats, a: Args, lexicon: set[str]) -> dict:
    """Greedy decoding; WER with its split, hallucination rate (A2) and keyword recall (A3)."""
    hyps, _ = transcribe(model, feats, max_new_tokens=a.max_new_tokens)
    m = corpus_error([u.text for u in utts], hyps, a.unit)
    pairs = list(zip(utts, hyps, strict=True))
    kw = [(keyword_scores(u.keywords, h, lexicon)[1], len(u.keywords)) for u, h in pairs if u.keywords]
    return {"wer": m["wer"], "sub": m["sub"], "del": m["del"], "ins": m["ins"],
            "halluc": sum(is_hallucination(u.text, h, a) for u, h in pairs) / len(utts),
            "kw_recall": sum(r * n for r, n in kw) / max(sum(n for _, n in kw), 1), "n": len(utts)}


@torch.no_grad()
def ctc_transcribe(model: SpeechLLM, feats) -> list[str]:
    """Greedy CTC from the encoder's auxiliary head: a second, different recogniser (D1)."""
    out = []
    for s in range(0, len(feats), 64):
        x, lens = collate(feats[s : s + 64], next(model.parameters()).device)
        h, hl = model.encoder(x, lens)
        best = model.ctc_head(h).argmax(-1)  # [B, T']
        blank = model.ctc_head.out_features - 1
        for row, n in zip(best.tolist(), hl.tolist(), strict=True):
            ids = [t for i, t in enumerate(row[:n]) if t != blank and (i == 0 or t != row[i - 1])]
            out.append(model.decode(ids))
    return out


def select_rl_data(a: Args, model: SpeechLLM, utts: list[Utt], feats) -> list[Utt]:
    """The paper's RL sets (SPEC §2): D0 random, D1 hard, D2 duration cap, D3 keyword-rich."""
    rng = random.Random(a.seed)
    idx = list(range(len(utts)))
    rng.shuffle(idx)
    if a.select == "random":  # D0, the control set
        keep = idx
    elif a.select == "short":  # D2
        keep = [i for i in idx if utts[i].duration < a.max_duration]
    elif a.select == "keyword":  # D3: most keywords first
        keep = sorted((i for i in idx if utts[i].keywords), key=lambda i: -len(utts[i].keywords))
    elif a.select == "hard":  # D1: two recognisers disagree, plus long and repetitive sentences
        sft, _ = transcribe(model, feats, max_new_tokens=a.max_new_tokens)
        if a.second:
            second = SpeechLLM.load(a.second, a.device)
            other, _ = transcribe(second, feats, max_new_tokens=a.max_new_tokens)
        elif model.ctc_head is not None:
            other = ctc_transcribe(model, feats)
        else:
            raise SystemExit("--select hard needs --second CKPT (this model has no CTC head)")
        n_words = sorted(len(u.text.split()) for u in utts)
        long = n_words[int(0.9 * (len(n_words) - 1))]

        def hard(i: int) -> bool:
            words = normalize(utts[i].text).split()
            return (normalize(sft[i]) != normalize(other[i]) or len(words) >= long
                    or len(set(words)) < len(words)
                    or (a.hard_own_errors and normalize(sft[i]) != normalize(utts[i].text)))
        keep = [i for i in idx if hard(i)]
    else:
        raise SystemExit(f"--select must be random, hard, short or keyword, not {a.select!r}")
    return [utts[i] for i in keep[: a.select_n]]


def write_manifest(path: str, utts: list[Utt]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for u in utts:
            f.write(json.dumps({"key": u.key, "audio": u.audio, "text": u.text, "speaker": u.speaker,
                                "keywords": u.keywords, "duration": u.duration}) + "\n")
    os.replace(path + ".tmp", path)


def plot(out_dir: str, log: list[dict], dev: list[dict]) -> None:
    plot_curves(os.path.join(out_dir, "curves.svg"), [
        ("reward", "mean reward", [r["step"] for r in log], [r["reward"] for r in log]),
        ("dev WER (greedy)", "WER", [r["step"] for r in dev], [r["wer"] for r in dev])])


# ------------------------------------------------------------------ the loop
def main(a: Args) -> dict:
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    if a.device == "cpu":
        torch.set_num_threads(a.threads or os.cpu_count() or 1)
    toy = not a.data
    if toy:
        world = build_toy_world()
        a.data, a.dev_data = world["rl"], a.dev_data or world["dev"]  # RL data SFT never saw
        a.test_data = a.test_data or [world["test-seen"], world["test-unseen"]]
    if a.init and a.qwen2_audio:
        raise SystemExit("give --init or --qwen2_audio, not both")
    if not a.init and not a.qwen2_audio:
        if not toy:
            raise SystemExit("--init WARM_START (or --qwen2_audio DIR) is needed with --data")
        from sft_asr import toy_warm_start

        a.init = toy_warm_start()
    t_start = time.time()
    os.makedirs(a.out_dir, exist_ok=True)
    if a.qwen2_audio:  # the same loop, with Qwen2-Audio's own tower, projector and LM
        model = load_qwen2_audio(a.qwen2_audio).to(a.device)
        a.init = a.qwen2_audio
    else:
        model = SpeechLLM.load(a.init, a.device)
    skips = Skips()
    tests = {n: featurize(model, p, skips, a)
             for n, p in zip(set_names(a.test_data), a.test_data, strict=True)}
    lexicon = set(KEYWORDS) if toy else {w for u, _ in tests.values() for x in u for k in x.keywords
                                         for w in k.split()}
    if a.eval_only:
        res = {name: evaluate(model, u, f, a, lexicon) for name, (u, f) in tests.items()}
        with open(os.path.join(a.out_dir, "summary.json"), "w") as fh:
            json.dump({"init": a.init, "test": res, "skipped": skips.as_dict()}, fh, indent=1)
        return {"test": res}
    utts, feats = featurize(model, a.data, skips, a)
    if len(utts) < a.batch_size:  # B is the number of groups in a step (and in Dr.GRPO's constant)
        print(f"{a.data}: {len(utts)} usable utterances, fewer than --batch_size; B = {len(utts)}")
        a.batch_size = len(utts)
    if not toy:
        lexicon |= {w for u in utts for k in u.keywords for w in k.split()}
    if a.select:
        chosen = select_rl_data(a, model, utts, feats)
        write_manifest(a.select_out or os.path.join(a.out_dir, f"rl_{a.select}.jsonl"), chosen)
        print(f"--select {a.select}: {len(chosen)} of {len(utts)} utterances")
        return {"selected": len(chosen)}
    dev_utts, dev_feats = featurize(model, a.dev_data, skips, a) if a.dev_data else (utts[:200], feats[:200])
    before = {name: evaluate(model, u, f, a, lexicon) for name, (u, f) in tests.items()}
    dev_log = [{"step": 0, **evaluate(model, dev_utts, dev_feats, a, lexicon)}]
    best_wer = dev_log[0]["wer"]
    state_path = os.path.join(a.out_dir, "last", "train_state.pt")
    resuming = a.resume and os.path.isfile(state_path)
    if not resuming:
        model.save(os.path.join(a.out_dir, "best"))

    # Only the LM learns; the encoder and projector are the frozen audio front end (SPEC F1).
    # Dropout stays off (eval mode) throughout: π_θ, π_old and π_ref must be the same function
    # of θ, so that ρ = 1 exactly at μ = 1 (Eq. G7) and the KL starts at 0.
    model.eval().requires_grad_(False)
    model.lm.requires_grad_(True)
    ref = reference_model(model.lm) if a.beta > 0 else None  # π_ref (Eq. G5); β = 0 never builds it
    opt = torch.optim.AdamW(model.lm.parameters(), lr=a.lr, weight_decay=0.0)
    gen = torch.Generator(device=a.device).manual_seed(a.seed)  # rollout sampling
    graphs = a.cuda_graph and a.device.startswith("cuda")  # a CUDA graph needs CUDA
    B, G = a.batch_size, a.group_size
    log: list[dict] = []
    start = 1
    if resuming:  # continue exactly where the last dev evaluation left off
        ck = torch.load(state_path, weights_only=False)
        if changed := changed_flags(ck.get("args", {}), a):  # states before this check have none
            raise SystemExit(f"{state_path}: that run was started with other flags ({', '.join(changed)}); "
                             "give a new --out_dir, or --resume false to start over")
        model.lm.load_state_dict(SpeechLLM.load(os.path.join(a.out_dir, "last"), a.device).lm.state_dict())
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        random.setstate(ck["random"])
        start, best_wer, dev_log, log = ck["step"] + 1, ck["best_wer"], ck["dev_log"], ck["log"]
        skips.restore(ck.get("skips", {}))  # the loop's non-finite rewards included
        t_start -= ck.get("time_s", 0.0)  # time_s and wall_s go on from the checkpoint's
        with open(os.path.join(a.out_dir, "metrics.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in log)
        print(f"resumed from {a.out_dir}/last at step {ck['step']}")

    def save_last(step: int) -> None:  # model, then the loop state inside it
        model.save(os.path.join(a.out_dir, "last"))
        torch.save({"opt": opt.state_dict(), "gen": gen.get_state(), "random": random.getstate(),
                    "step": step, "best_wer": best_wer, "dev_log": dev_log, "log": log, "args": asdict(a),
                    "skips": skips.as_dict(), "time_s": time.time() - t_start},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    bar = tqdm(range(start, a.steps + 1), desc="grpo", initial=start - 1, total=a.steps)
    for step in bar:
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        batch = random.sample(range(len(utts)), B)
        # 1. The frozen encoder embeds the batch once, reused by rollout and update (F1).
        t0 = time.time()
        with torch.no_grad():
            x, xl = collate([feats[i] for i in batch], a.device)  # [B, T, 80]
            audio, al, enc = model.embed_audio(x, xl)  # [B, T', d]
            # π_ref reads the audio through its own (frozen) embedding table; the encoder runs once
            audio_ref = model.embed_audio(x, xl, ref, enc)[0] if ref is not None else None
        # 2. Rollout: G samples per utterance from π_old = π_θ (Eq. G1).
        emb, mask, _, _ = model.build_inputs(audio, al)  # [B, P, d]: each prompt is run once for its G rows
        toks, lens, _ = sample(model.lm, emb, mask, a.max_new_tokens, model.eos_id,
                               model.tokenizer.pad_token_id or 0, a.temperature, a.top_k, a.top_p, gen,
                               group=G, cuda_graph=graphs, compiled=a.compile_sampler)  # [B*G, L]
        seqs = [toks[i, : lens[i]].tolist() for i in range(len(toks))]  # o_i, eos included
        hyps = [model.decode(s) for s in seqs]
        t_sample = time.time() - t0
        # 3. Rewards (Eq. G2), one per sample.
        terms = [rewards(utts[batch[i // G]], hyps[i], a, lexicon) for i in range(len(hyps))]
        r = torch.tensor([total_reward(t, a) for t in terms]).view(-1, G)  # [B, G]
        for i in torch.nonzero(~torch.isfinite(r.flatten())).flatten().tolist():  # bad reward: named, counted
            skips.warn(utts[batch[i // G]].src, "non-finite reward (advantage 0)",
                       f"sample {i % G}: {hyps[i]!r}")
        # 4. Advantages (Eq. G3); all-equal groups give Â = 0 and are counted.
        adv, zero_std = group_advantages(r, a.scale)  # [B, G], [B]
        groups = torch.arange(len(batch))  # the update reads whole groups, each utterance once
        if a.drop_zero_std:
            groups = groups[~zero_std]
        rows = (groups[:, None] * G + torch.arange(G)).flatten()  # their samples, group-major
        stats: dict[str, float] = {}
        t1 = time.time()
        if len(rows) > 0:
            keep_seqs = [seqs[i] for i in rows]
            aud, aln, A = audio[groups], al[groups], adv.flatten()[rows].to(a.device)  # [B', T', d], A [N]
            lmask = torch.arange(max(map(len, keep_seqs)), device=a.device)[None] < \
                torch.tensor([len(s) for s in keep_seqs], device=a.device)[:, None]  # [N, L]
            with torch.no_grad():  # ℓ(old) once, right after sampling (Eq. G7); ℓ(ref) for Eq. G5
                # μ = 1: π_old is π_θ itself (eval mode, no dropout), so ℓ(old) = ℓ.detach() below
                lp_old = sequence_logprobs(model, model.lm, aud, aln, keep_seqs, a)[0] if a.mu > 1 else None
                if ref is not None:
                    lp_ref = sequence_logprobs(model, ref, audio_ref[groups], aln, keep_seqs, a)[0]
                else:
                    lp_ref = None
            for _ in range(a.mu):  # μ inner updates on one rollout (Eq. G7)
                lp, ent = sequence_logprobs(model, model.lm, aud, aln, keep_seqs, a)  # [N, L]
                loss, stats = grpo_loss(lp, lp.detach() if lp_old is None else lp_old, lp_ref, A, lmask, a,
                                        G)  # rows are whole groups
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.lm.parameters(), 1.0)  # the norm before clipping
                opt.step()
            stats["loss"] = loss.item()
            stats["grad_norm"] = float(gnorm)  # of the last inner update
            stats["entropy"] = float((ent.detach() * lmask).sum() / lmask.sum())
        t_update = time.time() - t1
        n_tok = int(lens.sum())
        clipped = [lens[i] == a.max_new_tokens and toks[i, -1] != model.eos_id for i in range(len(seqs))]
        rec = {"step": step, "reward": float(r.nanmean()), "reward_std": float(r.std(1).nanmean()),
               **reward_means(terms),
               "frac_reward_zero_std": float(zero_std.float().mean()), **stats,
               "completions/mean_length": n_tok / len(seqs), "completions/min_length": int(lens.min()),
               "completions/max_length": int(lens.max()),
               "completions/clipped_ratio": sum(map(bool, clipped)) / len(seqs),
               "sampling_tok_s": n_tok / max(t_sample, 1e-9),
               "update_tok_s": a.mu * n_tok / max(t_update, 1e-9) if len(rows) else 0.0,
               "peak_mem_mb": peak_mem_mb(a.device), "time_s": time.time() - t_start}
        log.append(rec)
        with open(os.path.join(a.out_dir, "metrics.jsonl"), "a" if log[:-1] else "w") as fh:
            fh.write(json.dumps(rec) + "\n")
        bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec.get('kl', 0):.4f}",
                        zero_std=f"{rec['frac_reward_zero_std']:.2f}")
        if step % a.eval_every == 0 or step == a.steps:  # keep the best dev checkpoint
            d = evaluate(model, dev_utts, dev_feats, a, lexicon)
            dev_log.append({"step": step, **d})
            bar.write(f"step {step}  dev WER {d['wer']:.4f}  reward {rec['reward']:.3f}")
            if d["wer"] < best_wer:
                best_wer = d["wer"]
                model.save(os.path.join(a.out_dir, "best"))
            save_last(step)
    best = SpeechLLM.load(os.path.join(a.out_dir, "best"), a.device)
    after = {name: evaluate(best, u, f, a, lexicon) for name, (u, f) in tests.items()}
    summary = {"init": a.init, "final": os.path.join(a.out_dir, "best"), "before": before, "after": after,
               "dev": dev_log, "steps": a.steps, "wall_s": round(time.time() - t_start, 1),
               "skipped": skips.as_dict(), "args": asdict(a)}
    with open(os.path.join(a.out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    plot(a.out_dir, log, dev_log)
    for name in before:
        b, f = before[name], after[name]
        print(f"{name:12s} WER {b['wer']:.4f} -> {f['wer']:.4f}   "
              f"halluc {b['halluc']:.3f} -> {f['halluc']:.3f}   "
              f"kw recall {b['kw_recall']:.3f} -> {f['kw_recall']:.3f}")
    return summary


if __name__ == "__main__":
    main(parse_args(Args))
