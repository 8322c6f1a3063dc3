"""DPO's reference log-probs for full fine-tuning: one pass before training, cached with the tokenized data
(`--reference cached`, the default), or a frozen copy of the starting weights scoring each batch (`live`).

With an adapter, the reference is the same weights with the adapter switched off (computed
live in the loss, no second copy). Training every weight would need a frozen second copy
to compare against; instead, before the first step (while the weights still ARE the
reference), one no-grad pass scores every train and held-out pair, and the loss reads
those numbers from the batch. They are written beside the tokenized data
(`<cache entry>/reference-<fingerprint>.npz`): a rerun or a resume reuses them; other
weights (or dtype or device kind) give another fingerprint, other data another cache entry.
"""
from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.data.packing import collate_pairs, group_by_budget

REFERENCE_PREFIX = "reference-"


@torch.no_grad()
def model_fingerprint(model: Any) -> str:
    """A hash of the weights' values (two moments of every parameter, in fp64), dtype and device kind.

    Reads every weight once on its own device (milliseconds on a GPU); any change to a
    weight, its dtype or the device kind (whose kernels round differently) changes it.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().flatten().double()
        moments = torch.stack([flat.sum(), (flat * flat).sum(), flat[: 1 + flat.numel() // 2].sum()])
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.device.type}:".encode())
        digest.update(np.asarray(moments.cpu(), dtype=np.float64).tobytes())
    return digest.hexdigest()[:20]


@torch.no_grad()
def score_pairs(model: Any, pairs: list[Any], batch_tokens: int, device: torch.device,
                padded: bool = False, pad_id: int = 0, logps: Any = None) -> np.ndarray:
    """Summed log-probs `(N, 2)` of each pair's (chosen, rejected) reply under `model` as it is now.

    `logps` is the loss's own log-prob function (fused on the fast path), so the cached
    reference and the policy are computed by the same kernels and rewards start at 0.
    """
    from tunesmith.train.preference import sequence_logps

    logps = logps or sequence_logps
    was_training = model.training
    model.eval()
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    for group in group_by_budget([len(p.input_ids) for p in pairs], batch_tokens):
        batch = collate_pairs([pairs[i] for i in group], padded=padded, pad_id=pad_id).to(device)
        out[group] = logps(model, batch)[0].double().cpu().numpy()
    model.train(was_training)
    return out


def _load(path: Path, sizes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (train, eval) reference arrays of the expected sizes, or None."""
    try:
        with np.load(path) as arrays:
            train, evals = arrays["train"], arrays["eval"]
    except (OSError, ValueError, KeyError):
        return None
    return (train, evals) if (len(train), len(evals)) == sizes else None


def _save(path: Path, train: np.ndarray, evals: np.ndarray) -> None:
    """Write atomically: a crashed pass never leaves half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ref-", suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, train=train, eval=evals)
    os.replace(tmp, path)


def attach(pairs: list[Any], values: np.ndarray) -> None:
    """Store each pair's reference log-probs on it (collate_pairs puts them in the batch)."""
    for pair, (chosen, rejected) in zip(pairs, values.tolist()):
        pair.reference = (chosen, rejected)


def score_shared(run: Any, pairs: list[Any]) -> np.ndarray:
    """`score_pairs` of `pairs`, each rank scoring every world-th pair, summed over ranks.

    The pass runs before the model is wrapped (every rank still holds all the weights), so
    under DDP or FSDP2 the ranks split the work instead of each scoring everything.
    """
    dist = run.dist
    share = list(range(dist.rank, len(pairs), dist.world))
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    if share:
        out[share] = score_pairs(run.model, [pairs[i] for i in share], run.config.loop.batch_tokens, run.device,
                                 run.padded, run.pad_id, getattr(run.loss_fn, "logps", None))
    if dist.enabled:
        total = dist.sum(torch.from_numpy(out).to(run.device))
        out = total.cpu().numpy()
    return out


def keep_live_reference(run: Any) -> None:
    """`--reference live`: a frozen copy of the starting weights, which the loss scores each batch with.

    Taken before the first step and before any checkpoint is loaded, so a resumed run
    compares with the same starting weights. Costs the weights' memory once more and one
    no-grad forward per step; no pass before training, nothing cached.
    """
    frozen = copy.deepcopy(run.model).eval().requires_grad_(False)
    run.loss_fn.reference_model = frozen
    count = sum(p.numel() for p in frozen.parameters())
    run.notices.append(f"reference: live, a frozen copy of the starting weights ({count:,} parameters more in "
                       "memory) scores each batch")


def prepare_reference(run: Any) -> None:
    """The `before_training` hook of DPO: nothing with an adapter; else the live copy, or load or compute the pass.

    Rank 0 reads and writes the cache and tells the others what it found, so every rank
    takes the same branch (a rank scoring alone would wait for the others forever).
    """
    if run.recipe.params.adapter:
        return
    if run.config.method.reference == "live":
        keep_live_reference(run)
        return
    prepared, say, dist = run.prepared, run.notices.append, run.dist
    fingerprint = model_fingerprint(run.model)
    entry = prepared.cache_entry
    path = Path(entry) / f"{REFERENCE_PREFIX}{fingerprint}.npz" if entry is not None else None
    sizes = (len(prepared.train), len(prepared.eval))
    cached = dist.on_main(lambda: _load(path, sizes) if path is not None and path.is_file() else None)
    if cached is not None:
        say(f"reference log-probs: cached ({path})")
    else:
        cached = tuple(score_shared(run, pairs) for pairs in (prepared.train, prepared.eval))
        if path is not None:
            dist.on_main(lambda: _save(path, *cached))
        split = f", shared out over {dist.world} processes" if dist.enabled else ""
        say(f"reference log-probs: computed for {len(prepared.train) + len(prepared.eval)} pairs "
            f"before training{split} (the reference model is not kept in memory)")
    attach(prepared.train, cached[0])
    attach(prepared.eval, cached[1])
