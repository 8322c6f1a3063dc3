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
    make_loss: Callable[[Any, Any], Any]
    """`(fast TrainSetup, MethodOptions) -> LossFn`."""
    train_all_tokens: bool = False
    """Every token of every sample is a target (continued pretraining), not only the replies."""
    metrics: tuple[str, ...] = ()
    """Names of the extra per-step metrics its loss reports (beyond the loss)."""
    bar_metrics: tuple[str, ...] = ()
    """The few of `metrics` the progress bar shows beside the loss."""
    tokenize: Callable[[Any, Any, Any], Any] | None = None
    """`(conversations, tokenizer, DataOptions) -> (samples, TokenizeReport)`; None: one sequence per sample."""
    collate: Callable[..., Any] | None = None
    """`(samples, padded=, pad_id=) -> Batch`; None: `data.packing.collate`."""
    before_training: Callable[[Any], None] | None = None
    """`(train.api.Run) -> None`, run once the model is ready and before any step (e.g. a reference pass)."""
    uses_reference: bool = False
    """Its loss compares with a reference model (`--reference` picks how full fine-tuning provides one)."""

    def default_lr(self, adapter: bool) -> float:
        """The learning rate a run uses when none is given."""
        return self.lr_adapter if adapter else self.lr_full


def next_token_loss(fast: Any, options: Any = None) -> Any:
    """Cross-entropy on the targets: the fused kernel when the fast path built one, else plain."""
    from tunesmith.train.losses import sft_loss_sum

    return fast.loss_sum or sft_loss_sum


def dpo_loss(fast: Any, options: Any) -> Any:
    """DPO's sigmoid loss at `--beta` (the reference: cached log-probs, or the adapter switched off)."""
    from tunesmith.train.preference import logps_for, make_dpo_loss

    return make_dpo_loss(options.beta, logps_for(fast))


def orpo_loss(fast: Any, options: Any) -> Any:
    """ORPO: NLL of the chosen reply + `--orpo-lambda` x the odds-ratio term (no reference model)."""
    from tunesmith.train.preference import logps_for, make_orpo_loss

    return make_orpo_loss(options.orpo_lambda, logps_for(fast))


def tokenize_pairs(convs: Any, tokenizer: Any, options: Any) -> Any:
    """Preference conversations -> `TokenizedPair`s (data.pairs)."""
    from tunesmith.data.pairs import tokenize_pairs as tokenize

    return tokenize(convs, tokenizer, options)


def collate_pairs(pairs: Any, *, padded: bool = False, pad_id: int = 0) -> Any:
    """Pairs -> one Batch, chosen and rejected of each pair in one forward (data.packing)."""
    from tunesmith.data.packing import collate_pairs as collate

    return collate(pairs, padded=padded, pad_id=pad_id)


def reference_pass(run: Any) -> None:
    """DPO's reference when it is not the same weights with the adapter off: the cached pass, or a live copy."""
    from tunesmith.train.reference import prepare_reference

    prepare_reference(run)


SFT = Objective("sft", "supervised fine-tuning: next-token loss on the replies (and their end-of-turn token)",
                SEQUENCE, ("chat", "text"), lr_full=1e-5, lr_adapter=2e-4, make_loss=next_token_loss)
PRETRAIN = Objective("pretrain", "continued pretraining: next-token loss on every token of every sample",
                     SEQUENCE, ("text", "chat"), lr_full=1e-5, lr_adapter=2e-4, make_loss=next_token_loss,
                     train_all_tokens=True)

PAIR_METRICS = ("reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logp", "rejected_logp")
DPO = Objective("dpo", "direct preference optimisation on chosen/rejected pairs (sigmoid loss, --beta 0.1)",
                PAIR, ("preference",), lr_full=5e-7, lr_adapter=5e-6, make_loss=dpo_loss, metrics=PAIR_METRICS,
                bar_metrics=("reward_accuracy", "margin"), tokenize=tokenize_pairs, collate=collate_pairs,
                before_training=reference_pass, uses_reference=True)
ORPO = Objective("orpo", "odds-ratio preference optimisation: NLL on chosen + --orpo-lambda 0.1 x odds-ratio term; "
                 "no reference model", PAIR, ("preference",), lr_full=1e-6, lr_adapter=1e-5, make_loss=orpo_loss,
                 metrics=(*PAIR_METRICS, "chosen_nll", "log_odds"), bar_metrics=("reward_accuracy", "margin"),
                 tokenize=tokenize_pairs, collate=collate_pairs)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SFT, PRETRAIN, DPO, ORPO)}
