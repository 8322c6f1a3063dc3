"""TokenizedSample -> Batch: fill each micro-batch with a token budget, samples packed end to end.

Packed batches are one row `(1, T)`: samples sit back to back, `position_ids` restart at
0 for each sample, and targets are shifted *within* each sample, so the last token of a
sample never predicts the first token of the next. Given restarting positions, no
attention mask and no cache, transformers builds a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`): no token attends across a sample
boundary. Backends that cannot do that get the padded fallback: `(B, T)` rows, right
padded, with an attention mask.

Batches are built from a fixed order of samples (shuffled per epoch by the loop with
a seed), so the same seed always gives the same batches: resume relies on it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass
class Batch:
    """One micro-batch, ready for `model(input_ids, position_ids=..., attention_mask=...)`."""

    input_ids: torch.Tensor  # (B, T); B == 1 when packed
    targets: torch.Tensor  # (B, T) next-token labels, already shifted; IGNORE_INDEX where not trained
    position_ids: torch.Tensor  # (B, T) restart at 0 for every sample
    num_targets: int  # how many targets are not IGNORE_INDEX
    attention_mask: torch.Tensor | None = None  # (B, T) only for padded batches; packed rely on positions
    num_tokens: int = 0  # real (non-padding) tokens, for throughput

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`; on CUDA copied from pinned memory without blocking the host.

        A copy from ordinary (pageable) memory makes the host wait; a pinned, non-blocking
        copy is queued behind the GPU work already launched, so the host keeps running ahead.
        A batch already on `device` is returned as it is.
        """
        if self.input_ids.device.type == torch.device(device).type:
            return self
        cuda = torch.device(device).type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids),  # type: ignore[arg-type]
                     self.num_targets, move(self.attention_mask), self.num_tokens)


def shifted_targets(labels: list[int]) -> list[int]:
    """Labels shifted left by one inside one sample: position i is trained to predict label i+1."""
    return labels[1:] + [IGNORE_INDEX]


def group_by_budget(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped greedily, in order, so each group holds at most `batch_tokens` tokens.

    A sample longer than the budget gets a group of its own (it is never split: a sample
    is one document, and cutting it would train on a context the model never sees whole).
    """
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > batch_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def collate_packed(samples: list[TokenizedSample]) -> Batch:
    """Samples end to end in one row `(1, T)` with per-sample positions and targets."""
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    for s in samples:
        ids += s.input_ids
        targets += shifted_targets(s.labels)
        positions += range(len(s.input_ids))
    t = torch.tensor(targets, dtype=torch.long).unsqueeze(0)  # (1, T)
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        targets=t,
        position_ids=torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        num_targets=int((t != IGNORE_INDEX).sum()),
        num_tokens=len(ids),
    )


def collate_padded(samples: list[TokenizedSample], pad_id: int = 0) -> Batch:
    """One sample per row `(B, T)`, right padded; padding is masked out and never trained."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(samples), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        targets[row, :n] = torch.tensor(shifted_targets(s.labels))
        mask[row, :n] = 1
    positions = torch.arange(width).expand(len(samples), width).clone()  # (B, T)
    return Batch(ids, targets, positions, int((targets != IGNORE_INDEX).sum()), mask,
                 sum(len(s.input_ids) for s in samples))


def collate(samples: list[TokenizedSample], *, padded: bool = False, pad_id: int = 0) -> Batch:
    """One micro-batch of `samples`: packed into one row, or padded one per row."""
    return collate_padded(samples, pad_id) if padded else collate_packed(samples)


def pack(samples: list[TokenizedSample], batch_tokens: int, *, padded: bool = False,
         pad_id: int = 0) -> list[Batch]:
    """Micro-batches of up to `batch_tokens` real tokens, in the order given.

    `padded=True` is the fallback for attention backends without per-document masks:
    the same groups of samples, one per row, padded to the longest.
    """
    groups = group_by_budget([len(s.input_ids) for s in samples], batch_tokens)
    return [collate([samples[i] for i in g], padded=padded, pad_id=pad_id) for g in groups]


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a seeded shuffle, the same for the same (seed, epoch)."""
    order = list(range(num_samples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_groups(samples: list[TokenizedSample], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices of each micro-batch of one epoch: deterministic for (seed, epoch).

    Only indices, so a large dataset is collated one micro-batch at a time.
    """
    order = epoch_order(len(samples), seed, epoch)
    groups = group_by_budget([len(samples[i].input_ids) for i in order], batch_tokens)
    return [[order[i] for i in g] for g in groups]


def split_step(groups: list[list[int]], lengths: list[int], world: int, batch_tokens: int) -> list[list[list[int]]]:
    """One optimizer step's micro-batches (sample indices), shared out among `world` ranks by tokens.

    The step holds the same samples for any number of ranks, so the global batch, and so
    the loss curve, does not depend on it. Samples go longest first to the rank with the
    fewest tokens so far; each rank packs its share (in the step's order) into micro-batches
    of `batch_tokens`, and every rank gets as many micro-batches as the busiest one, `[]`
    standing for a placeholder, so all ranks run the same number of forward/backward passes.
    One rank gets the step's groups unchanged.
    """
    if world == 1:
        return [groups]
    order = [i for g in groups for i in g]
    position = {index: k for k, index in enumerate(order)}
    load = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(order, key=lambda i: (-lengths[i], position[i])):
        rank = min(range(world), key=lambda r: (load[r], r))
        shares[rank].append(index)
        load[rank] += lengths[index]
    packed = []
    for share in shares:
        share.sort(key=position.__getitem__)
        packed.append([[share[k] for k in g] for g in group_by_budget([lengths[i] for i in share], batch_tokens)])
    count = max(len(p) for p in packed)
    return [p + [[] for _ in range(count - len(p))] for p in packed]
