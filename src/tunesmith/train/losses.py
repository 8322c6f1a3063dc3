"""Losses: the contract every objective's loss keeps, and the plain next-token loss.

Every loss returns a `LossSum`: the SUM over its units (trained tokens for SFT, pairs for
a preference loss) and how many units there were; the loop divides by the units of the
whole optimizer step (`Batch.num_targets`, counted before any forward). Summing here (not
averaging per micro-batch) is what makes packing, padding and gradient accumulation give
the same loss and the same gradients. Extra metrics are sums over the same units, so the
loop can average them the same way.

`sft_loss_sum` is also the seam for the GPU fast path: `tunesmith.model.fast` may provide
a fused linear-cross-entropy with the same signature (never materialising (B, T, V) logits).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from tunesmith.data.packing import Batch
from tunesmith.data.tokenize import IGNORE_INDEX



class LossSum(NamedTuple):
    """What a loss returns for one micro-batch."""

    total: torch.Tensor  # () summed loss over `count` units, with its graph
    count: int  # units summed: trained tokens (SFT) or pairs (preference losses)
    metrics: dict[str, torch.Tensor] = {}  # () detached sums over the same units, for logging


LossFn = Callable[[Any, Batch], LossSum]


def forward_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits `(B, T, V)`; packed batches pass no mask so transformers builds per-document masks."""
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                attention_mask=batch.attention_mask, use_cache=False)
    return out.logits


def sft_loss_sum(model: Any, batch: Batch) -> LossSum:
    """Summed next-token cross-entropy over the batch's targets (fp32 math), and their count."""
    logits = forward_logits(model, batch)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return LossSum(loss, batch.num_targets)


@torch.no_grad()
def packing_is_exact(model: Any, device: torch.device) -> bool:
    """Probe: does a sample packed behind another get the same logits as alone?

    True when the model's attention honours restarting `position_ids` (every transformers
    architecture built on `masking_utils`); False means tokens would attend across sample
    boundaries, and the loop must fall back to padded batches.
    """
    from tunesmith.data.packing import collate_packed
    from tunesmith.data.tokenize import TokenizedSample

    vocab = model.get_input_embeddings().weight.shape[0]
    first = TokenizedSample([(7 * i + 3) % vocab for i in range(8)], [0] * 8)
    second = TokenizedSample([(11 * i + 5) % vocab for i in range(8)], [0] * 8)
    was_training = model.training
    model.eval()
    packed = forward_logits(model, collate_packed([first, second]).to(device))[0, 8:].float()  # (8, V)
    alone = forward_logits(model, collate_packed([second]).to(device))[0].float()  # (8, V)
    model.train(was_training)
    tolerance = 1e-3 if packed.dtype == torch.float32 and alone.dtype == torch.float32 else 5e-2
    scale = float(alone.abs().max()) + 1e-6
    return float((packed - alone).abs().max()) <= tolerance * scale
