"""LoRA inside the compiled decoder layers: nodes that share an input become one group of plain matmuls.

In a compiled layer the LoRA node is the custom op `tunesmith::lora_linear` (dynamo keeps it
as one opaque call, so the graph shows where each adapted linear is and what it reads). Before
AOT autograd sees the graph, `group_lora_calls` rewrites every such call into plain torch math:

- calls that read the same tensor (q/k/v of attention, gate/up of the MLP) become ONE group:
  one matmul over the A's ((sum r, in)) and one over the B's as a block-diagonal ((sum out,
  sum r)) in each pass, where each member had its own; the frozen weights keep one matmul
  each. q/k/v: 24 matmul launches per step and layer -> 12. The block-diagonal computes zeros
  in a matmul whose inner size is sum r (under 1% of the layer's FLOPs at r=16).
- the adapter's contribution is a plain add, which inductor fuses into whatever reads the
  output next (RoPE, SwiGLU, the residual add); `addmm` would first copy its (N, out) input.
- AOT autograd derives the backward; frozen weights get none.

Outside compiled layers (eager, checkpointed) the op runs as it is (`lora_node.lora_linear`).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from tunesmith.model import lora_node  # noqa: F401  (registers torch.ops.tunesmith.lora_linear)


def grouped_lora(x: torch.Tensor, weights: list[torch.Tensor], a_list: list[torch.Tensor],
                 b_list: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """y_i = x W_i^T + s_i (x A_i^T) B_i^T for every member i, in x's dtype: one matmul for all
    the A's, one for all the B's (block-diagonal), one per frozen weight.

    The math of `lora_node._lora_forward` (scale on the (N, r) side, adapters cast to x's
    dtype), differentiable by autograd, for members that read the same x. The frozen weights
    are not concatenated: autograd would keep the concatenated copy for the backward (the
    size of q/k/v and gate/up's weights: +1.2 GiB on a 1B model, +9 GiB on an 8B one).
    """
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    a = torch.cat([t.to(dtype) for t in a_list])  # (R, in)
    h = x2 @ a.t()  # (N, R)
    if len(set(scales)) == 1:
        h = h * scales[0]
    else:
        h = torch.cat([part * s for part, s in zip(h.split([t.shape[0] for t in a_list], dim=1), scales)], dim=1)
    b = torch.block_diag(*[t.to(dtype) for t in b_list])  # (O, R), one block per member
    adapters = (h @ b.t()).split([w.shape[0] for w in weights], dim=1)  # (N, out_i) each
    return [(x2 @ w.t() + part).view(*x.shape[:-1], w.shape[0]) for w, part in zip(weights, adapters)]


LINEARS = False  # also group plain bias-free linears that share an input (full fine-tuning's q/k/v, gate/up)


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """x W_i^T for every member i as one matmul over the concatenated weights (their gradients
    come back as row blocks of one (sum out, in) gradient)."""
    y = x @ torch.cat(weights).t()
    return list(y.split([w.shape[0] for w in weights], dim=-1))


def _lora_call(node: fx.Node) -> tuple[Any, ...] | None:
    """(x, w, a, b, scale) of a `lora_linear` call whose h output is unused, else None."""
    op = torch.ops.tunesmith.lora_linear
    if node.op != "call_function" or node.target not in (op, op.default):
        return None
    if not all(user.target is operator.getitem and user.args[1] == 0 for user in node.users):
        return None  # h (the second output) is read: leave the op (correct, just not grouped)
    names = ("x", "w", "a", "b", "scale")
    return tuple(node.args) + tuple(node.kwargs[n] for n in names[len(node.args):])


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
    """A torch.compile backend: `group_lora_calls` on dynamo's graph, then `backend` (inductor)."""
    from torch._dynamo import lookup_backend

    compile_graph = lookup_backend(backend)

    def compile_grouped(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        group_lora_calls(gm)
        return compile_graph(gm, example_inputs)

    return compile_grouped

