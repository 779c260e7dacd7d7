"""grpo_tts.py and sft_tts.py: rewards T1-T4 against hand-worked numbers and their edge
cases, the log-probs over the output slice, a tiny TTS world built end to end, a smoke run,
eval-only on a text-only manifest, bad prompts, resume, and a learning test."""
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import nan_every_third_reward
from safetensors.torch import load_file

import grpo_tts as g
import sft_tts
from common.audio import f0_gap, f0_stats, voiced_f0
from common.toy import vocabulary
from common.tts import build_toy_tts


def A(**kw):
    return g.Args(**kw)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own $SPEECHRL_CACHE, so the SFT start's cached figures never leak across."""
    monkeypatch.setenv("SPEECHRL_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------ rewards (SPEC §3)
def test_accuracy_reward_is_clipped_cer():
    assert g.reward_accuracy("abcd", "abxd") == pytest.approx(0.75)  # 1 sub over 4 characters
    assert g.reward_accuracy("one two", "") == 0.0  # empty transcript: CER 1
    assert g.reward_accuracy("ab", "abxyzw") == 0.0  # CER 2 -> clipped to 0
    assert g.reward_accuracy("one", "o n e") == 1.0  # spaces are not characters


def test_duration_reward_against_group_median():
    r = g.reward_duration([40, 50, 60, 150])  # median 55
    assert r == pytest.approx([-15 / 55, -5 / 55, -5 / 55, -1.0])  # -95/55 clipped at -1


def test_token_diversity_by_hand():
    d = g.token_diversity([[1, 2, 3], [1, 2, 4], [1, 2, 3]])
    assert d == pytest.approx([1 / 6, 1 / 3, 1 / 6])  # 1 substitution in 3 tokens to the odd one
    assert g.token_diversity([[5, 6], [5, 6]]) == [0.0, 0.0]
    assert g.token_diversity([[1, 2, 3, 4], [1, 2]]) == pytest.approx([0.5, 0.5])  # 2 edits / max len 4


def test_pitch_diversity_of_steady_and_gliding_tones():
    t = torch.arange(16000) / 16000
    steady = 0.5 * torch.sin(2 * torch.pi * 150 * t)
    glide = 0.5 * torch.sin(2 * torch.pi * (100 * t + 100 * t**2))  # 100 Hz -> 300 Hz
    assert g.pitch_diversity(steady, 50.0) < 0.2 < g.pitch_diversity(glide, 50.0)
    assert g.pitch_diversity(torch.zeros(16000), 50.0) == 0.0  # silence: no voiced frames
    pause = torch.cat([steady, 1e-3 * torch.randn(8000), steady])  # a pause is not pitch movement
    assert g.pitch_diversity(pause, 50.0) < 0.2


def test_f0_statistics_of_tones_and_pauses(tmp_path):
    """Median F0 and pitch movement (interquartile range in semitones): 150 Hz for a third,
    300 Hz for two thirds, with a quiet pause between them, span one octave: 12 st."""
    t = torch.arange(8000) / 16000
    tone = lambda hz: 0.5 * torch.sin(2 * torch.pi * hz * t)  # noqa: E731
    quiet = 1e-3 * torch.randn(8000)  # the detector finds 120-160 Hz in this noise: not voiced
    med, move = f0_stats(torch.cat([tone(200), tone(200), quiet, tone(200)]))
    assert abs(med - 200) < 4 and move < 0.5
    v = voiced_f0(torch.cat([tone(150), quiet, tone(300), tone(300)]))
    assert len(v) > 100 and ((v - 150).abs() < 6).sum() > 35 and ((v - 300).abs() < 12).sum() > 70
    assert abs(f0_stats(torch.cat([tone(150), quiet, tone(300), tone(300)]))[1] - 12) < 0.5
    assert f0_stats(torch.zeros(16000)) is None and f0_stats(tone(200)[:2000]) is None  # silent, short
    sf.write(tmp_path / "p.wav", tone(200).numpy(), 16000)  # (in a 16-bit file, 300 Hz reads as 150)
    gap = f0_gap(f0_stats(torch.cat([tone(100), tone(100)])), str(tmp_path / "p.wav"))  # 100 Hz vs 200 Hz
    assert gap == pytest.approx(12, abs=0.3)  # an octave
    assert g.mean([1.0, None, 3.0]) == 2.0 and g.mean([None]) is None


def test_group_rewards_edge_cases():
    K = 10
    mel = torch.zeros(8, 80)
    outs = [[1, 2, K], [1, 2, 3], [K], [4, 4, K]]  # fine, no eos, no audio, empty transcript
    ended = [True, False, True, True]
    mels = [mel, mel, None, mel]
    hyps = ["one", "one", "", ""]
    terms = g.group_rewards("one", outs, ended, hyps, mels, [0.9, 0.9, 0.0, 0.5], A(w_dur=1.0))
    assert terms[0] == {"acc": 1.0, "dur": 0.0, "fail": 0.0, "sim": 0.9}  # median of the valid: 2
    floor = {"acc": 0.0, "dur": -1.0, "sim": -1.0, "fail": 1.0}  # only the active terms (no T3 here)
    assert terms[1] == floor == terms[2]  # no eos / no audio: the lowest reward
    assert terms[3]["acc"] == 0.0 and terms[3]["fail"] == 0.0  # empty transcript: CER 1, not 0
    assert g.total_reward(terms[0], A(w_dur=1.0, w_sim=0.5)) == pytest.approx(1.45)
    assert g.total_reward(terms[1], A(w_dur=1.0, w_sim=0.5)) == pytest.approx(-1.5)  # the floor


def test_diversity_counts_only_the_valid_outputs_speech_tokens():
    """T3's token term compares an output with the others that count (eos and audio), on
    speech tokens only: a runaway sample must not make its group look diverse."""
    K = 10
    outs = [[1, 2, K], [1, 3, K], [1, 2, 3]]  # the third has no eos
    mels = [torch.full((8, 80), -20.0)] * 3  # 8 frames: too short for F0, so pitch diversity is 0
    terms = g.group_rewards("one", outs, [True, True, False], ["one"] * 3, mels, None, A(w_div=1.0))
    assert [t["div"] for t in terms] == pytest.approx([0.25, 0.25, 0.0])  # (1 edit / 2 tokens + 0) / 2


def test_identical_group_gets_zero_advantage():
    terms = g.group_rewards("one", [[1, 10]] * 4, [True] * 4, ["one"] * 4, [torch.zeros(4, 80)] * 4, None,
                            A(w_dur=1.0))
    r = torch.tensor([[g.total_reward(t, A(w_dur=1.0)) for t in terms]])
    adv, zero = g.group_advantages(r, "group")
    assert zero.tolist() == [True] and torch.equal(adv, torch.zeros(1, 4))


def test_advantages_and_loss_by_hand():
    adv, _ = g.group_advantages(torch.tensor([[1.0, 2.0, 3.0]]), "group")  # std 1 (unbiased)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0, 1.0]]) / (1 + 1e-4))
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    a = A(batch_size=1, group_size=2, beta=0.0, max_new_tokens=3)  # longest output: 3 tokens, eos included
    for agg, want in (("grpo", -(1.0 + -1.0) / 2), ("dapo", -(3 * 1.0 - 1.0) / 4),
                      ("dr_grpo", -(3 - 1) / (2 * 3))):
        a.loss_agg = agg
        loss, st = g.grpo_loss(lp, lp, None, torch.tensor([1.0, -1.0]), mask, a)
        assert loss.item() == pytest.approx(want), agg
        assert st["kl"] == 0.0 and st["clip_ratio/low_mean"] == 0.0


def test_logprobs_cover_the_output_slice_exactly():
    """ℓ from the fused kernel = log_softmax over speech tokens + eos of a plain forward, at
    the emitted positions only."""
    torch.manual_seed(0)
    lm = build_toy_tts(vocabulary(), n_speech=12, d=32, layers=1, heads=2).eval()
    prompts = [lm.prompt("one", "two three", [3, 4]), lm.prompt("", "five", [7])]
    outs = [[1, 2, 12], [5, 12]]
    lp, ent = g.sequence_logprobs(lm, lm.lm, prompts, outs, A(device="cpu", bf16=False))
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        ids = torch.tensor([p + [lm.offset + t for t in o[:-1]]])
        logits = lm.lm(input_ids=ids).logits[0, len(p) - 1:, lm.out_slice[0]: lm.out_slice[1]]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(o)[:, None]).squeeze(1)
        torch.testing.assert_close(lp[i, : len(o)], want, atol=1e-5, rtol=1e-5)
    assert lp[1, 2] == 0.0 and ent.shape == lp.shape


# ------------------------------------------------------------------ a tiny TTS world, end to end
TINY = {"train": 60, "dev": 6, "test-seen": 6, "test-unseen": 6, "rl": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ttsworld")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEECHRL_CACHE", str(root))
        mp.setattr(sft_tts, "TTS_SIZES", TINY)
        # a step cap, not a time budget: the same tiny world on any machine
        a = sft_tts.Args(n_tokens=32, t2m_d=32, t2m_blocks=2, lm_d=32, lm_layers=1, eval_every=10,
                         batch_size=8, judge_batch=8, max_steps=20, threads=2, side_by_side=True)
        paths = sft_tts.build_tts_world(a)
        assert sft_tts.build_tts_world(a) == paths  # cached: the second call builds nothing
        # upto: another TTS LM setting, built only up to the judges, reuses them and stops there
        part = sft_tts.build_tts_world(dataclasses.replace(a, lm_lr=a.lm_lr / 2), upto="judges")
        assert part["reward_asr"] == paths["reward_asr"]
        assert part["tts_lm"] != paths["tts_lm"] and not os.path.exists(part["tts_lm"])
        # --side_by_side false: one stage after another in this process (new judges, then that LM)
        one_by_one = dataclasses.replace(a, judge_batch=4, lm_lr=a.lm_lr / 2, side_by_side=False)
        seq = sft_tts.build_tts_world(one_by_one)
        assert seq["reward_asr"] != paths["reward_asr"] and seq["tts_lm"] == part["tts_lm"]
        assert all(os.path.isfile(os.path.join(seq[k], "model.safetensors")) for k in ("eval_asr", "tts_lm"))
    return paths


def test_audio_stages_ran_beside_the_lm(world):
    """With two threads the fixture's build trained token2wav and the judges in a second
    process (its output in a log beside the stages) while this one trained the LM."""
    log = open(os.path.join(os.path.dirname(os.path.dirname(world["tts_lm"])), "audio-stages.log")).read()
    assert "stage token2wav:" in log and "stage judges:" in log and "stage tts_lm" not in log


def test_a_failed_audio_stage_names_its_log(world, tmp_path):
    a = sft_tts.Args(n_tokens=32, lm_d=32, lm_layers=1, batch_size=8, judge_batch=8, max_steps=2,
                     eval_every=2, threads=2, side_by_side=True)
    dirs = {s: str(tmp_path / s) for s in sft_tts.STAGES}
    paths = {"tokens": world["tokens"], "token2mel": str(tmp_path / "no_token2mel")}  # the judges need it
    with pytest.raises(RuntimeError, match="judges failed .*audio-stages.log"):
        sft_tts._build_stages(a, ["judges", "tts_lm"], world["world"], dirs, paths)
    assert os.path.isfile(os.path.join(dirs["tts_lm"], "done.json"))  # the LM beside it finished
    assert not os.path.exists(os.path.join(dirs["judges"], "done.json"))
    assert "no_token2mel" in open(tmp_path / "audio-stages.log").read()  # the child's traceback


def test_lm_bf16_trains_the_tts_lm_under_autocast(world, tmp_path, monkeypatch):
    """--lm_bf16 runs the LM's training forward under CPU bf16 autocast (and only then):
    the same seeded steps give other weights than fp32, and the dev NLL stays fp32."""
    from safetensors.torch import load_file as load

    splits = {n: sft_tts.load_split(os.path.join(world["world"], n, "manifest.jsonl"), sft_tts.Skips())
              for n in ("train", "dev")}
    tokens = json.load(open(world["tokens"]))
    seen = []
    real = torch.autocast

    def spy(*args, **kw):
        seen.append(kw.get("enabled", True))
        return real(*args, **kw)
    monkeypatch.setattr(sft_tts.torch, "autocast", spy)
    weights = {}
    for bf16 in (True, False):
        a = sft_tts.Args(n_tokens=32, lm_d=32, lm_layers=1, batch_size=8, max_steps=3, eval_every=3,
                         lm_bf16=bf16)
        rep = sft_tts.build_tts_lm(a, str(tmp_path / str(bf16)), splits, tokens)
        assert isinstance(rep["best_dev"], float) and math.isfinite(rep["best_dev"])
        weights[bf16] = load(str(tmp_path / str(bf16) / "tts_lm" / "model.safetensors"))
    assert seen == [True] * 3 + [False] * 3  # one autocast per training step, on only with the flag
    assert any(not torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_the_tts_lm_trains_for_its_step_budget_whatever_the_clock(world, tmp_path, monkeypatch):
    """The TTS LM's budget and cosine are in steps (--lm_steps), not minutes: a clock that
    jumps an hour per reading (a very slow CPU) still gets every step of the budget."""
    splits = {n: sft_tts.load_split(os.path.join(world["world"], n, "manifest.jsonl"), sft_tts.Skips())
              for n in ("train", "dev")}
    tokens = json.load(open(world["tokens"]))
    clock = iter(range(0, 10**9, 3600))
    monkeypatch.setattr(sft_tts.time, "time", lambda: float(next(clock)))
    a = sft_tts.Args(n_tokens=32, lm_d=32, lm_layers=1, batch_size=8, lm_steps=5, eval_every=2, patience=99)
    rep = sft_tts.build_tts_lm(a, str(tmp_path), splits, tokens)
    assert rep["steps"] == 5 and rep["stopped"] == "budget"
    assert [h["step"] for h in rep["history"]] == [2, 4, 5]


@pytest.mark.parametrize("stage, renamed", [("tokenizer", [True] * 4),
                                            ("token2wav", [False, True, True, False]),
                                            ("judges", [False, False, True, False]),
                                            ("tts_lm", [False, False, False, True])])
def test_a_stage_change_renames_it_and_the_stages_that_read_it(monkeypatch, stage, renamed):
    a = sft_tts.Args()
    before = [sft_tts.cached(a, "w", s) for s in sft_tts.STAGES]
    monkeypatch.setitem(sft_tts.STAGE_VERSIONS, stage, sft_tts.STAGE_VERSIONS[stage] + 1)
    after = [sft_tts.cached(a, "w", s) for s in sft_tts.STAGES]
    assert [b != c for b, c in zip(before, after, strict=True)] == renamed
    a.judge_steps += 1  # a setting of the judges: the LM keeps its folder
    assert sft_tts.cached(a, "w", "tts_lm") == after[3] and sft_tts.cached(a, "w", "judges") != after[2]


@pytest.mark.parametrize("steps, max_steps, ran", [(7, 0, 7), (7, 4, 4), (0, 5, 5)])
def test_a_step_budget_ends_the_stage_and_its_cosine(steps, max_steps, ran):
    # token2wav and the judges train for steps, not minutes: the same models at any thread count
    w = torch.nn.Parameter(torch.zeros(()))
    lrs: list[float] = []  # the learning rate of every step
    real = torch.optim.AdamW.step

    def spy(self, *args, **kw):
        lrs.append(self.param_groups[0]["lr"])
        if len(lrs) > 100:  # fail, not hang for the 60 minutes, if the step budget is ignored
            raise RuntimeError("the stage ran past its step budget")
        return real(self, *args, **kw)

    def dev_fn():  # always improving: only the budget stops the stage
        return 1.0 / (1 + len(lrs))

    a = sft_tts.Args(eval_every=1, max_steps=max_steps, patience=99)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", spy)
        rep = sft_tts.train_until_plateau("t", [w], lambda: (w - 1) ** 2, dev_fn, a, 1.0, lambda: None,
                                          steps=steps, minutes=60.0)
    assert rep["steps"] == ran and rep["stopped"] == "budget" and len(lrs) == ran
    # warmup (step/100) times the cosine, which reaches its floor (0.1) at the last step
    assert lrs[-1] == pytest.approx(ran / 100 * 0.1)
    assert lrs[0] == pytest.approx(0.01 * (0.1 + 0.45 * (1 + math.cos(math.pi / ran))))


def _args(w, out, **kw):
    split = {s: os.path.join(w["world"], s, "manifest.jsonl") for s in TINY}
    first = json.loads(open(split["dev"]).readline())
    base = dict(prompt_audio=os.path.join(w["world"], "dev", first["audio"]), prompt_text=first["text"],
                init=w["tts_lm"], tokenizer=w["tokenizer"], token2mel=w["token2mel"],
                reward_asr=w["reward_asr"],
                eval_asr=w["eval_asr"], speaker_model=w["speaker"], data=split["rl"], dev_data=split["dev"],
                test_data=[split["test-seen"], split["test-unseen"]], out_dir=str(out), steps=2, batch_size=2,
                group_size=3, max_new_tokens=12, lr=1e-3, eval_every=1, audio_every=1, n_audio=2,
                device="cpu",
                bf16=False, threads=1)
    return g.Args(**{**base, **kw})


def test_world_stages_are_saved_and_each_can_be_rebuilt(world):
    for k in ("tokenizer", "token2mel", "reward_asr", "eval_asr", "speaker", "tts_lm"):
        assert os.path.isfile(os.path.join(world[k], "model.safetensors")), k
    done = json.load(open(os.path.join(os.path.dirname(world["tokens"]), "done.json")))
    assert done["report"]["codes_used"] > 1 and done["report"]["skipped"] == {}  # no bad item here
    tokens = json.load(open(world["tokens"]))
    assert set(tokens) == set(TINY) and len(tokens["train"]) == TINY["train"]


def test_the_tokenizer_report_totals_the_bad_items_of_every_split(world, tmp_path, monkeypatch):
    """A copy of the tiny corpus with four bad lines: the tokenizer stage names each, skips it,
    tokenises the rest and totals them by reason in its report (done.json)."""
    corpus = shutil.copytree(world["world"], tmp_path / os.path.basename(world["world"]))
    sf.write(corpus / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    good = json.loads(open(corpus / "dev" / "manifest.jsonl").readline())
    with open(corpus / "train" / "manifest.jsonl", "a") as f:
        f.write('{"key": "cut off\n')
        f.write(json.dumps({**good, "key": "gone", "audio": "../nowhere.wav"}) + "\n")
        f.write(json.dumps({**good, "key": "silent", "audio": "../empty.wav"}) + "\n")
    with open(corpus / "test-unseen" / "manifest.jsonl", "a") as f:
        f.write(json.dumps({**good, "key": "no words", "text": "  "}) + "\n")
    monkeypatch.setenv("SPEECHRL_CACHE", str(tmp_path))
    monkeypatch.setattr(sft_tts, "TTS_SIZES", TINY)
    paths = sft_tts.build_tts_world(sft_tts.Args(n_tokens=32, max_steps=20), upto="tokenizer")
    done = json.load(open(os.path.join(os.path.dirname(paths["tokens"]), "done.json")))
    assert done["report"]["skipped"] == {"bad audio": 1, "empty transcript": 1, "malformed JSON line": 1,
                                         "missing audio file": 1}
    tokens = json.load(open(paths["tokens"]))
    assert {n: len(t) for n, t in tokens.items()} == TINY  # every good line, no bad one


def test_two_step_smoke_changes_the_policy(world, tmp_path):
    s = g.main(_args(world, tmp_path, w_dur=0.5, w_div=0.5, w_sim=0.5))
    before = load_file(os.path.join(world["tts_lm"], "model.safetensors"))
    after = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert set(s["before"]) == set(s["after"]) == set(s["resynth_cer"]) == {"test-seen", "test-unseen"}
    assert set(s["before"]["test-seen"]) >= {"cer", "wer", "sim", "dur_ratio", "no_eos", "cer_by_voice",
                                              "f0_hz", "f0_iqr_st", "f0_gap_st"}
    assert set(s["f0_gap_st_floor"]["test-seen"]) == {"real", "resynth"}
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "rewards/acc/mean", "rewards/dur/mean", "rewards/div/mean",
                "rewards/sim/mean", "frac_reward_zero_std", "kl", "clip_ratio/low_mean", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "sampling_tok_s", "update_tok_s",
                "peak_mem_mb", "grad_norm"):
        assert key in rows[0], key
    assert all(r["grad_norm"] > 0 for r in rows)
    assert rows[0]["kl"] < 1e-6  # step 1: π_θ = π_ref
    # μ = 1: ℓ(old) is this step's ℓ detached, so ρ = 1 and nothing is clipped at any step
    assert all(r["clip_ratio/low_mean"] == r["clip_ratio/high_mean"] == 0.0 for r in rows)
    for step in ("step_0000", "step_0001", "step_0002"):
        assert len(os.listdir(tmp_path / "audio" / step)) >= 1, step
    assert json.load(open(tmp_path / "summary.json"))["final"].endswith("best")


def test_eval_only_text_manifest_and_bad_prompt(world, tmp_path):
    dev = [json.loads(x) for x in open(os.path.join(world["world"], "dev", "manifest.jsonl"))]
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype="float32"), 16000)
    with open(tmp_path / "texts.jsonl", "w") as f:
        f.write(json.dumps({"key": "a", "text": "alpha bravo two"}) + "\n")  # default prompt voice
        f.write(json.dumps({"key": "b", "text": "monday at nine"}) + "\n")
        f.write(json.dumps({"key": "c", "text": "one", "prompt_audio": str(tmp_path / "silent.wav"),
                            "prompt_text": "two"}) + "\n")
    prompt = os.path.join(world["world"], "dev", dev[0]["audio"])
    with open(tmp_path / "texts.jsonl", "a") as f:  # a prompt with no transcript: the LM would misread it
        f.write(json.dumps({"key": "d", "text": "one", "prompt_audio": prompt}) + "\n")
    with pytest.raises(SystemExit, match="--prompt_text"):
        g.main(_args(world, tmp_path / "out", eval_only=True, test_data=[str(tmp_path / "texts.jsonl")],
                     prompt_audio=prompt, prompt_text=""))
    s = g.main(_args(world, tmp_path / "out", eval_only=True, test_data=[str(tmp_path / "texts.jsonl")],
                     prompt_audio=prompt, prompt_text=dev[0]["text"]))
    (res,) = s["test"].values()  # named after the manifest's folder
    assert res["n"] == 2  # the silent prompt is skipped and counted
    saved = json.load(open(tmp_path / "out" / "summary.json"))
    assert saved["skipped"] == {"bad audio": 1, "prompt without text": 1}
    wavs = sorted(os.listdir(tmp_path / "out" / "audio"))
    assert set(wavs) <= {"a.wav", "b.wav"}
    for w in wavs:
        assert sf.info(str(tmp_path / "out" / "audio" / w)).samplerate == 16000
    # a second manifest in the same folder, with the same key
    (tmp_path / "more.jsonl").write_text(json.dumps({"key": "a", "text": "one two"}) + "\n")
    s = g.main(_args(world, tmp_path / "two", eval_only=True, prompt_audio=prompt, prompt_text=dev[0]["text"],
                     test_data=[str(tmp_path / "texts.jsonl"), str(tmp_path / "more.jsonl")]))
    assert sorted(s["test"]) == ["more", "texts"]  # named by their stems, neither lost
    assert (tmp_path / "two" / "audio" / "texts" / "a.wav").exists()  # one folder per set: no overwrite
    assert (tmp_path / "two" / "audio" / "more" / "a.wav").exists()


def test_conditions_pick_each_lines_prompt_voice(world, tmp_path):
    """A line's prompt is its own prompt_audio, else the next line of its speaker (wrapping
    round), else the default voice; a line with none of them is named, counted and left out."""
    from common.data import Skips
    from common.tts import conditions, load_module

    dev = [json.loads(x) for x in open(os.path.join(world["world"], "train", "manifest.jsonl"))]
    path = lambda u: os.path.join(world["world"], "train", u["audio"])  # noqa: E731
    voice = dev[0]["speaker"]
    same = [u for u in dev if u["speaker"] == voice][:2]
    other = next(u for u in dev if u["speaker"] != voice)
    lines = [{"key": "x", "text": same[0]["text"], "speaker": voice, "audio": path(same[0])},
             {"key": "y", "text": same[1]["text"], "speaker": voice, "audio": path(same[1])},
             {"key": "z", "text": "one two", "speaker": "nobody"},
             {"key": "w", "text": "three", "prompt_audio": path(other), "prompt_text": other["text"]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    lm, tok = load_module(world["tts_lm"]), load_module(world["tokenizer"])
    skips = Skips()
    cs = conditions(str(tmp_path / "m.jsonl"), lm, tok, skips)
    assert [c.utt.key for c in cs] == ["x", "y", "w"] and skips.as_dict() == {"no prompt voice": 1}
    assert [c.prompt_audio for c in cs] == [path(same[1]), path(same[0]), path(other)]
    assert [c.voice for c in cs] == [voice, voice, "own prompt"]  # per-voice figures use the voice spoken
    assert cs[0].ref_len is not None and cs[2].ref_len is None  # token count only where audio exists
    assert cs[0].prompt_ids == lm.prompt(same[1]["text"], same[0]["text"],
                                         tok.encode(cs[0].prompt_mel).tolist())  # CosyVoice 2 layout
    cs = conditions(str(tmp_path / "m.jsonl"), lm, tok, Skips(), path(other), other["text"])
    assert [(c.prompt_audio, c.voice) for c in cs if c.utt.key == "z"] == [(path(other), "default voice")]


def test_resume_continues_exactly(world, tmp_path, monkeypatch):
    """Weights, the skip counts (every 3rd reward NaN here) and the clock go on."""
    nan_every_third_reward(monkeypatch, g)  # B*G = 6 per step
    sa = g.main(_args(world, tmp_path / "a", steps=4, eval_every=2, audio_every=10))
    g.main(_args(world, tmp_path / "b", steps=2, eval_every=2, audio_every=10))
    sb = g.main(_args(world, tmp_path / "b", steps=4, eval_every=2, audio_every=10))  # resumes at step 3
    assert sa["skipped"] == sb["skipped"] == {"non-finite reward (advantage 0)": 8}
    t = [json.loads(x)["time_s"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert t == sorted(t) and sb["wall_s"] >= round(t[-1], 1), t  # wall_s is rounded to 0.1 s
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(SystemExit, match=r"--beta 0.1 -> 0.0"):  # another run's flags: refused, named
        g.main(_args(world, tmp_path / "b", steps=6, eval_every=2, audio_every=10, beta=0.0))


def test_learning_reward_rises(world, tmp_path):
    """On the tiny world the mean reward rises: the barely trained LM mostly runs past the
    length limit (the floor reward), and GRPO teaches it to end its speech."""
    g.main(_args(world, tmp_path, steps=80, batch_size=4, group_size=6, lr=3e-3, beta=0.0, eval_every=80,
                 audio_every=100, w_dur=0.5, max_new_tokens=10))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    r = [x["reward"] for x in rows]
    assert sum(r[-10:]) / 10 > sum(r[:10]) / 10 + 0.25, [round(x, 2) for x in r]


def test_options_run_end_to_end(world, tmp_path, monkeypatch):
    """The reward ASR on Griffin-Lim audio, μ = 2, batch scaling, DAPO aggregation with
    clip-higher, top-k/top-p, sampled evaluation and dropping all-equal groups, together for
    two steps; a batch larger than the RL set, and a text-only test set (no floor, no
    duration ratio)."""
    graph_args, real_sample = [], g.sample  # --cuda_graph (on by default) reaches the sampler only on CUDA
    monkeypatch.setattr(g, "sample",
                        lambda *x, **k: graph_args.append((k["cuda_graph"], k["compiled"]))
                        or real_sample(*x, **k))
    texts = tmp_path / "texts" / "manifest.jsonl"
    texts.parent.mkdir()
    texts.write_text(json.dumps({"key": "a", "text": "alpha bravo two"}) + "\n")
    seen = os.path.join(world["world"], "test-seen", "manifest.jsonl")
    s = g.main(_args(world, tmp_path, reward_on="wav", mu=2, scale="batch", loss_agg="dapo", eps_high=0.28,
                     top_k=8, top_p=0.9, eval_temperature=0.7, audio_every=10, drop_zero_std=True,
                     batch_size=TINY["rl"] + 2, test_data=[seen, str(texts)], compile_sampler=True))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["completions/max_length"] <= 12 for r in rows)  # eos within the 12
    assert all(0.0 <= r["rewards/acc/mean"] <= 1.0 for r in rows)
    assert s["after"]["test-seen"]["n"] == TINY["test-seen"] and s["after"]["texts"]["n"] == 1
    assert s["args"]["batch_size"] == TINY["rl"]  # B is what the RL set allows (Dr.GRPO's constant)
    assert s["resynth_cer"]["texts"] is None and s["after"]["texts"]["dur_ratio"] is None
    assert graph_args and set(graph_args) == {(False, True)}  # cpu: no graph; the compile flag passed


def test_nan_reward_is_named_counted_and_the_run_goes_on(world, tmp_path, monkeypatch, caplog):
    nan_every_third_reward(monkeypatch, g)  # B*G = 6 per step
    with caplog.at_level("WARNING", logger="speechrl"):
        s = g.main(_args(world, tmp_path, audio_every=10))
    assert s["skipped"]["non-finite reward (advantage 0)"] == 4  # 2 steps x 6 samples, every 3rd
    assert any("manifest.jsonl:" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["reward"]) for r in rows)


def test_semantic_token_world_end_to_end(tmp_path, monkeypatch):
    """--tokens semantic: the tokenizer stage trains a recogniser and clusters its states,
    token2mel reads the prompt's voice, and grpo_tts runs a step and evaluates on that world."""
    monkeypatch.setenv("SPEECHRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sft_tts, "TTS_SIZES", TINY)
    a = sft_tts.Args(tokens="semantic", n_tokens=16, t2m_d=32, t2m_blocks=1, lm_d=32, lm_layers=1,
                     eval_every=5, batch_size=8, judge_batch=8, max_steps=5)
    w = sft_tts.build_tts_world(a)
    assert w["tokenizer"] != sft_tts.build_tts_world(
        dataclasses.replace(a, tokens="mel"), upto="tokenizer")["tokenizer"]  # its own cache key
    done = json.load(open(os.path.join(os.path.dirname(w["tokens"]), "done.json")))
    assert done["report"]["asr"]["steps"] == 5 and done["report"]["codes_used"] > 1
    assert os.path.isfile(os.path.join(os.path.dirname(w["tokens"]), "asr", "model.safetensors"))
    s = g.main(_args(w, tmp_path / "run", steps=1, audio_every=10))
    assert s["steps"] == 1 and set(s["after"]) == {"test-seen", "test-unseen"}
    assert math.isfinite(s["resynth_cer"]["test-seen"]) and math.isfinite(s["after"]["test-seen"]["cer"])


def test_the_sft_start_is_judged_once_for_every_seed_and_run(world, tmp_path, monkeypatch):
    """A second run from the same start (another seed, another out_dir) reads the before /
    floor / dev figures instead of recomputing them; another checkpoint gets its own."""
    s0 = g.main(_args(world, tmp_path / "a", steps=1, audio_every=10))
    calls = {"n": 0}
    real = g.resynth_cer

    def counted(*args):
        calls["n"] += 1
        return real(*args)
    monkeypatch.setattr(g, "resynth_cer", counted)
    s1 = g.main(_args(world, tmp_path / "b", steps=1, audio_every=10, seed=1))
    assert calls["n"] == 0 and s1["before"] == s0["before"] and s1["resynth_cer"] == s0["resynth_cer"]
    g.main(_args(world, tmp_path / "c", steps=1, audio_every=10, init=str(tmp_path / "a" / "last")))
    assert calls["n"] == 2  # a new checkpoint: test-seen and test-unseen floors computed again
    # audio rewritten behind an unchanged manifest (here: a new mtime) is a new start too
    manifest = os.path.join(world["world"], "test-seen", "manifest.jsonl")
    with open(manifest) as f:
        wav = os.path.join(os.path.dirname(manifest), json.loads(f.readline())["audio"])
    st = os.stat(wav)
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    g.main(_args(world, tmp_path / "d", steps=1, audio_every=10, seed=1))
    assert calls["n"] == 4
