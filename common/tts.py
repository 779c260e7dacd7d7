"""The TTS side: discrete speech tokens, token2wav, the TTS LM, and the judges that score
its audio.

    SpeechTokenizer  log-mel frames mean-pooled to 25 Hz -> nearest k-means centroid
    SemanticTokenizer  a CTC recogniser's encoder states pooled to 25 Hz -> nearest
                     centroid (CosyVoice's supervised semantic tokens, tiny)
    Token2Mel        speech tokens (+ the prompt's voice, for semantic tokens) -> log-mel
                     (a small conv net); `mel_to_wav` adds Griffin-Lim. Together they are
                     token2wav, the one place where a real codec (CosyVoice 2's flow
                     matching + vocoder) would plug in.
    TTSLM            a causal LM over text tokens + speech tokens, CosyVoice 2's layout:
                     [prompt text][text] <sos> [prompt speech] -> speech tokens ... <eos>
    CTCRecognizer    a character CTC recogniser: the reward ASR (T1) and, trained apart,
                     the evaluation ASR
    SpeakerEncoder   d-vectors for speaker similarity (T4 and the SIM metric)
    conditions       a manifest's texts, each with a same-voice prompt in the TTS LM's layout

Every module saves to a folder (config.json + model.safetensors, atomically) and loads
back from it with `load_module`; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.functional as AF
import torchaudio.transforms as AT
from safetensors.torch import load_file

from common.audio import HOP, N_FFT, N_MELS, SR, load_audio, log_mel
from common.data import Skips, Utt, length_batches, read_data
from common.models import (
    WEIGHTS_NAME,
    ConvBlock,
    ToyEncoder,
    keep_mask,
    prefix_shared_hidden,
    save_folder,
    toy_tokenizer,
)

TOKEN_HOP = 4  # mel frames (10 ms) per speech token: 25 Hz tokens
CHARS = " abcdefghijklmnopqrstuvwxyz'"  # the CTC recognisers' alphabet; blank is the last id


def cmvn(mel: torch.Tensor) -> torch.Tensor:
    """Per-utterance mean and variance normalisation of log-mel [T, 80]."""
    return (mel - mel.mean(0, keepdim=True)) / (mel.std(0, keepdim=True) + 1e-5)


def pad_batch(xs: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, ...] tensors -> padded [B, T_max, ...] and lengths [B]."""
    lens = torch.tensor([x.shape[0] for x in xs])
    out = xs[0].new_full((len(xs), int(lens.max()), *xs[0].shape[1:]), value)
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
    return out, lens


# ---------------------------------------------------------------- speech tokens
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on x [N, D] -> centroids [k, D]. Empty clusters are reseeded."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        a = nearest(x, c)
        counts = torch.bincount(a, minlength=k)
        c = torch.zeros_like(c).index_add_(0, a, x) / counts.clamp(min=1)[:, None]
        empty = counts == 0
        c[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]
    return c


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest centroid for every row of x [N, D] -> [N]."""
    c2 = (c * c).sum(1)
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([(c2 - 2 * x[i : i + chunk] @ c.T).argmin(1) for i in range(0, len(x), chunk)])


class SpeechTokenizer(nn.Module):
    """Audio -> discrete speech tokens: log-mel, mean-pooled over TOKEN_HOP frames,
    globally normalised (so voice and loudness stay in the tokens), nearest centroid."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("centroids", torch.zeros(cfg["n_tokens"], N_MELS))
        self.register_buffer("mean", torch.zeros(N_MELS))
        self.register_buffer("std", torch.ones(N_MELS))

    def pooled(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel [T, 80] -> normalised 25 Hz frames [T // 4, 80]."""
        n = mel.shape[0] // TOKEN_HOP
        x = mel[: n * TOKEN_HOP].view(n, TOKEN_HOP, N_MELS).mean(1)
        return (x - self.mean) / self.std

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel [T, 80] -> speech tokens [T // 4] in 0..K-1."""
        return nearest(self.pooled(mel), self.centroids)

    def encode_batch(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.encode(m) for m in mels]

    @classmethod
    def fit(cls, mels: list[torch.Tensor], n_tokens: int, max_frames: int = 200_000,
            seed: int = 0) -> SpeechTokenizer:
        tok = cls({"n_tokens": n_tokens})
        raw = torch.cat([m[: m.shape[0] // TOKEN_HOP * TOKEN_HOP].view(-1, TOKEN_HOP, N_MELS).mean(1)
                         for m in mels])  # [N, 80]
        tok.mean, tok.std = raw.mean(0), raw.std(0) + 1e-5
        x = (raw - tok.mean) / tok.std
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_frames]]
        tok.centroids = kmeans(x, n_tokens, seed=seed)
        return tok


class SemanticTokenizer(nn.Module):
    """Audio -> supervised semantic tokens, CosyVoice's idea at toy size: the encoder states
    of a character CTC recogniser (20 ms), mean-pooled in pairs to 25 Hz, globally
    normalised, nearest k-means centroid. Trained to carry the text, they carry little of
    the voice, so the TTS LM models content and token2mel takes the voice from the prompt."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.asr = CTCRecognizer(cfg["asr"])
        d = cfg["asr"]["d"]
        self.register_buffer("centroids", torch.zeros(cfg["n_tokens"], d))
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))

    @torch.no_grad()
    def pooled_batch(self, mels: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """log-mel [T_i, 80] each -> un-normalised 25 Hz states [ceil(T_i / 2) // 2, d] each."""
        self.asr.eval()
        out: list[torch.Tensor] = [torch.zeros(0)] * len(mels)
        order = sorted(range(len(mels)), key=lambda i: mels[i].shape[0])  # little padding
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            dev = self.centroids.device
            x, lens = pad_batch([cmvn(mels[i].to(dev).float()) for i in idx])
            h, hl = self.asr.encoder(x, lens.to(dev))  # [B, T/2, d]: 20 ms frames
            for j, (i, n) in enumerate(zip(idx, hl.tolist(), strict=True)):
                n2 = n // 2
                out[i] = h[j, : 2 * n2].view(n2, 2, h.shape[-1]).mean(1)  # [n/2, d]: 40 ms, as TOKEN_HOP
        return out

    def encode_batch(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """log-mel [T_i, 80] each -> speech tokens in 0..K-1 (about T_i / 4 each)."""
        return [nearest((x - self.mean) / self.std, self.centroids) for x in self.pooled_batch(mels)]

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encode_batch([mel])[0]

    @classmethod
    def fit(cls, asr: CTCRecognizer, mels: list[torch.Tensor], n_tokens: int,
            max_frames: int = 200_000, seed: int = 0) -> SemanticTokenizer:
        tok = cls({"n_tokens": n_tokens, "asr": asr.cfg})
        tok.asr.load_state_dict(asr.state_dict())
        raw = torch.cat(tok.pooled_batch(mels))  # [N, d]
        tok.mean, tok.std = raw.mean(0), raw.std(0) + 1e-5
        x = (raw - tok.mean) / tok.std
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_frames]]
        tok.centroids = kmeans(x, n_tokens, seed=seed)
        return tok


# ---------------------------------------------------------------- token2wav
class Token2Mel(nn.Module):
    """Speech tokens [B, n] -> log-mel [B, 4n, 80]: embedding, upsampling to 100 Hz with a
    learned position-within-token, residual conv blocks, a linear read-out. With
    cfg["voice"] (semantic tokens, which carry little of the voice) it also reads a voice
    reference, another utterance of the speaker: its normalised log-mel's mean and std
    over time, projected and added at every frame."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        d = cfg["d"]
        self.emb = nn.Embedding(cfg["n_tokens"], d)
        self.sub = nn.Embedding(TOKEN_HOP, d)  # which of the token's 4 frames
        self.blocks = nn.Sequential(*[ConvBlock(d, 5) for _ in range(cfg["blocks"])])
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, N_MELS))
        self.voice = nn.Linear(2 * N_MELS, d) if cfg.get("voice") else None
        self.register_buffer("mean", torch.zeros(N_MELS))
        self.register_buffer("std", torch.ones(N_MELS))

    def voice_of(self, mel: torch.Tensor) -> torch.Tensor:
        """A voice reference's log-mel [T, 80] -> [160]: mean and std of its normalised frames."""
        x = (mel.to(self.mean.device).float() - self.mean) / self.std
        return torch.cat([x.mean(0), x.std(0)])

    def forward(self, tokens: torch.Tensor, lens: torch.Tensor | None = None,
                voice: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised log-mel [B, 4n, 80] (the training target space); voice [B, 160] from
        voice_of. With lens [B], the padding never reaches real frames: a batch gives each
        item what it gets alone."""
        x = self.emb(tokens).repeat_interleave(TOKEN_HOP, 1)  # [B, 4n, d]
        x = x + self.sub.weight.repeat(tokens.shape[1], 1)[None]
        if self.voice is not None:
            if voice is None:
                raise ValueError("this token2mel reads a voice reference: pass voice (or voices to mel())")
            x = x + self.voice(voice)[:, None]  # [B, 1, d]: the same at every frame
        keep = keep_mask(TOKEN_HOP * lens, x) if lens is not None else None  # [B, 4n, 1]
        for block in self.blocks:
            x = block(x, keep)
        return self.out(x)

    @torch.no_grad()
    def mel(self, tokens: list[torch.Tensor], voices: list[torch.Tensor] | None = None,
            batch_size: int = 32) -> list[torch.Tensor]:
        """Speech tokens (one tensor each, any lengths) -> log-mel [4 n_i, 80] each. voices:
        a voice reference's log-mel per item (the prompt's), read only by a voice-conditioned
        token2mel. Run by length, `batch_size` a batch, each padded to its own longest (sampled
        outputs vary about 3x in length)."""
        if self.voice is not None and voices and len(voices) != len(tokens):
            raise ValueError(f"{len(tokens)} token sequences but {len(voices)} voice references")
        out: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
        for idx in length_batches([len(t) for t in tokens], batch_size, shuffle=False):
            x, lens = pad_batch([tokens[i].to(self.mean.device) for i in idx])
            v = (torch.stack([self.voice_of(voices[i]) for i in idx])
                 if self.voice is not None and voices else None)
            y = self(x, lens, v) * self.std + self.mean  # [b, 4n, 80]
            for j, i in enumerate(idx):
                out[i] = y[j, : TOKEN_HOP * int(lens[j])]
        return out


_gl: dict[str, tuple[torch.Tensor, AT.GriffinLim]] = {}


@torch.no_grad()
def mel_to_wav(mels: list[torch.Tensor], n_iter: int = 32) -> list[torch.Tensor]:
    """log-mel [T_i, 80] -> 16 kHz audio [160 (T_i - 1)] each: the mel filterbank's pseudo-inverse
    gives a power spectrogram, Griffin-Lim (fixed zero-phase start) its phase. Deterministic."""
    if not mels:
        return []
    key = f"{mels[0].device}:{n_iter}"
    if key not in _gl:
        fb = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SR / 2, N_MELS, SR)  # [201, 80], as log_mel's
        _gl[key] = (torch.linalg.pinv(fb).to(mels[0].device),
                    AT.GriffinLim(N_FFT, n_iter, hop_length=HOP, power=2.0,
                                  rand_init=False).to(mels[0].device))
    pinv, gl = _gl[key]
    x, lens = pad_batch(mels, value=-13.8)  # log(1e-6): silence
    spec = (x.float().exp() @ pinv).clamp(min=0).transpose(1, 2)  # [B, 201, T]
    wav = gl(spec)  # [B, ~160 T]
    peak = wav.abs().amax(1, keepdim=True).clamp(min=1e-4)
    wav = wav * torch.clamp(0.9 / peak, max=1.0)  # never clip
    return [wav[i, : HOP * (int(n) - 1)] for i, n in enumerate(lens)]  # centred frames: hop x (T - 1)


# ---------------------------------------------------------------- judges
class CTCRecognizer(nn.Module):
    """A character CTC recogniser on CMVN log-mels: ToyEncoder at 20 ms frames + linear."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.encoder = ToyEncoder(d_model=cfg["d"], n_layers=cfg["layers"], conv_blocks=cfg["conv_blocks"],
                                  dropout=cfg.get("dropout", 0.1), subsample=2)
        self.head = nn.Linear(cfg["d"], len(CHARS) + 1)

    def forward(self, mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """log-mel [T_i, 80] each -> CTC log-probs [B, T', C] and lengths [B]."""
        dev = self.head.weight.device
        x, lens = pad_batch([cmvn(m.to(dev).float()) for m in mels])
        h, hl = self.encoder(x, lens.to(dev))
        return self.head(h).log_softmax(-1), hl

    @staticmethod
    def targets(text: str) -> list[int]:
        return [CHARS.index(c) for c in text if c in CHARS]

    @torch.no_grad()
    def transcribe(self, mels: list[torch.Tensor], batch_size: int = 16) -> list[str]:
        """Greedy CTC transcripts, batched by length (16 a batch: less padding than 64, and
        faster on CPU)."""
        was = self.training
        self.eval()
        order = sorted(range(len(mels)), key=lambda i: mels[i].shape[0])
        out = [""] * len(mels)
        blank = len(CHARS)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            lp, hl = self([mels[i] for i in idx])
            best = lp.argmax(-1).tolist()  # [B, T']
            for row, n, i in zip(best, hl.tolist(), idx, strict=True):
                ids = [t for j, t in enumerate(row[:n]) if t != blank and (j == 0 or t != row[j - 1])]
                out[i] = " ".join("".join(CHARS[t] for t in ids).split())
        self.train(was)
        return out


class SpeakerEncoder(nn.Module):
    """d-vectors: ToyEncoder on globally normalised log-mel (per-utterance CMVN would wipe
    out the voice), mean-pooled, projected, L2-normalised. Trained as a speaker classifier."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.encoder = ToyEncoder(d_model=cfg["d"], n_layers=cfg["layers"], conv_blocks=1, dropout=0.1)
        self.proj = nn.Linear(cfg["d"], cfg["d"])
        self.classify = nn.Linear(cfg["d"], cfg["n_speakers"])  # training only
        self.register_buffer("mean", torch.zeros(N_MELS))
        self.register_buffer("std", torch.ones(N_MELS))

    def forward(self, mels: list[torch.Tensor]) -> torch.Tensor:
        """log-mel [T_i, 80] each -> unit-norm embeddings [B, d]."""
        dev = self.mean.device
        x, lens = pad_batch([(m.to(dev).float() - self.mean) / self.std for m in mels])
        h, hl = self.encoder(x, lens.to(dev))
        keep = keep_mask(hl, h)  # [B, T', 1]
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.proj(pooled), dim=-1)

    @torch.no_grad()
    def similarity(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """Cosine similarity of pairs (a_i, b_i) of log-mels -> [B]."""
        if not a:
            return torch.zeros(0)
        was = self.training
        self.eval()
        s = (self(a) * self(b)).sum(-1)
        self.train(was)
        return s


class WhisperRecognizer(nn.Module):
    """A local Whisper folder (model, feature extractor, tokenizer) as a judge of 16 kHz
    audio, for real models: greedy decoding, batched, under no_grad. It reads audio, not
    log-mels, so the reward goes through the whole of token2wav."""

    reads_audio = True

    def __init__(self, path: str, max_new_tokens: int = 96):
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

        self.model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
        self.fe = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_new_tokens = max_new_tokens
        if hasattr(self.tok, "set_prefix_tokens"):  # <|startoftranscript|><|en|><|transcribe|>...
            self.tok.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
            self.prefix = self.tok.prefix_tokens
        else:
            self.prefix = [self.model.config.decoder_start_token_id]

    @torch.no_grad()
    def transcribe_audio(self, wavs: list[torch.Tensor], batch_size: int = 32) -> list[str]:
        dev, eos = self.model.device, self.model.config.eos_token_id
        out = []
        for s in range(0, len(wavs), batch_size):
            x = self.fe([w.cpu().numpy() for w in wavs[s : s + batch_size]], sampling_rate=SR,
                        return_tensors="pt").input_features.to(dev, self.model.dtype)
            enc = self.model.model.encoder(x).last_hidden_state
            ids = torch.tensor([self.prefix] * len(x), device=dev)
            done = torch.zeros(len(x), dtype=torch.bool, device=dev)
            for _ in range(self.max_new_tokens):  # greedy; the decoder re-reads its prefix (short outputs)
                logits = self.model(encoder_outputs=(enc,), decoder_input_ids=ids).logits[:, -1]
                nxt = logits.argmax(-1).masked_fill(done, eos)
                ids = torch.cat([ids, nxt[:, None]], 1)
                done |= nxt == eos
                if bool(done.all()):
                    break
            out += [" ".join(t.split()) for t in self.tok.batch_decode(ids[:, len(self.prefix):],
                                                                        skip_special_tokens=True)]
        return out


def transcribe_with(asr: nn.Module, mels: list[torch.Tensor], wavs: list[torch.Tensor] | None = None):
    """Any judge's transcripts: a CTCRecognizer reads log-mels, a Whisper reads audio."""
    if getattr(asr, "reads_audio", False):
        return asr.transcribe_audio(wavs if wavs is not None else mel_to_wav(mels))
    return asr.transcribe(mels)


def load_judge(path: str, device: str = "cpu") -> nn.Module:
    """A recogniser folder: ours (save_module) or a Hugging Face Whisper."""
    with open(os.path.join(path, "config.json")) as f:
        if json.load(f).get("model_type") == "whisper":
            return WhisperRecognizer(path).to(device)
    return load_module(path, device)


# ---------------------------------------------------------------- the TTS LM
class TTSLM(nn.Module):
    """A causal LM over [text tokens][speech tokens][eos][sos]. Speech token s has id
    offset + s, eos is offset + K and sos offset + K + 1, so the outputs (speech tokens and
    eos) are one contiguous slice of the vocabulary: `out_slice`. Sampling and log-probs
    both renormalise over that slice, so at T = 1 without top-k/top-p they are the same
    distribution (the head must have no bias: log-probs read its weight rows only)."""

    def __init__(self, cfg: dict, lm: nn.Module, tokenizer):
        super().__init__()
        if getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise ValueError("TTSLM: the LM head has a bias; head() and the log-probs read its weights only")
        self.cfg, self.lm, self.tokenizer = cfg, lm, tokenizer
        self.offset, self.n_speech = cfg["offset"], cfg["n_speech"]
        self.eos_id, self.sos_id = self.offset + self.n_speech, self.offset + self.n_speech + 1
        self.out_slice = (self.offset, self.offset + self.n_speech + 1)  # speech tokens + eos

    def prompt(self, prompt_text: str, text: str, prompt_speech: list[int]) -> list[int]:
        """CosyVoice 2's layout: [prompt text][text] <sos> [prompt speech tokens]."""
        ids = self.tokenizer(f"{prompt_text} {text}".strip(), add_special_tokens=False).input_ids
        return ids + [self.sos_id] + [self.offset + s for s in prompt_speech]

    def batch(self, prompts: list[list[int]], outputs: list[list[int]] | None = None):
        """Left-padded ids [N, P+L], attention mask, positions, and (with outputs, given as
        speech ids 0..K with K = eos) the flat indices of the positions that predict them
        and those targets as out-slice indices. Only outputs are predicted: the prompt,
        including its speech tokens, is never in the loss or the log-probs."""
        outputs = outputs or [[] for _ in prompts]
        seqs = [p + [self.offset + o for o in out[:-1]] for p, out in zip(prompts, outputs, strict=True)]
        n = max(map(len, seqs))
        dev = self.lm.get_input_embeddings().weight.device
        ids = torch.full((len(seqs), n), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        pred = []
        for i, (s, p, out) in enumerate(zip(seqs, prompts, outputs, strict=True)):
            ids[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), 1
            first = i * n + n - len(s) + len(p) - 1  # the last prompt position predicts out[0]
            pred.extend(range(first, first + len(out)))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        y = torch.tensor([o for out in outputs for o in out], dtype=torch.long)
        return (ids.to(dev), mask.to(dev), pos.to(dev), torch.tensor(pred, dtype=torch.long, device=dev),
                y.to(dev))

    def output_hidden(self, net: nn.Module, prompts: list[list[int]],
                      outputs: list[list[int]], rows_per_pass: int = 32) -> torch.Tensor:
        """Hidden states that predict each output token [Σ|o_i|, d] for group-major outputs
        (G = len(outputs) / len(prompts) per prompt, out-slice ids), each prompt run once
        through `net` and shared by its G outputs, which run by length, `rows_per_pass` at a
        time (`prefix_shared_hidden`)."""
        ids, mask, _, _, _ = self.batch(prompts)  # [B, P], left-padded
        emb = net.get_input_embeddings()(ids)  # [B, P, d]
        ids_out = [[self.offset + t for t in o] for o in outputs]  # out-slice ids -> vocabulary ids
        return prefix_shared_hidden(net.base_model, emb, mask, ids_out, self.tokenizer.pad_token_id or 0,
                                    rows_per_pass)

    def head(self, lm: nn.Module | None = None) -> torch.Tensor:
        """The output rows of the LM head: [K + 1, d]."""
        return (lm or self.lm).get_output_embeddings().weight[self.out_slice[0]: self.out_slice[1]]


def build_toy_tts(words: list[str], n_speech: int, d: int = 256, layers: int = 4, heads: int = 4,
                  dropout: float = 0.1, seed: int = 0) -> TTSLM:
    """The toy TTS LM: a Qwen2ForCausalLM from a small config over words + speech tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = toy_tokenizer(words, prompt_token="<tts>")
    off = len(tok)
    cfg = Qwen2Config(vocab_size=off + n_speech + 2, hidden_size=d, intermediate_size=3 * d,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=4096, tie_word_embeddings=True, attention_dropout=dropout,
                      pad_token_id=tok.pad_token_id, eos_token_id=off + n_speech, bos_token_id=None)
    return TTSLM({"kind": "tts_lm", "offset": off, "n_speech": n_speech}, Qwen2ForCausalLM(cfg), tok)


def load_real_tts(lm_path: str, n_speech: int, dtype: torch.dtype = torch.float32) -> TTSLM:
    """A TTS LM from a local causal-LM folder (e.g. Qwen2.5). If its vocabulary has no room
    for the K speech tokens + eos + sos after the text tokens, the embeddings are resized
    (the new rows start random: SFT must teach them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(lm_path, local_files_only=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(lm_path, local_files_only=True)
    off = len(tok)
    if lm.get_input_embeddings().weight.shape[0] < off + n_speech + 2:
        lm.resize_token_embeddings(off + n_speech + 2)
    return TTSLM({"kind": "tts_lm", "offset": off, "n_speech": n_speech}, lm, tok)


# ---------------------------------------------------------------- texts to speak, with prompt voices
@dataclass
class Cond:
    """One text to speak: its prompt (the CosyVoice 2 layout's ids), the prompt's log-mel
    (for speaker similarity) and audio file, the voice it is spoken in (the name per-voice
    figures use) and, when real audio of the text exists, its token count."""

    utt: Utt
    prompt_ids: list[int]
    prompt_mel: torch.Tensor  # [T, 80]
    ref_len: int | None
    prompt_audio: str
    voice: str


def conditions(path: str, lm: TTSLM, tok: SpeechTokenizer | SemanticTokenizer, skips: Skips,
               prompt_audio: str = "", prompt_text: str = "") -> list[Cond]:
    """The lines of a manifest as texts to speak. Each line's prompt: its own prompt_audio,
    else the next line of the same speaker, else the default voice `prompt_audio`. Lines
    with no prompt voice or with bad audio are named, counted in `skips` and left out."""
    utts = read_data(path, skips, need_audio=False)
    mels: dict[str, torch.Tensor] = {}

    def mel_of(p: str) -> torch.Tensor:
        if p not in mels:
            mels[p] = log_mel(load_audio(p, 30.0))
        return mels[p]

    by_speaker: dict[str, list[int]] = {}  # lines with audio, per speaker, in file order
    for i, u in enumerate(utts):
        if u.speaker and u.audio:
            by_speaker.setdefault(u.speaker, []).append(i)
    out = []
    for i, u in enumerate(utts):
        peers = [j for j in by_speaker.get(u.speaker or "", []) if j != i]
        nxt = next((j for j in peers if j > i), peers[0] if peers else None)  # the next line of its voice
        if u.prompt_audio:
            p_audio, p_text, voice = u.prompt_audio, u.prompt_text or "", u.speaker or "own prompt"
        elif nxt is not None:
            p_audio, p_text, voice = utts[nxt].audio, utts[nxt].text, u.speaker
        elif prompt_audio:
            p_audio, p_text, voice = prompt_audio, prompt_text, "default voice"
        else:
            skips.warn(u.src, "no prompt voice",
                       "no prompt_audio, no other line of its speaker, no default prompt voice")
            continue
        if not p_text:  # without it the LM would read the prompt's speech as this line's text
            skips.warn(u.src, "prompt without text", f"{p_audio}: give its transcript as prompt_text")
            continue
        try:
            pm = mel_of(p_audio)
            ref = len(tok.encode(mel_of(u.audio))) if u.audio else None
        except Exception as e:  # unreadable, silent, too long ...: named, counted, skipped
            skips.warn(u.src, "bad audio", str(e))
            continue
        out.append(Cond(u, lm.prompt(p_text, u.text, tok.encode(pm).tolist()), pm, ref, p_audio, voice))
    if not out:
        raise ValueError(f"{path}: nothing usable (skipped: {skips.as_dict()})")
    return out


# ---------------------------------------------------------------- checkpoints
def save_module(module: nn.Module, path: str) -> None:
    """config.json + model.safetensors (+ lm_config and tokenizer for a TTSLM), atomically."""
    cfg = dict(module.cfg, cls=type(module).__name__)
    extras = None
    if isinstance(module, TTSLM):
        cfg["lm_config"] = module.lm.config.to_dict()

        def extras(tmp: str) -> None:
            module.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    save_folder(path, cfg, "config.json", module, extras)


def load_module(path: str, device: str = "cpu") -> nn.Module:
    """Rebuild any module saved by save_module from its folder."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    kind = cfg.pop("cls")
    if kind == "TTSLM":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        lm_cfg = dict(cfg.pop("lm_config"))
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_cfg.pop("model_type"), **lm_cfg))
        module: nn.Module = TTSLM(cfg, lm, AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")))
    else:
        classes = {c.__name__: c for c in (SpeechTokenizer, SemanticTokenizer, Token2Mel, CTCRecognizer,
                                           SpeakerEncoder)}
        module = classes[kind](cfg)
    missing, unexpected = module.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)),
                                                 strict=False)
    if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
        raise ValueError(f"{path}: checkpoint does not match: missing {missing}, unexpected {unexpected}")
    if kind == "TTSLM":
        module.lm.tie_weights()
    return module.to(device).eval()
