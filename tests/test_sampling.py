"""Sampling processors against hand-computed logits, and option validation."""
from __future__ import annotations

import math

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.infer.sampling import (RepetitionPenalty, SamplingOptions, Temperature, TopK, TopP, build_processors,
                                      sampling_with)

INF = float("-inf")


def test_repetition_penalty_only_last_n_generated_tokens_and_sign_rule() -> None:
    # prompt = [5, 1]; generated = [1, 2, 3]; window 2 -> only ids 2 and 3 are penalised
    ids = torch.tensor([[5, 1, 1, 2, 3]])
    scores = torch.tensor([[1.0, 4.0, 2.0, -3.0, 0.5, 6.0]])
    out = RepetitionPenalty(2.0, window=2, prompt_length=2)(ids, scores)
    # id 2: positive 2.0 / 2 = 1.0; id 3: negative -3.0 * 2 = -6.0; id 1 (older) and id 5 (prompt) untouched
    assert out.tolist() == [[1.0, 4.0, 1.0, -6.0, 0.5, 6.0]]
    assert scores.tolist() == [[1.0, 4.0, 2.0, -3.0, 0.5, 6.0]]  # the input is not modified


def test_repetition_penalty_window_zero_means_all_generated_and_each_occurrence_counts() -> None:
    ids = torch.tensor([[5, 1, 2, 2, 3, 2]])  # prompt [5]; generated [1, 2, 2, 3, 2]
    scores = torch.tensor([[0.0, 4.0, 16.0, -1.0, 0.0, 6.0]])
    out = RepetitionPenalty(2.0, window=0, prompt_length=1)(ids, scores)
    # id 1 once: 4/2; id 2 three times: 16/2/2/2; id 3 once: -1*2; 6.0 is prompt-only
    assert out.tolist() == [[0.0, 2.0, 2.0, -2.0, 0.0, 6.0]]


def test_repetition_penalty_matches_the_guides_loop() -> None:
    """The guides' apply_repetition_penalty: for each of the last N generated tokens, divide or multiply."""
    torch.manual_seed(0)
    scores = torch.randn(1, 50)
    generated = torch.randint(0, 50, (30,)).tolist()
    expected = scores[0].clone()
    for token in generated[-10:]:
        expected[token] = expected[token] / 1.3 if expected[token] > 0 else expected[token] * 1.3
    ids = torch.tensor([[7, 7, 7] + generated])
    out = RepetitionPenalty(1.3, window=10, prompt_length=3)(ids, scores)
    assert torch.allclose(out[0], expected, rtol=1e-6)


def test_repetition_penalty_nothing_generated_yet_and_per_row() -> None:
    scores = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    assert torch.equal(RepetitionPenalty(3.0, 4, prompt_length=2)(torch.tensor([[0, 1], [1, 0]]), scores), scores)
    ids = torch.tensor([[7, 0], [7, 1]])  # row 0 generated 0, row 1 generated 1
    out = RepetitionPenalty(4.0, 4, prompt_length=1)(ids, scores)
    assert out.tolist() == [[0.25, -1.0], [1.0, -4.0]]


def test_temperature_divides() -> None:
    assert Temperature(0.5)(torch.zeros(1, 2), torch.tensor([[2.0, -4.0]])).tolist() == [[4.0, -8.0]]


def test_top_k_keeps_k_largest() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [9.0, 8.0, 7.0, 6.0]])
    assert TopK(2)(None, scores).tolist() == [[INF, 3.0, 2.0, INF], [9.0, 8.0, INF, INF]]
    assert torch.equal(TopK(10)(None, scores), scores)  # k larger than the vocabulary keeps all


def test_top_p_keeps_smallest_set_reaching_p_in_vocab_order() -> None:
    probs = [0.15, 0.5, 0.05, 0.3]  # sorted: 0.5 (idx 1), 0.3 (idx 3), 0.15, 0.05
    scores = torch.tensor([[math.log(p) for p in probs]])
    kept = TopP(0.75)(None, scores)
    assert torch.isinf(kept).tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.75
    assert kept[0, 1] == scores[0, 1] and kept[0, 3] == scores[0, 3]
    only_top = TopP(0.4)(None, scores)
    assert torch.isinf(only_top).tolist() == [[True, False, True, True]]  # the top token is always kept
    assert not torch.isinf(TopP(0.99)(None, scores)).any()


def test_build_processors_order_and_greedy() -> None:
    options = SamplingOptions(temperature=0.5, top_k=3, top_p=0.8, repetition_penalty=1.2)
    assert [type(p) for p in build_processors(options, 4)] == [RepetitionPenalty, Temperature, TopK, TopP]
    greedy = SamplingOptions(greedy=True, temperature=0, repetition_penalty=1.2)
    assert [type(p) for p in build_processors(greedy, 4)] == [RepetitionPenalty]
    plain = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0)
    assert build_processors(plain, 4) == []


@pytest.mark.parametrize("values, field", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty_range": -2}, "repetition_penalty_range"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_values_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(UserError, match=field):
        SamplingOptions(**values)


def test_greedy_allows_zero_temperature_and_overrides_revalidate() -> None:
    assert SamplingOptions(greedy=True, temperature=0).greedy
    assert sampling_with(None, {"top_k": 5}).top_k == 5
    with pytest.raises(UserError, match="top_p"):
        sampling_with(SamplingOptions(), {"top_p": 2.0})
    with pytest.raises(UserError, match="unknown sampling option"):
        sampling_with(None, {"topp": 0.5})
