"""The speech-tokenizer trial of the TTS issue: mel tokens (k-means over log-mel frames)
against supervised semantic tokens (k-means over a CTC recogniser's encoder states, with a
token2mel that reads the prompt's voice). Builds (or finds) both worlds up to token2wav,
then lets ONE evaluation ASR, the mel world's, judge token2wav(tokens of real test audio):
the resynthesis CER, on Griffin-Lim audio and on token2mel's mel directly.

    python bench/tokenizer_trial.py          # needs the default world's judges (python sft_tts.py)

The semantic world's own judges would have heard its token2wav audio in training; this
judge has not, which favours the mel tokens. The last line is one JSON object.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sft_tts as S  # noqa: E402
from common.audio import load_audio, log_mel  # noqa: E402
from common.data import Skips, corpus_error, read_data  # noqa: E402
from common.tts import load_judge, load_module, mel_to_wav  # noqa: E402

mel_world = S.build_tts_world(S.Args(), upto="judges")
asr = load_judge(mel_world["eval_asr"])
res = {}
for kind in ("mel", "semantic"):
    w = S.build_tts_world(S.Args(tokens=kind), upto="token2wav")
    tok, t2m = load_module(w["tokenizer"]), load_module(w["token2mel"])
    for split in ("test-seen", "test-unseen"):
        utts = read_data(os.path.join(w["world"], split, "manifest.jsonl"), Skips())
        mels = [log_mel(load_audio(u.audio)) for u in utts]
        voices = [mels[p[0]] for p in S.peers(utts)]  # another utterance of the voice (if read)
        fake = t2m.mel(tok.encode_batch(mels), voices)
        refs = [u.text for u in utts]

        def cer(ms, refs=refs):
            return round(corpus_error(refs, asr.transcribe(ms), "char")["wer"], 4)
        wav = [log_mel(x) for x in mel_to_wav(fake)]
        res[f"{kind}/{split}"] = {"real": cer(mels), "resynth_wav": cer(wav), "resynth_mel": cer(fake)}
        print(f"{kind:9s} {split:12s} {res[f'{kind}/{split}']}", flush=True)
print(json.dumps(res))
