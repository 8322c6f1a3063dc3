"""The one training loop. A method plugs in as its trainable parameters plus a `LossFn`.

Per optimizer step: take `grad_accum` micro-batches, count the trained tokens of all of
them, backpropagate each micro-batch's summed loss divided by that count (so the step's
gradient is that of the mean over every trained token, however the tokens were packed,
padded or split), check the loss is finite, clip, step, schedule. Evaluation and
checkpoints happen between steps. Data position is (epoch, micro-batch index), and
batches are a pure function of (seed, epoch), so a resumed run sees the same batches.

More than one process (`train.distributed`): each step's samples are shared out among the
ranks by tokens (`DataPlan.share`), so a step holds the same samples for any world size; the
unit count is summed over ranks before dividing (token-weighted, not a mean of per-rank
means), and so are the reported loss and metrics; only rank 0 logs. `Engine.dist` defaults
to one process, where all of that is a no-op.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import LoopOptions
from tunesmith.data.packing import Batch, collate, epoch_groups, split_step
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.errors import UserError
from tunesmith.model import graphs
from tunesmith.train.checkpoint import TrainState
from tunesmith.train.distributed import Dist, as_placeholder
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
    world: int = 1
    collate_fn: Callable[..., Batch] | None = None  # the objective's collator; None: one sequence per sample

    def groups(self, epoch: int) -> list[list[int]]:
        """Sample indices of each micro-batch of `epoch` (of the whole run, whatever the world size)."""
        return epoch_groups(self.samples, self.batch_tokens, self.seed, epoch)

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Tokens of each sample."""
        return [len(s.input_ids) for s in self.samples]

    def share(self, step: list[list[int]]) -> list[list[int]]:
        """This rank's micro-batches of one step's groups (all of them in a single process)."""
        return split_step(step, self.lengths, self.world, self.batch_tokens)[self.rank] if self.world > 1 else step

    def collate(self, group: list[int]) -> Batch:
        """The micro-batch of these sample indices; `[]` is a placeholder (runs, counts nothing)."""
        if not group:
            shortest = min(range(len(self.samples)), key=self.lengths.__getitem__)
            return as_placeholder(self.collate([shortest]))
        return (self.collate_fn or collate)([self.samples[i] for i in group], padded=self.padded, pad_id=self.pad_id)


@dataclass
class Engine:
    """What an optimizer step needs: the model, how it is updated, how it is scored, where it runs."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: LossFn
    device: torch.device
    dist: Dist = field(default_factory=Dist)  # one process unless `train.distributed` says otherwise


def total_steps(plan: DataPlan, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the run: --max-steps, else epochs x steps per epoch (rounded up)."""
    if max_steps is not None:
        return max_steps
    per_epoch = math.ceil(len(plan.groups(0)) / grad_accum)
    return max(1, math.ceil(epochs * per_epoch))


def step_groups(plan: DataPlan, grad_accum: int,
                state: TrainState) -> Iterator[tuple[int, int, float, list[Batch], int]]:
    """(epoch, next batch index, epoch progress, this rank's micro-batches, the step's tokens on all ranks)
    per optimizer step, from `state` on, forever."""
    epoch, start = state.epoch, state.batch_in_epoch
    while True:
        groups = plan.groups(epoch)
        for i in range(start, len(groups), grad_accum):
            end = min(i + grad_accum, len(groups))
            tokens = sum(plan.lengths[k] for g in groups[i:end] for k in g)
            yield epoch, end, epoch + end / len(groups), [plan.collate(g) for g in plan.share(groups[i:end])], tokens
        epoch, start = epoch + 1, 0


def accumulate(model: Any, micro_batches: list[Batch], loss_fn: LossFn, device: torch.device,
               dist: Dist | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Forward/backward every micro-batch; gradients = those of the mean loss over all their units.

    Returns the step's mean loss and mean metrics as 0-dim tensors on `device` (read them
    later: reading now would make the host wait for the GPU) and this rank's unit count.
    With several ranks, the units (and the loss and metric sums) are summed over ranks: every
    unit of the global step weighs the same. A placeholder (`num_targets == 0`) runs with
    weight 0, so ranks with fewer micro-batches still take part in every collective. No
    micro-batch's autograd graph outlives it, which is what lets the fast path record its
    CUDA graphs here (`model.graphs.may_record`).
    """
    dist = dist or Dist()
    total = sum(b.num_targets for b in micro_batches)
    denominator: Any = max(total, 1)
    if dist.enabled:
        denominator = dist.sum(torch.tensor(float(total), device=device)).clamp(min=1.0)  # () all ranks' units
    loss_total = torch.zeros((), device=device)
    metric_totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        with dist.grad_sync(last=index == len(micro_batches) - 1), graphs.may_record():
            result = loss_fn(model, batch.to(device))
            weight = 1.0 if batch.num_targets else 0.0
            (result.total * (weight * dist.grad_scale) / denominator).backward()
        loss_total += weight * result.total.detach().float()
        for name, value in result.metrics.items():
            metric_totals[name] = metric_totals.get(name, 0) + weight * value.detach().float()
        del result  # no autograd graph outlives its micro-batch (what `graphs.may_record` vouches for)
    if dist.enabled:
        names = sorted(metric_totals)
        summed = dist.sum(torch.stack([loss_total, *(metric_totals[n] for n in names)]))
        loss_total, metric_totals = summed[0], dict(zip(names, summed[1:]))
    return loss_total / denominator, {k: v / denominator for k, v in metric_totals.items()}, total


@torch.no_grad()
def evaluate(model: Any, batches: list[Batch], loss_fn: LossFn, device: torch.device,
             dist: Dist | None = None) -> dict[str, float]:
    """Mean held-out loss over every unit (and its perplexity), and the loss's metrics, as `eval_*`.

    With several ranks, each evaluates its share (`distributed.share_batches`) and the sums
    are added up over ranks; placeholders run but count nothing.
    """
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    metric_sums: dict[str, float] = {}
    for batch in batches:
        result = loss_fn(model, batch.to(device))
        weight = 1.0 if batch.num_targets else 0.0
        loss_sum, count = loss_sum + weight * float(result.total), count + int(weight) * result.count
        for name, value in result.metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + weight * float(value)
    model.train(was_training)
    if dist.enabled:
        names = sorted(metric_sums)
        summed = dist.sum(torch.tensor([loss_sum, count, *(metric_sums[n] for n in names)], dtype=torch.float64,
                                       device=device)).tolist()
        loss_sum, count, metric_sums = summed[0], int(summed[1]), dict(zip(names, summed[2:]))
    loss = loss_sum / max(count, 1)
    metrics = {f"eval_{name}": value / max(count, 1) for name, value in metric_sums.items()}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), **metrics}


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's loss, gradient norm and metrics, on their way to the host, and its record.

    The host reads them one step later (`read`), when the GPU has long finished them, so the
    loop never waits for the GPU inside a step. A NaN/inf is still caught before anything
    is evaluated or saved: the loop reads the pending step before every evaluation and
    checkpoint, so a checkpoint never holds diverged weights.
    """

    step: int
    values: torch.Tensor  # (2 + metrics,) fp32: loss, norm, then the metrics (means over the step's units)
    names: list[str]  # the metrics' names, in `values` order
    ready: Any  # the CUDA event after the copy of `values` to the host; None where `values` is readable now
    last_checkpoint: str | None
    record: dict[str, Any]  # step, epoch, lr, tokens so far
    tokens: int  # real tokens of the step

    @classmethod
    def start(cls, step: int, loss: torch.Tensor, norm: torch.Tensor, metrics: dict[str, torch.Tensor],
              last_checkpoint: str | None, record: dict[str, Any], tokens: int) -> StepResult:
        """Queue the copy of the step's values to the host behind the step itself.

        Read later with `.tolist()` on the GPU tensor, the values would be gathered only
        then, behind the NEXT step's kernels already queued, and the host would wait for
        that whole step: the GPU's queue would run dry at every step while the host
        prepares the next one. A non-blocking copy into pinned memory queued now, and an
        event after it, makes `read` wait for this step only.
        """
        names = list(metrics)
        values = torch.stack([loss.to(norm.device).float(), norm.float(), *(metrics[n].float() for n in names)])
        ready = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values, ready = host.copy_(values, non_blocking=True), torch.cuda.Event()
            ready.record()
        return cls(step, values, names, ready, last_checkpoint, record, tokens)

    def read(self) -> tuple[float, float, dict[str, float]]:
        """(loss, gradient norm, metrics) on the host; raises if loss or norm is not finite."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.values.tolist()
        loss, norm = values[0], values[1]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was written yet")
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            raise TrainingDiverged(
                f"training diverged at step {self.step}: {what}; stopped ({kept})",
                ["fix: lower --lr (e.g. by 10x), keep --grad-clip 1.0, check the data for broken samples; "
                 "--resume continues from the last checkpoint"])
        return loss, norm, dict(zip(self.names, values[2:]))


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float) -> torch.Tensor:
    """Clip, step, schedule; returns the gradient norm before clipping (on the device, not read).

    The clipped parameters are the optimizer's (exactly the trainable ones), not a fresh
    walk over the model's modules every step. An optimizer that `fuses_grad_scale` gets the
    clip coefficient (torch's: max_norm / (norm + 1e-6), at most 1) and applies it as it reads
    each gradient, which saves a pass over all of them; the others get torch's clipping.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if getattr(optimizer, "fuses_grad_scale", False):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        scale = (grad_clip / (norm + 1e-6)).clamp_(max=1.0) if grad_clip > 0 else None
        optimizer.step(grad_scale=scale)
    else:
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # sharded (FSDP2) gradients give a DTensor norm
            norm = norm.full_tensor()
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train(engine: Engine, plan: DataPlan, eval_batches: list[Batch], opts: LoopOptions, state: TrainState,
          steps: int, log: RunLog, save: SaveFn) -> TrainState:
    """Run optimizer steps from `state.step` to `steps`; evaluate and checkpoint on schedule.

    Step N's loss is read while step N+1 runs on the GPU (see `StepResult`); tokens/s is
    real tokens over wall time (evaluations and checkpoints excluded). `save` writes a
    checkpoint and returns its path; the newest one is named if training diverges.
    """
    engine.model.train()
    engine.optimizer.zero_grad(set_to_none=True)
    clock = Clock()
    groups = step_groups(plan, opts.grad_accum, state)
    pending: StepResult | None = None
    last_checkpoint = state.checkpoint
    while state.step < steps:
        epoch, next_index, progress, micro, tokens = next(groups)
        lr = engine.optimizer.param_groups[0]["lr"]
        loss, metrics, _units = accumulate(engine.model, micro, engine.loss_fn, engine.device, engine.dist)
        norm = optimizer_step(engine.optimizer, engine.scheduler, opts.grad_clip)
        state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, next_index
        state.tokens += tokens
        record = {"step": state.step, "epoch": round(progress, 4), "lr": lr, "tokens": state.tokens}
        result = StepResult.start(state.step, loss, norm, metrics, last_checkpoint, record, tokens)
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
                    record_eval(engine, eval_batches, state, log)
                if saving:
                    state.history = list(log.history)
                    last_checkpoint = state.checkpoint = str(save(state))
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
    """Read a finished step's loss, norm and metrics (raises on NaN/inf), log them and move the bar."""
    loss, norm, metrics = result.read()
    clock.tokens += result.tokens
    record = {"step": result.record["step"], "epoch": result.record["epoch"], "train_loss": loss,
              "lr": result.record["lr"], "grad_norm": norm, "tokens": result.record["tokens"],
              "tokens_per_s": clock.speed(), **metrics}
    log.log(record)
    log.advance(record["step"], record["epoch"], loss, record["lr"], record["tokens_per_s"], metrics)


def record_eval(engine: Engine, eval_batches: list[Batch], state: TrainState, log: RunLog) -> dict[str, float]:
    """Evaluate, log, and keep the best eval loss in `state`."""
    result = evaluate(engine.model, eval_batches, engine.loss_fn, engine.device, engine.dist)
    if state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss:
        state.best_eval_loss = result["eval_loss"]
    log.log({"step": state.step, **result})
    log.message(f"step {state.step}: eval loss {result['eval_loss']:.4f} (perplexity {result['eval_perplexity']:.2f})")
    return result
