"""Packing: shifted targets, budgets, and no attention across sample boundaries (parity with padding)."""
from __future__ import annotations

import random

import pytest
import torch

from tunesmith.data.packing import epoch_groups, group_by_budget, pack, shifted_targets
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.train.losses import forward_logits, sft_loss_sum


def make_samples(n: int, vocab: int, seed: int = 0) -> list[TokenizedSample]:
    """Random samples of varied length whose first third (the 'prompt') is not trained."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randint(6, 30))]
        cut = len(ids) // 3
        out.append(TokenizedSample(ids, [IGNORE_INDEX] * cut + ids[cut:], f"s{i}"))
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_targets_are_shifted_within_each_sample():
    a = TokenizedSample([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = TokenizedSample([4, 5], [4, 5])
    (batch,) = pack([a, b], batch_tokens=100)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    # token 3 is the last of sample a: it must not be trained to predict 4 (the next sample's start)
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.num_targets == 3 and batch.num_tokens == 5
    assert shifted_targets([7, 8]) == [8, IGNORE_INDEX]


def test_budget_is_respected_and_nothing_is_dropped():
    lengths = [5, 7, 3, 20, 1, 9]
    groups = group_by_budget(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups)  # a group keeps the samples' order
    for g in groups:
        assert sum(lengths[i] for i in g) <= 10 or len(g) == 1  # an over-long sample stands alone
    assert [3] in groups


def test_groups_leave_little_padding_on_long_samples():
    """Each row is padded up to the budget on the GPU: the groups must come close to the fewest
    possible (total tokens / budget), where filling strictly in order leaves ~20% empty."""
    rng = random.Random(0)
    lengths = [int(min(8192, max(256, rng.lognormvariate(7.6, 0.75)))) for _ in range(400)]  # median ~2k

    def next_fit(budget: int) -> int:
        count, used = 0, budget + 1
        for n in lengths:
            count, used = (count, used + n) if used + n <= budget else (count + 1, n)
        return count

    for budget in (8192, 16384):
        fewest = -(-sum(lengths) // budget)
        groups = group_by_budget(lengths, budget)
        assert all(sum(lengths[i] for i in g) <= budget for g in groups)
        assert len(groups) <= 1.04 * fewest + 1, (len(groups), fewest)
        assert len(groups) < next_fit(budget)
    assert len(group_by_budget(lengths, 8192, open_groups=1)) == next_fit(8192)  # one open group: in order


def test_epoch_groups_are_deterministic_and_cover_every_sample_once(llama3_tokenizer):
    samples = make_samples(20, len(llama3_tokenizer))
    a = epoch_groups(samples, 64, seed=3, epoch=1)
    assert a == epoch_groups(samples, 64, seed=3, epoch=1)
    assert a != epoch_groups(samples, 64, seed=3, epoch=2)
    assert sorted(i for g in a for i in g) == list(range(20))
    assert all(sum(len(samples[i].input_ids) for i in g) <= 64 or len(g) == 1 for g in a)


def test_packed_loss_equals_padded_per_sample_loss(model):
    samples = make_samples(8, model.config.vocab_size)
    with torch.no_grad():
        (packed,) = pack(samples, batch_tokens=10_000)
        packed_sum, packed_n, _ = sft_loss_sum(model, packed)
        padded_sum, padded_n, _ = sft_loss_sum(model, pack(samples, 10_000, padded=True)[0])
        alone = [sft_loss_sum(model, pack([s], 10_000)[0]) for s in samples]
    alone_sum = sum(float(x.total) for x in alone)
    assert packed_n == padded_n == sum(x.count for x in alone) == sum(s.num_trained - (s.labels[0] != IGNORE_INDEX)
                                                                   for s in samples)
    assert abs(float(packed_sum) - alone_sum) <= 1e-4 * alone_sum
    assert abs(float(padded_sum) - alone_sum) <= 1e-4 * alone_sum


def test_no_token_attends_across_a_sample_boundary(model):
    """The logits of a sample inside a pack equal its logits alone; without restarting positions they do not."""
    samples = make_samples(3, model.config.vocab_size, seed=1)
    with torch.no_grad():
        (packed,) = pack(samples, batch_tokens=10_000)
        logits = forward_logits(model, packed)[0]  # (T, V)
        start = len(samples[0].input_ids)
        second = logits[start:start + len(samples[1].input_ids)]
        alone = forward_logits(model, pack([samples[1]], 10_000)[0])[0]
        torch.testing.assert_close(second, alone, rtol=1e-4, atol=1e-5)
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits[0, start:start + len(samples[1].input_ids)]
        assert not torch.allclose(leaky, alone, atol=1e-3)


class IgnoresPositions:
    """A model whose attention cannot see sample boundaries (it drops position_ids)."""

    def __init__(self, model) -> None:
        self.model, self.training = model, False

    def __call__(self, input_ids, position_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def test_probe_detects_whether_packing_is_exact(model):
    from tunesmith.train.losses import packing_is_exact

    assert packing_is_exact(model, torch.device("cpu"))
    assert not packing_is_exact(IgnoresPositions(model), torch.device("cpu"))
