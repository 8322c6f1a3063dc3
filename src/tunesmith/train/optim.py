"""The optimizer policy: AdamW, with bf16 weights updated by stochastic rounding.

Why this policy. On CUDA the weights live in bf16 (half the memory of fp32, and no
fp32->bf16 cast in every forward). Plain bf16 AdamW is not sound: a bf16 weight has 8
significant bits, so an update smaller than ~1/512 of the weight rounds away to nothing
(at lr 1e-5 nearly every update does) and training silently stalls. The two standard
cures are fp32 master weights (+4 bytes/param) or stochastic rounding (+0 bytes/param).
We use stochastic rounding: the update is computed in fp32 and the result is rounded up
or down at random with probabilities that make the rounding unbiased, so small updates
survive in expectation. Both Adam moments stay in fp32 (a bf16 second moment decays
wrongly: v * 0.999 rounds back to v). Per parameter: 2 (bf16 weight) + 2 (bf16 grad) +
8 (fp32 m, v) bytes, versus 16 for fp32-master AdamW with fp32 grads.

Parameters that are already fp32 (CPU/MPS runs, LoRA adapters kept in fp32) get
`torch.optim.AdamW` (fused on CUDA) unchanged. On CUDA the bf16 update is one Triton
launch for all the tensors (read p, g, m, v; write p, m, v: 22 bytes/param); elsewhere the
same math runs as torch ops, which is also the reference the kernel is tested against.

Gradient clipping folds into that pass: `step(grad_scale=c)` multiplies each gradient by the
clip coefficient `c` (a device scalar) as it is read, instead of a separate pass that reads
and writes every gradient once more before the step (`loop.optimizer_step` does this for
optimizers whose `fuses_grad_scale` is true).

`--optim` swaps in a bitsandbytes AdamW for any method: `adamw-8bit` keeps m and v in 8 bits
(blockwise quantised: 2 bytes/param instead of 8), the `paged-` ones put the states in
CUDA unified memory, so they page out to CPU RAM instead of failing on a memory spike (on
CPU they run unpaged). They round bf16 weights to nearest, so for full fine-tuning in bf16
the default (stochastic rounding) keeps small updates that they lose; for adapters (fp32)
they compute the same update.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

_BF16_MANTISSA_MASK = -65536  # 0xFFFF0000 as int32: keeps sign, exponent and 7 mantissa bits


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 `x` to bf16 unbiasedly: E[result] == x (up to fp32 precision).

    Adds 16 random bits below bf16's last mantissa bit, then truncates. The int32 view of
    a float is sign-magnitude, so the same add-and-truncate is correct for negative values.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & _BF16_MANTISSA_MASK).view(torch.float32).to(torch.bfloat16)


def _adamw_bf16_torch(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, step: int, generator: torch.Generator | None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One AdamW step for a bf16 tensor in fp32 math, stored back with stochastic rounding."""
    g32 = g.float() if grad_scale is None else g.float() * grad_scale
    m.lerp_(g32, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
    denom = (v / (1.0 - beta2**step)).sqrt_().add_(eps)
    p32 = p.float().mul_(1.0 - lr * weight_decay)
    p32.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
    p.copy_(stochastic_round_bf16(p32, generator))


def block_table(numels: list[int] | tuple[int, ...], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each program of the fused kernel: which tensor it updates, from which element on.

    Tensor i gets ceil(numels[i] / block) consecutive programs; program j of it starts at
    element j * block. Returns (tensor index int32, first element int64), one entry per program.
    """
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first program
    start = (torch.arange(int(counts.sum())) - first[tensor]) * block
    return tensor.to(torch.int32), start


@functools.cache
def _triton_ok(device_type: str) -> bool:
    """Whether the fused kernel can run here (CUDA and an importable Triton)."""
    if device_type != "cuda":
        return False
    try:
        import tunesmith.train._optim_triton  # noqa: F401
    except Exception:  # Triton missing or broken: the torch ops do the same math
        return False
    return True


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 parameters: fp32 moments, fp32 update math, stochastically rounded weights.

    A `torch.optim.Optimizer` so that LR schedulers and `state_dict()` checkpoints work.
    """

    fuses_grad_scale = True  # step(grad_scale=...) clips inside the update (module docstring)

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._tables: dict[tuple[Any, ...], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        """One seeded generator per device, so runs are reproducible."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _fused(self, params: list[torch.Tensor], grad_scale: torch.Tensor | None, seed: int,
               **args: Any) -> None:
        """One Triton launch over `params` (same device, same step count)."""
        from tunesmith.train import _optim_triton

        device = params[0].device
        key = (device, tuple(p.numel() for p in params))
        if key not in self._tables:  # the block table depends only on the sizes: built once
            tensor, start = block_table(key[1], _optim_triton.BLOCK)
            self._tables[key] = (torch.tensor(key[1], dtype=torch.int64, device=device),
                                 (tensor.to(device), start.to(device)))
        numels, blocks = self._tables[key]
        tensors = list(params) + [p.grad for p in params]
        tensors += [self.state[p][name] for name in ("exp_avg", "exp_avg_sq") for p in params]
        for t in tensors[:2 * len(params)]:
            assert t.is_contiguous() and t.dtype == torch.bfloat16, "AdamWBF16 needs contiguous bf16 weights and grads"
        _optim_triton.adamw_bf16_sr(tensors, numels, blocks, grad_scale, seed=seed, **args)

    @torch.no_grad()
    def step(self, closure: Any = None, grad_scale: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Update every parameter that has a gradient, each gradient multiplied by `grad_scale` if given."""
        assert closure is None, "AdamWBF16 takes no closure"
        for group_index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            buckets: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                buckets.setdefault((state["step"], p.device), []).append(p)
            for launch, ((step, device), params) in enumerate(buckets.items()):
                args = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], step=step)
                if _triton_ok(device.type):
                    seed = (self._seed * 1_000_003 + step * 65_537 + group_index * 1_009 + launch) % (2**31 - 1)
                    self._fused(params, grad_scale, seed, **args)
                    continue
                for p in params:
                    state = self.state[p]
                    _adamw_bf16_torch(p, p.grad, state["exp_avg"], state["exp_avg_sq"], grad_scale=grad_scale,
                                      generator=self._generator(p.device), **args)


BNB_OPTIMIZERS = {"adamw-8bit": "AdamW8bit", "paged-adamw-8bit": "PagedAdamW8bit",
                  "paged-adamw-32bit": "PagedAdamW32bit"}
"""`--optim` name -> `bitsandbytes.optim` class."""
OPTIMIZER_EXTRA = "qlora"  # the pip extra that installs bitsandbytes


def check_optimizer_installed(optim: str) -> None:
    """Refuse a bitsandbytes optimizer before anything loads when bitsandbytes is missing."""
    import importlib.util

    from tunesmith.errors import UserError

    if optim in BNB_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--optim {optim} needs bitsandbytes, which is not installed",
                        [f'fix: pip install "tunesmith[{OPTIMIZER_EXTRA}]", or drop --optim (fused AdamW)'])


def _bnb_optimizer(optim: str, groups: list[Any], lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """A bitsandbytes AdamW (8-bit and/or paged states); its state_dict checkpoints like torch's."""
    import warnings

    import bitsandbytes as bnb

    cls = getattr(bnb.optim, BNB_OPTIMIZERS[optim])
    with warnings.catch_warnings():  # "paged optimizers are not supported on CPU": we say so in --help
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported")
        return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def make_optimizer(
    params: Iterable[Any], *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, seed: int = 0, optim: str = "adamw",
) -> torch.optim.Optimizer:
    """The optimizer for these parameters (tensors or param-group dicts), by `optim` and their dtype.

    `optim` a bitsandbytes name -> that optimizer (see module docstring). `adamw`: bf16
    parameters -> `AdamWBF16` (stochastic rounding); otherwise -> `torch.optim.AdamW`,
    fused on CUDA. Mixed dtypes are refused: a model is trained in one dtype.
    """
    groups = list(params)
    if optim in BNB_OPTIMIZERS:
        return _bnb_optimizer(optim, groups, lr, betas, eps, weight_decay)
    if optim != "adamw":
        raise ValueError(f"unknown optimizer {optim!r} (allowed: adamw, {', '.join(BNB_OPTIMIZERS)})")
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    dtypes = {p.dtype for p in tensors}
    if len(dtypes) > 1:
        raise ValueError(f"trainable parameters have mixed dtypes {sorted(map(str, dtypes))}; cast them to one")
    if dtypes == {torch.bfloat16}:
        return AdamWBF16(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed)
    fused = bool(tensors) and all(p.device.type == "cuda" for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
