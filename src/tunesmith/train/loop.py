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

import contextlib
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


def stage(micro_batches: list[Batch], device: torch.device) -> list[Batch]:
    """The micro-batches on `device`. On CUDA: from pinned memory, without blocking the host.

    A copy from ordinary (pageable) memory makes the host wait; a pinned, non-blocking copy
    is queued behind the GPU work already launched, so the host keeps running ahead.
    """
    if device.type != "cuda":
        return [b.to(device) for b in micro_batches]

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.pin_memory().to(device, non_blocking=True)

    return [Batch(move(b.input_ids), move(b.targets), move(b.position_ids), b.num_targets,
                  move(b.attention_mask), b.num_tokens) for b in micro_batches]


def accumulate(model: Any, micro_batches: list[Batch], loss_fn: LossFn,
               device: torch.device) -> tuple[torch.Tensor, int]:
    """Forward/backward every micro-batch; gradients = those of the mean loss over all their targets.

    Returns the step's mean loss as a 0-dim tensor on `device` (read it later: reading it
    now would make the host wait for the GPU) and its trained-token count.
    """
    total = sum(b.num_targets for b in micro_batches)
    denominator = max(total, 1)
    loss_total = torch.zeros((), device=device)
    for batch in micro_batches:
        loss_sum, _count = loss_fn(model, batch.to(device))
        (loss_sum / denominator).backward()
        loss_total += loss_sum.detach().float()
    return loss_total / denominator, total


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


@dataclass
class StepResult:
    """One optimizer step's loss and gradient norm, still on the device, and how to report it.

    The host reads them one step later (`read`), when the GPU has long finished them, so the
    loop never waits for the GPU inside a step. A NaN/inf is still caught before anything
    is evaluated or saved: the loop reads the pending step before every evaluation and
    checkpoint, so a checkpoint never holds diverged weights.
    """

    step: int
    loss: torch.Tensor  # () fp32
    norm: torch.Tensor  # () fp32
    last_checkpoint: Path | None
    record: dict[str, Any]
    tokens: int = 0  # real tokens of the step

    def read(self) -> tuple[float, float]:
        """(loss, gradient norm) on the host, one sync for both; raises if either is not finite."""
        loss, norm = torch.stack([self.loss.float(), self.norm.float()]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written yet")
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            raise TrainingDiverged(
                f"training diverged at step {self.step}: {what}; stopped ({kept})",
                ["fix: lower --lr (e.g. by 10x), keep --grad-clip 1.0, check the data for broken samples; "
                 "--resume continues from the last checkpoint"])
        return loss, norm


def optimizer_step(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float,
                   loss: torch.Tensor | float, state: TrainState, last_checkpoint: Path | None) -> StepResult:
    """Clip and step; the finiteness check is deferred to `StepResult.read` (no host sync here).

    The clipped parameters are the optimizer's (exactly the trainable ones), not a fresh
    walk over the model's modules every step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.as_tensor(loss, dtype=torch.float32, device=norm.device)
    return StepResult(state.step + 1, loss, norm, last_checkpoint, {})


def train(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, plan: DataPlan, eval_batches: list[Batch],
          opts: LoopOptions, state: TrainState, steps: int, log: RunLog, loss_fn: LossFn, save: SaveFn,
          device: torch.device, last_checkpoint: Path | None = None) -> TrainState:
    """Run optimizer steps from `state.step` to `steps`; evaluate and checkpoint on schedule.

    Step N's loss is read while step N+1 runs on the GPU (see `StepResult`); tokens/s is
    real tokens over wall time (evaluations and checkpoints excluded).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    clock = Clock()
    groups = step_groups(plan, opts.grad_accum, state)
    pending: StepResult | None = None
    while state.step < steps:
        epoch, next_index, progress, micro = next(groups)
        lr = optimizer.param_groups[0]["lr"]
        loss, _targets = accumulate(model, stage(micro, device), loss_fn, device)
        result = optimizer_step(model, optimizer, scheduler, opts.grad_clip, loss, state, last_checkpoint)
        tokens = sum(b.num_tokens for b in micro)
        state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, next_index
        state.tokens += tokens
        result.tokens = tokens
        result.record = {"step": state.step, "epoch": round(progress, 4), "lr": lr, "tokens": state.tokens}
        if pending is not None:
            report(pending, log, clock)  # waits for the previous step only: this one is queued behind it
        pending = result
        evaluating = opts.eval_every and state.step % opts.eval_every == 0 and state.step < steps and eval_batches
        saving = opts.save_every and state.step % opts.save_every == 0
        if evaluating or saving:
            report(pending, log, clock)
            pending = None
            with clock.paused():
                if evaluating:
                    record_eval(model, eval_batches, loss_fn, device, state, log)
                if saving:
                    state.history = list(log.history)
                    last_checkpoint = save(state)
                    log.message(f"checkpoint: {last_checkpoint}")
    if pending is not None:
        report(pending, log, clock)
    state.history = list(log.history)
    return state


class Clock:
    """Wall time of training (evaluations and checkpoints excluded) and the tokens it covered."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.excluded = 0.0
        self.tokens = 0

    def speed(self) -> float:
        """Real tokens per second of the steps read so far."""
        return self.tokens / max(time.perf_counter() - self.started - self.excluded, 1e-9)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start


def report(result: StepResult, log: RunLog, clock: Clock) -> None:
    """Read a finished step's loss and norm (raises on NaN/inf), log them and move the bar."""
    loss, norm = result.read()
    clock.tokens += result.tokens
    record = {**result.record, "train_loss": loss, "grad_norm": norm, "tokens_per_s": clock.speed()}
    record = {k: record[k] for k in ("step", "epoch", "train_loss", "lr", "grad_norm", "tokens", "tokens_per_s")}
    log.log(record)
    log.advance(record["step"], record["epoch"], loss, record["lr"], record["tokens_per_s"])


def record_eval(model: Any, eval_batches: list[Batch], loss_fn: LossFn, device: torch.device,
                state: TrainState, log: RunLog) -> dict[str, float]:
    """Evaluate, log, and keep the best eval loss in `state`."""
    result = evaluate(model, eval_batches, loss_fn, device)
    if state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss:
        state.best_eval_loss = result["eval_loss"]
    log.log({"step": state.step, **result})
    log.message(f"step {state.step}: eval loss {result['eval_loss']:.4f} (perplexity {result['eval_perplexity']:.2f})")
    return result
