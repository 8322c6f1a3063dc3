"""Metric functions against hand-computed values (and the reference implementations' conventions)."""
from __future__ import annotations

import math

import pytest

from tunesmith.eval import metrics as m


def test_normalize_ignores_case_whitespace_and_punctuation():
    assert m.normalize("  Hello,   WORLD!! ") == "hello world"
    assert m.normalize("«Ça va?» — oui.") == "ça va oui"
    assert m.normalize("don't") == "dont"


def test_exact_match_counts_normalised_equality():
    replies = ["Positive.", "negative", "POSITIVE!!", "neutral-ish"]
    refs = ["positive", "Negative", "positive", "neutral"]
    assert m.exact_match(replies, refs) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        m.exact_match(["a"], ["a", "b"])  # lengths must agree, never silently truncated


def test_label_set_only_for_small_repeated_short_labels():
    refs = ["positive", "Negative", "positive.", "neutral", "negative", "neutral"]
    assert m.label_set(refs) == ["negative", "neutral", "positive"]
    assert m.label_set(["a b c d e", "a b c d e"]) is None  # too long to be a label
    assert m.label_set(["one", "two", "three"]) is None  # each answer unique: free text
    assert m.label_set([f"w{i}" for i in range(11)] * 2) is None  # too many labels


def test_label_accuracy_reads_the_first_label_named():
    labels = ["negative", "positive"]
    assert m.predicted_label("Sentiment: Positive! Not negative.", labels) == "positive"
    assert m.predicted_label("I think it is negative", labels) == "negative"
    assert m.predicted_label("positively unclear", labels) is None  # whole words only
    replies = ["Positive.", "it is negative", "no idea", "negative"]
    refs = ["positive", "negative", "positive", "positive"]
    assert m.label_accuracy(replies, refs, labels) == pytest.approx(2 / 4)


def test_rouge_l_on_known_strings():
    # LCS("the cat on the mat sat", "the cat sat on the mat") = "the cat on the mat" = 5 of 6 each way
    assert m.rouge_l("the cat on the mat sat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS = 1: P = 1/2, R = 1/3, F = 2PR / (P + R) = 0.4
    assert m.rouge_l("cat the", "The cat sat.") == pytest.approx(0.4)
    assert m.rouge_l("", "anything") == 0.0
    assert m.rouge_l("Same, words!", "same words") == 1.0
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example


def test_chrf_on_known_strings():
    assert m.chrf(["ab"], ["ab"]) == pytest.approx(100.0)
    # 1-grams: 1 of 2 match (P = R = 1/2); 2-grams: 0 of 1; orders 3-6 do not occur -> averaged over 2 orders:
    # P = R = 1/4, F_beta=2 = 5PR / (4P + R) = 25
    assert m.chrf(["ab"], ["ac"]) == pytest.approx(25.0)
    assert m.chrf(["a b"], ["ab"]) == pytest.approx(100.0)  # whitespace is ignored
    assert m.chrf(["xyz"], ["abc"]) == 0.0


def test_chrf_weighs_recall_more_than_precision():
    short = m.chrf(["abc"], ["abcdef"])  # all precise, half recalled
    long = m.chrf(["abcdefghijkl"], ["abcdef"])  # all recalled, half precise
    assert long > short


def test_repetition_rate_counts_repeated_trigrams():
    # 6 words -> 4 trigrams: (a b c) (b c a) (c a b) (a b c): one repeat
    assert m.repetition_rate(["a b c a b c"]) == pytest.approx(1 / 4)
    assert m.repetition_rate(["one two", "x y z"]) == 0.0  # short replies contribute no trigram
    assert m.repetition_rate(["go go go go go"]) == pytest.approx(2 / 3)


def test_uppercase_share_counts_cased_letters_only():
    assert m.uppercase_share(["ABC def", "123 !?"]) == pytest.approx(3 / 6)
    assert m.uppercase_share(["ÉTÉ 東京"]) == 1.0  # letters without case are not counted
    assert m.uppercase_share([""]) == 0.0


def test_perplexity_is_exp_of_loss_and_never_overflows():
    assert m.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert m.perplexity(1e6) == math.inf
