"""LoRA layers as one autograd node each: the fast path's replacement for peft's LoRA forward.

peft's LoRA Linear forward is ~6 autograd nodes per adapted layer (base linear, casts, A,
scale, B, add), each a host-launched step in the backward pass, and it scales and adds on the
whole (T, out) output in fp32. Here one node computes y = x W^T + s (x A^T) B^T in the
activations' dtype: the scale on the (T, r) side, the add inside the matmul, the fp32 adapter
weights cast for the matmuls (their gradients come back in fp32). On NF4 (QLoRA) bases the
node dequantises the weight in the forward and again in the backward; inside compiled layers
that takes another form (`lora4bit_compiled`), since there the compiler would save the 16-bit
weight instead.

Three forms of the 16-bit node (`NODE`), which bench/gpu_train.py times side by side:
- "function": an `autograd.Function`. Inside compiled layers dynamo traces it, and
  functionalisation turns its in-place add back into `addmm`, which copies its (T, out)
  input first.
- "op": the same math as an opaque custom op (`torch.library.custom_op`), which compiled
  graphs call as it is, in-place add included.
- "grouped" (the default): the custom op as a marker that the compiled layers rewrite
  (`model/lora_graph.py`): calls that share an input (q/k/v, gate/up) share their adapter
  matmuls (and, as its written-out node, their frozen weights' matmul). Measured on an H200
  (bench/README.md, round 5): 73.8k tok/s vs 68.8k for the Function (round 4: the op 63.9k
  vs the Function 66.9k), +0.6 GiB peak, losses within 0.01%.
Eager layers (checkpointing) run the Function in the "grouped" form, the op in the "op" form.
"""
from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

NODE = "grouped"  # the 16-bit node's form: "function", "op" or "grouped" (see the module docstring)
NODES = ("function", "op", "grouped")


def _lora_forward(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  bias: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """y = x W^T (+ bias) + s (x A^T) B^T in x's dtype, and what the backward needs: (x2, A, B, h) cast.

    The scale is applied on the (N, r) side and the add is fused into the matmul: `addmm_` in
    place on the fresh base product (out-of-place `addmm` first copies its (N, out) input into
    a new buffer: one device-to-device copy per adapted layer and pass). A frozen base bias
    (Qwen2's q/k/v) goes into the base matmul as its (out,) addend; it needs no gradient.
    """
    a_c, b_c = a.to(x.dtype), b.to(x.dtype)  # (r, in), (out, r)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    h = (x2 @ a_c.t()) * scale  # (N, r)
    base = x2 @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x2, w.t())
    y = base.addmm_(h, b_c.t())  # (N, out)
    return y.view(*x.shape[:-1], w.shape[0]), (x2, a_c, b_c, h)


def _lora_backward(grad: torch.Tensor, weight: Callable[[], torch.Tensor], saved: tuple[torch.Tensor, ...],
                   scale: float, dtypes: tuple[torch.dtype, torch.dtype],
                   need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(grad of x, grad of A, grad of B) of `_lora_forward`, A's and B's in `dtypes`; grad of x
    only when `need_x`, and `weight()` gives W only then."""
    x2, a_c, b_c, h = saved
    g = grad.reshape(-1, grad.shape[-1])  # (N, out)
    gh = (g @ b_c) * scale  # (N, r)
    grad_x = None
    if need_x:
        w = weight()  # (out, in)
        grad_x = (g @ w).addmm_(gh, a_c).view(*grad.shape[:-1], w.shape[1])  # (..., in), in place as above
    grad_a = (gh.t() @ x2).to(dtypes[0])  # (r, in)
    grad_b = (g.t() @ h).to(dtypes[1])  # (out, r)
    return grad_x, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T as ONE autograd node, in the activations' dtype (bf16 on CUDA).

    peft's forward is ~6 autograd nodes per adapted layer (base linear, casts, A, scale, B,
    add), each a CPU-launched step in the backward pass, and it scales and adds on the whole
    (T, out) output. On a 1B model at 8k tokens the GPU then waits for the CPU. Here: the
    scale is applied on the (T, r) side, the add is fused into the matmul (`addmm`), the fp32
    adapter weights are cast to bf16 for the matmuls (their gradients come back in fp32).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float, bias: torch.Tensor | None) -> torch.Tensor:
        y, saved = _lora_forward(x, w, a, b, scale, bias)
        ctx.save_for_backward(w, *saved)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        w, *saved = ctx.saved_tensors
        grad_x, grad_a, grad_b = _lora_backward(grad, lambda: w, tuple(saved), ctx.scale, ctx.dtypes,
                                                ctx.needs_input_grad[0])
        return grad_x, None, grad_a, grad_b, None, None


def _dequantize(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes NF4 tensor in `dtype` (a transient copy)."""
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(packed, quant_state).to(dtype)


class Lora4bit(torch.autograd.Function):
    """`LoraLinear` on an NF4 base weight: dequantised in the forward and again in the backward.

    The 16-bit copy is never saved (it would cost what 4-bit saves); saved are the input and
    the (N, r) adapter activations, in the activations' dtype: peft's Linear4bit path keeps
    fp32 copies of each input and runs ~8 autograd nodes per layer.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float, quant_state: Any, bias: torch.Tensor | None) -> torch.Tensor:
        y, saved = _lora_forward(x, _dequantize(packed, quant_state, x.dtype), a, b, scale, bias)  # W freed after
        ctx.save_for_backward(packed, *saved)
        ctx.scale, ctx.dtypes, ctx.quant_state = scale, (a.dtype, b.dtype), quant_state
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        packed, *saved = ctx.saved_tensors
        weight = lambda: _dequantize(packed, ctx.quant_state, grad.dtype)  # noqa: E731
        grad_x, grad_a, grad_b = _lora_backward(grad, weight, tuple(saved), ctx.scale, ctx.dtypes,
                                                ctx.needs_input_grad[0])
        return grad_x, None, grad_a, grad_b, None, None, None


def lora4bit_compiled(x: torch.Tensor, packed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                      quant_state: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """`Lora4bit`'s math for compiled layers: the base product under a checkpoint, so the compiler
    dequantises the weight again in the backward instead of saving its 16-bit copy.

    Why not the Function there: dynamo traces its forward and backward into one graph, the two
    dequantisations of the same bytes become one node (common subexpressions are merged), and the
    partitioner may not recompute an opaque bitsandbytes op, so it saves the (out, in) weight for
    the backward. On the Llama-3.1-8B shape at 4,096 tokens that is 13 GiB: tunesmith QLoRA peaked
    at 36.5 GiB where Unsloth's without checkpointing peaked at 22.7 (bench/README.md, round 12).
    A checkpointed region's ops are tagged for recomputation, which the partitioner honours; the
    base product itself is not recomputed (the backward needs only the weight and the gradient).
    """
    def base(x: torch.Tensor) -> torch.Tensor:
        w = _dequantize(packed, quant_state, x.dtype)
        return x @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x.reshape(-1, x.shape[-1]),
                                                           w.t()).view(*x.shape[:-1], w.shape[0])

    h = (x @ a.to(x.dtype).t()) * scale  # (..., r)
    return checkpoint(base, x, use_reentrant=False) + h @ b.to(x.dtype).t()


def _fused_lora4bit_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft LoRA Linear4bit through `Lora4bit` (`lora4bit_compiled` inside compiled layers);
    states they do not cover go to peft's own forward."""
    active = self.active_adapters
    if self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or active[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name, weight = active[0], self.base_layer.weight
    node = lora4bit_compiled if torch.compiler.is_compiling() else Lora4bit.apply
    return node(x, weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                weight.quant_state, self.base_layer.bias)


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft LoRA Linear through `LoraLinear`; states it does not cover go to peft's own forward."""
    active = self.active_adapters
    if self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or active[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    args = (x, base.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], base.bias)
    if NODE == "op" or (NODE == "grouped" and torch.compiler.is_compiling()):  # "grouped": a marker in graphs
        return lora_linear(*args)[0]
    return LoraLinear.apply(*args)


def fuse_lora_layers(model: Any) -> int:
    """Give every plain LoRA layer (no dropout, no DoRA/variant, no trained bias) the fused forward.

    16-bit `nn.Linear` bases get `LoraLinear`; bitsandbytes NF4 bases on CUDA get `Lora4bit`
    (on CPU bitsandbytes repacks 4-bit bytes for its own kernel, which `dequantize_4bit` does
    not read, and the fast path is CUDA-only anyway).
    """
    fused = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or len(lora_a) != 1 or not hasattr(module, "base_layer"):
            continue
        name, base = next(iter(lora_a)), module.base_layer
        plain = (isinstance(module.lora_dropout[name], torch.nn.Identity) and name not in module.lora_variant
                 and module.lora_B[name].bias is None and not base.weight.requires_grad
                 and (getattr(base, "bias", None) is None or not base.bias.requires_grad))
        if plain and type(base) is torch.nn.Linear:
            module.forward = MethodType(_fused_lora_forward, module)
            fused += 1
        elif (plain and type(base).__name__ == "Linear4bit" and base.weight.device.type == "cuda"
              and getattr(base.weight, "quant_state", None) is not None):
            module.forward = MethodType(_fused_lora4bit_forward, module)
            fused += 1
    return fused


@torch.library.custom_op("tunesmith::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`LoraLinear` as a custom op: (y, h) with h = s x A^T (N, r), which the backward reuses."""
    y, (_x2, _a, _b, h) = _lora_forward(x, w, a, b, scale, bias)
    return y, h


@lora_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(*x.shape[:-1], w.shape[0]), x.new_empty(x.numel() // x.shape[-1], a.shape[0])


@torch.library.custom_op("tunesmith::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         h: torch.Tensor, scale: float,
                         need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad A, grad B) of `lora_linear`; grad x is empty when x needs none."""
    saved = (x.reshape(-1, x.shape[-1]), a.to(x.dtype), b.to(x.dtype), h)
    grad_x, grad_a, grad_b = _lora_backward(grad, lambda: w, saved, scale, (a.dtype, b.dtype), need_x)
    return (grad_x if grad_x is not None else x.new_empty(0)), grad_a, grad_b


@lora_linear_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
      scale: float, need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape if need_x else (0,)), torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, w, a, b, scale, _bias = inputs
    ctx.save_for_backward(x, w, a, b, output[1])
    ctx.scale = scale


def _backward(ctx: Any, grad_y: torch.Tensor, _grad_h: Any) -> tuple[Any, ...]:
    x, w, a, b, h = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = lora_linear_backward(grad_y, x, w, a, b, h, ctx.scale, need_x)
    return (grad_x if need_x else None), None, grad_a, grad_b, None, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)
