"""Resumable checkpoints, written atomically: a crash mid-save never leaves a half checkpoint.

Layout: `OUTPUT/checkpoints/step-000120/` holding `trainable.safetensors` (all weights for
full fine-tuning, the adapter for LoRA), `optimizer.pt`, `scheduler.pt`, `rng.pt` and
`state.json` (step, data position, metrics so far). It is written to a hidden temp dir
that is renamed into place only when complete (rename is atomic on one filesystem), and
only the newest `keep` survive. Only rank 0 writes.
"""
from __future__ import annotations

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
    """Write a checkpoint for `state.step` atomically, then prune to the newest `keep`."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.contiguous() for k, v in trainable_state(model).items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")  # written last
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
