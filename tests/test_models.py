"""Real-checkpoint loading with tiny configs, minGPT-style parity with the transformers
classes we wrap, checkpoint round trips, and the sampler against HF generate."""
import os
import shutil

import pytest
import torch
from conftest import assert_grads_close, make_tiny_qwen2_audio
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperFeatureExtractor, WhisperModel

from common.models import (
    SpeechLLM,
    _pick,
    build_toy_asr,
    collate,
    load_qwen2_audio,
    load_real_asr,
    sample,
    static_cache_decoder,
    toy_tokenizer,
    transcribe,
)

WORDS = ["one", "two", "three", "alpha", "bravo"]


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    """A tiny Whisper and a tiny Qwen2 (+ tokenizer) saved as HF folders."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    wcfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_source_positions=100, num_mel_bins=80, vocab_size=60,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(wcfg).save_pretrained(root / "whisper")
    # 2 x 100 frames = 2 s: the feature extractor's window must match the tiny encoder
    WhisperFeatureExtractor(feature_size=80, chunk_length=2).save_pretrained(root / "whisper")
    tok = toy_tokenizer(WORDS)
    qcfg = Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(qcfg).save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    return str(root / "whisper"), str(root / "qwen")


def _wav(seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(16000 * seconds), generator=g) * 0.1


def test_real_loading_and_whisper_parity(real_dirs):
    wdir, qdir = real_dirs
    model = load_real_asr(wdir, qdir, prompt="one two", stack=2).eval()
    feats = [model.features(_wav(1.0)), model.features(_wav(0.5, 1))]
    assert feats[0][0].shape == (200, 80) and [n for _, n in feats] == [100, 50]  # speech frames
    x, lens = collate(feats)
    h, hl = model.encoder(x, lens)
    assert hl.tolist() == [50, 25]
    # parity: our wrapper == transformers' WhisperModel encoder on the padded features
    ref = WhisperModel.from_pretrained(wdir).encoder.eval()
    full = model.feature_extractor(_wav(1.0).numpy(), sampling_rate=16000, return_tensors="pt",
                                   padding="max_length", max_length=32000).input_features
    torch.testing.assert_close(h[0], ref(full).last_hidden_state[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h[1], ref(x[1:].transpose(1, 2)).last_hidden_state[0], rtol=1e-4, atol=1e-4)


def test_lm_parity_with_transformers(real_dirs):
    _, qdir = real_dirs
    model = load_real_asr(real_dirs[0], qdir, prompt="one", stack=2).eval()
    ref = Qwen2ForCausalLM.from_pretrained(qdir).eval()
    audio = torch.randn(2, 5, 48)
    emb, mask, pos, _ = model.build_inputs(audio, torch.tensor([5, 3]))
    ours = model.lm.get_output_embeddings()(model.hidden(emb, mask, pos))
    theirs = ref(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_build_inputs_left_pads_and_points_at_targets():
    model = build_toy_asr(WORDS, d_enc=16, enc_layers=1, d_lm=16, lm_layers=1)
    audio = torch.randn(2, 4, 16)
    tg = [[5, 6, model.eos_id], [7, model.eos_id]]
    emb, mask, pos, pred = model.build_inputs(audio, torch.tensor([4, 2]), tg)
    L = 4 + 1 + 3  # audio + prompt + targets of the longest row
    assert emb.shape == (2, L, 16) and mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert pos[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    # row 0 targets sit at 5..7, predicted from 4..6; row 1's at 6..7, from 5..6
    assert pred.tolist() == [4, 5, 6, L + 5, L + 6]
    tok_emb = model.lm.get_input_embeddings().weight
    torch.testing.assert_close(emb[1, 6], tok_emb[7])


@pytest.fixture(scope="module")
def qwen2_audio_dir(tmp_path_factory):
    return make_tiny_qwen2_audio(str(tmp_path_factory.mktemp("hf") / "qwen2audio"), WORDS)


@pytest.mark.parametrize("rows_per_pass", [32, 2])  # 2: three passes, rows out of order
@pytest.mark.parametrize("kind", ["toy", "qwen2audio"])
def test_prefix_sharing_equals_whole_sequences(kind, rows_per_pass, qwen2_audio_dir):
    """output_hidden (each utterance's [prefix][audio][prompt] run once, its keys/values shared
    by its G samples; the samples run by length, `rows_per_pass` at a time) gives the hidden
    states and LM gradients of running every sequence whole (build_inputs), within fp32
    rounding of a different summation order."""
    torch.manual_seed(0)
    if kind == "toy":
        model = build_toy_asr(WORDS, d_enc=16, enc_layers=1, d_lm=16, lm_layers=2).eval()
        audio, lens = torch.randn(2, 5, 16), torch.tensor([5, 3])  # different lengths: left padding
    else:
        model = load_qwen2_audio(qwen2_audio_dir, prompt="<|audio_eos|> one two").eval()
        audio, lens = torch.randn(2, 5, model.lm.config.hidden_size), torch.tensor([4, 5])
    G, eos = 3, model.eos_id
    outs = [[5, 6, eos], [7, eos], [eos], [6, 6, 5, eos], [5, eos], [7, 5, eos]]  # group-major, 2 x 3
    emb, mask, pos, pred = model.build_inputs(audio.repeat_interleave(G, 0), lens.repeat_interleave(G), outs)
    want = model.hidden(emb, mask, pos).flatten(0, 1)[pred]  # [Σ|o_i|, d]
    got = model.output_hidden(audio, lens, outs, rows_per_pass=rows_per_pass)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    w = torch.randn_like(want)
    params = [p for p in model.lm.parameters() if p.requires_grad]
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
    assert_grads_close(g_got, g_want)


def test_prefix_sharing_backward_has_no_atomic_adds():
    """The G rows of each prompt are picked with index_select, whose backward sums them in
    order. Tensor indexing (first[grp]) backs up through index_put_(accumulate=True), which a
    multi-threaded CPU runs with atomic adds in a different order every run: same-seed GRPO
    runs parted at step 8's backward in 3 of 6 tries (README, *Bit-identical reruns*)."""
    torch.manual_seed(0)
    model = build_toy_asr(WORDS, d_enc=16, enc_layers=1, d_lm=16, lm_layers=2).eval()
    eos = model.eos_id
    got = model.output_hidden(torch.randn(2, 5, 16), torch.tensor([5, 3]),
                              [[5, 6, eos], [7, eos], [eos], [6, 6, 5, eos], [5, eos], [7, 5, eos]])
    seen, todo = set(), [got.grad_fn]
    while todo:  # every node of the backward graph
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    names = {type(fn).__name__ for fn in seen}
    assert "IndexSelectBackward0" in names and "IndexBackward0" not in names, sorted(names)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen2_audio_parity_with_transformers(qwen2_audio_dir, attn):
    """Our SpeechLLM over Qwen2-Audio's modules gives the logits that
    Qwen2AudioForConditionalGeneration gives for the same audio and text, utterance by
    utterance, although ours runs them as one left-padded batch (padding frames masked in
    the tower, with either attention implementation)."""
    from transformers import Qwen2AudioForConditionalGeneration

    model = load_qwen2_audio(qwen2_audio_dir, prompt="<|audio_eos|> one two").eval()
    model.encoder.tower.config._attn_implementation = attn
    full = Qwen2AudioForConditionalGeneration.from_pretrained(qwen2_audio_dir).eval()
    wavs = [_wav(1.2), _wav(0.5, 1)]
    feats = [model.features(w) for w in wavs]
    x, lens = collate(feats)
    targets = [model.target_ids("alpha one"), model.target_ids("two")]
    with torch.no_grad():
        audio, alens, _ = model.embed_audio(x, lens)
        emb, mask, pos, _ = model.build_inputs(audio, alens, targets)
        ours = model.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits  # [B, L, V]
    tok, fe = model.tokenizer, model.feature_extractor
    audio_id = full.config.audio_token_id
    for i, w in enumerate(wavs):
        f = fe(w.numpy(), sampling_rate=16000, return_tensors="pt", padding="max_length",
               return_attention_mask=True)
        ids = (model.prefix_ids + [audio_id] * int(alens[i]) + model.prompt_ids + targets[i])
        with torch.no_grad():
            ref = full(input_ids=torch.tensor([ids]), input_features=f.input_features,
                       feature_attention_mask=f.attention_mask).logits[0]  # [L_i, V]
        torch.testing.assert_close(ours[i, -len(ids):], ref, rtol=1e-4, atol=1e-4)
    # 120 and 50 feature frames -> conv (T - 1) // 2 + 1 -> pool (T - 2) // 2 + 1, as in transformers
    assert int(alens[0]) == 30 and int(alens[1]) == 12
    assert tok.convert_ids_to_tokens(model.prefix_ids) == ["<|audio_bos|>"]


@pytest.mark.parametrize("kind", ["toy", "whisper", "qwen2audio"])
def test_checkpoint_roundtrip(tmp_path, real_dirs, qwen2_audio_dir, kind):
    if kind == "toy":
        model = build_toy_asr(WORDS, d_enc=16, enc_layers=1, d_lm=16, lm_layers=1).eval()
    elif kind == "whisper":
        model = load_real_asr(*real_dirs, prompt="one", stack=2).eval()
    else:
        model = load_qwen2_audio(qwen2_audio_dir).eval()
    model.save(str(tmp_path / "ck"))
    model.save(str(tmp_path / "ck"))  # overwriting is atomic and leaves no .tmp/.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    back = SpeechLLM.load(str(tmp_path / "ck"))
    f = [model.features(_wav(0.6))]
    x, lens = collate(f)
    a1, l1, _ = model.embed_audio(x, lens)
    a2, l2, _ = back.embed_audio(x, lens)
    torch.testing.assert_close(a1, a2)
    assert transcribe(model, f, max_new_tokens=5) == transcribe(back, f, max_new_tokens=5)
    torch.testing.assert_close(back.features(_wav(0.6))[0], f[0][0])


def test_toy_encoder_output_does_not_depend_on_batchmates():
    from common.models import ToyEncoder

    torch.manual_seed(0)
    for subsample in (2, 4):
        enc = ToyEncoder(d_model=32, n_layers=1, conv_blocks=2, dropout=0.0, subsample=subsample).eval()
        x, lens = torch.randn(3, 101, 80), torch.tensor([101, 57, 13])
        junk = x.clone()
        junk[1, 57:], junk[2, 13:] = 5.0, -3.0  # other padding values, as other batchmates give
        h, hl = enc(x, lens)
        h_junk, _ = enc(junk, lens)
        for i in range(3):
            alone, _ = enc(x[i : i + 1, : lens[i]], lens[i : i + 1])
            torch.testing.assert_close(h[i, : hl[i]], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h_junk[i, : hl[i]], h[i, : hl[i]], rtol=1e-5, atol=1e-5)


def test_greedy_sampler_equals_hf_generate():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()
    emb = torch.randn(3, 6, 32)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    toks, lengths, _ = sample(lm, emb, mask, max_new_tokens=8, eos_id=39, temperature=0.0)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False,
                      eos_token_id=39, pad_token_id=0)
    assert toks.tolist() == ref[:, : toks.shape[1]].tolist()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_static_cache_sampler_equals_hf_generate_on_other_layouts(arch):
    """The static-cache decoder follows the weights' own layout: Qwen3's per-head q/k norms
    and Llama's bias-free projections give HF generate's greedy tokens too."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    shape = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    lm = (Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape)) if arch == "qwen3"
          else LlamaForCausalLM(LlamaConfig(**shape))).eval()
    assert static_cache_decoder(lm) is not None
    emb, mask = torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.long)
    mask[1, :3] = 0
    toks, _, _ = sample(lm, emb, mask, max_new_tokens=8, eos_id=39, temperature=0.0)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False,
                      eos_token_id=39, pad_token_id=0)
    assert toks.tolist() == ref[:, : toks.shape[1]].tolist()


def _tiny_lm():
    """A seeded tiny Qwen2 (vocabulary 30) and 16 prompts of 5 embeddings, every third
    left-padded by 2."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=30, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()
    emb, mask = torch.randn(16, 5, 32), torch.ones(16, 5, dtype=torch.long)
    mask[::3, :2] = 0
    return lm, emb, mask


def _draws(autocast: bool = False, group: int = 1, shared: bool = False, **kw):
    """Seeded draws of a tiny Qwen2 with left padding, a vocabulary slice, top-k/top-p and
    rows that stop at eos at different steps: (tokens, lengths, log-probs). With group > 1:
    4 prompts, `group` samples each, each prompt passed once (`shared`: sample's group) or
    as `group` repeated rows."""
    lm, emb, mask = _tiny_lm()
    if group > 1:
        emb, mask = emb[:4], mask[:4]
        if shared:
            kw["group"] = group
        else:
            emb, mask = emb.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return sample(lm, emb, mask, max_new_tokens=12, eos_id=29, temperature=1.3, top_k=12, top_p=0.95,
                      generator=torch.Generator().manual_seed(7), vocab=(10, 30), **kw)


def test_static_cache_equals_the_models_own_cache_when_sampling():
    """Same generator, same draws: tokens, lengths and log-probs agree between the static
    cache and the model's own forward + growing cache."""
    (t1, l1, p1), (t2, l2, p2) = _draws(), _draws(static_cache=False)
    assert t1.tolist() == t2.tolist() and l1.tolist() == l2.tolist()
    assert ((t1 >= 10) | (t1 == 0)).all() and len(set(l1.tolist())) > 1  # eos at different steps
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)


def _rows_per_step(fn):
    """fn()'s result and the rows each of its decode steps computed (the embedding's input:
    the prefill takes embeddings, not token ids, so it is not counted)."""
    from torch.nn.modules.module import register_module_forward_hook

    rows: list[int] = []
    hook = register_module_forward_hook(
        lambda mod, args, out: rows.append(args[0].shape[0]) if isinstance(mod, torch.nn.Embedding) else None)
    try:
        return fn(), rows
    finally:
        hook.remove()


def test_ended_rows_leave_the_static_cache_and_the_draws_hold():
    """Once a quarter of the live rows have ended, the static-cache step stops computing
    them; every row still takes its own noise, so the draws equal the model's own cache
    (which computes all rows to the end), also with GRPO's groups."""
    (t1, l1, p1), rows = _rows_per_step(lambda: _draws(group=4, shared=True))
    t2, l2, p2 = _draws(group=4, shared=True, static_cache=False)
    assert t1.tolist() == t2.tolist() and l1.tolist() == l2.tolist()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)
    assert rows[0] == 16 and min(rows) < 16 and rows == sorted(rows, reverse=True)
    # decode step t computes token t + 1: every row longer than that is among those computed
    assert all(k >= int((l1 > t + 1).sum()) for t, k in enumerate(rows))


def test_greedy_rows_that_end_leave_the_static_cache_and_the_tokens_hold():
    """Greedy decoding (temperature 0, as in evaluation) with rows ending at different
    steps: the static cache drops them and gives the model's own cache's tokens."""
    lm, emb, mask = _tiny_lm()

    def greedy(eos: int, **kw):
        return sample(lm, emb, mask, max_new_tokens=12, eos_id=eos, temperature=0.0, vocab=(10, 30), **kw)

    # a random model seldom picks a given eos greedily: take the id whose rows end most variously
    eos = max(range(10, 30), key=lambda e: len(set(greedy(e, static_cache=False)[1].tolist())))
    (t1, l1, p1), rows = _rows_per_step(lambda: greedy(eos))
    t2, l2, p2 = greedy(eos, static_cache=False)
    assert len(set(l1.tolist())) > 2 and int((l1 < 12).sum()) >= 4  # enough rows end early to drop
    assert t1.tolist() == t2.tolist() and l1.tolist() == l2.tolist()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)
    assert rows[0] == 16 and min(rows) < 16
    assert all(k >= int((l1 > t + 1).sum()) for t, k in enumerate(rows))


@pytest.mark.parametrize("autocast", [False, True])
def test_fixed_shape_decode_step_equals_the_static_cache(autocast):
    """The CUDA-graph step (`cuda_graph=True`; on CPU the same fixed-shape step runs
    eagerly): it writes each slot by index and reads the whole buffer under a mask, and
    gives the same draws as the growing-slice path, in fp32 and under bf16 autocast."""
    (t1, l1, p1), (t2, l2, p2) = _draws(autocast, cuda_graph=True), _draws(autocast)
    assert t1.tolist() == t2.tolist() and l1.tolist() == l2.tolist()
    assert len(set(l1.tolist())) > 1  # eos at different steps
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(p1, p2, rtol=tol, atol=tol)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_step_equals_the_static_cache():
    """`compiled=True` (inductor over the fixed-shape step and its pick, the cache rounded up
    to 64 slots): the same draws, lengths and log-probs as the eager static cache. About
    20 s on 2 CPU cores, most of it compiling."""
    (t1, l1, p1), (t2, l2, p2) = _draws(cuda_graph=True, compiled=True), _draws()
    assert t1.tolist() == t2.tolist() and l1.tolist() == l2.tolist()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)


def test_the_pick_draws_as_torch_multinomial():
    """`_pick` spells out torch.multinomial(p, 1) as argmax(p / q), q ~ Exp(1), so that a CUDA
    graph can replay the draw: the same tokens from the same generator, which ends in the same
    state (so every seeded run draws as it did with torch.multinomial)."""
    logits = torch.randn(64, 300) * 3
    logits[:, :50] = float("-inf")  # filtered ids, as top-k/top-p leave them
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ref = torch.multinomial(torch.softmax(logits, -1), 1, generator=g1).squeeze(1)
    tok, lp = _pick(logits, 1.0, 0, 1.0, g2)
    assert tok.tolist() == ref.tolist() and torch.equal(g1.get_state(), g2.get_state())
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, ref[:, None]).squeeze(1))


def test_graph_step_trims_when_every_row_ends_early():
    """The fixed-shape (graph) path checks for the end only every 8 steps and so runs past
    the last eos; its output is cut back to the longest row: the same shape, tokens, lengths
    and log-probs as the eager path, which stops at once."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=4, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()  # eos (3) is one id in 4: it comes soon
    emb, mask = torch.randn(8, 4, 32), torch.ones(8, 4, dtype=torch.long)
    outs = [sample(lm, emb, mask, max_new_tokens=20, eos_id=3, temperature=1.0,
                   generator=torch.Generator().manual_seed(1), **kw) for kw in (dict(cuda_graph=True), {})]
    (t1, l1, p1), (t2, l2, p2) = outs
    assert t1.shape[1] < 8 and t1.shape == t2.shape and t1.tolist() == t2.tolist()  # every row ended early
    assert l1.tolist() == l2.tolist() and int(l1.max()) == t1.shape[1]
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)


def test_sampler_refuses_non_finite_probabilities():
    """A diverged policy (NaN logits) stops the rollout with a clear error instead of
    sampling garbage silently."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=12, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()
    with torch.no_grad():
        lm.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite probabilities in 2 of 2 rows"):
        sample(lm, torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.long), 4, eos_id=11)


@pytest.mark.parametrize("path", [dict(), dict(cuda_graph=True), dict(static_cache=False)])
def test_each_prompt_is_prefilled_once_for_its_group(path):
    """sample(..., group=G) runs each prompt once and copies its keys/values to its G rows:
    the same draws and log-probs as passing every prompt G times, on each sampler path."""
    (t1, l1, p1), (t2, l2, p2) = _draws(group=4, **path), _draws(group=4, shared=True, **path)
    assert t1.shape == (16, 12) and t1.tolist() == t2.tolist() and l1.tolist() == l2.tolist()
    assert len({tuple(r) for r in t1[:4].tolist()}) > 1  # a group's rows draw apart
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)


def test_static_cache_only_for_layouts_it_computes_exactly():
    """Look-alike layouts (Granite's multipliers, Mistral's window) are left to their own
    forward, and so is a Qwen2 with a sliding window."""
    from transformers import GraniteConfig, GraniteForCausalLM, MistralConfig, MistralForCausalLM
    shape = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    assert static_cache_decoder(GraniteForCausalLM(GraniteConfig(**shape))) is None
    assert static_cache_decoder(MistralForCausalLM(MistralConfig(**shape))) is None
    windowed = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, **shape)
    assert static_cache_decoder(Qwen2ForCausalLM(windowed)) is None
    assert static_cache_decoder(Qwen2ForCausalLM(Qwen2Config(**shape))) is not None


def test_static_cache_under_bf16_autocast():
    """The autocast path (bf16 on CUDA in the scripts) runs to full length, and its first
    token (the prefill) agrees with the model's own forward under the same autocast."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()
    emb, mask = torch.randn(4, 6, 32), torch.ones(4, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.autocast("cpu", torch.bfloat16):
        toks, lengths, _ = sample(lm, emb, mask, max_new_tokens=5, eos_id=-1, temperature=0.0)
        ref, _, _ = sample(lm, emb, mask, max_new_tokens=5, eos_id=-1, temperature=0.0, static_cache=False)
    assert toks.shape == (4, 5) and lengths.tolist() == [5] * 4
    assert toks[:, 0].tolist() == ref[:, 0].tolist()


def test_sampler_falls_back_to_the_models_own_forward():
    """A layout the static-cache decoder does not know (GPT-2) still samples, through the
    model's own forward and cache: greedy equals HF generate."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    assert static_cache_decoder(lm) is None
    emb, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    toks, _, _ = sample(lm, emb, mask, max_new_tokens=6, eos_id=39, temperature=0.0)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False,
                      eos_token_id=39, pad_token_id=0)
    assert toks.tolist() == ref[:, : toks.shape[1]].tolist()


def test_sampler_frequencies_match_the_distribution():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=6, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)).eval()
    emb = torch.randn(1, 3, 16).expand(4000, 3, 16)
    mask = torch.ones(4000, 3, dtype=torch.long)
    toks, _, lps = sample(lm, emb, mask, max_new_tokens=1, eos_id=5, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    p = torch.softmax(lm(inputs_embeds=emb[:1], attention_mask=mask[:1]).logits[0, -1], -1)
    freq = torch.bincount(toks[:, 0], minlength=6).float() / 4000
    assert (freq - p).abs().max() < 0.03
    torch.testing.assert_close(lps[:, 0], p.log()[toks[:, 0]], rtol=1e-4, atol=1e-4)
