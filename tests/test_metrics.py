import pytest

from common.data import cer, corpus_error, edit_ops, normalize, wer


@pytest.mark.parametrize("raw, norm", [
    ("Tomorrow at Seven-Thirty, P.M.!", "tomorrow at seven thirty p m"),
    ("  two   o'clock\t", "two oclock"),
    ("X-Ray", "x ray"),
    ("ＡＢＣ", "abc"),  # full-width folds (NFKC)
    ("...", ""),
])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_wer_by_hand():
    # ref: a b c d ; hyp: a x c d e -> 1 sub + 1 ins over 4 words
    assert wer("a b c d", "a x c d e") == pytest.approx(2 / 4)
    assert edit_ops("a b c d", "a x c d e") == {"hits": 3, "sub": 1, "del": 0, "ins": 1, "n": 4}
    # deletion of two words
    assert wer("one two three four", "one four") == pytest.approx(2 / 4)
    # normalised before scoring: case and punctuation do not count
    assert wer("Alpha, Bravo.", "alpha bravo") == 0.0


def test_wer_can_exceed_one_and_empty_cases():
    assert wer("one", "one two three") == pytest.approx(2.0)
    assert wer("one two", "") == 1.0  # all deleted
    assert wer("", "") == 0.0
    assert wer("", "two words") == 2.0  # empty reference: every word is an insertion


def test_cer_by_hand():
    # "abcd" vs "abed": one substitution over 4 characters; spaces are ignored
    assert cer("ab cd", "abed") == pytest.approx(1 / 4)


def test_corpus_error_split():
    refs, hyps = ["a b c", "d e"], ["a c", "d e f g"]
    # utt1: 1 del; utt2: 2 ins -> 3 errors over 5 words
    out = corpus_error(refs, hyps)
    assert out["wer"] == pytest.approx(3 / 5)
    assert (out["sub"], out["del"], out["ins"]) == (0.0, pytest.approx(1 / 5), pytest.approx(2 / 5))
    with pytest.raises(ValueError):
        corpus_error(["a"], [])
