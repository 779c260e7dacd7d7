"""common.parse_args: the command line of every script, from its Args dataclass."""
from dataclasses import dataclass, field

import pytest

from common import parse_args


@dataclass
class Args:
    """A demo."""

    eval_only: bool = False
    """a switch"""
    bf16: bool = True
    """another"""
    lr: float = 1e-4
    """a number"""
    test_data: list[str] = field(default_factory=list)
    """repeatable"""


def test_bool_flags_bare_or_with_a_value():
    assert parse_args(Args, []) == Args()
    assert parse_args(Args, ["--eval_only"]).eval_only is True  # the README's bare form
    assert parse_args(Args, ["--eval_only", "true", "--bf16", "false"]) == Args(eval_only=True, bf16=False)
    assert parse_args(Args, ["--bf16", "0"]).bf16 is False
    with pytest.raises(SystemExit):  # a typo is an error, not a silent False
        parse_args(Args, ["--bf16", "flase"])


def test_types_and_repeatable_lists():
    a = parse_args(Args, ["--lr", "3e-4", "--test_data", "a.jsonl", "--test_data", "b.jsonl"])
    assert a.lr == 3e-4 and a.test_data == ["a.jsonl", "b.jsonl"]


def test_plot_curves_writes_an_svg_with_every_point(tmp_path):
    """The curves need no plotting library: one SVG, a panel per series, one polyline
    vertex per finite point (NaN skipped), the value range on the axis, escaped titles."""
    import xml.etree.ElementTree as ET

    from common import plot_curves
    path = tmp_path / "curves.svg"
    plot_curves(str(path), [("reward", "mean reward", [1, 2, 3], [0.2, float("nan"), 0.5]),
                            ("dev CER <greedy>", "CER", [0, 50, 100], [0.5, 0.45, 0.4])])
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert [len(pl.get("points").split()) for pl in lines] == [2, 3]
    texts = [t.text for t in root.findall(f"{ns}text")]
    assert "dev CER <greedy>" in texts and "0.5" in texts and "0.4" in texts and "100" in texts
    ys = [float(p.split(",")[1]) for p in lines[1].get("points").split()]
    assert ys[0] < ys[1] < ys[2]  # a falling CER is drawn going down (SVG y grows downwards)


def test_bf16_autocast_only_where_the_cpu_has_it(monkeypatch, tmp_path):
    """sft_tts trains its LM under bf16 autocast by default only on a CPU with avx512_bf16:
    elsewhere bf16 is emulated (27x slower a step on an AVX2-only EPYC)."""
    import builtins

    import common

    real_open = builtins.open
    info = tmp_path / "cpuinfo"

    def fake_open(path, *a, **k):
        if path == "/proc/cpuinfo":
            if not info.exists():
                raise FileNotFoundError(path)
            return real_open(info, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert common.cpu_has_bf16() is False  # no /proc (macOS, Windows): fp32
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert common.cpu_has_bf16() is False  # avx512 without its bf16 extension
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert common.cpu_has_bf16() is True
    import sft_tts

    assert sft_tts.Args().lm_bf16 is True  # the default follows the CPU
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert sft_tts.Args().lm_bf16 is False
    assert parse_args(sft_tts.Args, ["--lm_bf16", "true"]).lm_bf16 is True  # and a flag overrides it
