"""Held-out preference pairs: does a model prefer the chosen reply, and by how much?

For each pair, the model's summed log-prob of the chosen and of the rejected reply (the
tokens training scores: the reply through its end-of-turn token, after the inference
prompt). Per model: `preference_accuracy` (share of pairs where chosen is the likelier)
and `preference_margin` (mean log-prob difference, nats). Between a tuned model and its
base (the DPO reference), the implicit reward of a reply is
log pi_tuned(y|x) - log pi_base(y|x) (DPO's reward over beta): `reward_accuracy` is the
share of pairs whose implicit reward prefers chosen, `reward_margin` its mean gap.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tunesmith.config import DataOptions
from tunesmith.data.conversation import Conversation

MAX_LENGTH = 2048
BATCH_TOKENS = 2048


def preference_pairs(convs: list[Conversation], tokenizer: Any) -> list[Any]:
    """The held-out pairs tokenized as training tokenizes them (pairs that cannot train are left out)."""
    from tunesmith.data.pairs import tokenize_pairs

    prefs = [c for c in convs if c.kind == "preference"]
    if not prefs:
        return []
    return tokenize_pairs(prefs, tokenizer, DataOptions(max_length=MAX_LENGTH, skip_invalid=True))[0]


def pair_logps(model: Any, pairs: list[Any]) -> np.ndarray:
    """`(N, 2)` summed log-probs of (chosen, rejected) under `model`."""
    from tunesmith.train.reference import score_pairs

    return score_pairs(model, pairs, BATCH_TOKENS, model.device)


def preference_metrics(logps: np.ndarray) -> dict[str, float]:
    """A model's own preference between the replies of each pair."""
    gap = logps[:, 0] - logps[:, 1]
    return {"preference_accuracy": float((gap > 0).mean()), "preference_margin": float(gap.mean())}


def reward_metrics(tuned: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """The tuned model's implicit reward against its base (what DPO optimises, over beta)."""
    reward = tuned - base  # (N, 2)
    gap = reward[:, 0] - reward[:, 1]
    return {"reward_accuracy": float((gap > 0).mean()), "reward_margin": float(gap.mean())}
