"""Audio I/O and features. soundfile reads and writes; torchaudio is for DSP only
(torchaudio >= 2.9 has no file I/O of its own)."""
from __future__ import annotations

import functools
import math
import os
import tempfile

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT

SR = 16_000  # every model in this project works at 16 kHz
N_MELS = 80
HOP = 160  # 10 ms frames
N_FFT = 400  # 25 ms window


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and why."""


def load_audio(path: str, max_seconds: float | None = None) -> torch.Tensor:
    """Read any soundfile-readable file to mono float32 at 16 kHz, shape [samples].

    Raises AudioError for an unreadable, empty, silent or too-long file. Other sample
    rates are resampled (torchaudio.functional.resample)."""
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [samples, channels]
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        raise AudioError(f"{path}: unreadable audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if sr < 4000 or sr > 192_000:
        raise AudioError(f"{path}: implausible sample rate {sr} Hz")
    wav = torch.from_numpy(data.mean(axis=1))  # mono
    if not torch.isfinite(wav).all():
        raise AudioError(f"{path}: audio holds NaN or inf samples")
    if wav.abs().max() < 1e-4:
        raise AudioError(f"{path}: silent audio (peak {wav.abs().max():.1e})")
    dur = wav.shape[0] / sr
    if max_seconds is not None and dur > max_seconds:
        raise AudioError(f"{path}: audio too long ({dur:.1f} s > {max_seconds:.1f} s limit)")
    if sr != SR:
        wav = AF.resample(wav, sr, SR)
    return wav.contiguous()


def write_wav(path: str, wav: torch.Tensor | np.ndarray, sr: int = SR) -> None:
    """Write mono float audio as 16-bit PCM WAV, atomically (temp file + rename)."""
    x = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".wav.tmp")
    os.close(fd)
    sf.write(tmp, np.clip(x, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


_mel: dict[str, AT.MelSpectrogram] = {}


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    """Log-mel features [frames, 80] at 10 ms hop, from 16 kHz audio [samples]."""
    key = str(wav.device)
    if key not in _mel:
        _mel[key] = AT.MelSpectrogram(SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS).to(wav.device)
    m = _mel[key](wav.float())  # [80, frames]
    return torch.log(m.clamp(min=1e-6)).T.contiguous()  # [frames, 80]


def f0(wav: torch.Tensor) -> torch.Tensor:
    """Frame-level F0 in Hz (torchaudio's NCCF pitch detector), [frames]."""
    return AF.detect_pitch_frequency(wav.float()[None], SR, freq_low=60, freq_high=500)[0]


def voiced_f0(wav: torch.Tensor) -> torch.Tensor:
    """F0 (Hz) of the frames that carry sound: 10 ms frames whose 25 ms RMS is at least a tenth
    of the loudest frame's (-20 dB), inside the detector's range (it returns its top, 484 Hz,
    on silence). An energy gate only: a loud fricative passes, and gets the pitch the
    detector's 30-frame median filter carries over from its neighbours."""
    if wav.shape[0] < 4000 or float(wav.abs().max()) < 1e-3:  # < 0.25 s (too short for the
        return torch.zeros(0)  # detector's median filter) or silence: no pitch
    p = f0(wav)  # [frames], frame i starts at sample HOP * i
    rms = torch.nn.functional.pad(wav, (0, N_FFT)).unfold(0, N_FFT, HOP)[: len(p)].pow(2).mean(1).sqrt()
    return p[(rms >= 0.1 * rms.max()) & (p > 60) & (p < 480)]


def f0_stats(wav: torch.Tensor) -> tuple[float, float] | None:
    """An utterance's median voiced F0 (Hz) and its pitch movement: the interquartile range
    of its F0 in semitones, which the detector's octave errors (12 st) leave alone while they
    stay under a quarter of the frames. None where fewer than 2 frames are voiced."""
    p = voiced_f0(wav)
    if len(p) < 2:
        return None
    q = torch.quantile(12 * torch.log2(p), torch.tensor([0.25, 0.75]))
    return float(p.median()), float(q[1] - q[0])


@functools.lru_cache(maxsize=4096)
def f0_stats_of_file(path: str) -> tuple[float, float] | None:
    """f0_stats of an audio file (a prompt voice, read again at every evaluation), once per file."""
    return f0_stats(load_audio(path))


def f0_gap(stats: tuple[float, float] | None, ref_path: str) -> float | None:
    """Semitones between a median F0 (`stats`: f0_stats of an output) and that of the audio
    file `ref_path`; None where either has no voiced frames."""
    p = f0_stats_of_file(ref_path)
    return abs(12 * math.log2(stats[0] / p[0])) if stats and p else None
