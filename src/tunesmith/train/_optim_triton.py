"""Fused Triton kernel for `optim.AdamWBF16`: one launch updates every tensor of a bucket.

Why one launch: a step used to launch one kernel per tensor, and on small models (Qwen-0.5B
full fine-tuning: ~290 tensors) issuing those launches cost the host 10 ms per step, on a
step the host already bounded. The kernel instead reads a table of the tensors' offsets from
two base pointers (`element_deltas`) and a table that maps each program to (tensor, first
element), built by `optim.block_table`. Full blocks run unmasked, so with 16-byte aligned
tensors every access is one vector per thread; only each tensor's last block is masked.

Why `randint4x` and eight parts per block: Philox costs ~60 integer operations per call. One
call per element (what `tl.randint` does) made the kernel compute-bound on an H200; one
call gives 4 x 32 random bits, i.e. the 16-bit noise of 8 elements, so each program updates
its block as 8 parts of `BLOCK // 8` elements, one 16-bit half of one Philox output each.

Kept apart from optim.py because importing Triton fails on machines without a GPU stack;
optim.py imports this only on CUDA and falls back to the torch ops otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Measured on an H200 (bench/README.md, round 8; Llama-1B full, 20 steps): 8192 x 8 warps
# 6.65 ms per step (~4.1 TB/s, 96% of a device copy), 8192 x 4 8.30 ms, 4096 x 4 6.73 ms,
# 16384 x 8 9.11 ms. With 8 warps a part of 1024 elements is 4 per thread: 8-byte bf16 and
# 16-byte fp32 vectors.
BLOCK = 8192  # elements per program, split by `optim.block_table` into 8 parts of 1024
_WARPS = 8


@triton.jit
def _update_part(p_ptr, g_ptr, m_ptr, v_ptr, offs, noise, n, scale, lr, beta1, beta2, eps, decay, bc1, bc2,
                 MASKED: tl.constexpr):
    """AdamW on the elements `offs` of one tensor; the new bf16 weight is rounded with `noise`."""
    if MASKED:
        mask = offs < n
    else:  # a full block: unmasked loads are what lets Triton use vector accesses
        mask = None
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * scale
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * decay - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
    bits = (p.to(tl.int32, bitcast=True) + noise.to(tl.int32)) & -65536
    p = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)


@triton.jit
def _update_block(p_ptr, g_ptr, m_ptr, v_ptr, start, pid, seed, n, scale, lr, beta1, beta2, eps, decay, bc1, bc2,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """The BLOCK elements from `start` on, as 8 parts that share one Philox call per lane."""
    Q: tl.constexpr = BLOCK // 8
    lane = tl.arange(0, Q)
    r0, r1, r2, r3 = tl.randint4x(seed, pid.to(tl.int64) * Q + lane)
    base = start + lane
    args = (n, scale, lr, beta1, beta2, eps, decay, bc1, bc2)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base, r0 & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + Q, (r0 >> 16) & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 2 * Q, r1 & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 3 * Q, (r1 >> 16) & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 4 * Q, r2 & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 5 * Q, (r2 >> 16) & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 6 * Q, r3 & 0xFFFF, *args, MASKED=MASKED)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 7 * Q, (r3 >> 16) & 0xFFFF, *args, MASKED=MASKED)


@triton.jit(do_not_specialize=["seed"])  # a new seed every step: specialising on it (== 1, % 16) recompiles
def _adamw_bf16_sr_kernel(bf16_base, fp32_base, deltas, numels, block_tensor, block_start, scale_ptr, lr, beta1,
                          beta2, eps, decay, bc1, bc2, seed, n_tensors, HAS_SCALE: tl.constexpr,
                          ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    dp = tl.load(deltas + t)
    dg = tl.load(deltas + n_tensors + t)
    dm = tl.load(deltas + 2 * n_tensors + t)
    dv = tl.load(deltas + 3 * n_tensors + t)
    if ALIGNED:  # every tensor starts on 16 bytes (checked on the host): 8 bf16 or 4 fp32 elements
        dp = tl.multiple_of(dp, 8)
        dg = tl.multiple_of(dg, 8)
        dm = tl.multiple_of(dm, 4)
        dv = tl.multiple_of(dv, 4)
    start = tl.multiple_of(start, BLOCK)
    scale = tl.load(scale_ptr) if HAS_SCALE else 1.0
    ptrs = (bf16_base + dp, bf16_base + dg, fp32_base + dm, fp32_base + dv)
    args = (start, pid, seed, n, scale, lr, beta1, beta2, eps, decay, bc1, bc2)
    if start + BLOCK <= n:
        _update_block(*ptrs, *args, BLOCK=BLOCK, MASKED=False)
    else:
        _update_block(*ptrs, *args, BLOCK=BLOCK, MASKED=True)


def adamw_bf16_sr(tensors: list[torch.Tensor], numels: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor],
                  grad_scale: torch.Tensor | None, *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step: int, seed: int) -> None:
    """In-place AdamW step on every tensor of one bucket, in one launch.

    `tensors`: the T bf16 weights, then their bf16 gradients, fp32 first and second moments
    (4 * T tensors, all contiguous, on one device). `numels`: int64 (T,) on the device.
    `blocks`: `optim.block_table(numels, BLOCK)` on the device. `grad_scale`: an fp32 scalar
    on the device that multiplies every gradient (the clip coefficient), or None.
    """
    block_tensor, block_start = blocks
    n_tensors = numels.numel()
    bf16_base, fp32_base = tensors[0], tensors[2 * n_tensors]
    deltas, aligned = element_deltas([t.data_ptr() for t in tensors], n_tensors, bf16_base.data_ptr(),
                                     fp32_base.data_ptr())
    if bf16_base.is_cuda:  # gradients are new tensors every step: their offsets go over every step (pinned: no sync)
        deltas = deltas.pin_memory().to(bf16_base.device, non_blocking=True)
    scale = grad_scale if grad_scale is not None else numels  # any pointer: not read when HAS_SCALE is off
    _adamw_bf16_sr_kernel[(block_tensor.numel(),)](
        bf16_base, fp32_base, deltas, numels, block_tensor, block_start, scale, lr, beta1, beta2, eps,
        1.0 - lr * weight_decay, 1.0 - beta1**step, 1.0 - beta2**step, seed, n_tensors,
        HAS_SCALE=grad_scale is not None, ALIGNED=aligned, BLOCK=BLOCK, num_warps=_WARPS)


def element_deltas(addresses: list[int], n_tensors: int, bf16_base: int, fp32_base: int) -> tuple[torch.Tensor, bool]:
    """Each tensor's offset, in elements, from the first tensor of its dtype; and whether all are 16-byte aligned.

    Why offsets from two base pointers and not the addresses themselves: Triton knows the
    alignment of a pointer argument, and `multiple_of` on an offset loaded from memory, but
    nothing of a pointer made from a loaded integer; without known alignment every access is
    one element wide (2 or 4 bytes) and the kernel ran at 70% of a copy's bandwidth.
    """
    half = 2 * n_tensors
    deltas = [(a - bf16_base) // 2 for a in addresses[:half]] + [(a - fp32_base) // 4 for a in addresses[half:]]
    return torch.tensor(deltas, dtype=torch.int64), all(a % 16 == 0 for a in addresses)
