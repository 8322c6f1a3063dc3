"""Resumable checkpoints, written atomically: a crash mid-save never leaves a half checkpoint.

Layout: `OUTPUT/checkpoints/step-000120/` holding a `torch.distributed.checkpoint` (DCP)
of the trainable weights (all of them for full fine-tuning, the adapter for LoRA) and the
optimizer state (`.metadata` + one `__R_0.distcp` file per rank: every rank writes its own
shard), `scheduler.pt`, `rng-R.pt` (each rank's RNG) and `state.json` (step, data position,
metrics so far). DCP stores each tensor as a whole with the place of every shard, so a
checkpoint loads into any number of processes (2 ranks -> 1, FSDP2 -> one process or DDP).
It is written to a hidden temp dir that rank 0 renames into place once every rank has
finished (rename is atomic on one filesystem; several machines need a shared one), with
`state.json` last; only the newest `keep` survive.
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
from tunesmith.train.distributed import Dist

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


def _state_dicts(model: Any, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainable weights and the optimizer state, keyed by parameter name (sharded where the model is).

    Frozen weights are left out: they come from the base model, as the run loads it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_checkpoint(root: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, keep: int, dist: Dist | None = None) -> Path:
    """Write a checkpoint for `state.step` atomically (every rank its shard), then prune to the newest `keep`.

    Every file is flushed to disk before rank 0's rename publishes the directory, so a kill
    or power loss never leaves a directory that looks complete. A full disk (or any failed
    write) is a `UserError` naming the checkpoint that is still intact.
    """
    import torch.distributed.checkpoint as dcp

    dist = dist or Dist()
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    try:
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            remove_partial(root)  # temp dirs of a save that was killed (this run holds the output lock)
            tmp.mkdir()
        dist.barrier()
        weights, optim = _state_dicts(model, optimizer)
        dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(tmp), no_dist=not dist.enabled)
        torch.save(rng_state(), tmp / f"rng-{dist.rank}.pt")
        if dist.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _fsync_files(tmp, dist.rank)
        dist.barrier()  # every shard is on disk
        if dist.is_main:
            (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")  # written last
            _fsync_files(tmp, None, names=("state.json",))
            if final.exists():
                _discard(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except OSError as exc:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(root, final, exc, "the checkpoint") from None
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_main:
        for old in checkpoint_dirs(root)[:-keep]:
            _discard(old)
    dist.barrier()  # nobody reads or resumes before the checkpoint is in place
    return final


def _fsync_files(directory: Path, rank: int | None, names: tuple[str, ...] = ()) -> None:
    """Flush this rank's files in `directory` (all of them for rank 0, or just `names`) to disk."""
    if names:
        paths = [directory / n for n in names]
    else:
        paths = [f for f in directory.iterdir() if f.is_file()
                 and (rank in (None, 0) or f.name.startswith((f"__{rank}_", f"rng-{rank}.")))]
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


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


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    dist: Dist | None = None) -> TrainState:
    """Restore model (trainable part), optimizer, scheduler and RNG from `path`; return its state.

    Works whatever number of processes wrote it: each rank reads the parts of every tensor
    that its own shards need.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    dist = dist or Dist()
    if not (path / ".metadata").is_file():
        raise UserError(f"{path}: not a checkpoint this version can read (no .metadata: written before "
                        "checkpoints became torch.distributed.checkpoint directories)",
                        ["fix: start the run again without --resume"])
    weights, optim = _state_dicts(model, optimizer)
    saved = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    if saved != set(weights):
        raise UserError(f"{path}: checkpoint does not match this run's trainable parameters "
                        f"({len(saved)} saved, {len(weights)} expected); same --model and --method?")
    dcp.load({"model": weights, "optimizer": optim}, checkpoint_id=str(path), no_dist=not dist.enabled)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{dist.rank}.pt"
    set_rng_state(torch.load(rng if rng.is_file() else path / "rng-0.pt", weights_only=True))
    state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    state.checkpoint = str(path)
    return state
