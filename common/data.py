"""Data: JSONL manifests, Kaldi data dirs, bad-item handling, length-bucketed batches, and
the transcripts' one normaliser with the error rates every script reports (SPEC §2).
Rewards and reported WER must use the *same* normaliser, so there is exactly one: lower
case, punctuation removed (apostrophes inside words dropped, so "o'clock" -> "oclock"),
white space folded.

Bad input never stops a run. Each bad item gets one warning line naming its file and
line, is skipped, and is counted in `Skips` (which every script writes to its summary).
Only a source in which nothing usable is left is an error.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import jiwer
import torch

from common.audio import AudioError, load_audio

log = logging.getLogger("speechrl")


# ---------------------------------------------------------------- transcripts and error rates
_DROP_INSIDE = re.compile(r"(?<=\w)['’](?=\w)")  # o'clock -> oclock, don't -> dont
_NOT_WORD = re.compile(r"[^\w\s]|_")  # every other punctuation becomes a space
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case, strip punctuation, fold white space (NFKC first, so full-width forms fold)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DROP_INSIDE.sub("", text)
    text = _NOT_WORD.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def _split(text: str, unit: str) -> list[str]:
    text = normalize(text)
    if unit == "word":
        return text.split()
    return list(text.replace(" ", ""))  # characters, spaces ignored (CER for unspaced scripts)


def edit_ops(ref: str, hyp: str, unit: str = "word") -> dict[str, int]:
    """Levenshtein alignment counts of one pair: hits, sub, del, ins and the reference length n."""
    r, h = _split(ref, unit), _split(hyp, unit)
    if not r or not h:  # jiwer refuses empty strings; the alignment is trivial anyway
        return {"hits": 0, "sub": 0, "del": len(r), "ins": len(h), "n": len(r)}
    out = jiwer.process_words(" ".join(r), " ".join(h))
    return {"hits": out.hits, "sub": out.substitutions, "del": out.deletions,
            "ins": out.insertions, "n": len(r)}


def error_rate(ref: str, hyp: str, unit: str = "word") -> float:
    """(S+D+I)/N of one pair. An empty reference gives 0 for an empty hypothesis, else len(hyp)."""
    o = edit_ops(ref, hyp, unit)
    errors = o["sub"] + o["del"] + o["ins"]
    return errors / o["n"] if o["n"] else float(errors)


def wer(ref: str, hyp: str) -> float:
    return error_rate(ref, hyp, "word")


def cer(ref: str, hyp: str) -> float:
    return error_rate(ref, hyp, "char")


def corpus_error(refs: list[str], hyps: list[str], unit: str = "word") -> dict[str, float]:
    """Corpus WER (or CER) = total errors / total reference units, with its sub/del/ins split."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    tot = {"sub": 0, "del": 0, "ins": 0, "n": 0}
    for r, h in zip(refs, hyps, strict=True):
        o = edit_ops(r, h, unit)
        for k in tot:
            tot[k] += o[k]
    n = max(tot["n"], 1)
    return {"wer": (tot["sub"] + tot["del"] + tot["ins"]) / n, "sub": tot["sub"] / n,
            "del": tot["del"] / n, "ins": tot["ins"] / n, "n_units": tot["n"]}


@dataclass
class Utt:
    key: str
    audio: str  # absolute path
    text: str
    src: str  # "file:line" where the item was read, for messages
    speaker: str | None = None
    keywords: list[str] = field(default_factory=list)
    duration: float | None = None
    lang: str | None = None
    prompt_audio: str | None = None  # TTS: an utterance of the voice to speak in (absolute path)
    prompt_text: str | None = None  # TTS: its transcript


class Skips:
    """Counts skipped items by reason; `warn` prints the one-line message."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def warn(self, where: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def restore(self, counts: dict[str, int]) -> None:
        """Take a checkpoint's counts (on resume: the manifests' and the loop's so far)."""
        self.counts = Counter(counts)

    def total(self) -> int:
        return sum(self.counts.values())


def _check_text(text: object, where: str, skips: Skips) -> str | None:
    if not isinstance(text, str) or not text.strip():
        skips.warn(where, "empty transcript")
        return None
    if not normalize(text):
        skips.warn(where, "transcript has no words after normalisation", repr(text[:40]))
        return None
    return text.strip()


def read_manifest(path: str, skips: Skips, need_audio: bool = True) -> list[Utt]:
    """A JSONL manifest: {"key", "audio", "text"} plus optional speaker/keywords/duration/lang
    and, for TTS, prompt_audio/prompt_text. Relative paths resolve against the manifest's
    folder. need_audio=False (texts to synthesise) makes "audio" optional."""
    base = os.path.dirname(os.path.abspath(path))
    out: list[Utt] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            where = f"{path}:{i}"
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                skips.warn(where, "malformed JSON line", str(e)[:60])
                continue
            missing = [k for k in ("key", "audio")[: 1 + need_audio]
                       if not isinstance(d.get(k), str) or not d[k]]
            if missing:
                skips.warn(where, "missing field", ", ".join(missing))
                continue
            if d["key"] in seen:
                skips.warn(where, "duplicate key", d["key"])
                continue
            text = _check_text(d.get("text"), where, skips)
            if text is None:
                continue
            paths = {k: d[k] if os.path.isabs(d[k]) else os.path.join(base, d[k])
                     for k in ("audio", "prompt_audio") if isinstance(d.get(k), str) and d[k]}
            bad = [p for p in paths.values() if not os.path.isfile(p)]
            if bad:
                skips.warn(where, "missing audio file", bad[0])
                continue
            kw = d.get("keywords") or []
            seen.add(d["key"])
            out.append(Utt(d["key"], paths.get("audio", ""), text, where, d.get("speaker"),
                           [normalize(k) for k in kw if isinstance(k, str) and normalize(k)],
                           d.get("duration"), d.get("lang"), paths.get("prompt_audio"), d.get("prompt_text")))
    return out


def _kaldi_table(path: str, skips: Skips) -> dict[str, tuple[str, str]]:
    """key -> (rest of line, "file:line")."""
    table: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            parts = line.strip().split(maxsplit=1)
            if not parts:
                continue
            where = f"{path}:{i}"
            if parts[0] in table:
                skips.warn(where, "duplicate key", parts[0])
                continue
            table[parts[0]] = (parts[1] if len(parts) > 1 else "", where)
    return table


def read_kaldi(d: str, skips: Skips) -> list[Utt]:
    """A Kaldi data dir: wav.scp (plain paths only), text, optional utt2spk."""
    for name in ("wav.scp", "text"):
        if not os.path.isfile(os.path.join(d, name)):
            raise FileNotFoundError(f"{d}: a Kaldi data dir needs {name}")
    wavs = _kaldi_table(os.path.join(d, "wav.scp"), skips)
    texts = _kaldi_table(os.path.join(d, "text"), skips)
    spk_path = os.path.join(d, "utt2spk")
    spk = _kaldi_table(spk_path, skips) if os.path.isfile(spk_path) else {}
    out = []
    for key, (audio, where) in wavs.items():
        if audio.endswith("|"):
            skips.warn(where, "piped wav.scp command not supported; give a file path",
                       audio[:60])
            continue
        if key not in texts:
            skips.warn(where, "no transcript in text", key)
            continue
        text = _check_text(texts[key][0], texts[key][1], skips)
        if text is None:
            continue
        audio = audio if os.path.isabs(audio) else os.path.join(d, audio)
        if not os.path.isfile(audio):
            skips.warn(where, "missing audio file", audio)
            continue
        out.append(Utt(key, audio, text, where, spk.get(key, (None,))[0]))
    return out


def read_data(path: str, skips: Skips, need_audio: bool = True) -> list[Utt]:
    """A manifest (.jsonl) or a Kaldi data dir. Raises if nothing usable is left."""
    if os.path.isdir(path):
        utts = read_kaldi(path, skips)
    elif os.path.isfile(path):
        utts = read_manifest(path, skips, need_audio)
    else:
        raise FileNotFoundError(f"{path}: no such manifest or Kaldi data dir")
    if not utts:
        raise ValueError(f"{path}: no usable utterances (skipped: {skips.as_dict() or 'none'})")
    return utts


def set_names(paths: list[str]) -> list[str]:
    """One distinct name per manifest: its folder's name (toy/test-seen/manifest.jsonl ->
    test-seen), or its file stem where folders repeat (data/a.jsonl, data/b.jsonl -> a, b),
    numbered if that repeats too. Results are keyed by these names, so no two may share one."""
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) or stem(p) for p in paths]
    names = [stem(p) if names.count(n) > 1 else n
             for p, n in zip(paths, names, strict=True)]
    return [f"{n}-{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def load_audio_items(utts: list[Utt], skips: Skips, max_seconds: float,
                     progress: bool = False) -> list[tuple[Utt, torch.Tensor]]:
    """Read each utterance's audio (16 kHz mono); bad audio is skipped and counted."""
    from tqdm import tqdm

    out = []
    for u in tqdm(utts, desc="audio", disable=not progress, leave=False):
        try:
            out.append((u, load_audio(u.audio, max_seconds)))
        except AudioError as e:
            skips.warn(u.src, "bad audio", str(e))
    if not out:
        raise ValueError(f"no usable audio among {len(utts)} items (skipped: {skips.as_dict()})")
    return out


def length_batches(lengths: list[int], max_items: int, max_units: int | None = None,
                   shuffle: bool = True, seed: int = 0) -> list[list[int]]:
    """Indices grouped by similar length (little padding): at most max_items per batch and,
    if given, at most max_units of padded length (items x longest). Batch order is shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending, so the newest item is the longest
        if cur and (len(cur) >= max_items or (max_units and longest * (len(cur) + 1) > max_units)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches
