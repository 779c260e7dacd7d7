"""grpo_asr.py: rewards, advantages and losses against hand-worked numbers, plus a smoke
run, the β=0 contract, eval-only and data selection, and a learning test."""
import json
import math
import random

import pytest
import torch
from conftest import make_tiny_qwen2_audio, nan_every_third_reward
from safetensors.torch import load_file

import grpo_asr as g
from common.models import SpeechLLM, build_toy_asr, load_qwen2_audio
from common.toy import build_toy_world, vocabulary


def A(**kw):
    return g.Args(**kw)


# ------------------------------------------------------------------ rewards
def test_accuracy_reward():
    assert g.reward_accuracy("a b c d", "a x c d e") == pytest.approx(0.5)  # 1 sub + 1 ins over 4
    assert g.reward_accuracy("one two", "") == 0.0  # empty hypothesis: all deleted
    assert g.reward_accuracy("", "") == 1.0
    assert g.reward_accuracy("", "x y") == -1.0  # empty reference: WER = 2 insertions
    assert g.reward_accuracy("one", "one one one four") == -2.0  # WER > 1 -> negative
    assert g.reward_accuracy("ab cd", "abed", unit="char") == pytest.approx(0.75)


@pytest.mark.parametrize("ref, hyp, flag", [
    ("a b c", "a x c", False),
    ("one two", "one two one two one two", True),  # a loop (and runaway insertions)
    ("four four four", "four four four", False),  # a repeat that the reference has too
    ("alpha bravo charlie delta echo", "alpha alpha alpha bravo charlie", True),  # 1-gram x3 loop
    ("a b c d", "a b c d e f", False),  # 6 <= 1.5*4+2 words; 2 insertions = 50%, not more
    ("a b c d", "a b c d e f g", True),  # 3 insertions > 50% of 4
    ("one two", "one 二", True),  # another script
    ("", "", False),
])
def test_hallucination(ref, hyp, flag):
    assert g.is_hallucination(ref, hyp, A()) is flag


def test_keyword_reward_by_hand():
    lex = {"alpha", "bravo", "march", "monday"}
    p, r = g.keyword_scores(["alpha", "march"], "alpha bravo monday", lex)
    assert (p, r) == (pytest.approx(1 / 3), 0.5)  # alpha of {alpha, bravo, monday}; 1 of 2 found
    assert g.keyword_scores(["alpha"], "", lex) == (0.0, 0.0)
    u = g.Utt("k", "x.wav", "alpha march", "m:1", keywords=["alpha", "march"])
    terms = g.rewards(u, "alpha bravo monday", A(), lex)
    assert terms["keyword"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert terms["acc"] == pytest.approx(1 - 2 / 2) and terms["exact"] == 0.0 and terms["edit"] == -2.0
    assert "keyword" not in g.rewards(g.Utt("k", "x", "one", "m:1"), "one", A(), lex)
    total = g.total_reward(terms, A(w_acc=1.0, w_halluc=1.0, w_keyword=2.0))
    assert total == pytest.approx(terms["acc"] + terms["halluc"] + 2 * terms["keyword"])


# ------------------------------------------------------------------ advantages (Eq. G3)
def test_advantages_each_scale():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv, zero = g.group_advantages(r, "group")
    torch.testing.assert_close(adv, torch.tensor([[-1 / 1.0001, 0, 1 / 1.0001], [0, 0, 0]]))
    assert zero.tolist() == [False, True]
    adv, _ = g.group_advantages(r, "batch")  # group mean removed, divided by the batch std
    s = math.sqrt(15.5 / 5) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([[-1 / s, 0, 1 / s], [0, 0, 0]]))
    adv, _ = g.group_advantages(r, "none")
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0, 1], [0, 0, 0]]))
    with pytest.raises(ValueError):
        g.group_advantages(r, "bogus")


def test_nan_reward_gets_zero_advantage():
    adv, zero = g.group_advantages(torch.tensor([[1.0, float("nan"), 3.0]]), "group")
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([[-1 / s, 0.0, 1 / s]]))
    assert not torch.isnan(adv).any() and zero.tolist() == [False]


# ------------------------------------------------------------------ loss (Eqs. G4-G6)
def _loss_case():
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.5, 1.0]])
    lp_old = torch.full((2, 3), -1.0)
    lp = lp_old + ratios.log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    # surrogate by hand: row 0 (Â=+1): 1.2, 0.5, 1.0; row 1 (Â=-1): -1.1, -0.8
    return lp, lp_old, mask, adv


@pytest.mark.parametrize("agg, want", [("grpo", -((0.9 - 0.95) / 2)), ("dapo", -(0.8 / 5)),
                                       ("dr_grpo", -(0.8 / (2 * 4)))])
def test_loss_aggregations_by_hand(agg, want):
    lp, lp_old, mask, adv = _loss_case()
    a = A(loss_agg=agg, max_new_tokens=4, batch_size=1)  # B = 1 group of G = 2
    loss, st = g.grpo_loss(lp, lp_old, None, adv, mask, a, group_size=2)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert st["clip_ratio/high_mean"] == pytest.approx(1 / 5)  # 1.5 > 1.2 with Â > 0
    assert st["clip_ratio/low_mean"] == pytest.approx(1 / 5)  # 0.5 < 0.8 with Â < 0
    assert st["kl"] == 0.0


def test_loss_with_k3_kl_by_hand():
    lp, lp_old, mask, adv = _loss_case()
    lp_ref = lp.clone()
    lp_ref[0, 0] += math.log(2)  # D = 2 - ln 2 - 1 on that token, 0 elsewhere
    D = 1 - math.log(2)
    loss, st = g.grpo_loss(lp, lp_old, lp_ref, adv, mask, A(beta=0.1), group_size=2)
    row0 = (1.2 - 0.1 * D + 0.5 + 1.0) / 3
    assert loss.item() == pytest.approx(-(row0 - 0.95) / 2, abs=1e-6)
    assert st["kl"] == pytest.approx(D / 5, abs=1e-6)


def test_k3_kl_is_nonnegative_and_dapo_clip_higher():
    torch.manual_seed(0)
    lp, ref = -torch.rand(50, 7) * 5, -torch.rand(50, 7) * 5
    d = ref - lp
    assert ((torch.exp(d) - d - 1) >= 0).all()
    # clip-higher: a ratio of 1.25 is clipped at eps_high = 0.2 but not at 0.28
    lp_old = torch.zeros(1, 1)
    one = torch.ones(1, 1, dtype=torch.bool)
    lp1 = torch.full((1, 1), math.log(1.25))
    _, st = g.grpo_loss(lp1, lp_old, None, torch.ones(1), one, A(), 1)
    _, st_dapo = g.grpo_loss(lp1, lp_old, None, torch.ones(1), one, A(eps_high=0.28), 1)
    assert st["clip_ratio/high_mean"] == 1.0 and st_dapo["clip_ratio/high_mean"] == 0.0


def test_mu1_gradient_is_advantage_times_grad_logprob():
    # At μ=1 the ratio is 1 in value; its gradient is Â ∇ℓ (Eq. G7).
    lp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    loss, _ = g.grpo_loss(lp, lp.detach(), None, torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool),
                          A(loss_agg="dapo"), 1)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -1.0]]))  # -(Â / Σ|o|) per token


# ------------------------------------------------------------------ runs on a tiny toy world
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    world = build_toy_world({"train": 8, "dev": 4, "test-seen": 4, "test-unseen": 4}, root=str(root),
                            progress=False)
    build_toy_asr(vocabulary(), d_enc=32, enc_layers=1, d_lm=32, lm_layers=1).save(str(root / "init"))
    return world, str(root / "init")


def _run_args(tiny, out, **kw):
    world, init = tiny
    base = dict(data=world["train"], dev_data=world["dev"],
                test_data=[world["test-seen"], world["test-unseen"]], init=init, out_dir=str(out),
                steps=2, batch_size=2, group_size=3, max_new_tokens=6,
                lr=1e-2, eval_every=1)
    return g.Args(**{**base, **kw})


def _spread_rewards(monkeypatch):
    """A random model's samples all score alike (6 random words, no eos), so every group is
    all-equal and nothing moves; a seeded random term gives the groups spread."""
    rng, real = random.Random(0), g.total_reward
    monkeypatch.setattr(g, "total_reward", lambda terms, a: real(terms, a) + rng.random())


def test_two_step_smoke_changes_the_lm_only(tiny, tmp_path, monkeypatch):
    _spread_rewards(monkeypatch)
    s = g.main(_run_args(tiny, tmp_path))
    before = load_file(tiny[1] + "/model.safetensors")
    after = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("lm."))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("lm."))
    assert set(s["before"]) == set(s["after"]) == {"test-seen", "test-unseen"}
    assert set(s["before"]["test-seen"]) >= {"wer", "sub", "del", "ins", "halluc", "kw_recall"}
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "rewards/acc/mean", "frac_reward_zero_std", "kl",
                "clip_ratio/low_mean", "entropy", "completions/mean_length", "completions/clipped_ratio",
                "sampling_tok_s", "update_tok_s", "peak_mem_mb", "grad_norm"):
        assert key in rows[0], key
    assert all(r["grad_norm"] > 0 for r in rows)  # the spread rewards move the LM at both steps
    # step 1: π_θ = π_old = π_ref, dropout off -> ρ = 1 (nothing clipped) and KL = 0
    assert rows[0]["kl"] < 1e-6 and rows[0]["clip_ratio/region_mean"] == 0.0
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["final"].endswith("best") and saved["steps"] == 2


def test_qwen2_audio_is_a_policy_of_the_same_loop(tiny, tmp_path, monkeypatch):
    """--qwen2_audio DIR: Qwen2-Audio's tower, projector and LM, trained by the same loop;
    only the LM moves, and the saved checkpoint loads back as a SpeechLLM."""
    _spread_rewards(monkeypatch)
    qdir = make_tiny_qwen2_audio(str(tmp_path / "q2a"), vocabulary(), seconds=8)
    s = g.main(_run_args(tiny, tmp_path / "run", init="", qwen2_audio=qdir))
    assert s["init"] == qdir and s["steps"] == 2
    load_qwen2_audio(qdir).save(str(tmp_path / "start"))
    start = load_file(str(tmp_path / "start" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert set(after) == set(start)
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("lm."))
    assert all(torch.equal(start[k], after[k]) for k in start if not k.startswith("lm."))
    assert SpeechLLM.load(str(tmp_path / "run" / "last")).cfg["encoder"] == "qwen2audio"


def test_beta_zero_never_builds_a_reference(tiny, tmp_path, monkeypatch):
    def no_reference(_):
        raise AssertionError("a reference model was built")
    monkeypatch.setattr(g, "reference_model", no_reference)
    g.main(_run_args(tiny, tmp_path / "a", steps=1, beta=0.0))
    with pytest.raises(AssertionError, match="reference"):
        g.main(_run_args(tiny, tmp_path / "b", steps=1, beta=0.1))


def test_eval_only_and_selection(tiny, tmp_path):
    world, init = tiny
    s = g.main(g.Args(eval_only=True, init=init, test_data=[world["test-seen"]], out_dir=str(tmp_path),
                      data=world["train"], max_new_tokens=4))
    assert set(json.load(open(tmp_path / "summary.json"))["test"]) == {"test-seen"} == set(s["test"])
    for mode in ("random", "hard", "short", "keyword"):
        out = tmp_path / f"{mode}.jsonl"
        g.main(_run_args(tiny, tmp_path, select=mode, select_out=str(out), select_n=5, max_duration=2.0))
        rows = [json.loads(x) for x in open(out)]
        assert 0 < len(rows) <= 5 or mode == "short"
        if mode == "short":
            assert all(r["duration"] < 2.0 for r in rows)
        if mode == "keyword":
            counts = [len(r["keywords"]) for r in rows]
            assert counts == sorted(counts, reverse=True) and counts[0] > 0


def test_learning_reward_rises(tiny, tmp_path):
    """On a tiny task (8 utterances, a random tiny model) the mean reward rises."""
    torch.manual_seed(0)
    g.main(_run_args(tiny, tmp_path, steps=40, batch_size=4, group_size=8, lr=3e-3, beta=0.0,
                     eval_every=40, max_new_tokens=8))
    r = [json.loads(x)["reward"] for x in open(tmp_path / "metrics.jsonl")]
    assert sum(r[-8:]) / 8 > sum(r[:8]) / 8 + 0.5, r


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    """Weights, rewards, the skip counts (every 3rd reward NaN here) and the clock go on."""
    nan_every_third_reward(monkeypatch, g)  # B*G = 6 per step
    sa = g.main(_run_args(tiny, tmp_path / "a", steps=4, eval_every=2))
    g.main(_run_args(tiny, tmp_path / "b", steps=2, eval_every=2))
    sb = g.main(_run_args(tiny, tmp_path / "b", steps=4, eval_every=2))  # resumes at step 3
    assert sa["skipped"] == sb["skipped"] == {"non-finite reward (advantage 0)": 8}
    t = [json.loads(x)["time_s"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert t == sorted(t) and sb["wall_s"] >= round(t[-1], 1), t  # wall_s is rounded to 0.1 s
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra = [json.loads(x)["reward"] for x in open(tmp_path / "a" / "metrics.jsonl")]
    rb = [json.loads(x)["reward"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert ra == rb and len(ra) == 4
    with pytest.raises(SystemExit, match=r"--lr 0.01 -> 0.001"):  # another run's flags: refused, named
        g.main(_run_args(tiny, tmp_path / "b", steps=6, eval_every=2, lr=1e-3))


def test_options_run_end_to_end(tiny, tmp_path, monkeypatch):
    """μ = 2 inner updates (ρ moves off 1 on the second), Dr.GRPO scaling and aggregation,
    clip-higher, and dropping all-equal groups, together for two steps, with a batch larger
    than the RL set. --cuda_graph (on by
    default) reaches the sampler only on CUDA; --compile_sampler reaches it as given."""
    graph_args, real_sample = [], g.sample
    monkeypatch.setattr(g, "sample",
                        lambda *x, **k: graph_args.append((k["cuda_graph"], k["compiled"]))
                        or real_sample(*x, **k))
    s = g.main(_run_args(tiny, tmp_path, mu=2, scale="none", loss_agg="dr_grpo", eps_high=0.28,
                         drop_zero_std=True, temperature=1.5, top_k=5, top_p=0.9, compile_sampler=True,
                         batch_size=10))
    assert s["args"]["batch_size"] == 8  # B is what the 8 training utterances allow (Dr.GRPO's constant)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["completions/max_length"] <= 6 for r in rows)
    # dropped groups: a step whose groups are all equal makes no update (no loss logged)
    assert all(("loss" in r) == (r["frac_reward_zero_std"] < 1.0) for r in rows)
    assert graph_args == [(False, True)] * 2  # device cpu: no CUDA graph, whatever the flag


def test_nan_reward_is_named_counted_and_the_run_goes_on(tiny, tmp_path, monkeypatch, caplog):
    nan_every_third_reward(monkeypatch, g)  # B*G = 6 per step
    with caplog.at_level("WARNING", logger="speechrl"):
        s = g.main(_run_args(tiny, tmp_path))
    assert s["skipped"]["non-finite reward (advantage 0)"] == 4  # 2 steps x 6 samples, every 3rd
    assert any("manifest.jsonl:" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_reference_reads_its_own_embedding_table(tiny):
    """After the policy's token table moves, π_ref's inputs must not move with it."""
    model = g.SpeechLLM.load(tiny[1])
    ref = g.reference_model(model.lm)
    audio, lens = torch.randn(1, 3, 32), torch.tensor([3])
    before = model.build_inputs(audio, lens, [[5, 6]], ref)[0]
    with torch.no_grad():
        model.lm.get_input_embeddings().weight.add_(1.0)
    torch.testing.assert_close(model.build_inputs(audio, lens, [[5, 6]], ref)[0], before)
    assert not torch.equal(model.build_inputs(audio, lens, [[5, 6]])[0], before)
