import json
import math
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common.toy
from common import cache_lock
from common.data import normalize
from common.toy import (
    KEYWORDS,
    NOISE_COLOURS,
    TRAIN_VOICES,
    UNSEEN_VOICES,
    add_noise,
    build_toy_world,
    number_words,
    ordinal_words,
    recipe,
    recipe_hash,
    sentence,
    speakable,
    vocabulary,
)


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (312, "three hundred twelve"),
    (1000, "one thousand"), (2_400_017, "two million four hundred thousand seventeen"),
    (999_999_999, "nine hundred ninety nine million nine hundred ninety nine thousand "
                  "nine hundred ninety nine"),
])
def test_number_words(n, words):
    assert number_words(n) == words


def test_ordinals_and_speakable():
    assert [ordinal_words(i) for i in (1, 2, 12, 20, 21, 30, 31)] == [
        "first", "second", "twelfth", "twentieth", "twenty first", "thirtieth", "thirty first"]
    assert speakable("seven oclock pm xray") == "seven o'clock p.m. x-ray"


def test_grammar_is_normalised_and_closed():
    rng, vocab = random.Random(1), set(vocabulary())
    for _ in range(2000):
        s = sentence(rng)
        assert s == normalize(s)  # transcripts are already in normal form
        assert set(s.split()) <= vocab
    assert {"alpha", "march", "monday"} <= set(KEYWORDS)


def test_recipe_hash_changes_with_recipe():
    assert recipe_hash(recipe()) == recipe_hash(recipe())
    assert recipe_hash(recipe({"train": 3})) != recipe_hash(recipe({"train": 4}))


def test_noise_hits_its_snr_is_seeded_and_coloured():
    # a "speech" of +-0.3 (power 0.09) between two silences that must not count as speech
    speech = torch.cat([torch.zeros(4000), 0.3 * torch.sign(torch.sin(torch.arange(16000) * 0.05) + 1e-3),
                        torch.zeros(4000)])
    low = {}
    for colour in NOISE_COLOURS:
        noisy = add_noise(speech, 7.5, colour, seed=3)
        noise = noisy - speech
        assert 10 * math.log10(0.09 / noise.pow(2).mean().item()) == pytest.approx(7.5, abs=1e-3)
        assert torch.equal(noisy, add_noise(speech, 7.5, colour, seed=3))
        assert not torch.equal(noisy, add_noise(speech, 7.5, colour, seed=4))
        p = torch.fft.rfft(noise).abs().pow(2)
        low[colour] = (p[: len(p) // 16].sum() / p.sum()).item()  # share of power below 500 Hz
    assert low["brown"] > low["pink"] > low["white"]
    assert low["white"] == pytest.approx(1 / 16, abs=0.01)


def test_the_clean_recipe_is_the_old_one():
    # the TTS corpus is clean: its recipe (and so its cache folder) is what it was before noise
    assert "snr_db" not in recipe(snr_db=None) and recipe()["snr_db"] == [0.0, 20.0]
    assert recipe_hash(recipe(snr_db=None)) != recipe_hash(recipe())


def test_tiny_build_is_split_by_voice_and_cached(tmp_path):
    sizes = {"train": 6, "dev": 2, "test-seen": 2, "test-unseen": 3}
    m = build_toy_world(sizes, root=str(tmp_path), progress=False)
    rows = {s: [json.loads(x) for x in open(p)] for s, p in m.items()}
    assert {s: len(r) for s, r in rows.items()} == sizes
    train_voices = {f"{e}:{v}" for e, v, _ in TRAIN_VOICES}
    assert {r["speaker"] for r in rows["train"]} <= train_voices
    assert {r["speaker"] for r in rows["test-unseen"]} == {f"{e}:{v}" for e, v, _ in UNSEEN_VOICES}
    texts = [r["text"] for rs in rows.values() for r in rs]
    assert len(texts) == len(set(texts))  # no sentence in two splits
    for r in rows["dev"]:
        path = os.path.join(os.path.dirname(m["dev"]), r["audio"])
        assert os.path.isfile(path) and r["duration"] > 0.3
        assert r["keywords"] == [w for w in r["text"].split() if w in KEYWORDS]
        assert 0.0 <= r["snr_db"] <= 20.0 and r["noise"] in NOISE_COLOURS
    stamp = os.path.getmtime(m["train"])
    assert build_toy_world(sizes, root=str(tmp_path), progress=False) == m  # cached: no rebuild
    assert os.path.getmtime(m["train"]) == stamp


def test_builds_started_side_by_side_synthesise_once(tmp_path, monkeypatch):
    """Two runs on a cold cache (two seeds launched together): one builds, the other waits
    for it and reads the result; without the lock both synthesise and one rename fails."""
    calls, count = [], threading.Lock()
    real = common.toy.synthesize

    def counted(*args):
        with count:
            calls.append(args[2])
        real(*args)

    monkeypatch.setattr(common.toy, "synthesize", counted)
    sizes = {"train": 4, "dev": 2, "test-seen": 2, "test-unseen": 3}
    with ThreadPoolExecutor(2) as pool:
        ms = list(pool.map(lambda _: build_toy_world(sizes, root=str(tmp_path), progress=False), range(2)))
    assert ms[0] == ms[1] and all(os.path.isfile(p) for p in ms[0].values())
    assert len(calls) == sum(sizes.values())  # each utterance synthesised once


def test_cache_lock_excludes_and_is_released(tmp_path):
    path, order = str(tmp_path / "thing"), []
    inside = threading.Event()

    def holder():
        with cache_lock(path):
            inside.set()
            order.append("a in")
            threading.Event().wait(0.3)
            order.append("a out")

    t = threading.Thread(target=holder)
    t.start()
    inside.wait()
    with cache_lock(path):  # blocks until the holder leaves
        order.append("b in")
    t.join()
    assert order == ["a in", "a out", "b in"]
    with cache_lock(path):  # released: taken again at once
        pass
