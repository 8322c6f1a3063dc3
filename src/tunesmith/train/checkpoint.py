"""Resumable checkpoints, written atomically: a crash mid-save never leaves a half checkpoint.

Layout: `OUTPUT/checkpoints/step-000120/` holding `trainable.safetensors` (all weights for
full fine-tuning, the adapter for LoRA), `optimizer.pt`, `scheduler.pt`, `rng.pt` and
`state.json` (step, data position, metrics so far). It is written to a hidden temp dir
that is renamed into place only when complete (rename is atomic on one filesystem), and
only the newest `keep` survive. Only rank 0 writes.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import UserError
from tunesmith.model.adapters import trainable_state

PREFIX = "step-"


@dataclass
class TrainState:
    """Where training is: enough to continue exactly as if never stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch comes from
    batch_in_epoch: int = 0  # index of the next micro-batch within that epoch
    tokens: int = 0  # real tokens trained on so far
    best_eval_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # metric records logged so far
    checkpoint: str | None = None  # the newest complete checkpoint (named if training diverges)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp dirs of an interrupted save are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (dropout, sampling), to restore on resume."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, keep: int) -> Path:
    """Write a checkpoint for `state.step` atomically, then prune to the newest `keep`.

    A full disk (or any failed write) is a `UserError` naming the checkpoint that is still
    intact; nothing half-written is left behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:06d}"
    remove_partial(root)  # temp dirs of a save that was killed (this run holds the output lock)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, optimizer, scheduler, state)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(root, final, exc, "the checkpoint") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep]:
        _discard(old)
    return final


def _write_files(tmp: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 state: TrainState) -> None:
    """The checkpoint's files, each flushed to disk; state.json last (it marks the dir complete)."""
    from safetensors.torch import save_file

    from tunesmith.train.output import honour_umask

    tensors = {k: v.contiguous() for k, v in trainable_state(model).items()}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    honour_umask(tmp)  # safetensors writes 0600 (see train.output.honour_umask)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename publishes the directory
    _fsync_dir(tmp)


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a checkpoint: renamed out of the `step-` namespace first, so a kill mid-delete leaves no
    half-deleted directory that looks complete."""
    trash = path.with_name(f".tmp-trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_partial(root: Path) -> None:
    """Delete what interrupted saves and deletes left (`.tmp-*`); only safe while holding the output lock."""
    if root.is_dir():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def write_failed(root: Path, target: Path, exc: OSError, what: str) -> UserError:
    """The error for a failed write of `what` to `target`: what failed, which checkpoint under `root` is
    intact, what to do."""
    existing = checkpoint_dirs(root)
    kept = (f"the last complete checkpoint, {existing[-1]}, is intact: --resume continues from it"
            if existing else "no earlier checkpoint exists")
    fix = ("free disk space (or lower --keep-checkpoints)" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "check that the output directory is writable")
    return UserError(f"{target}: could not write {what} ({exc.strerror or exc})", [f"{kept}; {fix}"])


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    """Restore model (trainable part), optimizer, scheduler and RNG from `path`; return its state."""
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    tensors = load_file(str(path / "trainable.safetensors"), device=str(device))
    expected = set(trainable_state(model))
    if set(tensors) != expected:
        raise UserError(f"{path}: checkpoint does not match this run's trainable parameters "
                        f"({len(tensors)} saved, {len(expected)} expected); same --model and --method?")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    state.checkpoint = str(path)
    return state
