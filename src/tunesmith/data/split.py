"""Train/test split: a fixed-seed shuffle, so a rerun holds out exactly the same samples."""
from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_train_eval(items: list[T], test_split: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `round(len * test_split)` items (at least 1 when test_split > 0 and there are 2+).

    The order within each part follows the input, so the split is stable and readable;
    training shuffles on its own.
    """
    if test_split <= 0 or len(items) < 2:
        return list(items), []
    n_eval = min(len(items) - 1, max(1, round(len(items) * test_split)))
    held = set(random.Random(seed).sample(range(len(items)), n_eval))
    train = [x for i, x in enumerate(items) if i not in held]
    evals = [x for i, x in enumerate(items) if i in held]
    return train, evals
