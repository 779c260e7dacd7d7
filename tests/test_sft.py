import json
import os

import pytest
import torch
from safetensors.torch import load_file

import sft_asr
from common.toy import build_toy_world

TINY = dict(d_enc=32, enc_layers=1, d_lm=32, lm_layers=1, batch_size=8, warmup=1, lr=3e-3,
            eval_every=10, max_new_tokens=12, patience=100)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    sizes = {"train": 24, "dev": 4, "test-seen": 4, "test-unseen": 4}
    return build_toy_world(sizes, root=str(tmp_path_factory.mktemp("toy")), progress=False)


def _args(world, out, **kw):
    return sft_asr.Args(data=world["train"], dev_data=world["dev"], test_data=[world["test-unseen"]],
                        out_dir=str(out), **{**TINY, **kw})


def test_one_model_source_only():
    with pytest.raises(SystemExit, match="one of"):
        sft_asr.make_model(sft_asr.Args(init="ckpt", qwen2_audio="q2a"))


def test_sft_smoke_loss_falls(world, tmp_path):
    s = sft_asr.main(_args(world, tmp_path, max_steps=40))
    curve = [json.loads(x) for x in open(tmp_path / "dev_curve.jsonl")]
    assert [c["step"] for c in curve] == [10, 20, 30, 40]
    assert curve[-1]["train_loss"] < 0.7 * curve[0]["train_loss"]
    assert set(s["results"]) == {"dev", "test-unseen"} and 0 <= s["results"]["dev"]["wer"]
    assert os.path.isfile(tmp_path / "best" / "model.safetensors")


def test_sft_resume_continues_exactly(world, tmp_path):
    sft_asr.main(_args(world, tmp_path / "a", max_steps=20))
    sft_asr.main(_args(world, tmp_path / "b", max_steps=10))
    sft_asr.main(_args(world, tmp_path / "b", max_steps=20))  # resumes from b/last at step 10
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
