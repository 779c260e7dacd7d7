"""common/tts.py: the speech tokenizer, token2wav, the judges, the TTS LM layout and the
checkpoints of every TTS module."""
import pytest
import torch
from conftest import assert_grads_close

from common.audio import log_mel
from common.toy import vocabulary
from common.tts import (
    CHARS,
    TOKEN_HOP,
    CTCRecognizer,
    SemanticTokenizer,
    SpeakerEncoder,
    SpeechTokenizer,
    Token2Mel,
    build_toy_tts,
    kmeans,
    load_module,
    mel_to_wav,
    nearest,
    save_module,
)
from sft_tts import prompt_speech_targets


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    c = kmeans(x, 3, iters=10)
    found = sorted(tuple(round(v) for v in row.tolist()) for row in c)
    assert found == [(0, 0), (0, 10), (10, 0)]
    assert nearest(torch.tensor([[9.0, 1.0]]), c).item() == int(
        (c - torch.tensor([9.0, 1.0])).norm(dim=1).argmin())


def test_tokenizer_shapes_and_determinism(tmp_path):
    g = torch.Generator().manual_seed(0)
    mels = [torch.randn(n, 80, generator=g) for n in (41, 80, 123)]
    tok = SpeechTokenizer.fit(mels, 16)
    t = tok.encode(mels[0])
    assert t.shape == (41 // TOKEN_HOP,) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 16
    save_module(tok, str(tmp_path / "tok"))
    assert torch.equal(load_module(str(tmp_path / "tok")).encode(mels[2]), tok.encode(mels[2]))
    assert torch.equal(SpeechTokenizer.fit(mels, 16).centroids, tok.centroids)  # seeded


def test_semantic_tokenizer_shapes_batching_and_determinism(tmp_path):
    """Tokens from a CTC recogniser's states: 20 ms frames pooled in pairs (about T / 4
    tokens), the same alone as in a padded batch, saved and loaded with the recogniser."""
    torch.manual_seed(0)
    asr = CTCRecognizer({"d": 32, "layers": 1, "conv_blocks": 1})
    g = torch.Generator().manual_seed(0)
    mels = [torch.randn(n, 80, generator=g) for n in (41, 80, 123)]
    tok = SemanticTokenizer.fit(asr, mels, 8)
    assert torch.equal(tok.asr.head.weight, asr.head.weight)  # a copy of the recogniser
    batch = tok.encode_batch(mels)
    assert [len(t) for t in batch] == [(n + 1) // 2 // 2 for n in (41, 80, 123)]  # ceil(T/2) // 2
    assert all(t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 8 for t in batch)
    for m, t in zip(mels, batch, strict=True):
        assert torch.equal(tok.encode(m), t)  # padding does not leak
    assert len({int(c) for t in batch for c in t}) > 1
    assert tok.encode(torch.randn(3, 80, generator=g)).shape == (1,)  # 2 frames at 20 ms
    assert tok.encode(torch.randn(2, 80, generator=g)).shape == (0,)  # too short for a token
    save_module(tok, str(tmp_path / "sem"))
    assert torch.equal(load_module(str(tmp_path / "sem")).encode(mels[2]), batch[2])
    assert torch.equal(SemanticTokenizer.fit(asr, mels, 8).centroids, tok.centroids)  # seeded


def test_token2mel_reads_the_voice_reference(tmp_path):
    """A voice-conditioned token2mel needs a voice, and its output follows it; the same
    voice gives the same mel alone and in a batch."""
    torch.manual_seed(0)
    net = Token2Mel({"n_tokens": 16, "d": 32, "blocks": 2, "voice": True}).eval()
    toks = [torch.randint(16, (n,)) for n in (5, 9)]
    a, b = torch.randn(30, 80), torch.randn(50, 80) + 2.0
    with pytest.raises(ValueError, match="voice"):
        net.mel(toks)
    with pytest.raises(ValueError, match="2 token sequences but 1 voice"):
        net.mel(toks, [a])
    va = net.voice_of(a)
    assert va.shape == (160,)
    torch.testing.assert_close(va[:80], a.mean(0))  # mean and std 0 and 1 before training
    torch.testing.assert_close(va[80:], a.std(0))
    ya, yb = net.mel(toks, [a, a]), net.mel(toks, [a, b])
    assert torch.equal(ya[0], yb[0]) and not torch.allclose(ya[1], yb[1])
    torch.testing.assert_close(net.mel(toks[1:], [b])[0], yb[1], atol=1e-5, rtol=1e-5)
    save_module(net, str(tmp_path / "t2m"))
    assert torch.equal(load_module(str(tmp_path / "t2m")).mel(toks, [a, b])[1], yb[1])


def test_token2mel_runs_by_length_and_keeps_the_order():
    """mel() runs the items by length, a few a batch: each output comes back in the caller's
    order, with its own voice, as one batch of all of them gives it."""
    torch.manual_seed(0)
    net = Token2Mel({"n_tokens": 16, "d": 32, "blocks": 2, "voice": True}).eval()
    toks = [torch.randint(16, (n,)) for n in (9, 3, 14, 5, 11)]
    voices = [torch.randn(20 + 7 * i, 80) + i for i in range(5)]
    by_length, one_batch = net.mel(toks, voices, batch_size=2), net.mel(toks, voices, batch_size=5)
    assert [m.shape[0] for m in by_length] == [4 * len(t) for t in toks]
    for x, y in zip(by_length, one_batch, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    alone = net.mel(toks[2:3], voices[2:3])[0]
    torch.testing.assert_close(by_length[2], alone, atol=1e-5, rtol=1e-5)
    assert net.mel([], []) == []


def test_token2wav_shapes_and_determinism(tmp_path):
    torch.manual_seed(0)
    net = Token2Mel({"n_tokens": 16, "d": 32, "blocks": 2}).eval()
    toks = [torch.randint(16, (n,)) for n in (5, 9)]
    mels = net.mel(toks)
    assert [m.shape for m in mels] == [(20, 80), (36, 80)]
    assert torch.allclose(net.mel(toks[:1])[0], mels[0], atol=1e-5)  # padding does not leak
    wavs = mel_to_wav(mels)
    assert [w.shape[0] for w in wavs] == [19 * 160, 35 * 160]
    assert all(float(w.abs().max()) <= 0.9 + 1e-6 for w in wavs)
    assert torch.equal(mel_to_wav(mels)[1], wavs[1])  # Griffin-Lim from a fixed start: deterministic
    save_module(net, str(tmp_path / "t2m"))
    assert torch.equal(load_module(str(tmp_path / "t2m")).mel(toks)[1], mels[1])


def test_griffin_lim_inverts_a_real_mel():
    """mel -> wav -> mel comes back close (the judge can read token2mel's mel directly)."""
    t = torch.arange(16000) / 16000
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (1 + torch.sin(2 * torch.pi * 3 * t)) / 2
    m = log_mel(wav)
    back = log_mel(mel_to_wav([m])[0])
    n = min(len(m), len(back))
    loud = m[:n] > m[:n].max() - 6  # compare where there is energy
    assert (back[:n] - m[:n])[loud].abs().mean() < 0.5


def test_ctc_recognizer_and_speaker_encoder_shapes(tmp_path):
    torch.manual_seed(0)
    asr = CTCRecognizer({"d": 32, "layers": 1, "conv_blocks": 1})
    mels = [torch.randn(n, 80) for n in (30, 51)]
    lp, hl = asr(mels)
    assert lp.shape == (2, 26, len(CHARS) + 1) and hl.tolist() == [15, 26]  # 20 ms frames
    assert len(asr.transcribe(mels)) == 2
    assert CTCRecognizer.targets("ab z") == [1, 2, 0, 26]
    spk = SpeakerEncoder({"d": 32, "layers": 1, "n_speakers": 3})
    e = spk(mels)
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=-1), torch.ones(2))
    s = spk.similarity(mels, mels)
    assert torch.allclose(s, torch.ones(2), atol=1e-5)
    save_module(asr, str(tmp_path / "asr"))
    assert load_module(str(tmp_path / "asr")).transcribe(mels) == asr.transcribe(mels)


def test_tts_layout_masks_the_prompt():
    """[prompt text][text] <sos> [prompt speech]: only the emitted tokens and eos are targets."""
    lm = build_toy_tts(vocabulary(), n_speech=10, d=32, layers=1, heads=2)
    p = lm.prompt("one two", "three", [4, 5, 6])
    words = lm.tokenizer("one two three", add_special_tokens=False).input_ids
    assert p == words + [lm.sos_id, lm.offset + 4, lm.offset + 5, lm.offset + 6]
    outs = [[1, 2, 10], [7, 10]]  # speech ids, 10 = eos
    ids, mask, pos, pred, y = lm.batch([p, p[:-1]], outs)
    assert y.tolist() == [1, 2, 10, 7, 10]
    n = ids.shape[1]
    # row 0 predicts from its last prompt position on; the prompt's own tokens never are targets
    assert pred.tolist()[:3] == [len(p) - 1, len(p), len(p) + 1]
    assert ids[0, len(p):].tolist() == [lm.offset + 1, lm.offset + 2]  # inputs: outputs shifted by one
    assert pred.tolist()[3:] == [2 * n - 2, 2 * n - 1]  # row 1 is 2 shorter: left-padded by 2
    assert mask[1].sum() == len(p) and mask[1, :2].sum() == 0
    assert lm.head().shape == (11, 32)  # speech tokens + eos rows of the LM head
    assert lm.out_slice == (lm.offset, lm.eos_id + 1)


def test_sft_prompt_speech_targets():
    """The SFT-only extra targets: every prompt speech token, predicted from the position
    before it (`<sos>` predicts the first), found in rows of different left padding."""
    lm = build_toy_tts(vocabulary(), n_speech=10, d=32, layers=1, heads=2)
    ex = [(lm.prompt("one two", "three", [4, 5, 6]), [1, 2, 3, 10]),
          (lm.prompt("four", "five", [8, 9]), [7, 10])]
    ids, *_ = lm.batch([p for p, _ in ex], [o for _, o in ex])
    pos, y = prompt_speech_targets(lm, ex, ids.shape[1])
    assert y.tolist() == [4, 5, 6, 8, 9]
    flat = ids.flatten()
    assert (flat[pos + 1] - lm.offset).tolist() == y.tolist()  # each target is the next input token
    assert flat[pos].tolist() == [lm.sos_id, lm.offset + 4, lm.offset + 5, lm.sos_id, lm.offset + 8]


def _whole_sequence_hidden(lm, prompts, outs, G):
    """The plain way: every prompt + output sequence run whole (`batch`), B*G prompt passes."""
    ids, mask, pos, pred, _ = lm.batch([p for p in prompts for _ in range(G)], outs)
    hid = lm.lm.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    return hid.flatten(0, 1)[pred]


@pytest.mark.parametrize("rows_per_pass", [32, 2])  # 2: three passes, rows out of order
@pytest.mark.parametrize("out_lens", [(1, 4, 6, 2, 5, 3), (1, 1, 1, 1, 1, 1)])  # the second: no output inputs
def test_prefix_sharing_equals_whole_sequences(out_lens, rows_per_pass):
    """output_hidden (each prompt run once, its keys/values shared by its G outputs; the
    outputs run by length, `rows_per_pass` at a time) gives the hidden states and the
    parameter gradients of running every sequence whole. Tolerance:
    fp32 rounding of a different summation order (Qwen2's RMSNorm computes in fp32 even for
    fp64 inputs, so fp64 does not tighten it); the plain path batched two ways differs by as
    much."""
    torch.manual_seed(0)
    lm = build_toy_tts(vocabulary(), n_speech=10, d=32, layers=2, heads=2, dropout=0.0).eval()
    prompts = [lm.prompt("one two", "three", [4, 5, 6]), lm.prompt("", "five", [7]),
               lm.prompt("two", "one three five", [1, 2, 3, 8, 9])]  # different lengths: left padding
    G = 2
    outs = [[(i * 3 + t) % 10 for t in range(n - 1)] + [10] for i, n in enumerate(out_lens)]  # eos last
    w = torch.randn(sum(out_lens), 32)  # a fixed random loss on the hidden states
    params = [q for q in lm.parameters() if q.requires_grad]
    got = lm.output_hidden(lm.lm, prompts, outs, rows_per_pass)
    want = _whole_sequence_hidden(lm, prompts, outs, G)
    assert got.shape == want.shape == (sum(out_lens), 32)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
    assert_grads_close(g_got, g_want)
    with pytest.raises(ValueError, match="whole number of groups"):
        lm.output_hidden(lm.lm, prompts[:2], outs[:5])


def test_tts_lm_checkpoint_roundtrip(tmp_path):
    lm = build_toy_tts(vocabulary(), n_speech=10, d=32, layers=1, heads=2).eval()
    save_module(lm, str(tmp_path / "lm"))
    back = load_module(str(tmp_path / "lm"))
    ids = torch.tensor([lm.prompt("one", "two", [1, 2])])
    torch.testing.assert_close(back.lm(input_ids=ids).logits, lm.lm(input_ids=ids).logits)
    assert back.offset == lm.offset and back.n_speech == 10
    assert (back.lm.get_output_embeddings().weight.data_ptr()
            == back.lm.get_input_embeddings().weight.data_ptr())


def test_load_real_tts_from_a_local_folder(tmp_path):
    """The real-world path: a local causal-LM folder (here a tiny Qwen2 saved with
    save_pretrained) gets K speech tokens + eos + sos appended after its text vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common.models import toy_tokenizer
    from common.tts import load_real_tts

    tok = toy_tokenizer(vocabulary())
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    lm = load_real_tts(str(tmp_path / "qwen"), n_speech=20)
    assert lm.offset == len(tok) and lm.eos_id == len(tok) + 20 and lm.sos_id == len(tok) + 21
    assert lm.lm.get_input_embeddings().weight.shape[0] >= len(tok) + 22
    ids = torch.tensor([lm.prompt("one", "two", [0, 19])])
    assert lm.lm(input_ids=ids).logits.shape[-1] >= len(tok) + 22
    save_module(lm, str(tmp_path / "ckpt"))  # and it saves and loads like the toy one
    back = load_module(str(tmp_path / "ckpt"))
    torch.testing.assert_close(back.lm(input_ids=ids).logits, lm.lm.eval()(input_ids=ids).logits)


def test_whisper_judge_from_a_local_folder(tmp_path):
    """The real reward/eval ASR path: a Hugging Face Whisper folder (a tiny one from a config,
    with a word-level tokenizer) loads by path and transcribes a batch of audio greedily."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from common.models import toy_tokenizer
    from common.tts import WhisperRecognizer, load_judge, transcribe_with

    torch.manual_seed(0)
    tok = toy_tokenizer(vocabulary())
    cfg = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=100, max_target_positions=64, num_mel_bins=80,
                        vocab_size=len(tok), pad_token_id=0, bos_token_id=3, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=3)
    WhisperForConditionalGeneration(cfg).save_pretrained(tmp_path / "w")
    WhisperFeatureExtractor(feature_size=80, chunk_length=2).save_pretrained(tmp_path / "w")  # 2 s window
    tok.save_pretrained(tmp_path / "w")
    judge = load_judge(str(tmp_path / "w"))
    assert isinstance(judge, WhisperRecognizer) and judge.prefix == [3]
    judge.max_new_tokens = 5
    wavs = [0.1 * torch.randn(8000), 0.1 * torch.randn(16000)]
    hyps = transcribe_with(judge, [log_mel(w) for w in wavs], wavs)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)
    assert all(len(h.split()) <= 5 for h in hyps)
    assert hyps == judge.transcribe_audio(wavs[:1]) + judge.transcribe_audio(wavs[1:])  # batching is exact
