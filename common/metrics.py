"""The one text normaliser and the error rates every script reports (SPEC §2).

Rewards and reported WER must use the *same* normaliser, so there is exactly one:
lower case, punctuation removed (apostrophes inside words dropped, so "o'clock" ->
"oclock"), white space folded.
"""
from __future__ import annotations

import re
import unicodedata

import jiwer

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
