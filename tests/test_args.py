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
