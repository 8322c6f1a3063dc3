"""Scoring one model: held-out loss on the trained tokens, greedy replies, and reply metrics.

The loss is computed on exactly the tokens training learns from (same template, same
assistant-only mask, via `tokenize_all`), summed over tokens and divided by their count,
so it is the number training's eval loss reports for the same samples.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.data.conversation import Conversation
from tunesmith.data.tokenize import TokenizedSample, tokenize_all
from tunesmith.eval import metrics as m
from tunesmith.eval.data import EvalCase, has_reply

MAX_LENGTH = 2048  # the training default; longer samples are truncated as in training
LOSS_BATCH_TOKENS = 2048  # (1, 2048, V) logits at a time: ~1 GB at a 128k vocabulary in fp32
GENERATE_BATCH = 16


@dataclass
class ModelResult:
    """What one model scored: metric values, its replies (in case order) and the metrics skipped."""

    metrics: dict[str, float] = field(default_factory=dict)
    replies: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    loss_samples: int = 0
    pair_logps: Any = None  # (N, 2) summed log-probs of each held-out pair's (chosen, rejected), if any


def loss_samples(convs: list[Conversation], tokenizer: Any) -> list[TokenizedSample]:
    """The conversations as training tokenizes them (assistant tokens trained, the rest masked)."""
    scorable = [c for c in convs if has_reply(c)]
    if not scorable:
        return []
    samples, _report = tokenize_all(scorable, tokenizer, MAX_LENGTH)
    return samples


@torch.no_grad()
def heldout_loss(model: Any, samples: list[TokenizedSample]) -> tuple[float, int]:
    """Mean cross-entropy over the trained tokens of `samples`, and how many tokens that is.

    Packed with training's own `pack` and scored by the training loop's `evaluate`: the
    same number training logs as its eval loss. NaN when no token is trained.
    """
    from tunesmith.data.packing import pack
    from tunesmith.train.losses import sft_loss_sum
    from tunesmith.train.loop import evaluate

    batches = pack(samples, LOSS_BATCH_TOKENS)
    count = sum(b.num_targets for b in batches)
    if not count:
        return float("nan"), 0
    return evaluate(model, batches, sft_loss_sum, model.device)["eval_loss"], count


def generate_replies(model: Any, tokenizer: Any, cases: list[EvalCase], max_new_tokens: int) -> list[Any]:
    """Greedy replies (reproducible), batched; `Completion`s in case order."""
    from tunesmith.infer.generate import generate_batch
    from tunesmith.infer.sampling import SamplingOptions

    if not cases:
        return []
    sampling = SamplingOptions(greedy=True, max_new_tokens=max_new_tokens)
    return generate_batch(model, tokenizer, [c.prompt for c in cases], sampling, batch_size=GENERATE_BATCH)


def reply_stats(replies: Sequence[str], lengths: Sequence[int], stopped: Sequence[bool]) -> dict[str, float]:
    """Statistics of replies alone: length in tokens, share ended by the model, repetition, capitals."""
    n = max(len(replies), 1)
    return {"mean_length": sum(lengths) / n, "ended_share": sum(stopped) / n,
            "repetition_rate": m.repetition_rate(replies), "uppercase_share": m.uppercase_share(replies)}


def reference_metrics(replies: Sequence[str], references: Sequence[str | None]) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics against references, and the ones skipped with the reason."""
    skipped: dict[str, str] = {}
    pairs = [(r, ref) for r, ref in zip(replies, references) if ref is not None]
    if not pairs:
        reason = "the evaluation data has no reference replies" if references else "no prompts to generate for"
        return {}, {k: reason for k in ("exact_match", "label_accuracy", "rouge_l", "chrf")}
    hyp, ref = [p[0] for p in pairs], [p[1] for p in pairs]
    out = {"exact_match": m.exact_match(hyp, ref), "rouge_l": m.mean_rouge_l(hyp, ref), "chrf": m.chrf(hyp, ref)}
    labels = m.label_set(ref)
    if labels is None:
        skipped["label_accuracy"] = "the references are free text, not a small label set"
    else:
        out["label_accuracy"] = m.label_accuracy(hyp, ref, labels)
    if len(pairs) < len(replies):
        skipped["references"] = f"{len(replies) - len(pairs)} of {len(replies)} prompts have no reference"
    return out, skipped


def score_model(model: Any, tokenizer: Any, samples: list[TokenizedSample], cases: list[EvalCase],
                max_new_tokens: int, pairs: list[Any] | None = None) -> ModelResult:
    """Loss on `samples`, preference on `pairs` and greedy replies to `cases`, with every metric the data allows."""
    from tunesmith.eval.preference import pair_logps, preference_metrics

    result = ModelResult()
    model.eval()
    if pairs:
        result.pair_logps = pair_logps(model, pairs)
        result.metrics.update(preference_metrics(result.pair_logps))
    if samples:
        loss, _tokens = heldout_loss(model, samples)
        result.metrics.update(loss=loss, perplexity=m.perplexity(loss))
        result.loss_samples = len(samples)
    elif not pairs:
        result.skipped.update(dict.fromkeys(("loss", "perplexity"), "the evaluation data has no reference replies"))
    if not cases:
        result.skipped["generation"] = "the evaluation data has no chat prompts (text documents: loss only)"
        return result
    completions = generate_replies(model, tokenizer, cases, max_new_tokens)
    result.replies = [c.text.strip() for c in completions]
    lengths = [len(c.token_ids) - int(c.stopped) for c in completions]  # the stop token is not reply text
    result.metrics.update(reply_stats(result.replies, lengths, [c.stopped for c in completions]))
    scored, skipped = reference_metrics(result.replies, [c.reference for c in cases])
    result.metrics.update(scored)
    result.skipped.update(skipped)
    return result


def reference_stats(tokenizer: Any, cases: list[EvalCase]) -> dict[str, float]:
    """The same reply statistics for the references: what the replies should look like."""
    refs = [c.reference for c in cases if c.reference is not None]
    if not refs:
        return {}
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs]
    stats = reply_stats(refs, lengths, [True] * len(refs))
    del stats["ended_share"]
    return stats
