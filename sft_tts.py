"""The toy TTS world, built once and cached stage by stage (SPEC §3's pieces, tiny):

    1 tokenizer  k-means (K=512) over log-mel frames pooled to 25 Hz: audio -> speech tokens;
                 or (--tokens semantic) over the encoder states of a CTC recogniser
    2 token2wav  a conv net tokens -> log-mel, then Griffin-Lim (common.tts.mel_to_wav); with
                 semantic tokens it also reads the voice of another utterance of the speaker
    3 judges     the reward ASR and a separate evaluation ASR (character CTC), both trained
                 on real audio and on token2wav audio of real tokens, and a speaker encoder
    4 tts_lm     the TTS LM (Qwen2 from a small config), SFT until dev stops improving

    python sft_tts.py                      # build what is missing, then print the world's figures
    python sft_tts.py --rebuild token2wav  # rebuild one stage (repeatable)
    python sft_tts.py --side_by_side true  # token2wav and the judges in a second process beside the LM

Each stage lives in .cache/tts-<world>/<stage>-<hash of its settings and those of the stages it reads>.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import cache_lock, cpu_has_bf16, parse_args
from common.audio import log_mel
from common.data import Skips, corpus_error, length_batches, load_audio_items, read_data
from common.logprob import token_logprobs
from common.toy import TTS_SIZES, build_toy_world, cache_root, vocabulary
from common.tts import (
    TOKEN_HOP,
    TTSLM,
    CTCRecognizer,
    SemanticTokenizer,
    SpeakerEncoder,
    SpeechTokenizer,
    Token2Mel,
    build_toy_tts,
    load_module,
    save_module,
)

# The stages in build order, each with what it reads: its folder's name hashes the settings
# of these stages only, so retraining the judges (say, with a longer budget) keeps the TTS LM,
# which never sees them.
NEEDS = {"tokenizer": ("tokenizer",), "token2wav": ("tokenizer", "token2wav"),
         "judges": ("tokenizer", "token2wav", "judges"), "tts_lm": ("tokenizer", "tts_lm")}
STAGES = tuple(NEEDS)
# Bumped when a stage's code changes in a way its settings do not show: judges 2 = the
# ToyEncoder masks padding; tts_lm 2 = length-bucketed batches.
STAGE_VERSIONS = {"tokenizer": 1, "token2wav": 1, "judges": 2, "tts_lm": 2}


@dataclass
class Args:
    """Build the toy TTS world (tokenizer, token2wav, judges, TTS LM)."""

    rebuild: list[str] = field(default_factory=list)
    """stages to rebuild even if cached: tokenizer, token2wav, judges, tts_lm (repeatable)"""
    n_tokens: int = 512
    """K, the speech-token vocabulary (K=256 was 4-7 CER points worse in the prototype)"""
    tokens: str = "mel"
    """speech tokens: mel (k-means over log-mel frames) or semantic (over a CTC recogniser's states)"""
    tok_asr_minutes: float = 5.0
    """semantic tokens: the training budget of the recogniser whose states they cluster"""
    t2m_d: int = 192
    """token2mel width"""
    t2m_blocks: int = 6
    """token2mel residual conv blocks"""
    t2m_steps: int = 550
    """token2mel training steps (steps, not minutes: the same model at any thread count)"""
    judge_steps: int = 1500
    """reward ASR training steps (the evaluation ASR gets 2/3 of them)"""
    judge_batch: int = 16
    """utterances per step of the recognisers (compute-bound on CPU: more, smaller steps)"""
    spk_steps: int = 200
    """speaker encoder training steps"""
    lm_d: int = 256
    """TTS LM hidden size"""
    lm_layers: int = 4
    """TTS LM layers"""
    lm_lr: float = 1e-3
    """TTS LM peak learning rate"""
    lm_steps: int = 4700
    """TTS LM steps, its cosine's length (as many on any CPU, however slow); stops earlier on a plateau"""
    lm_prompt_loss: float = 1.0
    """SFT loss weight on the prompt's speech tokens (CosyVoice 2 learns them all; 0 = outputs only)"""
    lm_bf16: bool = field(default_factory=cpu_has_bf16)
    """bf16 autocast for the TTS LM; default: on where the CPU has avx512_bf16 (elsewhere it is emulated)"""
    batch_size: int = 32
    """utterances per step, every stage"""
    eval_every: int = 200
    """steps between dev checks (every stage)"""
    patience: int = 3
    """dev checks without improvement before a stage stops"""
    max_steps: int = 0
    """stop every stage after this many steps too (0 = only each stage's own budget and patience)"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """CPU threads (0 = all cores)"""
    side_by_side: bool = False
    """train the TTS LM beside token2wav and the judges (a second process, half the threads each; README)"""


# ------------------------------------------------------------------ data
def load_split(path: str, skips: Skips):
    """Utterances and their log-mels [T, 80] (bad audio skipped and counted)."""
    items = load_audio_items(read_data(path, skips), skips, max_seconds=30.0, progress=True)
    return [u for u, _ in items], [log_mel(w) for _, w in items]


def cached(a: Args, world: str, stage: str) -> str:
    """The stage's folder: named by its settings and those of the stages it reads."""
    upto = NEEDS[stage]
    keys = {"tokenizer": ["n_tokens"], "token2wav": ["t2m_d", "t2m_blocks", "t2m_steps"],
            "judges": ["judge_steps", "judge_batch", "spk_steps"],
            "tts_lm": ["lm_d", "lm_layers", "lm_lr", "lm_steps", "lm_bf16", "patience"]}
    cfg = {k: getattr(a, k) for s in upto for k in keys[s]} | {"seed": a.seed, "bs": a.batch_size,
                                                               "every": a.eval_every}
    if a.max_steps:
        cfg["max_steps"] = a.max_steps
    if "tts_lm" in upto and a.lm_prompt_loss:  # 0 adds nothing: the older LMs' hashes hold
        cfg["lm_prompt_loss"] = a.lm_prompt_loss
    if a.tokens != "mel":  # mel tokens add nothing, so the hashes of mel worlds hold
        cfg |= {"tokens": a.tokens, "tok_asr_minutes": a.tok_asr_minutes, "judge_batch": a.judge_batch}
    # a stage whose code changed gets a new folder; version 1 adds nothing, so old hashes hold
    cfg |= {f"v_{s}": STAGE_VERSIONS[s] for s in upto if STAGE_VERSIONS[s] > 1}
    h = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(cache_root(), f"tts-{os.path.basename(world)}", f"{stage}-{h}")


def train_until_plateau(name: str, params, step_fn, dev_fn, a: Args, lr: float, save_fn,
                        steps: int = 0, minutes: float = 0.0) -> dict:
    """AdamW with warmup and cosine decay over the budget (`steps`, else `minutes`); dev_fn()
    (lower is better) every eval_every steps; save_fn() at each new best; stop after
    `patience` checks without improvement or when the budget is spent."""
    steps = min(steps or a.max_steps, a.max_steps or steps)  # the smaller of those set; 0 if neither
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    params = [p for g in opt.param_groups for p in g["params"]]
    t0, best, bad, step, hist = time.time(), math.inf, 0, 0, []
    bar = tqdm(desc=name, unit="step")
    while True:
        step += 1
        # the schedule runs over the step budget if there is one (reproducible), else the time budget
        frac = step / steps if steps else min((time.time() - t0) / (60 * minutes), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = frac >= 1.0 or (not steps and time.time() - t0 > 60 * minutes)
        if step % a.eval_every == 0 or last:
            d = dev_fn()
            hist.append({"step": step, "min": round((time.time() - t0) / 60, 2), "dev": d})
            bar.write(f"{name} step {step} ({hist[-1]['min']} min): dev {d:.4f}")
            if d < best - 1e-4:
                best, bad = d, 0
                save_fn()
            else:
                bad += 1
            if bad >= a.patience or last:
                break
    bar.close()
    return {"best_dev": best, "steps": step, "minutes": round((time.time() - t0) / 60, 2),
            "stopped": "plateau" if bad >= a.patience else "budget", "history": hist}


# ------------------------------------------------------------------ the stages
def peers(utts) -> list[list[int]]:
    """For each utterance, the other utterances of its speaker (voice references)."""
    by_spk: dict[str, list[int]] = {}
    for i, u in enumerate(utts):
        by_spk.setdefault(u.speaker, []).append(i)
    return [[j for j in by_spk[u.speaker] if j != i] or [i] for i, u in enumerate(utts)]


def ctc_loss(asr: CTCRecognizer, batch: list) -> torch.Tensor:
    """The recognisers' training loss: character CTC over (log-mel, utterance) pairs."""
    lp, hl = asr([m for m, _ in batch])
    ys = [torch.tensor(CTCRecognizer.targets(u.text)) for _, u in batch]
    return F.ctc_loss(lp.transpose(0, 1), torch.cat(ys), hl, torch.tensor([len(y) for y in ys]),
                      blank=lp.shape[-1] - 1, zero_infinity=True)


def train_ctc(name: str, cfg: dict, data: list, dev: list, budget: dict, seed: int, a: Args,
              path: str, rng: random.Random) -> dict:
    """A character CTC recogniser on (log-mel, utterance) pairs, batches drawn with rng;
    dev = a list of (log-mels, utterances) sets whose CERs are averaged. The best dev
    checkpoint is saved at `path`; budget: {"steps": n} or {"minutes": m}; returns the
    training report."""
    torch.manual_seed(a.seed + seed)
    asr = CTCRecognizer(cfg)

    def step_fn():
        return ctc_loss(asr, rng.sample(data, a.judge_batch))

    def dev_fn():
        return sum(corpus_error([u.text for u in us], asr.transcribe(ms), "char")["wer"]
                   for ms, us in dev) / len(dev)

    return train_until_plateau(name, asr.parameters(), step_fn, dev_fn, a, 1e-3,
                               lambda: save_module(asr, path), **budget)


def build_tokenizer(a, out, splits):
    rep = {}
    if a.tokens == "semantic":  # CosyVoice's supervised semantic tokens: an ASR's states, clustered
        (utts, mels), (dev_u, dev_m) = splits["train"], splits["dev"]
        rep["asr"] = train_ctc("tokenizer_asr", {"d": 128, "layers": 3, "conv_blocks": 2},
                               list(zip(mels, utts, strict=True)), [(dev_m, dev_u)],
                               {"minutes": a.tok_asr_minutes}, 3, a, os.path.join(out, "asr"),
                               random.Random(a.seed + 3))
        asr = load_module(os.path.join(out, "asr"))  # its best dev checkpoint
        tok: torch.nn.Module = SemanticTokenizer.fit(asr, mels, a.n_tokens, seed=a.seed)
    elif a.tokens == "mel":
        tok = SpeechTokenizer.fit(splits["train"][1], a.n_tokens, seed=a.seed)
    else:
        raise SystemExit(f"--tokens takes mel or semantic, not {a.tokens!r}")
    tokens = {}
    for name, (utts, mels) in splits.items():
        tokens[name] = {u.key: t.tolist() for u, t in zip(utts, tok.encode_batch(mels), strict=True)}
    save_module(tok, os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump(tokens, f)
    n = [len(t) for t in tokens["train"].values()]
    return rep | {"tokens_per_utt": sum(n) / len(n),
                  "codes_used": len({c for t in tokens["train"].values() for c in t})}


def token2mel_loss(net: Token2Mel, batch: list) -> torch.Tensor:
    """token2mel's training loss: L1 to the normalised real log-mel over (tokens, log-mel,
    voice reference) triples, per mel value, on the frames both have."""
    lens = [len(t) for t, _, _ in batch]
    x = torch.nn.utils.rnn.pad_sequence([t for t, _, _ in batch], True)
    y = net(x, torch.tensor(lens), torch.stack([v for _, _, v in batch]))  # [B, 4n, 80]
    loss, n = 0.0, 0
    for i, (_, m, _) in enumerate(batch):
        k = min(TOKEN_HOP * lens[i], m.shape[0])
        loss = loss + F.l1_loss(y[i, :k], (m[:k] - net.mean) / net.std, reduction="sum")
        n += k * m.shape[1]
    return loss / n


def build_token2wav(a, out, splits, tokens):
    utts, mels = splits["train"]
    allm = torch.cat(mels)
    net = Token2Mel({"n_tokens": a.n_tokens, "d": a.t2m_d, "blocks": a.t2m_blocks,
                     "voice": a.tokens == "semantic"})
    net.mean, net.std = allm.mean(0), allm.std(0) + 1e-5
    rng, vrng = random.Random(a.seed), random.Random(a.seed + 1)  # batches; voice references
    voices, near = [net.voice_of(m) for m in mels], peers(utts)
    pairs = [(torch.tensor(tokens["train"][u.key]), m, i)
             for i, (u, m) in enumerate(zip(utts, mels, strict=True))]
    dev_u, dev_m = splits["dev"]
    dev_near = peers(dev_u)
    dev = [(torch.tensor(tokens["dev"][u.key]), m, net.voice_of(dev_m[dev_near[i][0]]))
           for i, (u, m) in enumerate(zip(dev_u, dev_m, strict=True))]

    def train_batch():  # each item's voice: another utterance of its speaker, drawn afresh
        return [(t, m, voices[vrng.choice(near[i])]) for t, m, i in rng.sample(pairs, a.batch_size)]

    def dev_fn():
        net.eval()
        with torch.no_grad():
            d = float(token2mel_loss(net, dev))
        net.train()
        return d

    return train_until_plateau("token2mel", net.parameters(), lambda: token2mel_loss(net, train_batch()),
                               dev_fn, a, 2e-3, lambda: save_module(net, os.path.join(out, "token2mel")),
                               steps=a.t2m_steps)


def build_judges(a, out, splits, tokens, t2m):
    """Reward ASR, evaluation ASR and speaker encoder. Each sees real audio and token2wav's
    mel of the real tokens, so it measures content, not vocoder artefacts."""
    utts, mels = splits["train"]
    rng, vrng = random.Random(a.seed), random.Random(a.seed + 1)  # batches; voice references
    near = peers(utts)
    fake = []  # a voice-reading token2mel hears another utterance of the speaker, as in synthesis
    for s in tqdm(range(0, len(utts), 256), desc="token2mel of train"):
        fake += t2m.mel([torch.tensor(tokens["train"][u.key]) for u in utts[s : s + 256]],
                        [mels[vrng.choice(near[i])] for i in range(s, min(s + 256, len(utts)))])
    data = ([(m, u) for u, m in zip(utts, mels, strict=True)]
            + [(m, u) for u, m in zip(utts, fake, strict=True)])
    dev_u, dev_m = splits["dev"]
    dev_fake = t2m.mel([torch.tensor(tokens["dev"][u.key]) for u in dev_u],
                       [dev_m[p[0]] for p in peers(dev_u)])
    report = {}
    # two different recognisers: the evaluation ASR is smaller, shaped differently, seeded apart;
    # dev CER is the mean over real and token2wav dev audio
    for name, cfg, steps, seed in (("reward_asr", {"d": 144, "layers": 3, "conv_blocks": 3},
                                    a.judge_steps, 1),
                                   ("eval_asr", {"d": 128, "layers": 3, "conv_blocks": 2},
                                    2 * a.judge_steps // 3, 2)):
        report[name] = train_ctc(name, cfg, data, [(dev_m, dev_u), (dev_fake, dev_u)], {"steps": steps},
                                 seed, a, os.path.join(out, name), rng)
    speakers = sorted({u.speaker for u in utts})
    spk = SpeakerEncoder({"d": 128, "layers": 2, "n_speakers": len(speakers)})
    allm = torch.cat(mels)
    spk.mean, spk.std = allm.mean(0), allm.std(0) + 1e-5
    sid = {s: i for i, s in enumerate(speakers)}

    def spk_step():
        batch = rng.sample(data, a.batch_size)
        emb = spk([m for m, _ in batch])
        return F.cross_entropy(spk.classify(emb * 8.0), torch.tensor([sid[u.speaker] for _, u in batch]))

    def spk_dev():
        spk.eval()
        with torch.no_grad():
            pred = spk.classify(spk(dev_fake) * 8.0).argmax(-1)
        spk.train()
        return float((pred != torch.tensor([sid[u.speaker] for u in dev_u])).float().mean())

    report["speaker"] = train_until_plateau("speaker", spk.parameters(), spk_step, spk_dev, a, 1e-3,
                                            lambda: save_module(spk, os.path.join(out, "speaker")),
                                            steps=a.spk_steps)
    return report


def tts_examples(lm: TTSLM, utts, toks: dict, pool=None, pool_toks=None, rng=None):
    """(prompt ids, output ids incl. eos) per utterance; prompts come from `pool` (default:
    the same split)."""
    pool, pool_toks = pool or utts, pool_toks or toks
    by_spk: dict[str, list[int]] = {}
    for j, u in enumerate(pool):
        by_spk.setdefault(u.speaker, []).append(j)
    ex = []
    for i, u in enumerate(utts):
        cands = [j for j in by_spk[u.speaker] if pool[j].key != u.key]
        j = rng.choice(cands) if rng else cands[i % len(cands)]
        p = pool[j]
        ex.append((lm.prompt(p.text, u.text, pool_toks[p.key]), toks[u.key] + [lm.n_speech]))
    return ex


def prompt_speech_targets(lm: TTSLM, ex: list[tuple[list[int], list[int]]], width: int):
    """For the left-padded rows (width `width`) that `TTSLM.batch` makes of (prompt, output)
    pairs: the flat positions that predict each of the prompt's speech tokens (`<sos>`
    predicts the first) and those tokens as out-slice ids. An SFT-only extra target: the
    prompt speech is the speech of the prompt text, and CosyVoice 2 learns every speech
    token of an utterance; RL's log-probs never include it."""
    pos, y = [], []
    for i, (p, out) in enumerate(ex):
        start = i * width + width - len(p) - (len(out) - 1)  # where row i's sequence begins
        k = p.index(lm.sos_id)
        pos.extend(range(start + k, start + len(p) - 1))  # <sos> .. the next-to-last prompt token
        y.extend(t - lm.offset for t in p[k + 1:])
    return torch.tensor(pos, dtype=torch.long), torch.tensor(y, dtype=torch.long)


def lm_nll(lm: TTSLM, ex: list[tuple[list[int], list[int]]], w_prompt: float = 0.0) -> torch.Tensor:
    """The SFT loss of (prompt, output) pairs: mean NLL of the output tokens (speech tokens
    and `<eos>`), plus w_prompt times that of the prompt's speech tokens."""
    ids, mask, pos, pred, y = lm.batch([p for p, _ in ex], [o for _, o in ex])
    hid = lm.lm.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    hid = hid.flatten(0, 1)  # [N*L, d]
    loss = -token_logprobs(hid[pred], lm.head(), y).mean()  # the outputs: speech tokens + eos
    if w_prompt:  # the prompt's speech tokens, each from the position before it
        ppred, py = (t.to(hid.device) for t in prompt_speech_targets(lm, ex, ids.shape[1]))
        loss = loss - w_prompt * token_logprobs(hid[ppred], lm.head(), py).mean()
    return loss


def build_tts_lm(a, out, splits, tokens):
    torch.manual_seed(a.seed)
    lm = build_toy_tts(vocabulary(), a.n_tokens, a.lm_d, a.lm_layers, seed=a.seed)
    tr_u, dev_u = splits["train"][0], splits["dev"][0]
    rng = random.Random(a.seed)
    dev_ex = tts_examples(lm, dev_u, tokens["dev"], tr_u, tokens["train"])

    queue: list[list] = []  # this epoch's batches, fresh prompts and order every epoch

    def step_fn():
        if not queue:  # length-bucketed: random batches were mostly padding (1.6 s a step)
            ex = tts_examples(lm, tr_u, tokens["train"], tr_u, tokens["train"], rng)
            lens = [len(p) + len(o) + rng.random() for p, o in ex]  # random tie-break
            batches = length_batches(lens, a.batch_size, seed=rng.randrange(2**31))
            queue.extend([ex[i] for i in b] for b in batches)
        with torch.autocast("cpu", torch.bfloat16, enabled=a.lm_bf16):
            return lm_nll(lm, queue.pop(), a.lm_prompt_loss)

    def dev_fn():  # the outputs only, whatever the training loss
        lm.eval()
        with torch.no_grad():
            d = sum(float(lm_nll(lm, dev_ex[s : s + 64])) * len(dev_ex[s : s + 64])
                    for s in range(0, len(dev_ex), 64))
        lm.train()
        return d / len(dev_ex)

    lm.train()
    return train_until_plateau("tts_lm", lm.parameters(), step_fn, dev_fn, a, a.lm_lr,
                               lambda: save_module(lm, os.path.join(out, "tts_lm")), steps=a.lm_steps)


# ------------------------------------------------------------------ driver
def build_tts_world(a: Args | None = None, upto: str = "tts_lm") -> dict[str, str]:
    """Build what is missing (or asked to be rebuilt) up to stage `upto`; returns the paths
    of every piece (those after `upto` may not exist yet)."""
    a = a or Args()
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    world = os.path.dirname(os.path.dirname(build_toy_world(TTS_SIZES, snr_db=None)["train"]))
    dirs = {s: cached(a, world, s) for s in STAGES}
    for s in a.rebuild:
        if s not in STAGES:
            raise SystemExit(f"--rebuild takes {', '.join(STAGES)}, not {s!r}")
        shutil.rmtree(dirs[s], ignore_errors=True)
    paths = {"world": world, "tokenizer": os.path.join(dirs["tokenizer"], "tokenizer"),
             "tokens": os.path.join(dirs["tokenizer"], "tokens.json"),
             "token2mel": os.path.join(dirs["token2wav"], "token2mel"),
             "reward_asr": os.path.join(dirs["judges"], "reward_asr"),
             "eval_asr": os.path.join(dirs["judges"], "eval_asr"),
             "speaker": os.path.join(dirs["judges"], "speaker"),
             "tts_lm": os.path.join(dirs["tts_lm"], "tts_lm")}

    def todo():
        return [s for s in STAGES[: STAGES.index(upto) + 1]
                if not os.path.isfile(os.path.join(dirs[s], "done.json"))]

    if not todo():
        return paths
    with cache_lock(os.path.dirname(dirs["tts_lm"])):  # runs side by side build the world once
        if todo():  # what is still missing once no other process is building
            _build_stages(a, todo(), world, dirs, paths)
    return paths


def _build_stages(a: Args, todo: list[str], world: str, dirs: dict[str, str], paths: dict[str, str]) -> None:
    manifest = {n: os.path.join(world, n, "manifest.jsonl")
                for n in ("train", "dev", "test-seen", "test-unseen", "rl")}
    splits: dict = {}  # split -> (utterances, log-mels), read once where this process needs them
    if "tokenizer" in todo:  # every split's audio, tokenised once
        skips = Skips()  # every split's bad lines and audio, each named as read; totalled in the report
        splits = {n: load_split(p, skips) for n, p in manifest.items()}
        _stage(a, dirs["tokenizer"], lambda: build_tokenizer(a, dirs["tokenizer"], splits)
               | {"skipped": skips.as_dict()})  # the later stages use only what was tokenised
    audio = [s for s in ("token2wav", "judges") if s in todo]  # these read the audio
    with open(paths["tokens"]) as f:
        tokens = json.load(f)

    def lm_stage() -> None:  # the TTS LM reads only the texts and the tokens
        texts = {n: ([u for u in read_data(manifest[n], Skips()) if u.key in tokens[n]], None)
                 for n in ("train", "dev")}  # (utterances, no mels), as load_split's that were tokenised
        _stage(a, dirs["tts_lm"], lambda: build_tts_lm(a, dirs["tts_lm"], texts, tokens))

    n = a.threads or torch.get_num_threads()
    if audio and "tts_lm" in todo and a.side_by_side and n >= 2:
        # Side by side: the LM and the audio stages read nothing of each other, and these small
        # models gain little from a second thread, so two processes at n/2 threads each finish
        # both in about the time of the longer one. The audio stages log to a file.
        log = os.path.join(os.path.dirname(dirs["tts_lm"]), "audio-stages.log")
        child = multiprocessing.get_context("spawn").Process(
            target=_audio_stages, args=(a, audio, manifest, dirs, paths, tokens, n // 2, log))
        child.start()
        print(f"stages {', '.join(audio)}: in a second process ({n // 2} of {n} threads) beside the TTS LM; "
              f"progress in {log}", flush=True)
        torch.set_num_threads(n - n // 2)
        try:
            lm_stage()
        except BaseException:  # an LM failure (or Ctrl-C) stops the audio stages too
            child.terminate()
            raise
        finally:
            child.join()
            torch.set_num_threads(n)
        if child.exitcode != 0:
            raise RuntimeError(f"stages {', '.join(audio)} failed (exit code {child.exitcode}); see {log}")
        print(f"stages {', '.join(audio)}: done (see {log})")
        return
    if audio:
        _audio_stages(a, audio, manifest, dirs, paths, tokens, splits=splits)
    if "tts_lm" in todo:
        lm_stage()


def _audio_stages(a: Args, todo: list[str], manifest: dict[str, str], dirs: dict[str, str],
                  paths: dict[str, str], tokens: dict, threads: int = 0, log: str = "",
                  splits: dict | None = None) -> None:
    """token2wav, then the judges (which hear token2wav's mel); in a second process when
    `log` is given (its output goes there). `splits`: train and dev already read, if they are."""
    if log:
        f = open(log, "w", buffering=1)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        torch.manual_seed(a.seed)
        torch.set_num_threads(threads)
    if not splits:
        splits = {n: load_split(manifest[n], Skips()) for n in ("train", "dev")}
    if "token2wav" in todo:
        _stage(a, dirs["token2wav"], lambda: build_token2wav(a, dirs["token2wav"], splits, tokens))
    if "judges" in todo:
        _stage(a, dirs["judges"], lambda: build_judges(a, dirs["judges"], splits, tokens,
                                                    load_module(paths["token2mel"])))


def _stage(a: Args, out: str, build) -> None:
    """Run one stage into its folder; done.json (its report) marks it complete."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    rep = build()
    rep["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "done.json"), "w") as f:
        json.dump({"args": asdict(a), "report": rep}, f, indent=1)
    print(f"stage {os.path.basename(out).rsplit('-', 1)[0]}: "
          f"{json.dumps({k: v for k, v in rep.items() if k != 'history'})}", flush=True)


if __name__ == "__main__":
    print(json.dumps(build_tts_world(parse_args(Args)), indent=1))
