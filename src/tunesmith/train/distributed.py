"""More than one process: torchrun's environment, DDP / FSDP2 wrapping, collectives and failures.

A run is one process per GPU, started by `torchrun` (or by `tunesmith train --gpus N`, which
starts torchrun). Every rank runs the same code; `Dist` is what differs: its rank, the world
size and the collectives. In a single process `Dist()` is a no-op, so the loop and the API
call it unconditionally and a one-process run is exactly what it was before.

- Wrapping: the model and its loss go into one module (`LossModule`), so a loss that calls
  sub-modules directly (the fused loss of the fast path reads the decoder and the head) still
  goes through the wrapper's forward, where DDP and FSDP2 hook in. DDP replicates it (adapter
  methods: the trainable part is small, the frozen base is read-only); FSDP2 `fully_shard`s
  every decoder block and then the root (full fine-tuning), with fp32 master weights, bf16
  compute and fp32 gradient reduction on CUDA (fp32 throughout on CPU).
- Gradients: both wrappers average over ranks; each rank's loss is the sum over its units
  divided by the units of all ranks, times the world size, so the average is exactly the
  gradient of the token-weighted mean over the global step (not a mean of per-rank means).
- Failures: collectives time out (`TIMEOUT`) rather than hang; a rank that raises says which
  rank, what happened and the last good checkpoint (`failure_guard`); ranks stopped by
  torchrun because another one died say so, and exit non-zero.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tunesmith.errors import UserError

TIMEOUT = datetime.timedelta(minutes=10)  # longest any collective may wait (a checkpoint save included)
T = TypeVar("T")


class RankStopped(BaseException):
    """This rank was told to stop (SIGTERM from torchrun: another rank failed). Not an `Exception`,
    so no `except Exception` on the way up swallows it."""


class PeerFailed(SystemExit):
    """Another rank failed first and said so: this rank exits (code 1) without repeating the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(1)
        self.reason = reason


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Dist:
    """This process's place in the run, and the few collectives the loop needs (no-ops alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    wrapper: str = "none"  # "ddp" | "fsdp" | "none": how the model was wrapped (`wrap`)
    root: Any = None  # the DDP / FSDP2 root module (a `LossModule`), once wrapped
    owns_group: bool = False  # True: this run created the process group and ends it

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the output directory."""
        return self.rank == 0

    @property
    def grad_scale(self) -> int:
        """Factor on each rank's loss so that the wrappers' gradient *average* is the global *sum*."""
        return self.world if self.root is not None else 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks (in place; returned for chaining)."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            torch.distributed.barrier()

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one micro-batch: DDP all-reduces gradients only after the step's last one.

        FSDP2 reduce-scatters after every micro-batch: skipping it would keep unsharded
        gradients of the whole model, the memory sharding exists to save.
        """
        if self.wrapper == "ddp" and not last:
            return self.root.no_sync()
        return contextlib.nullcontext()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and give its result to every rank; its error stops all ranks once.

        For what must happen once (clearing the output directory, writing a cache): the
        error is printed by rank 0 alone; the other ranks raise `PeerFailed`, which is quiet.
        """
        if not self.enabled:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, fn())
            except BaseException as exc:
                self.broadcast((False, repr(exc)))
                raise
        ok, value = self.broadcast(outcome)
        if not ok:
            raise PeerFailed(f"rank 0 failed: {value}")
        return value

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then on the other ranks (which then find what rank 0 cached)."""
        if not self.enabled:
            return fn()
        result = self.on_main(fn)
        return result if self.is_main else fn()

    def close(self) -> None:
        """End the process group if this run started it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start(device_type: str) -> Dist:
    """The `Dist` of this process: from torchrun's environment (joining or creating the group), else alone.

    NCCL on CUDA (each rank on GPU `LOCAL_RANK`), gloo on CPU. A group that already exists
    (a program that called `init_process_group` itself) is joined, not replaced.
    """
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not joined and not (under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1):
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    owns = False
    if not joined:
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (see README)
        if device_type == "cuda":  # device_id: NCCL binds this rank's GPU now (no guessing in barriers)
            torch.distributed.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", local_rank))
        else:
            torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        owns = True
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, owns_group=owns)


def launch(nproc: int, argv: list[str]) -> int:
    """Run `tunesmith ARGV` again under torchrun with `nproc` processes on this machine; its exit code.

    What `tunesmith train --gpus N` does; the processes see torchrun's environment and so
    do not launch again. Several machines: run torchrun yourself (see the README).
    """
    import subprocess

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--gpus {nproc}: this machine has {torch.cuda.device_count()} GPU(s)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tunesmith", *argv]
    return subprocess.call(command, env={**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")})


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """torchrun sends SIGTERM to the ranks still running when one fails: stop with a message, not silently."""
    raise RankStopped("stopped by the launcher (another rank failed: torchrun's summary names it)")


def choose_wrapper(parallel: str, adapter: bool) -> str:
    """`--parallel auto`: DDP when only an adapter trains (small, replicated), FSDP2 for full fine-tuning."""
    if parallel != "auto":
        return parallel
    return "ddp" if adapter else "fsdp"


class LossModule(torch.nn.Module):
    """The model and its loss as one module, so the wrapper's forward surrounds the whole loss."""

    def __init__(self, model: Any, loss_fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        """The loss of one micro-batch (a `LossSum`)."""
        return self.loss_fn(self.model, batch)


def wrap(dist: Dist, model: Any, loss_fn: Callable[[Any, Any], Any], wrapper: str, device: torch.device,
         dtype: torch.dtype, cpu_offload: bool = False) -> Callable[[Any, Any], Any]:
    """Wrap `model` + `loss_fn` for data parallelism; returns the loss to call instead (alone: `loss_fn`).

    Call after the parameter set and the fast path (kernels, attention, checkpointing) are
    applied and before the optimizer is built: FSDP2 replaces the parameters by shards.
    """
    if not dist.enabled:
        return loss_fn
    module = LossModule(model, loss_fn)
    if wrapper == "fsdp":
        root = _fully_shard(module, model, device, dtype, cpu_offload)
    else:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if device.type == "cuda" else None
        root = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    dist.wrapper, dist.root = wrapper, root

    def wrapped_loss(_model: Any, batch: Any) -> Any:
        """The loss through the wrapper (the model argument is the wrapped one's inner model)."""
        return root(batch)

    return wrapped_loss


def decoder_blocks(model: Any) -> list[torch.nn.Module]:
    """The repeated transformer blocks, by the class names transformers itself keeps together."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"--parallel fsdp: no decoder blocks found in {type(lm).__name__} "
                        "(it names none in _no_split_modules)", ["fix: use --parallel ddp"])
    return blocks


def _fully_shard(module: LossModule, model: Any, device: torch.device, dtype: torch.dtype,
                 cpu_offload: bool) -> Any:
    """FSDP2: each decoder block its own unit, then the root (embeddings, final norm, head).

    Sharded weights are fp32 (the optimizer's master copy); on CUDA they are gathered in
    `dtype` (bf16) for compute and gradients are reduced in fp32. Each block is cast to fp32
    just before it is sharded, so a full fp32 copy never exists at once.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    precision = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32
                 else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if cpu_offload and device.type == "cuda" else OffloadPolicy()  # CPU: already there
    for block in decoder_blocks(model):
        fully_shard(block.float(), mesh=mesh, mp_policy=precision, offload_policy=offload)
    with torch.no_grad():
        for param in module.parameters():  # what the root unit holds: embeddings, final norm, head
            if param.is_floating_point() and not isinstance(param, DTensor):
                param.data = param.data.float()
    return fully_shard(module, mesh=mesh, mp_policy=precision, offload_policy=offload)


def full_state_dict(dist: Dist, model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU, in `dtype` (sharded models only; None otherwise).

    A collective: every rank calls it. A replicated (DDP) or single model needs no gathering,
    so None tells the caller to save the model as it is.
    """
    if dist.wrapper != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    first: dict[int, str] = {}
    tied = set()  # a weight shared by two names (tied embeddings) is saved once, as transformers does
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            tied.add(name)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k not in tied}


def as_placeholder(batch: Any) -> Any:
    """A micro-batch that runs (so every rank does the same collectives) but counts nothing.

    The loop gives a batch with `num_targets == 0` zero weight; its real tokens only keep
    the forward and backward the same shape as a real one.
    """
    return dataclasses.replace(batch, num_targets=0, num_tokens=0)


def share_batches(dist: Dist, batches: list[Any]) -> list[Any]:
    """This rank's share of a list of batches (round robin), padded with placeholders to equal length."""
    if not dist.enabled or not batches:
        return batches
    mine = batches[dist.rank::dist.world]
    per_rank = -(-len(batches) // dist.world)
    return mine + [as_placeholder(batches[0])] * (per_rank - len(mine))


def last_checkpoint_text(checkpoints: Path) -> str:
    """How the failure message names the newest complete checkpoint."""
    from tunesmith.train.checkpoint import checkpoint_dirs

    saved = checkpoint_dirs(checkpoints)
    return (f"the last good checkpoint is {saved[-1]} (`--resume` continues from it)" if saved
            else "no checkpoint was written yet")


@contextlib.contextmanager
def failure_guard(dist: Dist, checkpoints: Path) -> Iterator[None]:
    """Turn a failure on one rank into one clear line on that rank, and a prompt exit on all.

    Own errors: "rank R failed: what" plus the last good checkpoint. Stopped because another
    rank failed (torchrun's SIGTERM, or a collective that lost its peer): "rank R stopped".
    A rank that raises leaves its collectives, so the others fail fast instead of waiting.
    """
    if not dist.enabled:
        yield
        return
    from tunesmith.train.loop import TrainingDiverged

    try:
        yield
    except PeerFailed:
        raise  # rank 0 already printed the cause
    except TrainingDiverged:
        if dist.is_main:
            raise  # every rank saw the same loss; rank 0 speaks for all
        raise PeerFailed("diverged (rank 0 reports it)") from None
    except KeyboardInterrupt:
        raise  # Ctrl-C reaches every rank: nothing failed, `finetune` names the checkpoint to resume from
    except BaseException as exc:
        if not lost_peer(exc):
            _report_own_failure(dist, exc, checkpoints)
            raise
        _print_line(f"rank {dist.rank}: stopped: {_what(exc)}; {last_checkpoint_text(checkpoints)}")
        raise PeerFailed("stopped") from None


PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused")


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` says another rank is gone (SIGTERM from torchrun, a collective that lost its peer)."""
    if isinstance(exc, (RankStopped, torch.distributed.DistError)):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in PEER_LOST)


def _report_own_failure(dist: Dist, exc: BaseException, checkpoints: Path) -> None:
    """This rank's own error: a `UserError` gains the rank and the checkpoint; anything else is printed."""
    if isinstance(exc, UserError):
        exc.args = (f"rank {dist.rank} of {dist.world} failed: {exc}",)
        exc.problems.append(f"the run stops on all ranks; {last_checkpoint_text(checkpoints)}")
        return
    _print_line(f"rank {dist.rank} of {dist.world} failed: {_what(exc)}; the run stops on all ranks; "
                f"{last_checkpoint_text(checkpoints)}")


def _what(exc: BaseException) -> str:
    """An exception in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240]}" if text else type(exc).__name__


def _print_line(text: str) -> None:
    """One line on stderr, flushed now (the process may be killed next)."""
    print(f"tunesmith: {text}", file=sys.stderr, flush=True)
