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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    sequence_ids: torch.Tensor | None = None  # (B, T) pair batches: token -> sequence 2*pair (+1 if rejected)
    reference_logps: torch.Tensor | None = None  # (P, 2) pair batches: cached reference log-probs, if any
    num_pairs: int = 0  # pair batches: P (kept by a placeholder, whose num_targets is 0, to size its sums)

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
                     self.num_targets, move(self.attention_mask), self.num_tokens, move(self.sequence_ids),
                     move(self.reference_logps), self.num_pairs)


def shifted_targets(labels: list[int]) -> list[int]:
    """Labels shifted left by one inside one sample: position i is trained to predict label i+1."""
    return labels[1:] + [IGNORE_INDEX]


OPEN_GROUPS = 16  # groups still taking samples while packing (see group_by_budget)


def group_by_budget(lengths: list[int], batch_tokens: int, open_groups: int = OPEN_GROUPS) -> list[list[int]]:
    """Indices grouped so each group holds at most `batch_tokens` tokens, with little left empty.

    A packed row is padded up to the budget on the GPU (static shapes), so every token a group
    leaves empty is compute spent on padding. Filling groups strictly in order (next fit)
    leaves 12-22% of an 8k-16k budget empty on samples of median ~2k tokens; sorting the
    whole epoch by length (best fit decreasing) fills them but makes each group one long
    sample plus fillers, the same every epoch. Between the two (97-99% full there): samples
    go in order, each to the fullest open group it fits in (best fit), else to a new group;
    when `open_groups` are open and a new one is needed, the fullest is closed first. A
    sample mostly shares a group with samples near it in the (shuffled) order, and groups
    come out in about that order.

    A sample longer than the budget gets a group of its own (it is never split: a sample
    is one document, and cutting it would train on a context the model never sees whole).
    """
    groups: list[list[int]] = []
    members: list[list[int]] = []  # the open groups' samples
    used: list[int] = []  # and their tokens
    for i, n in enumerate(lengths):
        fits = [k for k in range(len(used)) if used[k] + n <= batch_tokens]
        if fits:
            k = max(fits, key=used.__getitem__)
            members[k].append(i)
            used[k] += n
            continue
        if len(used) == open_groups:
            fullest = max(range(len(used)), key=used.__getitem__)
            groups.append(members.pop(fullest))
            used.pop(fullest)
        members.append([i])
        used.append(n)
    groups.extend(members)
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


def collate_pairs(pairs: list[Any], *, padded: bool = False, pad_id: int = 0) -> Batch:
    """Preference pairs (`data.pairs.TokenizedPair`) as ONE batch: chosen and rejected are two documents each.

    Packed, the 2P sequences sit end to end in one row with restarting positions (the
    per-document mask SFT packing uses); padded, one sequence per row. `sequence_ids` maps
    every token to its sequence (2*pair for chosen, 2*pair + 1 for rejected), and
    `num_targets` counts PAIRS: the unit a preference loss sums over.
    """
    docs = [s for pair in pairs for s in pair.sequences()]
    batch = collate(docs, padded=padded, pad_id=pad_id)
    if padded:
        seq = torch.arange(len(docs)).unsqueeze(1).expand_as(batch.input_ids).clone()  # (2P, T)
    else:
        seq = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([len(d.input_ids) for d in docs]))
        seq = seq.unsqueeze(0)  # (1, T)
    refs = [pair.reference for pair in pairs]
    batch.reference_logps = (torch.tensor(refs, dtype=torch.float32)  # (P, 2)
                             if all(r is not None for r in refs) else None)
    batch.sequence_ids, batch.num_targets, batch.num_pairs = seq, len(pairs), len(pairs)
    return batch


def pack(samples: list[Any], batch_tokens: int, *, padded: bool = False, pad_id: int = 0,
         collate_fn: Callable[..., Batch] | None = None) -> list[Batch]:
    """Micro-batches of up to `batch_tokens` real tokens, in the order given.

    `padded=True` is the fallback for attention backends without per-document masks:
    the same groups of samples, one per row, padded to the longest. `collate_fn` is the
    objective's collator (default: `collate`, one sequence per sample).
    """
    groups = group_by_budget([len(s.input_ids) for s in samples], batch_tokens)
    make = collate_fn or collate
    return [make([samples[i] for i in g], padded=padded, pad_id=pad_id) for g in groups]


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
