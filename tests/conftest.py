"""Helpers shared by the tests: tiny Hugging Face folders built from configs."""
import torch
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
    WhisperFeatureExtractor,
)

from common.models import toy_tokenizer

QWEN2_AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def make_tiny_qwen2_audio(folder: str, words: list[str], seconds: int = 2, seed: int = 0) -> str:
    """A random Qwen2AudioForConditionalGeneration (a `seconds` window, 128 mels) with a word-level
    tokenizer over `words` plus Qwen2-Audio's audio tokens, saved as an HF folder."""
    torch.manual_seed(seed)
    tok = toy_tokenizer(words + QWEN2_AUDIO_TOKENS)
    cfg = Qwen2AudioConfig(
        audio_config={"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 64, "num_mel_bins": 128, "max_source_positions": 50 * seconds},
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=False).to_dict(),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128, chunk_length=seconds).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def assert_grads_close(got, want, rtol: float = 1e-5) -> None:
    """Two tuples of parameter gradients agree (None in the same places) within fp32 rounding
    of a different summation order, relative to each tensor's largest entry."""
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= rtol * b.abs().max() + 1e-7


def nan_every_third_reward(monkeypatch, script) -> None:
    """Make every 3rd call of `script.total_reward` NaN. With B*G a multiple of 3 the same
    samples are NaN in every run, a resumed one included."""
    real, calls = script.total_reward, {"n": 0}

    def flaky(terms, a):
        calls["n"] += 1
        return float("nan") if calls["n"] % 3 == 0 else real(terms, a)
    monkeypatch.setattr(script, "total_reward", flaky)
