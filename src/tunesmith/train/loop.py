"""The one training loop. A method plugs in as its trainable parameters plus a `LossFn`.

Per optimizer step: take `grad_accum` micro-batches, count the trained tokens of all of
them, backpropagate each micro-batch's summed loss divided by that count (so the step's
gradient is that of the mean over every trained token, however the tokens were packed,
padded or split), check the loss is finite, clip, step, schedule. Evaluation and
checkpoints happen between steps. Data position is (epoch, micro-batch index), and
batches are a pure function of (seed, epoch), so a resumed run sees the same batches.

Distributed later: each rank packs its own shard (`epoch_batches(rank=...)`); the trained
token count must then be all-reduced before dividing; only rank 0 logs and saves.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import LoopOptions
from tunesmith.data.packing import Batch, collate, epoch_groups
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.errors import UserError
from tunesmith.train.checkpoint import TrainState
from tunesmith.train.losses import LossFn
from tunesmith.train.progress import RunLog

SaveFn = Callable[[TrainState], Path]


class TrainingDiverged(UserError):
    """The loss or gradient became NaN/inf: stop, keep the last good checkpoint."""


@dataclass
class DataPlan:
    """How samples become batches: the same for every epoch except the shuffle."""

    samples: list[TokenizedSample]
    batch_tokens: int
    seed: int
    padded: bool = False
    pad_id: int = 0
    rank: int = 0
    world_size: int = 1

    def groups(self, epoch: int) -> list[list[int]]:
        """Sample indices of each micro-batch of `epoch` for this rank."""
        return epoch_groups(self.samples, self.batch_tokens, self.seed, epoch, rank=self.rank,
                            world_size=self.world_size)

    def collate(self, group: list[int]) -> Batch:
        """The micro-batch of these sample indices."""
        return collate([self.samples[i] for i in group], padded=self.padded, pad_id=self.pad_id)


def total_steps(plan: DataPlan, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the run: --max-steps, else epochs x steps per epoch (rounded up)."""
    if max_steps is not None:
        return max_steps
    per_epoch = math.ceil(len(plan.groups(0)) / grad_accum)
    return max(1, math.ceil(epochs * per_epoch))


def step_groups(plan: DataPlan, grad_accum: int, state: TrainState) -> Iterator[tuple[int, int, float, list[Batch]]]:
    """(epoch, next batch index, epoch progress, micro-batches) per optimizer step, from `state` on, forever."""
    epoch, start = state.epoch, state.batch_in_epoch
    while True:
        groups = plan.groups(epoch)
        for i in range(start, len(groups), grad_accum):
            end = min(i + grad_accum, len(groups))
            yield epoch, end, epoch + end / len(groups), [plan.collate(g) for g in groups[i:end]]
        epoch, start = epoch + 1, 0


def accumulate(model: Any, micro_batches: list[Batch], loss_fn: LossFn, device: torch.device) -> tuple[float, int]:
    """Forward/backward every micro-batch; gradients = those of the mean loss over all their targets.

    Returns the step's mean loss and its trained-token count.
    """
    total = sum(b.num_targets for b in micro_batches)
    denominator = max(total, 1)
    loss_total = torch.zeros((), device=device)
    for batch in micro_batches:
        loss_sum, _count = loss_fn(model, batch.to(device))
        (loss_sum / denominator).backward()
        loss_total += loss_sum.detach().float()  # no host sync per micro-batch: one at the end of the step
    return float(loss_total) / denominator, total


@torch.no_grad()
def evaluate(model: Any, batches: list[Batch], loss_fn: LossFn, device: torch.device) -> dict[str, float]:
    """Mean held-out loss over every target token, and its perplexity."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        s, n = loss_fn(model, batch.to(device))
        loss_sum, count = loss_sum + float(s), count + n
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def optimizer_step(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float,
                   loss: float, state: TrainState, last_checkpoint: Path | None) -> float:
    """Clip and step, unless loss or gradient is not finite (then stop with a clear message)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not (math.isfinite(loss) and math.isfinite(float(norm))):
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {float(norm)}"
        raise TrainingDiverged(
            f"training diverged at step {state.step + 1}: {what}; stopped ({kept})",
            ["fix: lower --lr (e.g. by 10x), keep --grad-clip 1.0, check the data for broken samples; "
             "--resume continues from the last checkpoint"])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def train(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, plan: DataPlan, eval_batches: list[Batch],
          opts: LoopOptions, state: TrainState, steps: int, log: RunLog, loss_fn: LossFn, save: SaveFn,
          device: torch.device, last_checkpoint: Path | None = None) -> TrainState:
    """Run optimizer steps from `state.step` to `steps`; evaluate and checkpoint on schedule."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    train_seconds, run_tokens = 0.0, 0
    groups = step_groups(plan, opts.grad_accum, state)
    while state.step < steps:
        epoch, next_index, progress, micro = next(groups)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss, _targets = accumulate(model, micro, loss_fn, device)
        norm = optimizer_step(model, optimizer, scheduler, opts.grad_clip, loss, state, last_checkpoint)
        train_seconds += time.perf_counter() - started
        tokens = sum(b.num_tokens for b in micro)
        run_tokens += tokens
        state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, next_index
        state.tokens += tokens
        speed = run_tokens / max(train_seconds, 1e-9)
        log.log({"step": state.step, "epoch": round(progress, 4), "train_loss": loss, "lr": lr,
                 "grad_norm": norm, "tokens": state.tokens, "tokens_per_s": speed})
        log.advance(state.step, progress, loss, lr, speed)
        if opts.eval_every and state.step % opts.eval_every == 0 and state.step < steps and eval_batches:
            record_eval(model, eval_batches, loss_fn, device, state, log)
        if opts.save_every and state.step % opts.save_every == 0:
            state.history = list(log.history)
            last_checkpoint = save(state)
            log.message(f"checkpoint: {last_checkpoint}")
    state.history = list(log.history)
    return state


def record_eval(model: Any, eval_batches: list[Batch], loss_fn: LossFn, device: torch.device,
                state: TrainState, log: RunLog) -> dict[str, float]:
    """Evaluate, log, and keep the best eval loss in `state`."""
    result = evaluate(model, eval_batches, loss_fn, device)
    if state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss:
        state.best_eval_loss = result["eval_loss"]
    log.log({"step": state.step, **result})
    log.message(f"step {state.step}: eval loss {result['eval_loss']:.4f} (perplexity {result['eval_perplexity']:.2f})")
    return result
