"""LoRA inside the compiled decoder layers: nodes that share an input become one group of matmuls.

In a compiled layer the LoRA node is the custom op `tunesmith::lora_linear` (dynamo keeps it
as one opaque call, so the graph shows where each adapted linear is and what it reads). Before
AOT autograd sees the graph, `group_lora_calls` rewrites every such call into `grouped_lora`:
calls that read the same tensor (q/k/v of attention, gate/up of the MLP) become ONE group,
with one matmul over the A's ((sum r, in)) and one over the B's as a block-diagonal ((sum
out, sum r)) in each pass where each member had its own. The block-diagonal computes zeros in
a matmul whose inner size is sum r (under 1% of the layer's FLOPs at r=16). Two forms, both
measured on an H200 (bench/README.md, rounds 4 and 5; losses within 0.01% of the Function node):

- `WRITTEN_OUT` (the default): the `GroupedLora` node, arranged so that no `mm + add` pair
  forms (see below): q/k/v and gate/up run as one matmul over [x, h] in the forward and one
  grad-x matmul in the backward (q/k/v: 24 matmul launches per layer and step -> 7; CPU
  inductor code: 25 `addmm` -> 7). LoRA 72.2k (Function) -> 78.7k tok/s, +0.6 GiB peak.
- plain math: autograd derives the backward, each frozen weight keeps its own matmul.
  Inductor turns its `mm + add` pairs into `addmm`, which copies its (N, out) addend first
  (the `elementwise_kernel` in the profile), and in the backward grad x becomes a chain of
  such copies, one per member. 75.2k tok/s in the same run, at the Function's memory.

Two more forms of the written-out node were measured on an H200 and dropped (bench/README.md,
round 9): one output per member, so gate/up's SwiGLU backward writes two gradients instead of
one concatenated (that kernel 0.18 vs 0.335 ms a layer, yet the LoRA step 2% slower: 82.7k vs
84.4k tok/s; every group apart: 11% slower); and gh = g B_bd taken from grad x's matmul over
[B_bd | W_cat], which reads g once (cuBLAS picks slower tiles for the (N, r + in) output).

Outside compiled layers (eager, checkpointed) the fused forward emits the Function node
instead (`lora_node.LoraLinear`), so nothing is left to rewrite there.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from tunesmith.model import lora_node  # noqa: F401  (registers torch.ops.tunesmith.lora_linear)


WRITTEN_OUT = True  # `grouped_lora` through the `GroupedLora` node (off: plain math; see the module docstring)


def _scaled(h: torch.Tensor, ranks: list[int], scales: tuple[float, ...]) -> torch.Tensor:
    """h (N, sum r) with each member's columns times its scale."""
    if len(set(scales)) == 1:
        return h * scales[0]
    return torch.cat([part * s for part, s in zip(h.split(ranks, dim=1), scales)], dim=1)


def _adapters(x2: torch.Tensor, a_list: Any, b_list: Any,
              scales: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's adapter factors in x's dtype: A_cat (R, in), h = scaled x A_cat^T (N, R),
    and the B's as one block-diagonal (O, R)."""
    a = torch.cat([t.to(x2.dtype) for t in a_list])
    h = _scaled(x2 @ a.t(), [t.shape[0] for t in a_list], scales)
    return a, h, torch.block_diag(*[t.to(x2.dtype) for t in b_list])


class GroupedLora(torch.autograd.Function):
    """Members that read the same x: Y = [x W_1^T + s_1 (x A_1^T) B_1^T | x W_2^T + ... ] as one
    (..., sum out) output, with a backward written out so no activation-sized tensor is copied.

    Why a Function and not autograd of the plain math: inductor turns each `mm + add` into
    `addmm`, which copies its (N, out) addend first; the backward of plain math sums one
    (N, in) product per member into grad x that way (a chain of copies), and concatenating
    the frozen weights in the forward would make autograd keep the copy (+1.2 GiB on a 1B
    model, ~9 GiB on 8B). Here:
    - forward, where sum out >= in + sum r (q/k/v, gate/up): one matmul [x, h] @ [W_cat | B_bd]^T,
      no add at all; otherwise one matmul each for x W^T and h B_bd^T and an add placed so
      inductor fuses it into the next kernel (the residual add) instead of an `addmm`.
    - backward: grad x = G W_cat + gh A_cat (one add), grad B from one (sum out, sum r)
      product, grad A from one (sum r, in) product; [W_cat; A_cat] is built there and freed there.
    Saved: x, h (N, sum r) and the cast adapters; the frozen weights are the parameters. A frozen
    bias (Qwen2's q/k/v) is one (sum out,) add on the output and gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int, scales: tuple[float, ...], bias: torch.Tensor | None,
                *tensors: torch.Tensor) -> torch.Tensor:
        weights, a_list, b_list = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        a, h, b = _adapters(x2, a_list, b_list, scales)
        w = weights[0] if n == 1 else torch.cat(weights)  # (O, in), transient
        if w.shape[0] >= x2.shape[1] + b.shape[1]:  # copying x (N, in) costs less than an (N, O) add
            y = torch.cat([x2, h], dim=1) @ torch.cat([w, b], dim=1).t()
        else:  # the add on views: inductor's `mm + add -> addmm` pattern does not match it
            y = ((x2 @ w.t()).unsqueeze(0) + (h @ b.t()).unsqueeze(0))[0]
        if bias is not None:  # frozen (Qwen2's q/k/v): an (O,) add that fuses into the next kernel
            y = y + bias
        ctx.save_for_backward(x2, h, a, b, *weights)
        ctx.n, ctx.scales, ctx.ranks, ctx.x_shape = n, scales, [t.shape[0] for t in a_list], x.shape
        ctx.dtypes = [t.dtype for t in (*a_list, *b_list)]
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, h, a, b, *weights = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, O)
        gh = _scaled(g @ b, ctx.ranks, ctx.scales)  # (N, R): the gradient of x A^T
        grad_x = None
        if ctx.needs_input_grad[0]:
            # [W_cat; A] in one buffer: a concatenation the forward does not make, so the
            # graph's common-subexpression pass cannot merge it with the forward's W_cat
            # (which would then be saved for the backward)
            wa = torch.cat([*weights, a])  # (O + R, in)
            grad_x = (g @ wa[:g.shape[1]] + gh @ wa[g.shape[1]:]).view(ctx.x_shape)
        grad_a = (gh.t() @ x2).split(ctx.ranks)  # (r_i, in) each
        grad_b_all = g.t() @ h  # (O, R): member i's block is its B's gradient
        outs, grad_b, row, col = [w.shape[0] for w in weights], [], 0, 0
        for out, rank in zip(outs, ctx.ranks):
            grad_b.append(grad_b_all[row:row + out, col:col + rank])
            row, col = row + out, col + rank
        cast = [gr.to(dt) for gr, dt in zip((*grad_a, *grad_b), ctx.dtypes)]
        return (grad_x, None, None, None, *([None] * ctx.n), *cast)


def grouped_lora(x: torch.Tensor, weights: list[torch.Tensor], a_list: list[torch.Tensor],
                 b_list: list[torch.Tensor], scales: list[float],
                 biases: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """y_i = x W_i^T (+ bias_i) + s_i (x A_i^T) B_i^T for every member i that reads this x, in x's dtype.

    The math of `lora_node._lora_forward` (scale on the (N, r) side, adapters cast to x's
    dtype). Plain math: one matmul for all the A's, one for all the B's, one per frozen
    weight; the frozen weights are not concatenated, since autograd would keep the copy for
    the backward (q/k/v's and gate/up's size: +1.2 GiB on a 1B model, ~9 GiB on 8B).
    With `WRITTEN_OUT` (the default), the `GroupedLora` node instead.
    """
    biases = list(biases or [None] * len(weights))
    if WRITTEN_OUT:
        bias = None if all(t is None for t in biases) else torch.cat(
            [(t if t is not None else w.new_zeros(w.shape[0])).to(x.dtype) for t, w in zip(biases, weights)])
        y = GroupedLora.apply(x, len(weights), tuple(scales), bias, *weights, *a_list, *b_list)
        return list(y.split([w.shape[0] for w in weights], dim=-1))
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    _a, h, b = _adapters(x2, a_list, b_list, tuple(scales))
    adapters = (h @ b.t()).split([w.shape[0] for w in weights], dim=1)  # (N, out_i) each
    outs = []
    for w, part, t in zip(weights, adapters, biases):
        y = x2 @ w.t() + part
        outs.append((y if t is None else y + t.to(x.dtype)).view(*x.shape[:-1], w.shape[0]))
    return outs


LINEARS = False  # also group plain bias-free linears that share an input (full fine-tuning's q/k/v, gate/up)


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """x W_i^T for every member i as one matmul over the concatenated weights (their gradients
    come back as row blocks of one (sum out, in) gradient)."""
    y = x @ torch.cat(weights).t()
    return list(y.split([w.shape[0] for w in weights], dim=-1))


def _lora_call(node: fx.Node) -> tuple[Any, ...] | None:
    """(x, w, a, b, scale, bias) of a `lora_linear` call whose h output is unused, else None."""
    op = torch.ops.tunesmith.lora_linear
    if node.op != "call_function" or node.target not in (op, op.default):
        return None
    if not all(user.target is operator.getitem and user.args[1] == 0 for user in node.users):
        return None  # h (the second output) is read: leave the op (correct, just not grouped)
    names = ("x", "w", "a", "b", "scale", "bias")
    return tuple(node.args) + tuple(node.kwargs.get(n) for n in names[len(node.args):])


def _linear_call(node: fx.Node) -> tuple[Any, ...] | None:
    """(x, w) of a bias-free `F.linear` call, else None."""
    if not LINEARS or node.op != "call_function" or node.target not in (torch._C._nn.linear, F.linear):
        return None
    args = tuple(node.args) + tuple(node.kwargs.get(n) for n in ("input", "weight", "bias")[len(node.args):])
    return args[:2] if len(args) < 3 or args[2] is None else None


def group_lora_calls(gm: fx.GraphModule) -> int:
    """Rewrite the graph's `tunesmith::lora_linear` calls (and, with `LINEARS`, bias-free
    linears) into one `grouped_lora` (`grouped_linear`) call per distinct input; returns how
    many calls were rewritten. Members of one group read only the shared input and parameters,
    so the group is computed where its first member was.
    """
    graph = gm.graph
    groups: dict[tuple[Any, fx.Node], list[tuple[fx.Node, tuple[Any, ...]]]] = {}
    for node in graph.nodes:
        for math, parse in ((grouped_lora, _lora_call), (grouped_linear, _linear_call)):
            args = parse(node)
            if args is not None:
                groups.setdefault((math, args[0]), []).append((node, args))
    order = {node: i for i, node in enumerate(graph.nodes)}
    rewritten = 0
    for (math, x), members in groups.items():
        first = members[0][0]
        if len(members) == 1 and math is grouped_linear:
            continue  # nothing to group, and a linear needs no rewrite
        late = [a for _, args in members for a in args[1:] if isinstance(a, fx.Node) and order[a] > order[first]]
        if any(a.op != "get_attr" for a in late):
            continue  # an input computed after the first member: leave the group as it is
        for arg in late:
            first.prepend(arg)  # a parameter read later in the graph: read it before the group
        with graph.inserting_before(first):
            group = graph.call_function(math, (x, *map(list, zip(*(args[1:] for _, args in members)))))
            for i, (member, _args) in enumerate(members):
                out = graph.call_function(operator.getitem, (group, i))
                if math is grouped_linear:  # the linear's output itself
                    member.replace_all_uses_with(out)
                for user in list(member.users):  # the op's `[0]`
                    user.replace_all_uses_with(out)
                    graph.erase_node(user)
        for member, _args in members:  # after the inserts: they are placed before the first member
            graph.erase_node(member)
            rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten


def grouping_backend(backend: str = "inductor") -> Callable[..., Any]:
    """A torch.compile backend: `group_lora_calls` on dynamo's graph, then `backend`."""
    from torch._dynamo import lookup_backend

    compile_graph = lookup_backend(backend)

    def compile_grouped(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        group_lora_calls(gm)
        return compile_graph(gm, example_inputs)

    return compile_grouped
