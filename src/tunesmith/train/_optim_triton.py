"""Fused Triton kernel for `optim.AdamWBF16`: one pass over p, g, m, v per tensor.

Kept apart from optim.py because importing Triton fails on machines without a GPU stack;
optim.py imports this only on CUDA and falls back to the torch ops otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048
_WARPS = 4


@triton.jit
def _adamw_bf16_sr_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr, beta1, beta2, eps, decay, bc1, bc2, seed,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * decay - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
    noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
    bits = (p.to(tl.int32, bitcast=True) + noise) & -65536
    p = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)


def adamw_bf16_sr(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, step: int, seed: int) -> None:
    """In-place AdamW step on contiguous bf16 `p` (grad `g`) with fp32 moments `m`, `v`."""
    assert p.is_contiguous() and g.is_contiguous(), "AdamWBF16 needs contiguous parameters and gradients"
    n = p.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    _adamw_bf16_sr_kernel[grid](p, g, m, v, n, lr, beta1, beta2, eps, 1.0 - lr * weight_decay,
                                1.0 - beta1**step, 1.0 - beta2**step, seed, BLOCK=_BLOCK,
                                num_warps=_WARPS)
