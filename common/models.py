"""Models: the LLM-ASR (audio encoder -> frame-stacking projector -> causal LM), tiny
ones built from configs for the toy world, real ones loaded from local Hugging Face
folders, checkpoints (safetensors, written atomically), and the rollout sampler.

One class, `SpeechLLM`, serves both worlds:
  toy   ToyEncoder (conv + transformer on log-mels) + Qwen2ForCausalLM from a small config
  real  the encoder of a local Whisper folder + any local causal LM (Qwen2.5, ...)
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.audio import log_mel
from common.data import length_batches

CONFIG_NAME = "speechllm.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------- encoders
class ConvBlock(nn.Module):
    """Residual 1-D conv block: local acoustic patterns learn fast on small data."""

    def __init__(self, d: int, kernel: int = 5):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # [B, T, d]
        """keep [B, T, 1] (1 = real frame) zeroes padding, so it cannot leak into real frames."""
        h = self.norm(x) if keep is None else self.norm(x) * keep
        return x + F.gelu(self.conv(h.transpose(1, 2)).transpose(1, 2))


class ToyEncoder(nn.Module):
    """Two convs (stride 2 and 2: 10 ms -> 40 ms frames; or 2 and 1 with subsample=2),
    residual conv blocks and a pre-norm transformer."""

    def __init__(self, n_mels: int = 80, d_model: int = 192, n_layers: int = 4, n_heads: int = 4,
                 dropout: float = 0.1, conv_blocks: int = 0, subsample: int = 4):
        super().__init__()
        if subsample not in (2, 4):
            raise ValueError(f"subsample must be 2 or 4, not {subsample}")
        self.d_model, self.subsample = d_model, subsample
        self.conv = nn.Sequential(nn.Conv1d(n_mels, d_model, 3, 2, 1), nn.GELU(),
                                  nn.Conv1d(d_model, d_model, 3, subsample // 2, 1), nn.GELU())
        self.in_norm = nn.LayerNorm(d_model)  # puts the conv output on the scale of the positions
        self.blocks = nn.Sequential(*[ConvBlock(d_model) for _ in range(conv_blocks)])
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor):
        """feats [B, T, 80] padded, lens [B] real frames -> ([B, T', d], lens'), T' = T / subsample.
        Padding is zeroed before every conv (a conv's bias and GELU make it non-zero), so an
        utterance's output does not depend on its batchmates."""
        x = feats * keep_mask(lens, feats)  # [B, T, 80]
        for i, stride in ((0, 2), (2, self.subsample // 2)):
            x = self.conv[i + 1](self.conv[i](x.transpose(1, 2))).transpose(1, 2)
            lens = (lens + stride - 1) // stride  # a kernel-3, padding-1 conv keeps ceil(T / stride)
            x = x * keep_mask(lens, x)  # [B, T', d]
        keep = keep_mask(lens, x)  # [B, T', 1]
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x, keep)
        t = torch.arange(x.shape[1], device=x.device)
        half = self.d_model // 2  # sinusoidal positions: no length limit
        freq = torch.exp(-math.log(10_000.0) * torch.arange(half, device=x.device) / half)
        ang = t[:, None].float() * freq[None]
        x = x + torch.cat([ang.sin(), ang.cos()], -1).to(x.dtype)
        pad = keep[..., 0] == 0  # [B, T']
        return self.norm(self.layers(x, src_key_padding_mask=pad)), lens


def keep_mask(lens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, T, 1] in x's dtype for x [B, T, ...]: 1 on the first lens[b] frames, 0 on padding."""
    t = torch.arange(x.shape[1], device=x.device)
    return (t[None] < lens.to(x.device)[:, None]).unsqueeze(-1).to(x.dtype)


def pad_to_window(feats: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[B, T, n_mels] -> [B, n_frames, n_mels]: Whisper-style encoders take a fixed window."""
    if feats.shape[1] > n_frames:
        raise ValueError(f"{feats.shape[1]} feature frames > the encoder's {n_frames}")
    return F.pad(feats, (0, 0, 0, n_frames - feats.shape[1]))


class WhisperAudioEncoder(nn.Module):
    """transformers' Whisper encoder. It takes exactly 2 x max_source_positions feature
    frames (3,000 = 30 s for real checkpoints), so features are padded to that, and only
    the output frames that hold speech are passed on."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.d_model = encoder.config.d_model
        self.n_frames = 2 * encoder.config.max_source_positions

    def forward(self, feats: torch.Tensor, lens: torch.Tensor):
        feats = pad_to_window(feats, self.n_frames)  # [B, 3000, 80]
        h = self.encoder(feats.transpose(1, 2).to(self.encoder.dtype)).last_hidden_state
        return h, (lens + 1) // 2  # the encoder's conv has stride 2


class Qwen2AudioTower(nn.Module):
    """Qwen2-Audio's own audio encoder (a Whisper-style encoder with a stride-2 average
    pool: 40 ms frames) and its linear projector, so its outputs are already LM embeddings.
    Like Whisper it takes exactly 2 x max_source_positions feature frames; padding frames
    are masked in its attention, as Qwen2AudioForConditionalGeneration does."""

    def __init__(self, tower: nn.Module, projector: nn.Module):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.d_model = projector.linear.out_features
        self.n_frames = 2 * tower.config.max_source_positions

    def forward(self, feats: torch.Tensor, lens: torch.Tensor):
        feats = pad_to_window(feats, self.n_frames)  # [B, 3000, 128]
        conv_lens = (lens - 1) // 2 + 1  # after the stride-2 conv
        t = torch.arange(self.n_frames // 2, device=feats.device)
        keep = (t[None] < conv_lens[:, None])[:, None, None]  # [B, 1, 1, T/2]: True = attend
        dtype = self.tower.conv1.weight.dtype
        if self.tower.config._attn_implementation == "eager":  # eager adds its mask to the scores
            mask = torch.zeros(keep.shape, dtype=dtype, device=feats.device).masked_fill(
                ~keep, torch.finfo(dtype).min)
        else:  # SDPA takes a boolean mask, whatever dtype autocast gives q and k
            mask = keep  # (flash-attention-2 wants a 2-D mask instead: not supported here)
        h = self.tower(feats.transpose(1, 2).to(dtype), attention_mask=mask).last_hidden_state  # [B, 750, d]
        return self.projector(h), (conv_lens - 2) // 2 + 1  # [B, 750, d_lm], after the pool


# ---------------------------------------------------------------- checkpoints
def save_folder(path: str, cfg: dict, config_name: str, module: nn.Module, extras=None) -> None:
    """A checkpoint folder (config JSON + model.safetensors + whatever `extras(tmp)` writes),
    written to path.tmp and renamed over path, so a crash never leaves half a checkpoint.
    Tied weights (embedding = LM head) are stored once."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, config_name), "w") as f:
        json.dump(cfg, f, indent=1, default=str)
    state, seen = {}, set()
    for k, v in module.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.detach().contiguous().cpu()
    save_file(state, os.path.join(tmp, WEIGHTS_NAME))
    if extras is not None:
        extras(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the LLM-ASR
@functools.cache
def _forward_takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_name(model: nn.Module) -> str:
    """The KV cache's name in `model`'s forward and output: transformers >= 5.2x renamed it
    `cache`; older 5.x only knows `past_key_values`. Looked up once per class."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def prefix_shared_hidden(base: nn.Module, p_emb: torch.Tensor, p_mask: torch.Tensor,
                         outputs: list[list[int]], pad_id: int = 0, rows_per_pass: int = 32) -> torch.Tensor:
    """Final hidden states at the positions that predict each output token, [Σ|o_i|, d] in
    row order, for group-major outputs: G = len(outputs) / B consecutive outputs continue
    prompt b (p_emb [B, P, d], left-padded under p_mask [B, P]). Each prompt runs through
    `base` (a transformers decoder) once and its keys/values are shared by its G outputs
    (prefix sharing): the same numbers as running every prompt + output sequence whole, with
    B instead of B*G prompt passes in the forward and in the backward. In GRPO the prompt
    (audio, or text + prompt speech) is longer than the outputs, so this is most of the
    update's work. `outputs` are token ids; all but each one's last are also inputs; they run
    by length, `rows_per_pass` at a time (the result does not depend on it)."""
    B, G = p_emb.shape[0], len(outputs) // p_emb.shape[0]
    if G * B != len(outputs):
        raise ValueError(f"{len(outputs)} outputs are not a whole number of groups of {B} prompts")
    dev = p_emb.device
    out = base(inputs_embeds=p_emb, attention_mask=p_mask,
               position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    first = out.last_hidden_state[:, -1]  # [B, d]: the prompt's end predicts o[0]
    kw = cache_name(base)
    cache = getattr(out, kw)
    # The outputs' pass pads each row to the longest output it runs with. Sampled lengths
    # spread widely (a longest of 2.8x the mean in the toy TTS), so the rows run by length,
    # in passes of `rows_per_pass`, each padded to its own longest: about the real tokens'
    # work instead of N x the batch's longest.
    rows: list[torch.Tensor] = [first[0, :0]] * len(outputs)  # each row's [|o_i|, d]
    for part in length_batches([len(o) for o in outputs], rows_per_pass, shuffle=False):
        grp = torch.tensor([i // G for i in part], device=dev)  # each row's prompt
        # index_select, not first[grp]: the backward of tensor indexing sums the repeated
        # rows with parallel atomic adds on a multi-threaded CPU, in a different order every
        # run, so same-seed runs drifted apart (README, *Bit-identical reruns*);
        # index_select's backward (index_add_) sums them in order there. On CUDA it is the
        # other way round (torch.use_deterministic_algorithms lists index_select's
        # backward), so bit-identical reruns are promised on CPU only.
        h = first.index_select(0, grp)[:, None]  # [n, 1, d]
        L = max(len(outputs[i]) for i in part) - 1  # output tokens that are also inputs: o[:-1]
        if L > 0:
            kv = type(cache)()  # the rows' own copy of their prompts' keys and values
            for layer, c in enumerate(cache.layers):  # the backward sums over each group
                kv.update(c.keys.index_select(0, grp), c.values.index_select(0, grp), layer)
            ids = torch.full((len(part), L), pad_id, dtype=torch.long)
            mask = torch.zeros(len(part), L, dtype=torch.long)  # right-padded
            for r, i in enumerate(part):
                o = outputs[i]
                ids[r, : len(o) - 1], mask[r, : len(o) - 1] = torch.tensor(o[:-1], dtype=torch.long), 1
            ids, mask = ids.to(dev), mask.to(dev)
            pos = p_mask.sum(1)[grp][:, None] + torch.arange(L, device=dev)  # [n, L]
            hc = base(input_ids=ids, attention_mask=torch.cat([p_mask[grp], mask], 1),
                      position_ids=pos, **{kw: kv}).last_hidden_state  # [n, L, d]
            h = torch.cat([h, hc], 1)  # [n, 1+L, d]
        for r, i in enumerate(part):
            rows[i] = h[r, : len(outputs[i])]
    return torch.cat(rows)  # [Σ|o_i|, d], row by row


class SpeechLLM(nn.Module):
    """audio -> encoder -> stack `stack` frames -> MLP projector -> LM input embeddings.

    The LM reads [audio embeddings][prompt tokens] and writes the transcript, then eos.
    An optional CTC head on the encoder (toy world) speeds up SFT from scratch."""

    def __init__(self, cfg: dict, encoder: nn.Module, lm: nn.Module, tokenizer):
        super().__init__()
        self.cfg, self.encoder, self.lm, self.tokenizer = cfg, encoder, lm, tokenizer
        d_lm = lm.config.hidden_size
        if cfg["encoder"] == "qwen2audio":  # Qwen2-Audio's tower projects itself
            self.projector: nn.Module = nn.Identity()
        else:
            self.projector = nn.Sequential(nn.Linear(encoder.d_model * cfg["stack"], d_lm), nn.GELU(),
                                           nn.Linear(d_lm, d_lm))
        self.ctc_head = nn.Linear(encoder.d_model, len(tokenizer) + 1) if cfg.get("ctc") else None
        if cfg.get("ctc_embed"):  # token embeddings have std initializer_range; the projector's ~1
            self.ctc_gain = nn.Parameter(torch.tensor(1.0 / lm.config.initializer_range))
        self.prompt_ids = tokenizer(cfg["prompt"], add_special_tokens=False).input_ids
        self.prefix_ids = tokenizer(cfg.get("prefix", ""), add_special_tokens=False).input_ids
        self.eos_id = tokenizer.eos_token_id

    # -- features (on CPU, per utterance) ------------------------------------------------
    def features(self, wav: torch.Tensor) -> tuple[torch.Tensor, int]:
        """16 kHz audio [samples] -> (features [frames, n_mels], frames that hold speech);
        n_mels is 80 for the toy encoder and Whisper, 128 for Qwen2-Audio."""
        if self.cfg["encoder"] == "toy":
            x = log_mel(wav)  # per-utterance mean and variance normalisation (CMVN)
            return (x - x.mean(0, keepdim=True)) / (x.std(0, keepdim=True) + 1e-5), x.shape[0]
        fe = self.feature_extractor
        n = self.encoder.n_frames * fe.hop_length
        x = fe(wav.numpy(), sampling_rate=fe.sampling_rate, return_tensors="pt",
               padding="max_length", max_length=n, truncation=True).input_features[0]  # [80, 3000]
        # Whisper was trained on the extractor's own padding, so keep the full window; the
        # speech length tells the encoder which output frames to pass on.
        return x.T.contiguous(), min(math.ceil(wav.shape[0] / fe.hop_length), self.encoder.n_frames)

    # -- the forward pieces --------------------------------------------------------------
    def embed_audio(self, feats: torch.Tensor, lens: torch.Tensor, lm: nn.Module | None = None,
                    encoded: tuple[torch.Tensor, torch.Tensor] | None = None):
        """feats [B, T, n_mels] -> LM-space embeddings [B, T', d_lm], lengths [B], encoder out.
        `lm` (default: self.lm) is the LM whose input embeddings the CTC-guided term reads,
        e.g. the frozen reference in RL; `encoded` reuses an earlier encoder output."""
        h, hl = encoded if encoded is not None else self.encoder(feats, lens)  # [B, Te, d_enc]
        k = self.cfg["stack"]
        te = h.shape[1] // k * k
        if te == 0:
            raise ValueError("audio shorter than one projector frame")
        x = h[:, :te].reshape(h.shape[0], te // k, k * h.shape[2])  # [B, Te/k, k*d_enc]
        x = self.projector(x.to(self.lm.dtype))  # [B, Te/k, d_lm]
        if self.cfg.get("ctc_embed"):
            # LegoSLM-style: the CTC head's token posteriors (blank dropped) weight the LM's
            # own input embeddings, so the LM sees which words fired, in its own space.
            post = torch.softmax(self.ctc_head(h[:, :te]).float(), -1)[..., :-1]  # [B, Te, V]
            e = post.to(x.dtype) @ (lm or self.lm).get_input_embeddings().weight  # [B, Te, d_lm]
            x = x + self.ctc_gain * e.view(x.shape[0], te // k, k, -1).sum(2)
        return x, (hl // k).clamp(min=1, max=te // k), (h, hl)

    def build_inputs(self, audio: torch.Tensor, audio_lens: torch.Tensor,
                     targets: list[list[int]] | None = None, lm: nn.Module | None = None):
        """Left-padded LM inputs [prefix][audio][prompt](targets), token embeddings from `lm`
        (default: self.lm). Returns inputs_embeds [B, L, d], attention_mask [B, L],
        position_ids [B, L] and, with targets, the flat indices of the positions whose
        next-token prediction is each target token (for log-probs)."""
        emb = (lm or self.lm).get_input_embeddings()
        dev = audio.device
        prompt = emb(torch.tensor(self.prompt_ids, device=dev, dtype=torch.long))  # [Lp, d]
        prefix = emb(torch.tensor(self.prefix_ids, device=dev, dtype=torch.long))  # [Lq, d], often empty
        rows = []
        for i in range(audio.shape[0]):
            parts = [prefix.to(audio.dtype), audio[i, : audio_lens[i]], prompt.to(audio.dtype)]
            if targets is not None:
                parts.append(emb(torch.tensor(targets[i], device=dev, dtype=torch.long)).to(audio.dtype))
            rows.append(torch.cat(parts))
        L = max(r.shape[0] for r in rows)
        x = audio.new_zeros(len(rows), L, audio.shape[-1])
        mask = torch.zeros(len(rows), L, dtype=torch.long, device=dev)
        pred_pos = []
        for i, r in enumerate(rows):
            x[i, L - r.shape[0]:] = r
            mask[i, L - r.shape[0]:] = 1
            if targets is not None:  # the token at p is predicted from position p-1
                first = L - len(targets[i])
                pred_pos.append(i * L + torch.arange(first - 1, L - 1, device=dev))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return x, mask, pos, (torch.cat(pred_pos) if targets is not None else None)

    def output_hidden(self, audio: torch.Tensor, audio_lens: torch.Tensor, outputs: list[list[int]],
                      lm: nn.Module | None = None, rows_per_pass: int = 32) -> torch.Tensor:
        """Hidden states that predict each output token [Σ|o_i|, d] for G outputs per
        utterance (group-major), each utterance's [prefix][audio][prompt] run once through
        `lm` (default: self.lm) and shared by its G outputs, which run by length,
        `rows_per_pass` at a time (`prefix_shared_hidden`)."""
        lm = lm or self.lm
        emb, mask, _, _ = self.build_inputs(audio, audio_lens, lm=lm)  # [B, P, d]
        return prefix_shared_hidden(lm.base_model, emb, mask, outputs, self.tokenizer.pad_token_id or 0,
                                    rows_per_pass)

    def hidden(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        """Final hidden states of the LM [B, L, d] (the LM head is applied by the caller)."""
        return self.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state

    def target_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True).strip()

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Atomic: written to path.tmp, then renamed over path."""
        cfg = dict(self.cfg, lm_config=self.lm.config.to_dict())
        if self.cfg["encoder"] == "whisper":
            cfg["whisper_config"] = self.encoder.encoder.config.to_dict()
        if self.cfg["encoder"] == "qwen2audio":
            cfg["audio_config"] = self.encoder.tower.config.to_dict()

        def extras(tmp: str) -> None:
            self.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            if self.cfg["encoder"] != "toy":
                self.feature_extractor.save_pretrained(os.path.join(tmp, "feature_extractor"))
        save_folder(path, cfg, CONFIG_NAME, self, extras)

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SpeechLLM:
        """Rebuild from the saved configs (nothing downloaded) and load the weights."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with open(os.path.join(path, CONFIG_NAME)) as f:
            cfg = json.load(f)
        tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        lm_cfg = dict(cfg.pop("lm_config"))
        lm_config = AutoConfig.for_model(lm_cfg.pop("model_type"), **lm_cfg)
        lm = AutoModelForCausalLM.from_config(lm_config)
        if cfg["encoder"] == "toy":
            enc: nn.Module = ToyEncoder(**cfg["toy_encoder"])
            model = cls(cfg, enc, lm, tok)
        else:
            from transformers import AutoModel, WhisperConfig, WhisperFeatureExtractor
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            if cfg["encoder"] == "whisper":
                enc = WhisperAudioEncoder(WhisperEncoder(WhisperConfig(**cfg.pop("whisper_config"))))
            else:
                a_cfg = dict(cfg.pop("audio_config"))
                tower = AutoModel.from_config(AutoConfig.for_model(a_cfg.pop("model_type"), **a_cfg))
                from types import SimpleNamespace

                from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector

                proj = Qwen2AudioMultiModalProjector(SimpleNamespace(audio_config=tower.config,
                                                                     text_config=lm.config))
                enc = Qwen2AudioTower(tower, proj)
            model = cls(cfg, enc, lm, tok)
            model.feature_extractor = WhisperFeatureExtractor.from_pretrained(
                os.path.join(path, "feature_extractor"))
        state = load_file(os.path.join(path, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight") and lm.config.tie_word_embeddings}
        if set(missing) - tied or unexpected:
            raise ValueError(f"{path}: checkpoint does not match: missing {missing}, unexpected {unexpected}")
        lm.tie_weights()
        return model.to(device=device, dtype=dtype).eval()


def toy_tokenizer(words: list[str], prompt_token: str = "<asr>"):
    """A word-level HF tokenizer (saved and loaded like any other) over the toy vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", prompt_token]
    vocab = {w: i for i, w in enumerate(specials + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", additional_special_tokens=[prompt_token])


def build_toy_asr(words: list[str], d_enc: int = 192, enc_layers: int = 4, d_lm: int = 256,
                  lm_layers: int = 4, stack: int = 2, dropout: float = 0.1, ctc_embed: bool = True,
                  conv_blocks: int = 0, seed: int = 0) -> SpeechLLM:
    """The toy LLM-ASR: ToyEncoder + projector + a Qwen2ForCausalLM from a small config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = toy_tokenizer(words)
    lm_cfg = Qwen2Config(vocab_size=len(tok), hidden_size=d_lm, intermediate_size=4 * d_lm,
                         num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         attention_dropout=dropout, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    toy_enc = {"d_model": d_enc, "n_layers": enc_layers, "n_heads": 4, "dropout": dropout,
               "conv_blocks": conv_blocks}
    cfg = {"encoder": "toy", "toy_encoder": toy_enc, "stack": stack, "prompt": "<asr>", "ctc": True,
           "ctc_embed": ctc_embed}
    return SpeechLLM(cfg, ToyEncoder(**toy_enc), Qwen2ForCausalLM(lm_cfg), tok)


def load_real_asr(whisper_path: str, lm_path: str, prompt: str = "Transcribe the audio:",
                  stack: int = 4, dtype: torch.dtype = torch.float32) -> SpeechLLM:
    """A new LLM-ASR from local folders: a Whisper encoder and a causal LM. Nothing is
    downloaded (local_files_only); the projector starts random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor, WhisperModel

    kw = {"local_files_only": True, "dtype": dtype}
    whisper = WhisperModel.from_pretrained(whisper_path, **kw)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, **kw)
    tok = AutoTokenizer.from_pretrained(lm_path, local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"{lm_path}: the tokenizer has no eos token")
    cfg = {"encoder": "whisper", "stack": stack, "prompt": prompt, "ctc": False}
    model = SpeechLLM(cfg, WhisperAudioEncoder(whisper.get_encoder()), lm, tok)
    model.feature_extractor = WhisperFeatureExtractor.from_pretrained(whisper_path, local_files_only=True)
    return model.to(dtype)


QWEN2_AUDIO_ASR_PROMPT = "<|audio_eos|>Detect the language and recognize the speech: <|en|>"


def load_qwen2_audio(path: str, prompt: str = QWEN2_AUDIO_ASR_PROMPT, prefix: str = "<|audio_bos|>",
                     dtype: torch.dtype = torch.float32) -> SpeechLLM:
    """A local Qwen2AudioForConditionalGeneration folder as a SpeechLLM: its audio tower and
    projector are the encoder, its LM is the LM (the same modules, not copies). The layout
    is its own: [<|audio_bos|>][audio][<|audio_eos|> prompt](transcript)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Qwen2AudioForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    full = Qwen2AudioForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
    inner = getattr(full, "model", full)  # transformers 5 nests the parts under .model
    with torch.device("meta"):  # a shell with no weights of its own
        lm = AutoModelForCausalLM.from_config(full.config.text_config)
    lm.model, lm.lm_head = inner.language_model, full.lm_head
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos token")
    cfg = {"encoder": "qwen2audio", "stack": 1, "prompt": prompt, "prefix": prefix, "ctc": False}
    model = SpeechLLM(cfg, Qwen2AudioTower(inner.audio_tower, inner.multi_modal_projector), lm, tok)
    model.feature_extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
    return model.to(dtype)


# ---------------------------------------------------------------- the rollout sampler
def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None, noise: torch.Tensor | None = None):
    """One token per row: greedy at temperature 0, else sampled after top-k/top-p filtering.
    `noise` [N, V'] (Exp(1) draws) may be given, else it is drawn from `generator`.
    Returns (token [N], its log-prob under the sampling distribution [N])."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.zeros_like(tok, dtype=torch.float32)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))
    logp = torch.log_softmax(logits, -1)
    # torch.multinomial(p, 1, generator) draws exactly this way (argmax of p / q, q ~ Exp(1):
    # the Gumbel-max trick), with the same random numbers. Spelled out, the noise can be drawn
    # outside a CUDA graph and the draw itself replayed inside it
    if noise is None:
        noise = torch.empty_like(logp).exponential_(generator=generator)  # [N, V']
    tok = (logp.exp() / noise).argmax(-1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


STATIC_CACHE_MODELS = ("qwen2", "qwen3", "llama")


def static_cache_decoder(lm: nn.Module) -> nn.Module | None:
    """The decoder stack (`lm.model`) if the static-cache path below computes this model
    exactly: a Qwen2 / Qwen3 / Llama causal LM (q/k/v/o projections, pre-norms, rotary
    positions over the whole head) with full attention in every layer. Every LM in this
    project (toy, Qwen2.5, Qwen2-Audio's) is one; for any other model (look-alikes such as
    Granite or Mistral add multipliers or windows) `sample` uses the model's own forward."""
    cfg = getattr(lm, "config", None)
    m = getattr(lm, "model", None)
    if getattr(cfg, "model_type", None) not in STATIC_CACHE_MODELS or m is None:
        return None
    if getattr(cfg, "use_sliding_window", False) or any(
            t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return None
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return None
    return m


def _decode(m: nn.Module, x: torch.Tensor, pos: torch.Tensor, cache: list, at: int | torch.Tensor,
            see: torch.Tensor) -> torch.Tensor:
    """The decoder over x [N, T, d] at positions pos [N, T]. Each layer writes its keys and
    values into its pre-allocated cache [N, H_kv, S, hd] at slots at..at+T-1 (in place: no
    torch.cat of a growing cache per step) and attends over slots 0..at+T-1, `see`
    [N, T, at+T] saying which of them each query may use. With `at` a one-element tensor
    (a decode step at fixed shapes, for CUDA graphs) the slot is written by index_copy_ and
    attention reads the whole buffer, `see` [N, 1, S] hiding the slots not yet written.
    Returns the final-norm hidden states [N, T, d]."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb  # Llama's and Qwen3's too

    n, t, _ = x.shape
    fixed = isinstance(at, torch.Tensor)
    end = None if fixed else at + t
    cos, sin = m.rotary_emb(x, pos)  # [N, T, hd] each
    for layer, (k_cache, v_cache) in zip(m.layers, cache, strict=True):
        att = layer.self_attn
        hd = att.head_dim
        h = layer.input_layernorm(x)
        q = att.q_proj(h).view(n, t, -1, hd)  # [N, T, H, hd]
        k = att.k_proj(h).view(n, t, -1, hd)  # [N, T, H_kv, hd]
        if hasattr(att, "q_norm"):  # Qwen3: per-head norms before the rotation
            q, k = att.q_norm(q), att.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [N, H(_kv), T, hd]
        q, v = q.to(k_cache.dtype), att.v_proj(h).view(n, t, -1, hd).transpose(1, 2)
        if fixed:  # the same shapes and addresses at every step
            k_cache.index_copy_(2, at, k.to(k_cache.dtype))
            v_cache.index_copy_(2, at, v.to(v_cache.dtype))
        else:
            k_cache[:, :, at:end], v_cache[:, :, at:end] = k, v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # [N, H_kv, end or S, hd]
        rep = q.shape[1] // keys.shape[1]  # query heads per key/value head (GQA)
        if t == 1:  # decode: a KV head's `rep` query heads become its query rows (no copy
            # of the cache, and a kernel that takes a mask, unlike SDPA's enable_gqa on CUDA)
            o = F.scaled_dot_product_attention(q.reshape(n, -1, rep, hd), keys, values,
                                               attn_mask=see[:, None], scale=att.scaling)
            o = o.reshape(n, -1, 1, hd)  # [N, H, 1, hd]
        else:  # prefill, once per rollout
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)  # [N, H, end, hd]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=see[:, None],
                                               scale=att.scaling)  # [N, H, T, hd]
        x = x + att.o_proj(o.transpose(1, 2).reshape(n, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.norm(x)


def _fixed_step(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None, cache: list, real: torch.Tensor,
                tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, noise: torch.Tensor | None,
                temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step at fixed shapes: the token tok [N] at positions pos [N, 1] goes into
    cache slot `slot` [1], attention reads the whole cache with `real & (slot index <= slot)`
    as its mask, and the next token is picked with the given noise. Returns (token [N],
    log-prob [N])."""
    see = (real & (torch.arange(real.shape[1], device=real.device) <= slot))[:, None]  # [N, 1, S]
    h = _decode(m, m.embed_tokens(tok[:, None]), pos, cache, slot, see)[:, -1]  # [N, d]
    logits = F.linear(h.to(w.dtype), w, b)  # [N, V']
    return _pick(logits, temperature, top_k, top_p, None, noise)


_compiled_step = None  # torch.compile(_fixed_step), made once: its compiled graphs are reused across rollouts


def _graph_step(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None, cache: list, real: torch.Tensor,
                first_slot: int, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None, compiled: bool = False):
    """`_fixed_step` with its inputs in static buffers, as a CUDA graph needs: the token,
    position and slot are copied in, and the pick's Exp(1) noise is drawn into its buffer
    from `generator` (the same numbers `_pick` would draw). On CUDA the step (forward and
    pick) is captured once as a graph and replayed: one launch per step instead of a few
    per layer, which is where a small model's decode time goes. With `compiled` it is first
    compiled by inductor (norms, rotary, residuals and the pick fused): a Qwen2.5-0.5B step
    is then 1.75x faster again. Each new shape or sampling setting compiles anew, and
    after torch's recompile limit (8) the step silently runs uncompiled. Elsewhere (and for
    rotary scalings that branch on the host) the same step runs eagerly; the tests check it
    against the other path on CPU.
    Returns step(tok [N], pos [N, 1], slot) -> (next token [N], its log-prob [N])."""
    global _compiled_step
    n, dev = real.shape[0], real.device
    tok = torch.zeros(n, dtype=torch.long, device=dev)
    pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
    slot = torch.full((1,), first_slot, dtype=torch.long, device=dev)
    noise = torch.ones(n, w.shape[0], dtype=torch.float32, device=dev) if temperature > 0 else None  # [N,V']
    rope = str(getattr(m.rotary_emb, "rope_type", "default"))
    host_rope = "dynamic" in rope or rope == "longrope"  # these branch on the host: no graph, no compile
    fn = _fixed_step
    if compiled and not host_rope:
        if _compiled_step is None:
            _compiled_step = torch.compile(_fixed_step, dynamic=False)
        fn = _compiled_step

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return fn(m, w, b, cache, real, tok, pos, slot, noise, temperature, top_k, top_p)

    graph, out = None, None
    if dev.type == "cuda" and not host_rope:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # warm up (and compile) on a side stream (lazy inits must not happen during capture);
        # this writes junk into slot first_slot, which the first real step overwrites.
        # Autocast's weight cache must be off inside a graph; the attention kernel is pinned
        # to one known to take a mask under capture.
        amp = dict(device_type="cuda", enabled=torch.is_autocast_enabled("cuda"),
                   dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        kernels = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.cuda.device(dev):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.autocast(**amp), sdpa_kernel(kernels):
                for _ in range(2 if fn is _compiled_step else 1):  # compile, then run the compiled code
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side), torch.autocast(**amp), sdpa_kernel(kernels):
                out = run()

    def step(t_tok: torch.Tensor, t_pos: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok.copy_(t_tok)
        pos.copy_(t_pos)
        slot.fill_(at)
        if noise is not None:
            noise.exponential_(generator=generator)
        if graph is None:
            return run()
        graph.replay()
        return out[0].clone(), out[1].clone()  # the graph's outputs are overwritten by the next replay

    return step


@torch.no_grad()
def sample(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
           max_new_tokens: int, eos_id: int, pad_id: int = 0, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           vocab: tuple[int, int] | None = None, static_cache: bool = True, cuda_graph: bool = False,
           compiled: bool = False, group: int = 1):
    """Batched autoregressive sampling from left-padded prompt embeddings [B, P, d], `group`
    samples per prompt (N = B * group rows, group-major): each prompt is run once (prefill)
    and its keys and values copied to its rows, which then sample independently.
    `vocab=(lo, hi)` samples only ids lo..hi-1, renormalised over them (the TTS LM emits
    speech tokens and eos, never text); only those rows of the output head are computed.

    With `static_cache` (and a model `static_cache_decoder` accepts) the keys and values of
    all P + max_new_tokens positions live in one pre-allocated buffer per layer, written in
    place; otherwise the model's own forward and growing cache are used (the reference the
    tests compare against). Without `cuda_graph`, the static-cache step drops the rows that
    have ended (once a quarter of those it computes have); each row still draws its own noise,
    so its tokens are those of all rows run to the end wherever a matmul over fewer rows
    rounds the same (bit for bit on the CPUs tested). `cuda_graph` (static cache only) replays
    each decode step, the pick included, as a CUDA graph (`_graph_step`), and checks whether
    every row has ended only every 8 steps (the check waits for the GPU); `compiled` also
    compiles that step, the cache rounded up to a multiple of 64 slots so that prompts of
    similar lengths share one compiled step. In one call on an H100 both draw the same tokens
    as the eager step in fp32 (under bf16 the compiled step rounds differently; and the steps
    run past the last eos draw noise too, so a generator shared across calls drifts apart from
    the eager path's), and at Qwen2.5-0.5B they decode 6.2x and 10.8x faster than HF generate
    (BENCHMARKS.md). Elsewhere the same fixed-shape step runs eagerly, with no graph (what the
    CPU tests check); the scripts turn it on only on CUDA.

    Returns tokens [N, L] (pad after eos), lengths [N] (eos included; max_new_tokens if
    no eos came), and the sampled tokens' log-probs [N, L] (0 where padded)."""
    lo, hi = vocab or (0, None)
    nb, p, _ = inputs_embeds.shape
    n, dev = nb * group, inputs_embeds.device
    pos_b = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    mask_b, attention_mask = attention_mask, attention_mask.repeat_interleave(group, 0)  # [B, P], [N, P]
    m = static_cache_decoder(lm) if static_cache else None
    use_graph = cuda_graph and m is not None and max_new_tokens > 1
    if m is not None:
        head = lm.get_output_embeddings()
        w = head.weight[lo:hi]  # [V', d]: only the rows that can be sampled
        b = head.bias[lo:hi] if getattr(head, "bias", None) is not None else None
        s = p + max_new_tokens  # cache slots: the prompt, then one per new token
        if use_graph and compiled:
            s = -(-s // 64) * 64  # a compiled step is specialised to the cache size
        # the cache holds what attention reads: autocast's dtype (bf16 on CUDA) if it is on
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else w.dtype
        cache = [tuple(torch.zeros(nb, layer.self_attn.k_proj.out_features // layer.self_attn.head_dim, s,
                                   layer.self_attn.head_dim, dtype=dt, device=dev) for _ in range(2))
                 for layer in m.layers]  # [(keys, values) [B, H_kv, S, hd]] per layer
        # a slot is visible if it is not left padding, within the prompt also causally; a
        # padding query sees itself (a query that sees nothing gives NaN)
        see = mask_b.bool()[:, None, :] & torch.ones(p, p, dtype=torch.bool, device=dev).tril()  # [B, P, P]
        see[:, torch.arange(p), torch.arange(p)] = True
        h = _decode(m, inputs_embeds, pos_b, cache, 0, see)[:, -1]  # [B, d]: the prefill, once per prompt
        logits = F.linear(h.to(w.dtype), w, b).repeat_interleave(group, 0)  # [N, V']
        if group > 1:  # each prompt's keys/values to its rows
            cache = [(k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)) for k, v in cache]
        real = torch.cat([attention_mask.bool(), attention_mask.new_ones(n, max_new_tokens, dtype=torch.bool),
                          attention_mask.new_zeros(n, s - p - max_new_tokens, dtype=torch.bool)], 1)  # [N, S]
        if use_graph:
            step = _graph_step(m, w, b, cache, real, p, temperature, top_k, top_p, generator, compiled)
    else:
        cache_kw = cache_name(lm)
        out = lm(inputs_embeds=inputs_embeds, attention_mask=mask_b, position_ids=pos_b,
                 use_cache=True, logits_to_keep=1)  # the prefill, once per prompt
        cache, logits = getattr(out, cache_kw), out.logits[:, -1, lo:hi].repeat_interleave(group, 0)  # [N,V']
        if group > 1:
            cache.batch_repeat_interleave(group)
    next_pos = pos_b[:, -1:].repeat_interleave(group, 0) + 1  # [N, 1]
    tokens, logps = [], []
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=dev)
    # steps between the done-checks; 1 off the graph, so that seeded CPU runs draw as they always did
    every = 8 if use_graph else 1
    live = torch.arange(n, device=dev)  # the rows the eager static-cache step still computes
    tok, lp = _pick(logits, temperature, top_k, top_p, generator)  # the first token, from the prefill
    for t in range(max_new_tokens):
        tok = (tok + lo).masked_fill(done, pad_id)
        tokens.append(tok)
        logps.append(lp.masked_fill(done, 0.0))
        lengths = torch.where(~done & (tok == eos_id), t + 1, lengths)
        done = done | (tok == eos_id)
        if t == max_new_tokens - 1 or (t % every == every - 1 and bool(done.all())):
            break
        if use_graph:
            tok, lp = step(tok, next_pos, p + t)  # [N], [N]
        elif m is not None:
            # Rows that have ended stop being computed: once a quarter of the live rows have
            # ended, they leave the cache (a copy, so not at every step; the longest output is
            # often 2-3x the mean). The noise is still drawn for all N rows and each live row
            # takes its own, so every row draws what it would have drawn.
            ended = done[live]  # [N_live]
            if 4 * int(ended.sum()) >= live.numel():
                keep = (~ended).nonzero().squeeze(1)  # [N_live']
                live, cache = live[keep], [(k[keep], v[keep]) for k, v in cache]
            x = m.embed_tokens(tok[live, None])  # [N_live, 1, d]
            see = real[live, None, : p + t + 1]  # [N_live, 1, P + t + 1]
            h = _decode(m, x, next_pos[live], cache, p + t, see)[:, -1]  # [N_live, d]
            noise = (torch.empty(n, w.shape[0], dtype=torch.float32, device=dev)
                     .exponential_(generator=generator)[live]
                     if temperature > 0 else None)  # [N_live, V']: what _pick would draw for N rows
            picked, picked_lp = _pick(F.linear(h.to(w.dtype), w, b), temperature, top_k, top_p, None, noise)
            tok = tok.new_zeros(n).index_copy_(0, live, picked)  # [N]; ended rows are padded above
            lp = lp.new_zeros(n).index_copy_(0, live, picked_lp)  # [N]
        else:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], 1)
            out = lm(input_ids=tok[:, None], attention_mask=attention_mask, position_ids=next_pos,
                     use_cache=True, **{cache_kw: cache})
            cache, logits = getattr(out, cache_kw), out.logits[:, -1, lo:hi]
            tok, lp = _pick(logits, temperature, top_k, top_p, generator)
        next_pos = next_pos + 1
    logps = torch.stack(logps, 1)  # [N, L]; 0 past a row's eos
    bad = ~torch.isfinite(logps).all(1)  # a NaN/inf probability: torch.multinomial raised on
    if bool(bad.any()):  # these, argmax(p / q) would pick silently
        raise ValueError(f"sample: non-finite probabilities in {int(bad.sum())} of {n} rows "
                         "(has the model diverged?)")
    width = int(lengths.max())  # past the last eos only padding (steps run between done-checks)
    return torch.stack(tokens, 1)[:, :width], lengths, logps[:, :width]


# ---------------------------------------------------------------- batching and greedy decoding
def collate(feats: list[tuple[torch.Tensor, int]], device: str | torch.device = "cpu"):
    """Pad (features [T_i, 80], speech frames n_i) to x [B, T_max, 80] and lens [B] = n_i."""
    lens = torch.tensor([n for _, n in feats])
    x = torch.zeros(len(feats), max(f.shape[0] for f, _ in feats), feats[0][0].shape[1])
    for i, (f, _) in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x.to(device), lens.to(device)


@torch.no_grad()
def transcribe(model: SpeechLLM, feats: list[tuple[torch.Tensor, int]], batch_size: int = 64,
               max_new_tokens: int = 64) -> tuple[list[str], list[bool]]:
    """Greedy transcripts of many utterances (batched by length). Also returns, per
    utterance, whether decoding hit max_new_tokens without an eos."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    order = sorted(range(len(feats)), key=lambda i: feats[i][1])
    hyps, cut = [""] * len(feats), [False] * len(feats)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        x, lens = collate([feats[i] for i in idx], dev)
        audio, alens, _ = model.embed_audio(x, lens)
        emb, mask, _, _ = model.build_inputs(audio, alens)
        toks, lengths, _ = sample(model.lm, emb, mask, max_new_tokens, model.eos_id,
                                  model.tokenizer.pad_token_id or 0, temperature=0.0)
        for j, i in enumerate(idx):
            hyps[i] = model.decode(toks[j, : lengths[j]].tolist())
            cut[i] = bool(toks[j, lengths[j] - 1] != model.eos_id)
    model.train(was_training)
    return hyps, cut
