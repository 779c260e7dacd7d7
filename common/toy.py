"""The embedded toy world: real speech made on this machine by Debian's offline
synthesizers (espeak-ng, flite), from a seeded grammar of numbers, money, dates, times,
digit strings and NATO call signs. Splits are by voice:

    train, dev, test-seen   voices in TRAIN_VOICES (disjoint sentences)
    test-unseen             voices in UNSEEN_VOICES, which training never hears
    rl                      voices in TRAIN_VOICES, new sentences, for RL (never used by SFT)

Every ASR utterance gets background noise (white, pink or brown) at an SNR drawn from
NOISE_SNR_DB; the TTS corpus is clean (snr_db=None), since a TTS learns to speak its targets.

`build_toy_world()` is one call; it is cached under $SPEECHRL_CACHE (default: .cache
in the repository) in a folder named by the hash of its recipe, so it is rebuilt only
when the recipe changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from common import cache_lock
from common.audio import load_audio, write_wav

RECIPE_VERSION = 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- the grammar
ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORD_ONES = "_ first second third fourth fifth sixth seventh eighth ninth".split()
ORD_TEENS = ("tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth "
             "eighteenth nineteenth").split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = ("january february march april may june july august september october november "
          "december").split()
RELDAYS = "today tomorrow yesterday".split()
NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike "
        "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
        "zulu").split()
# Reward A3's keyword lexicon: the toy world's "proper nouns".
KEYWORDS = sorted(set(NATO) | set(WEEKDAYS) | set(MONTHS))
# One spelling per word in transcripts; the synthesizer gets a speakable form.
SPEAKABLE = {"oclock": "o'clock", "am": "a.m.", "pm": "p.m.", "xray": "x-ray", "juliett": "juliet"}


def number_words(n: int) -> str:
    """0 <= n < 10**9 in words, US style without "and": 312 -> three hundred twelve."""
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    for size, name in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            rest = n % size
            return number_words(n // size) + " " + name + ("" if rest == 0 else " " + number_words(rest))
    raise ValueError(n)


def ordinal_words(n: int) -> str:
    """1..31 as an ordinal: 21 -> twenty first."""
    if n < 10:
        return ORD_ONES[n]
    if n < 20:
        return ORD_TEENS[n - 10]
    if n % 10 == 0:
        return TENS[n // 10][:-1] + "ieth"  # twentieth, thirtieth
    return TENS[n // 10] + " " + ORD_ONES[n % 10]


def _amount(rng: random.Random) -> int:
    scale = rng.choice([10, 100, 1000, 10_000, 1_000_000, 50_000_000])
    return rng.randint(1, scale)


def _clock(rng: random.Random) -> str:
    hour = number_words(rng.randint(1, 12))
    m = rng.choice([0, 0, 5, 10, 15, 20, 30, 45, rng.randint(1, 59)])
    minute = "oclock" if m == 0 else ("oh " + ONES[m] if m < 10 else number_words(m))
    ampm = rng.choice(["", " am", " pm"])
    return f"{hour} {minute}{ampm}"


def _digits(rng: random.Random, n: int) -> str:
    return " ".join("oh" if d == 0 else ONES[d] for d in (rng.randint(0, 9) for _ in range(n)))


def sentence(rng: random.Random) -> str:
    """One sentence of the toy grammar."""
    kind = rng.randrange(7)
    if kind == 0:  # money
        s = f"{number_words(_amount(rng))} dollars"
        if rng.random() < 0.3:
            s += f" and {number_words(rng.randint(1, 99))} cents"
        return ("minus " if rng.random() < 0.25 else "") + s
    if kind == 1:  # time
        return f"{rng.choice(RELDAYS + WEEKDAYS)} at {_clock(rng)}"
    if kind == 2:  # date
        day = ordinal_words(rng.randint(1, 31))
        head = rng.choice(WEEKDAYS + RELDAYS) + " " if rng.random() < 0.6 else ""
        return f"{head}{rng.choice(MONTHS)} {day}"
    if kind == 3:  # digit string
        return _digits(rng, rng.randint(3, 7))
    if kind == 4:  # call sign
        letters = " ".join(rng.choice(NATO) for _ in range(rng.randint(2, 3)))
        return letters + " " + _digits(rng, rng.randint(1, 3))
    if kind == 5:  # plain number
        return ("minus " if rng.random() < 0.3 else "") + number_words(_amount(rng))
    # an appointment: call sign or date plus a time
    return f"{rng.choice(NATO)} {rng.choice(NATO)} {rng.choice(WEEKDAYS)} at {_clock(rng)}"


def speakable(text: str) -> str:
    return " ".join(SPEAKABLE.get(w, w) for w in text.split())


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (the toy tokenizer's vocabulary)."""
    words = set(ONES + TEENS + TENS[2:] + ORD_ONES[1:] + ORD_TEENS + WEEKDAYS + MONTHS + RELDAYS + NATO)
    words |= {"twentieth", "thirtieth", "hundred", "thousand", "million", "dollars", "and",
              "cents", "minus", "at", "oh", "oclock", "am", "pm"}
    return sorted(words)


# ---------------------------------------------------------------- voices and synthesis
# (engine, voice, gender). Split by voice: training never hears UNSEEN_VOICES.
TRAIN_VOICES = [
    ("espeak", "en-us+m1", "m"), ("espeak", "en-us+f2", "f"), ("espeak", "en-gb-x-rp+m3", "m"),
    ("espeak", "en+f4", "f"), ("espeak", "en-029+m2", "m"), ("espeak", "en-gb-x-gbclan+f1", "f"),
    ("espeak", "en-us+klatt", "m"), ("flite", "kal16", "m"), ("flite", "slt", "f"),
    ("flite", "rms", "m"),
]
UNSEEN_VOICES = [("espeak", "en-gb-scotland+m7", "m"), ("espeak", "en-us+f5", "f"),
                 ("flite", "awb", "m")]
# `rl`: new sentences by the training voices that SFT never trains on. The SFT model fits
# its own training set almost perfectly, so GRPO there sees all-equal groups and no signal;
# RL needs utterances the warm start has not memorised (listed last: the others keep
# their sentences).
DEFAULT_SIZES = {"train": 4000, "dev": 300, "test-seen": 300, "test-unseen": 300, "rl": 2000}
# The TTS side needs more speech: at about 3k utterances a tiny TTS LM overfits in minutes.
# Its test-unseen sets the prompt voice the TTS never heard; rl holds the GRPO texts.
TTS_SIZES = {"train": 15000, "dev": 200, "test-seen": 200, "test-unseen": 300, "rl": 1000}
# Clean synthetic speech is too easy: a small recogniser converges at a seen-voice WER of
# about 0.04, which leaves RL almost nothing to fix. Noise at 0-20 dB SNR makes it a task
# with a spread of difficulty, as real corpora have.
NOISE_SNR_DB = (0.0, 20.0)
NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^alpha


def add_noise(wav: torch.Tensor, snr_db: float, colour: str, seed: int) -> torch.Tensor:
    """wav [S] plus seeded Gaussian noise of a colour, scaled to `snr_db` against the
    speech's power (the power of the samples above 1% of the peak, so leading and
    trailing silence do not count as speech)."""
    g = torch.Generator().manual_seed(seed)
    spec = torch.fft.rfft(torch.randn(wav.shape[0], generator=g))  # [S/2+1]
    f = torch.arange(spec.shape[0], dtype=torch.float32).clamp(min=1.0)
    noise = torch.fft.irfft(spec * f.pow(-NOISE_COLOURS[colour] / 2), n=wav.shape[0])  # [S]
    speech = wav[wav.abs() > 0.01 * wav.abs().max()]
    p_speech = speech.pow(2).mean() if speech.numel() else wav.pow(2).mean()
    noise = noise * (p_speech / (noise.pow(2).mean() * 10 ** (snr_db / 10))).sqrt()
    out = wav + noise
    return out / max(1.0, out.abs().max().item())  # no clipping in the 16-bit WAV


def synthesize(engine: str, voice: str, text: str, rate: float, out_path: str) -> float:
    """Speak `text` with one voice at a relative speaking rate (1.0 = default) into a
    16 kHz WAV; returns its duration in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        if engine == "espeak":
            cmd = ["espeak-ng", "-v", voice, "-s", str(int(170 * rate)), "-w", raw, speakable(text)]
        elif engine == "flite":
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={1 / rate:.3f}",
                   "-t", speakable(text), "-o", raw]
        else:
            raise ValueError(f"unknown engine {engine}")
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        wav = load_audio(raw)
    write_wav(out_path, wav)
    return wav.shape[0] / 16_000


def check_synthesizers() -> None:
    missing = [t for t in ("espeak-ng", "flite") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"the toy world needs {', '.join(missing)}: "
                           "run `bash setup.sh` or `apt-get install -y espeak-ng flite`")


# ---------------------------------------------------------------- the cached build
def cache_root() -> str:
    return os.environ.get("SPEECHRL_CACHE", os.path.join(REPO, ".cache"))


def recipe(sizes: dict[str, int] | None = None, seed: int = 0,
           snr_db: tuple[float, float] | None = NOISE_SNR_DB) -> dict:
    r = {"version": RECIPE_VERSION, "sizes": sizes or DEFAULT_SIZES, "seed": seed,
         "train_voices": TRAIN_VOICES, "unseen_voices": UNSEEN_VOICES}
    if snr_db is not None:  # a clean recipe keeps the hash it had before noise existed
        r["snr_db"] = list(snr_db)
    return r


def recipe_hash(r: dict) -> str:
    return hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest()[:10]


def _plan(r: dict) -> dict[str, list[dict]]:
    """Every utterance of every split: disjoint sentences, voice and rate drawn per item."""
    rng = random.Random(r["seed"])
    used: set[str] = set()
    plan: dict[str, list[dict]] = {}
    for split, n in r["sizes"].items():
        voices = r["unseen_voices"] if split == "test-unseen" else r["train_voices"]
        items = []
        while len(items) < n:
            text = sentence(rng)
            if text in used:
                continue
            used.add(text)
            engine, voice, gender = voices[len(items) % len(voices)]
            rate = round(rng.uniform(0.8, 1.25), 3)
            key = f"{split}-{len(items):05d}"
            item = {"key": key, "audio": f"wav/{split}/{key}.wav", "text": text,
                    "speaker": f"{engine}:{voice}", "gender": gender, "rate": rate,
                    "keywords": [w for w in text.split() if w in KEYWORDS]}
            if r.get("snr_db"):
                item["snr_db"] = round(rng.uniform(*r["snr_db"]), 1)
                item["noise"] = rng.choice(sorted(NOISE_COLOURS))
                item["noise_seed"] = rng.randrange(2**31)
            items.append(item)
        plan[split] = items
    return plan


def build_toy_world(sizes: dict[str, int] | None = None, seed: int = 0, root: str | None = None,
                    progress: bool = True, workers: int = 2,
                    snr_db: tuple[float, float] | None = NOISE_SNR_DB) -> dict[str, str]:
    """Build (or find cached) the toy corpus; returns {split: manifest path}.
    snr_db: the range of background-noise SNRs in dB (None = clean speech)."""
    r = recipe(sizes, seed, snr_db)
    out = os.path.join(root or cache_root(), f"toy-{recipe_hash(r)}")
    manifests = {s: os.path.join(out, s, "manifest.jsonl") for s in r["sizes"]}
    if os.path.isfile(os.path.join(out, "recipe.json")):
        return manifests
    with cache_lock(out):  # runs started side by side build the corpus once
        if not os.path.isfile(os.path.join(out, "recipe.json")):  # not built while waiting
            _synthesise(r, out, progress, workers)
    return manifests


def _synthesise(r: dict, out: str, progress: bool, workers: int) -> None:
    """Synthesise recipe `r` into `out` (through `out`.partial, renamed when complete)."""
    check_synthesizers()
    tmp = out + ".partial"  # synthesised files survive an interrupted build
    plan = _plan(r)
    jobs = [(split, it) for split, items in plan.items() for it in items]

    def run(job):
        split, it = job
        path = os.path.join(tmp, it["audio"])
        if not os.path.isfile(path):
            engine, voice = it["speaker"].split(":", 1)
            if "snr_db" not in it:
                synthesize(engine, voice, it["text"], it["rate"], path)
            else:  # the noisy file is written last, so a resumed build never finds a clean one
                clean = path + ".clean.wav"
                synthesize(engine, voice, it["text"], it["rate"], clean)
                write_wav(path, add_noise(load_audio(clean), it["snr_db"], it["noise"], it["noise_seed"]))
                os.remove(clean)
        return job

    durations = {}
    with ThreadPoolExecutor(workers) as pool:
        for _, it in tqdm(pool.map(run, jobs), total=len(jobs), desc="toy world: synthesis",
                              disable=not progress):
            durations[it["key"]] = round(len_seconds(os.path.join(tmp, it["audio"])), 3)
    for split, items in plan.items():
        os.makedirs(os.path.join(tmp, split), exist_ok=True)
        with open(os.path.join(tmp, split, "manifest.jsonl"), "w") as f:
            for it in items:
                row = {**it, "audio": os.path.join("..", it["audio"]), "duration": durations[it["key"]]}
                f.write(json.dumps(row) + "\n")
    with open(os.path.join(tmp, "recipe.json"), "w") as f:
        json.dump(r, f, indent=1)
    os.replace(tmp, out)


def len_seconds(path: str) -> float:
    import soundfile as sf

    info = sf.info(path)
    return info.frames / info.samplerate
