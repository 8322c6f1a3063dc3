"""CUDA graphs over the decoder: a training micro-batch's layers issued as two launches.

Why. With the layers compiled, a step still issues thousands of kernels from Python (the
compiled layers' wrappers, dynamo's guards, autograd's nodes, one launch per kernel): on
Qwen2.5-0.5B LoRA the host needed 103 ms to issue a step the GPU ran in 67 (bench/README.md,
round 6), and on the 1B shape the host is barely ahead of the GPU. A CUDA graph records the
kernels of the decoder's forward, and of its backward, once; each later micro-batch of that
row length replays them, one launch each, and the host is free at once. Measured on an H200
(bench/README.md, round 10; same batches, same losses): Qwen2.5-0.5B LoRA 86.4k -> 145.6k
tok/s, full 102.5k -> 131.1k; the 1B shape, already GPU-bound, +1%.

What is recorded: `fast.decoder_hidden`'s work for rows of the token budget (ids and positions
-> last hidden states, the per-document block mask included), forward and backward, as two
`torch.cuda.CUDAGraph`s in one memory pool. Packed rows are padded to the budget, so nearly
every micro-batch replays; a longer row (a sample over the budget, padded to a multiple of
1,024) runs eagerly, beside the pool: `fast.prepare_for_training` attaches graphs only where
the memory plan finds room for the pool and such a row's activations together
(`plan.fits_graph_pool`). The loss head stays eager: liger's fused cross-entropy reads a
count back to the host, which a capture cannot hold, and its few launches cost little. So
does the optimizer step (one fused launch).

When: training micro-batches only (gradients on, the model in training mode). The budget's
length is recorded the third time it is seen (the first two run eagerly: they compile
whatever the layers need and train as usual). What a recording cannot follow, the decoder
must not do: read the GPU from the host, or take a Python branch on something that changes
between micro-batches of the same length.

Recordings are made only inside `may_record()`, which `train.loop.accumulate` enters: there no
autograd graph of an earlier micro-batch is alive. A live one (a caller still holding the last
loss) keeps the parameters' gradient accumulators of that pass, which carry the default
stream; the backward recording then waits on that stream and fails (measured on an H200 with
torch 2.11, which has no `set_override_stale_capture_stream` yet), and a failed recording can
leave its memory pool allocating. Elsewhere (a direct call of the loss) lengths already
recorded replay, which is safe, and new ones run eagerly. A recording that fails anyway
switches graphs off for the run, with one line on stderr.

Gradients: the backward graph writes the trainable parameters' gradients into buffers of its
own, and autograd accumulates them into `.grad` as from any node. Autograd keeps the first
gradient of a step without copying it, so `.grad` may BE such a buffer; before the next
backward replay overwrites the buffers (gradient accumulation), such a `.grad` is copied out.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

EAGER_RUNS = 2  # micro-batches of the recorded length that run eagerly before it is recorded

DecoderFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]  # (lm, ids, positions) -> hidden


@dataclass
class Recording:
    """The graphs of one row shape and the static tensors they read and write."""

    forward: Any  # .replay(): ids, positions -> hidden
    backward: Any  # .replay(): grad_hidden -> grads
    ids: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor
    grad_hidden: torch.Tensor
    params: list[torch.nn.Parameter]
    grads: list[torch.Tensor | None]  # the backward graph's gradient buffers, one per param

    def release_grads(self) -> None:
        """Copy out every `.grad` that is still one of this recording's buffers (see the module docstring)."""
        for p, buffer in zip(self.params, self.grads):
            if p.grad is not None and buffer is not None and p.grad.data_ptr() == buffer.data_ptr():
                p.grad = p.grad.clone()


class _Replay(torch.autograd.Function):
    """The recorded decoder as one autograd node: forward and backward are graph replays."""

    @staticmethod
    def forward(ctx: Any, rec: Recording, ids: torch.Tensor, positions: torch.Tensor,  # type: ignore[override]
                *params: torch.Tensor) -> torch.Tensor:
        rec.ids.copy_(ids)
        rec.positions.copy_(positions)
        rec.forward.replay()
        ctx.rec = rec
        return rec.hidden.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        rec = ctx.rec
        rec.release_grads()
        rec.grad_hidden.copy_(grad)
        rec.backward.replay()
        return (None, None, None, *(g.detach() if g is not None else None for g in rec.grads))


class CudaRecorder:
    """Records with `torch.cuda.graph` into one shared pool (the only recorder outside tests)."""

    def __init__(self) -> None:
        self.pool: Any = None

    def record(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(graph, what `fn` returned while recorded); `fn`'s kernels run only on replay.

        A parameter's gradient accumulator made before the recording and still alive (a
        previous micro-batch's loss that someone still holds keeps its whole autograd graph)
        carries the default stream, and the backward recording would wait on it, which ends
        the recording. Where torch can, it is told to move such a stale stream onto the
        recording's own (`set_override_stale_capture_stream`, process-wide: on only while recording).
        """
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
        if override is not None:
            override(True)
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        finally:
            if override is not None:
                override(False)  # the process-initial state
        return graph, out

    def warm_up(self, fn: Callable[[], Any]) -> None:
        """Run `fn` once on a side stream, as torch asks before a first recording (lazy inits stay out of it).

        The cache is emptied first: the blocks the eager micro-batches freed are cached for the
        default stream, and the allocator gives a side stream none of them, so the warm-up would
        map a second set of activations beside them. Measured on an H200 (1B full, 32k-token
        rows, bench/README.md round 11): reserved peak 31.9 GiB with graphs vs 22.3 without,
        while the steady state with graphs holds 22.8 (default pool 13.0, graph pool 9.8).
        """
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the side stream's cached blocks serve no other stream


class DecoderGraphs:
    """The decoder of one model, replayed from recordings where it can be (see the module docstring)."""

    def __init__(self, decoder_fn: DecoderFn, params: list[torch.nn.Parameter], length: int,
                 recorder: Any = None) -> None:
        self.decoder_fn = decoder_fn
        self.params = params  # the decoder's trainable parameters
        self.length = length  # the row length that is recorded (the token budget)
        self.recorder = recorder or CudaRecorder()
        self.seen: Counter[tuple[Any, ...]] = Counter()
        self.recordings: dict[tuple[Any, ...], Recording] = {}
        self.off: str | None = None  # why graphs were switched off, once they were

    def __call__(self, lm: Any, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, L, H): a replay where one is recorded or due, else the eager decoder."""
        if self.off or ids.shape[-1] != self.length or not (torch.is_grad_enabled() and lm.training):
            return self.decoder_fn(lm, ids, positions)
        key = (tuple(ids.shape), tuple(positions.shape), ids.dtype, positions.dtype, ids.device)
        rec = self.recordings.get(key)
        if rec is None:
            self.seen[key] += 1
            if self.seen[key] <= EAGER_RUNS or not getattr(_MAY_RECORD, "on", False):
                return self.decoder_fn(lm, ids, positions)
            try:
                rec = self.recordings[key] = self.record(lm, ids, positions)
            except Exception as exc:  # an op that cannot be recorded: eager for the rest of the run
                self.off = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                self.recordings.clear()
                print(f"fast kernels: CUDA graphs off for this run (recording failed: {self.off})", file=sys.stderr)
                return self.decoder_fn(lm, ids, positions)
        return _Replay.apply(rec, ids, positions, *self.params)

    def record(self, lm: Any, ids: torch.Tensor, positions: torch.Tensor) -> Recording:
        """Record the forward and the backward of this row shape.

        The backward differentiates the forward's latest output (`live`): on CUDA that is the
        recorded one; a recorder that re-runs its functions (the CPU tests') gets a fresh one per replay.
        """
        static_ids, static_pos = ids.clone(), positions.clone()
        params, live = self.params, {}

        def forward() -> torch.Tensor:
            live["hidden"] = self.decoder_fn(lm, static_ids, static_pos)
            return live["hidden"]

        def backward() -> tuple[torch.Tensor | None, ...]:
            return torch.autograd.grad(live["hidden"], params, grad_hidden, allow_unused=True)

        def warm() -> None:
            hidden = forward()
            if hidden.requires_grad and params:
                torch.autograd.grad(hidden, params, torch.ones_like(hidden), allow_unused=True)

        self.recorder.warm_up(warm)
        forward_graph, hidden = self.recorder.record(forward)
        grad_hidden = torch.zeros_like(hidden)
        if hidden.requires_grad and params:
            backward_graph, grads = self.recorder.record(backward)
        else:  # nothing in the decoder trains (e.g. only the head): nothing to replay backward
            backward_graph, grads = _Nothing(), tuple(None for _ in params)
        return Recording(forward_graph, backward_graph, static_ids, static_pos, hidden.detach(), grad_hidden, params,
                         list(grads))


class _Nothing:
    """A backward with no work."""

    def replay(self) -> None:
        pass


_ATTACHED: weakref.WeakKeyDictionary[Any, DecoderGraphs] = weakref.WeakKeyDictionary()
_MAY_RECORD = threading.local()


@contextlib.contextmanager
def may_record() -> Iterator[None]:
    """Inside: new row lengths may be recorded. The caller vouches that no autograd graph of an
    earlier micro-batch is alive (see the module docstring)."""
    before = getattr(_MAY_RECORD, "on", False)
    _MAY_RECORD.on = True
    try:
        yield
    finally:
        _MAY_RECORD.on = before


def attach(lm: Any, decoder_fn: DecoderFn, length: int, recorder: Any = None) -> DecoderGraphs:
    """Route `lm`'s training forwards of rows of `length` tokens through graphs (`attached(lm)`
    finds them; a copy of `lm` has none).

    Held by a weak key, so graphs and their pool go with the model; they hold no reference to it.
    """
    params = [p for p in lm.get_decoder().parameters() if p.requires_grad]
    graphs = _ATTACHED[lm] = DecoderGraphs(decoder_fn, params, length, recorder)
    return graphs


def attached(lm: Any) -> DecoderGraphs | None:
    """The graphs attached to `lm`, if any."""
    return _ATTACHED.get(lm)


def detach(lm: Any) -> None:
    """Back to the eager decoder for `lm` (e.g. when a data-parallel wrapper needs its hooks in backward)."""
    _ATTACHED.pop(lm, None)
