"""Slow checks on the full toy TTS world (built by `python sft_tts.py`; skipped when it is
not cached). Run with `pytest -m slow tests`."""
import json
import os

import pytest
import torch

import sft_tts
from common.audio import load_audio, log_mel
from common.data import Skips, corpus_error, read_data
from common.tts import load_judge, load_module, mel_to_wav

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world():
    a = sft_tts.Args()
    from common.toy import TTS_SIZES, cache_root, recipe, recipe_hash

    root = os.path.join(cache_root(), f"toy-{recipe_hash(recipe(TTS_SIZES))}")
    if not all(os.path.isfile(os.path.join(sft_tts.cached(a, root, s), "done.json")) for s in sft_tts.STAGES):
        pytest.skip("the toy TTS world is not built (python sft_tts.py)")
    return sft_tts.build_tts_world(a)


def test_resynthesis_of_real_tokens_beats_random_tokens(world):
    """The evaluation ASR on token2wav(tokens of real test audio) against token2wav(random
    tokens of the same lengths): the tokens must carry the words."""
    utts = read_data(os.path.join(world["world"], "test-seen", "manifest.jsonl"), Skips())[:100]
    tok, t2m = load_module(world["tokenizer"]), load_module(world["token2mel"])
    asr = load_judge(world["eval_asr"])
    mels = [log_mel(load_audio(u.audio)) for u in utts]
    real = tok.encode_batch(mels)
    voices = [mels[p[0]] for p in sft_tts.peers(utts)]  # another utterance of the voice (if read)
    g = torch.Generator().manual_seed(0)
    rand = [torch.randint(tok.cfg["n_tokens"], t.shape, generator=g) for t in real]
    refs = [u.text for u in utts]
    cer = {}
    for name, toks in (("real", real), ("random", rand)):
        hyps = asr.transcribe([log_mel(w) for w in mel_to_wav(t2m.mel(toks, voices))])
        cer[name] = corpus_error(refs, hyps, "char")["wer"]
    print(json.dumps(cer))
    assert cer["real"] < 0.3 and cer["random"] > 0.8 and cer["random"] > 3 * cer["real"], cer
