"""Fused Triton kernel for `optim.AdamWBF16`: one launch updates every tensor of a bucket.

Why one launch: a step used to launch one kernel per tensor, and on small models (Qwen-0.5B
full fine-tuning: ~290 tensors) issuing those launches cost the host 10 ms per step, on a
step the host already bounded. The kernel instead reads a table of the tensors' addresses
and a table that maps each program to (tensor, first element), built by `optim.block_table`.

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

BLOCK = 4096  # elements per program; `optim.block_table` splits the tensors by it
_WARPS = 4


@triton.jit
def _update_part(p_ptr, g_ptr, m_ptr, v_ptr, offs, noise, n, scale, lr, beta1, beta2, eps, decay, bc1, bc2):
    """AdamW on the elements `offs` of one tensor; the new bf16 weight is rounded with `noise`."""
    mask = offs < n
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


@triton.jit(do_not_specialize=["seed"])  # a new seed every step: specialising on it (== 1, % 16) recompiles
def _adamw_bf16_sr_kernel(ptrs, numels, block_tensor, block_start, scale_ptr, lr, beta1, beta2, eps, decay,
                          bc1, bc2, seed, n_tensors, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    p_ptr = tl.load(ptrs + t).to(tl.pointer_type(tl.bfloat16))
    g_ptr = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(tl.bfloat16))
    m_ptr = tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(ptrs + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
    scale = tl.load(scale_ptr) if HAS_SCALE else 1.0
    Q: tl.constexpr = BLOCK // 8
    lane = tl.arange(0, Q)
    r0, r1, r2, r3 = tl.randint4x(seed, pid.to(tl.int64) * Q + lane)
    base = start + lane
    args = (n, scale, lr, beta1, beta2, eps, decay, bc1, bc2)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base, r0 & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + Q, (r0 >> 16) & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 2 * Q, r1 & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 3 * Q, (r1 >> 16) & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 4 * Q, r2 & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 5 * Q, (r2 >> 16) & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 6 * Q, r3 & 0xFFFF, *args)
    _update_part(p_ptr, g_ptr, m_ptr, v_ptr, base + 7 * Q, (r3 >> 16) & 0xFFFF, *args)


def adamw_bf16_sr(ptrs: torch.Tensor, numels: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor],
                  grad_scale: torch.Tensor | None, *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step: int, seed: int) -> None:
    """In-place AdamW step on every tensor of one bucket, in one launch.

    `ptrs`: int64 (4 * T,) on the device, the addresses of the T bf16 weights, then of their
    bf16 gradients, fp32 first and second moments (all contiguous). `numels`: int64 (T,).
    `blocks`: `optim.block_table(numels, BLOCK)` on the device. `grad_scale`: an fp32 scalar
    on the device that multiplies every gradient (the clip coefficient), or None.
    """
    block_tensor, block_start = blocks
    n_tensors = numels.numel()
    scale = grad_scale if grad_scale is not None else numels  # any pointer: not read when HAS_SCALE is off
    _adamw_bf16_sr_kernel[(block_tensor.numel(),)](
        ptrs, numels, block_tensor, block_start, scale, lr, beta1, beta2, eps, 1.0 - lr * weight_decay,
        1.0 - beta1**step, 1.0 - beta2**step, seed, n_tensors, HAS_SCALE=grad_scale is not None,
        BLOCK=BLOCK, num_warps=_WARPS)
