import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from common.audio import AudioError, f0, load_audio, log_mel, write_wav
from common.data import Skips, length_batches, load_audio_items, read_data, read_kaldi, read_manifest


def tone(path, seconds=0.5, sr=16000, amp=0.3, hz=220.0):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (amp * np.sin(2 * np.pi * hz * t)).astype("float32"), sr)
    return path


def test_load_resamples_and_mixes_to_mono(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 200 * t)], 1) * 0.3
    sf.write(tmp_path / "a.flac", stereo.astype("float32"), 8000)  # 1 s at 8 kHz, stereo, FLAC
    wav = load_audio(str(tmp_path / "a.flac"))
    assert wav.dtype == torch.float32 and wav.dim() == 1 and wav.shape[0] == 16000


def test_write_wav_roundtrip_and_features(tmp_path):
    wav = torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 200) * 0.5
    write_wav(str(tmp_path / "x.wav"), wav)
    back = load_audio(str(tmp_path / "x.wav"))
    torch.testing.assert_close(back, wav, atol=1e-4, rtol=0)
    assert log_mel(back).shape == (101, 80)  # 1 s at 10 ms hop, centred frames
    pitch = f0(back)
    assert abs(float(pitch.median()) - 200) < 10


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_bytes(b"not audio at all"), "unreadable"),
    (lambda p: sf.write(p, np.zeros(0, "float32"), 16000), "empty"),
    (lambda p: sf.write(p, np.zeros(16000, "float32"), 16000), "silent"),
    (lambda p: tone(p, seconds=3.0), "too long"),
])
def test_bad_audio_raises_with_file_name(tmp_path, make, why):
    p = tmp_path / "bad.wav"
    make(p)
    with pytest.raises(AudioError, match=why) as e:
        load_audio(str(p), max_seconds=2.0)
    assert str(p) in str(e.value)


def _manifest(tmp_path, rows):
    path = tmp_path / "m.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_manifest_bad_items_are_skipped_counted_and_named(tmp_path, caplog):
    os.makedirs(tmp_path / "wav")
    tone(tmp_path / "wav" / "good.wav")
    tone(tmp_path / "wav" / "long.wav", seconds=3.0)
    sf.write(tmp_path / "wav" / "silent.wav", np.zeros(8000, "float32"), 16000)
    (tmp_path / "wav" / "junk.wav").write_bytes(b"junk")
    tone(tmp_path / "wav" / "sr22k.wav", sr=22050)
    rows = [
        {"key": "a", "audio": "wav/good.wav", "text": "one two", "keywords": ["Alpha"]},  # 1 ok
        "{not json",  # 2
        {"key": "a", "audio": "wav/good.wav", "text": "dup"},  # 3 duplicate key
        {"key": "b", "audio": "wav/good.wav", "text": "   "},  # 4 whitespace transcript
        {"key": "c", "audio": "wav/good.wav", "text": "?!"},  # 5 no words
        {"key": "d", "audio": "wav/missing.wav", "text": "x"},  # 6 missing file
        {"key": "e", "audio": "wav/long.wav", "text": "x"},  # 7 too long (on load)
        {"key": "f", "audio": "wav/silent.wav", "text": "x"},  # 8 silent (on load)
        {"key": "g", "audio": "wav/junk.wav", "text": "x"},  # 9 unreadable (on load)
        {"key": "h", "audio": str(tmp_path / "wav" / "sr22k.wav"), "text": "x y"},  # 10 ok, resampled
        {"audio": "wav/good.wav", "text": "x"},  # 11 no key
    ]
    path = _manifest(tmp_path, rows)
    skips = Skips()
    with caplog.at_level(logging.WARNING, logger="speechrl"):
        utts = read_manifest(path, skips)
        items = load_audio_items(utts, skips, max_seconds=2.0)
    assert [u.key for u, _ in items] == ["a", "h"]
    assert items[0][0].keywords == ["alpha"]
    assert items[1][1].shape[0] == 8000  # 0.5 s at 22.05 kHz -> 16 kHz
    assert skips.as_dict() == {"bad audio": 3, "duplicate key": 1, "empty transcript": 1,
                               "malformed JSON line": 1, "missing audio file": 1, "missing field": 1,
                               "transcript has no words after normalisation": 1}
    for line in (2, 3, 4, 5, 6, 7, 8, 9, 11):  # every message names the file and line
        assert any(f"{path}:{line}" in r.getMessage() for r in caplog.records), line


def test_nothing_usable_is_an_error(tmp_path):
    path = _manifest(tmp_path, [{"key": "a", "audio": "nope.wav", "text": "x"}])
    with pytest.raises(ValueError, match="no usable utterances"):
        read_data(path, Skips())


def test_kaldi_dir(tmp_path, caplog):
    tone(tmp_path / "a.wav")
    tone(tmp_path / "b.wav")
    (tmp_path / "wav.scp").write_text(
        f"u1 {tmp_path / 'a.wav'}\nu2 b.wav\nu3 sox x.wav -t wav - |\nu4 {tmp_path / 'a.wav'}\n")
    (tmp_path / "text").write_text("u1 ONE two\nu2 three\nu3 four\n")
    (tmp_path / "utt2spk").write_text("u1 spkA\nu2 spkB\n")
    skips = Skips()
    with caplog.at_level(logging.WARNING, logger="speechrl"):
        utts = read_data(str(tmp_path), skips)
    assert [(u.key, u.text, u.speaker) for u in utts] == [("u1", "ONE two", "spkA"), ("u2", "three", "spkB")]
    assert utts[1].audio == str(tmp_path / "b.wav")  # relative to the data dir
    assert skips.as_dict() == {"no transcript in text": 1,
                               "piped wav.scp command not supported; give a file path": 1}
    assert any(f"{tmp_path / 'wav.scp'}:3" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError):
        read_kaldi(str(tmp_path / "nowhere"), Skips())


def test_length_batches():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    b = length_batches(lengths, max_items=3, shuffle=False)
    assert b == [[1, 5, 3], [0, 4, 6], [2]]  # sorted by length, 3 a batch
    b = length_batches(lengths, max_items=10, max_units=10, shuffle=False)
    assert all(max(lengths[i] for i in x) * len(x) <= 10 or len(x) == 1 for x in b)
    assert sorted(i for x in b for i in x) == list(range(7))
    shuffled = length_batches(lengths, max_items=2, seed=1)
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, length_batches(lengths, 2, shuffle=False)))


def test_set_names_are_distinct():
    from common.data import set_names

    assert set_names(["w/seen/manifest.jsonl", "w/unseen/manifest.jsonl"]) == ["seen", "unseen"]
    assert set_names(["data/a.jsonl", "data/b.jsonl", "other/c.jsonl"]) == ["a", "b", "other"]
    assert set_names(["x/d/m.jsonl", "y/d/m.jsonl"]) == ["m-1", "m-2"]
