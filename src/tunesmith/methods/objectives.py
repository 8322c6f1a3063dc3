"""Objectives: what the loss is, which samples it consumes, its metrics and default lr.

An objective hands the loop one `LossFn` (`train.losses`: `(model, batch) -> LossSum`);
the loop sums, normalises and logs whatever it returns, so SFT, continued pretraining
and preference losses all run through the same accumulation, packing, checkpoints and
progress code. `make_loss` receives what the fast path set up, so an objective can use
the fused kernels where they compute the same thing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SEQUENCE = "sequence"  # one token sequence per sample: input_ids + labels
PAIR = "pair"  # a chosen and a rejected reply to one prompt


@dataclass(frozen=True)
class Objective:
    """One training objective of the registry."""

    name: str
    summary: str
    """One line for `--help`."""
    sample_kind: str
    """SEQUENCE or PAIR: what the tokenizer must produce for it."""
    data_kinds: tuple[str, ...]
    """Conversation kinds it trains on (`chat`, `text`, `preference`)."""
    lr_full: float
    """Default peak learning rate when every weight trains."""
    lr_adapter: float
    """Default peak learning rate when only an adapter trains."""
    make_loss: Callable[[Any], Any]
    """`(fast TrainSetup) -> LossFn`."""
    train_all_tokens: bool = False
    """Every token of every sample is a target (continued pretraining), not only the replies."""
    metrics: tuple[str, ...] = ()
    """Names of the extra per-step metrics its loss reports (beyond the loss)."""

    def default_lr(self, adapter: bool) -> float:
        """The learning rate a run uses when none is given."""
        return self.lr_adapter if adapter else self.lr_full


def next_token_loss(fast: Any) -> Any:
    """Cross-entropy on the targets: the fused kernel when the fast path built one, else plain."""
    from tunesmith.train.losses import sft_loss_sum

    return fast.loss_sum or sft_loss_sum


SFT = Objective("sft", "supervised fine-tuning: next-token loss on the replies (and their end-of-turn token)",
                SEQUENCE, ("chat", "text"), lr_full=1e-5, lr_adapter=2e-4, make_loss=next_token_loss)
PRETRAIN = Objective("pretrain", "continued pretraining: next-token loss on every token of every sample",
                     SEQUENCE, ("text", "chat"), lr_full=1e-5, lr_adapter=2e-4, make_loss=next_token_loss,
                     train_all_tokens=True)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT, PRETRAIN)}
