"""The fast path's CPU-checkable pieces: fused/chunked CE == plain CE, padding, fallbacks, memory choice."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.model import fast, lora_graph, lora_node


def _tiny(layers: int = 2, bias: bool = False) -> LlamaForCausalLM:
    """A tiny Llama; `bias`: q/k/v/o with biases (Qwen2's q/k/v have them)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa", attention_bias=bias)
    return LlamaForCausalLM(cfg)


def _packed(lengths: list[int], vocab: int = 96) -> SimpleNamespace:
    """A packed row of samples: targets shifted within each sample, -100 at each sample's end."""
    gen = torch.Generator().manual_seed(3)
    ids, pos, tgt = [], [], []
    for n in lengths:
        s = torch.randint(0, vocab, (n,), generator=gen)
        ids.append(s)
        pos.append(torch.arange(n))
        tgt.append(torch.cat([s[1:], torch.tensor([-100])]))
    targets = torch.cat(tgt).unsqueeze(0)
    return SimpleNamespace(input_ids=torch.cat(ids).unsqueeze(0), position_ids=torch.cat(pos).unsqueeze(0),
                           targets=targets, num_targets=int((targets != -100).sum()))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_linear_ce_equals_full_logits_ce(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    got = fast.chunked_linear_cross_entropy_sum(hidden, weight, targets, softcap, chunk=8)
    g_h, g_w = torch.autograd.grad(got, (hidden, weight))
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    w_h, w_w = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_h, w_h)
    torch.testing.assert_close(g_w, w_w)


def test_fused_loss_with_padding_matches_plain_per_document_loss():
    model = _tiny()
    batch = _packed([7, 12, 5])
    loss, count, _ = fast.make_fused_loss(budget=32, use_liger=False)(model, batch)  # pads 24 -> 32
    assert count == batch.num_targets
    # reference: each document on its own, full logits, no padding, no packing
    want, start = torch.zeros(()), 0
    for n in (7, 12, 5):
        ids = batch.input_ids[:, start:start + n]
        logits = model(input_ids=ids).logits[0]  # (n, V)
        want = want + F.cross_entropy(logits, batch.targets[0, start:start + n], ignore_index=-100, reduction="sum")
        start += n
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)


def test_pad_packed_adds_a_separate_untrained_document():
    batch = _packed([3, 2])
    ids, pos, tgt = fast.pad_packed(batch.input_ids, batch.position_ids, batch.targets, 8)
    assert ids.shape == pos.shape == tgt.shape == (1, 8)
    assert pos[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert tgt[0, 5:].tolist() == [-100, -100, -100]
    assert fast.padded_length(100, 8192) == 8192
    assert fast.padded_length(9000, 8192) == 9216


def test_cpu_and_disabled_fall_back_with_one_notice():
    model = _tiny()
    setup = fast.prepare_for_training(model, device=torch.device("cpu"), batch_tokens=64)
    assert setup.loss_sum is None and not setup.fast and not setup.checkpointing
    assert setup.notices == ["fast kernels: off on cpu (CUDA only)"]
    off = fast.prepare_for_training(model, device=torch.device("cpu"), batch_tokens=64, fast_kernels=False)
    assert off.notices == ["fast kernels: off (--no-fast-kernels)"]
    ck = fast.prepare_for_training(model, device=torch.device("cpu"), batch_tokens=64, gradient_checkpointing=True)
    assert ck.checkpointing and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_unsupported_family_gets_a_notice():
    lm = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    assert "no liger-kernel patches for model family 'gpt2'" in fast._liger_missing(lm)


def test_checkpointing_is_chosen_by_the_memory_plan_when_activations_do_not_fit():
    from tunesmith.train import plan

    model = _tiny()
    shape = plan.shape_from_config(model.config.to_dict())
    setting = plan.Setting(adapter=False, cuda=False, fused_loss=True)
    plain = plan.estimate(shape, setting, 1000).total
    assert plan.estimate(shape, plan.with_checkpointing(setting, True), 1000).total < plain
    assert not plan.choose(shape, setting, (plain + 1) / plan.HEADROOM, 1000).checkpointing
    assert plan.choose(shape, setting, (plain - 1) / plan.HEADROOM, 1000).checkpointing


@pytest.mark.parametrize("bias", [False, True])  # frozen base biases (Qwen2's q/k/v) go through the node too
@pytest.mark.parametrize("node", ["function", "op"])  # "grouped" runs the Function outside compiled layers
def test_fused_lora_forward_matches_peft(node, bias, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(lora_node, "NODE", node)
    model = get_peft_model(_tiny(bias=bias), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at zero, which would hide a wrong B path
    batch = _packed([9, 6])
    ref = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    ref_grads = torch.autograd.grad(ref.square().mean(), [p for p in model.parameters() if p.requires_grad])
    assert lora_node.fuse_lora_layers(model) == 7 * 2
    got = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    got_grads = torch.autograd.grad(got.square().mean(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with model.disable_adapter():  # states the fused forward does not cover go back to peft
        base = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    assert not torch.allclose(base, got)


def test_lora_custom_op_passes_torch_opcheck_and_equals_the_function():
    """The custom-op form of the LoRA node: torch's own checks of its schema, fake (meta) kernel and
    autograd registration, and the values and gradients of the autograd.Function form."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, a, b = torch.randn(24, 16), torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    bias = torch.randn(24)
    torch.library.opcheck(lora_node.lora_linear, (x, w, a, b, 0.5))
    torch.library.opcheck(lora_node.lora_linear, (x, w, a, b, 0.5, bias))
    torch.testing.assert_close(lora_node.lora_linear(x, w, a, b, 0.5, bias)[0],
                               lora_node.LoraLinear.apply(x, w, a, b, 0.5, None) + bias, rtol=1e-5, atol=1e-5)
    y_op = lora_node.lora_linear(x, w, a, b, 0.5)[0]
    g = torch.randn_like(y_op)
    got = torch.autograd.grad(y_op, (x, a, b), g)
    y_fn = lora_node.LoraLinear.apply(x, w, a, b, 0.5, None)
    want = torch.autograd.grad(y_fn, (x, a, b), g)
    torch.testing.assert_close(y_op, y_fn)
    torch.testing.assert_close(y_op, x @ w.t() + 0.5 * (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad, want_grad)
    frozen_x = x.detach()  # the first layer's input needs no gradient: only A and B get one
    grads = torch.autograd.grad(lora_node.lora_linear(frozen_x, w, a, b, 0.5)[0], (a, b), g)
    torch.testing.assert_close(grads[0], want[1])


@pytest.mark.parametrize("written_out", [False, True])
@pytest.mark.parametrize("bias", [None, (True, True, True), (True, False, True)])
@pytest.mark.parametrize(("outs", "ranks", "scales"), [
    ((24, 8, 8), (4, 2, 4), (0.5, 0.5, 0.5)),  # q/k/v-like (GQA widths): GroupedLora's folded [x, h] matmul
    ((24, 8, 8), (4, 2, 4), (0.5, 2.0, 1.0)),  # per-member scales
    ((8,), (4,), (0.5,)),  # o/down-like (out < in + r): two matmuls and an add
    ((6, 6), (2, 2), (1.0, 1.0)),  # a group GroupedLora does not fold
])
def test_grouped_lora_equals_one_node_per_member(outs, ranks, scales, bias, written_out, monkeypatch):
    """The grouped math (one matmul over the A's, one block-diagonal over the B's; as plain
    math or as the `GroupedLora` node, which folds the frozen weights into one matmul where
    that copies less) gives each member's output and gradients of its own `LoraLinear` node;
    with an input that needs no gradient too, and with frozen biases on all or some members."""
    monkeypatch.setattr(lora_graph, "WRITTEN_OUT", written_out)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ws = [torch.randn(o, 16) for o in outs]
    a_s = [torch.randn(r, 16, requires_grad=True) for r in ranks]
    b_s = [torch.randn(o, r, requires_grad=True) for o, r in zip(outs, ranks)]
    biases = [torch.randn(o) if has else None for o, has in zip(outs, bias or [False] * len(outs))]
    got = lora_graph.grouped_lora(x, ws, a_s, b_s, list(scales), biases)
    want = [lora_node.LoraLinear.apply(x, w, a, b, s, t) for w, a, b, s, t in zip(ws, a_s, b_s, scales, biases)]
    grads = [torch.randn_like(y) for y in want]
    inputs = (x, *a_s, *b_s)
    got_grads = torch.autograd.grad(got, inputs, grads)
    want_grads = torch.autograd.grad(want, inputs, grads)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    frozen = lora_graph.grouped_lora(x.detach(), ws, a_s, b_s, list(scales), biases)  # the first layer's input
    torch.testing.assert_close(torch.autograd.grad(frozen, inputs[1:], grads), want_grads[1:], rtol=1e-5, atol=1e-5)


def test_fused_lora_on_bf16_base_keeps_fp32_adapter_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32}  # peft keeps adapters fp32 on a bf16 base
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = _packed([9, 6])
    ref = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()
    lora_node.fuse_lora_layers(model)
    got = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()
    assert (got - ref).norm() / ref.norm() < 2e-2  # bf16 matmuls instead of peft's fp32 ones
    got.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)


@pytest.mark.parametrize(("node", "bias"), [*((n, False) for n in lora_node.NODES), ("grouped-plain", False),
                                            ("grouped", True), ("grouped-plain", True)])
def test_compiled_decoder_layers_give_the_loss_and_gradients_of_eager_layers(node, bias, monkeypatch):
    """Regional compilation (on by default on CUDA) computes what the eager layers compute: same
    packed-batch loss and gradients, LoRA's fused node included (as an autograd.Function, as
    the custom op, or as the custom op rewritten into grouped matmuls, written-out node or
    plain math, in the compiled run, against the Function in the eager one; with frozen q/k/v/o
    biases too). On the CPU the graphs dynamo and
    AOTAutograd capture run as they are (`aot_eager`: inductor's C++ build takes minutes on 2
    cores); bench/gpu_train.py checks inductor's kernels on the GPU (loss parity, 50 steps)."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters

    from tunesmith.train.losses import sft_loss_sum

    batch = _packed([7, 12, 5])
    batch.attention_mask = None  # packed: the per-document mask comes from the restarting positions
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = get_peft_model(_tiny(bias=bias), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero B, so the adapter path counts
        assert lora_node.fuse_lora_layers(model) == 14
        if compiled:
            monkeypatch.setattr(lora_graph, "WRITTEN_OUT", node != "grouped-plain")
            node = node.removesuffix("-plain")
            monkeypatch.setattr(lora_node, "NODE", node)
            rewritten = []
            group = lora_graph.group_lora_calls
            monkeypatch.setattr(lora_graph, "group_lora_calls", lambda gm: rewritten.append(group(gm)) or rewritten[-1])
            assert fast._compile_decoder_layers(fast.causal_lm(model), backend="aot_eager") == 2
            assert torch._dynamo.config.recompile_limit >= fast.RECOMPILE_LIMIT  # room for every variant of a run
            counters.clear()
        loss = sft_loss_sum(model, batch).total
        loss.backward()
        if compiled:  # compiled for real (suppress_errors would fall back to eager silently)
            assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)
            assert set(rewritten) == ({7} if node == "grouped" else set())  # every graph: 7 calls, now 4 groups
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_grouped_linears_give_the_loss_and_gradients_of_eager_layers(monkeypatch):
    """Full fine-tuning with `lora_graph.LINEARS`: q/k/v and gate/up each become one matmul over
    the concatenated weights inside the compiled layers; loss and every weight's gradient as
    in the eager model (`aot_eager` on the CPU, as above)."""
    from tunesmith.train.losses import sft_loss_sum

    batch = _packed([7, 12, 5])
    batch.attention_mask = None
    results, rewritten = [], []
    group = lora_graph.group_lora_calls
    monkeypatch.setattr(lora_graph, "group_lora_calls", lambda gm: rewritten.append(group(gm)) or rewritten[-1])
    for compiled in (False, True):
        model = _tiny()
        if compiled:
            monkeypatch.setattr(lora_graph, "LINEARS", True)
            fast._compile_decoder_layers(model, backend="aot_eager")
        loss = sft_loss_sum(model, batch).total
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert rewritten == [5]  # one graph for both layers: q/k/v -> 1 matmul, gate/up -> 1; o, down stay
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_document_block_mask_is_transformers_packed_causal_mask():
    """The flex mask the fast path builds (without reading the GPU) allows exactly the pairs
    transformers' own packed-sequence mask allows: causal, within each document."""
    from transformers.masking_utils import (and_masks, causal_mask_function, find_packed_sequence_indices,
                                            packed_sequence_mask_function)

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 0, 1, 2]])
    ours = fast.document_block_mask(pos).mask_mod
    theirs = and_masks(causal_mask_function, packed_sequence_mask_function(find_packed_sequence_indices(pos)))
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(16), torch.arange(16), indexing="ij")
    h = torch.zeros_like(b)
    got, want = ours(b, h, q, kv), theirs(b, h, q, kv)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert int(got[0].sum()) == 6 + 3 + 10 + 21 + 1  # documents of 3, 2, 4, 6, 1 tokens


def test_only_full_attention_models_get_the_document_mask():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    assert fast.full_attention_only(LlamaConfig())
    assert fast.full_attention_only(Qwen2Config())  # use_sliding_window False by default
    assert fast.full_attention_only(MistralConfig(sliding_window=None))
    assert not fast.full_attention_only(MistralConfig(sliding_window=4096))
    assert not fast.full_attention_only(Gemma2Config())


def test_the_decoder_hands_our_block_mask_to_every_attention_layer(monkeypatch):
    """transformers passes a ready BlockMask through to flex attention as it is (so the
    packed-row check that reads the GPU is skipped): each layer's attention gets ours."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    built, seen = [], []
    real = fast.document_block_mask
    monkeypatch.setattr(fast, "document_block_mask", lambda pos: built.append(real(pos)) or built[-1])

    def spy(module, query, key, value, attention_mask, **kwargs):  # (B, H, T, D) in, (B, T, H, D) out
        seen.append(attention_mask)
        return query.transpose(1, 2).contiguous(), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", spy)
    model = _tiny()
    model.config._attn_implementation = "flex_attention"
    batch = _packed([5, 9, 2])
    with torch.no_grad():
        hidden = fast.decoder_hidden(model, batch.input_ids, batch.position_ids)
    assert hidden.shape == (1, 16, 32)
    assert len(built) == 1 and len(seen) == 2 and all(m is built[0] for m in seen)
    monkeypatch.setattr(fast, "DOCUMENT_MASK", False)  # switched off: transformers builds its own
    with torch.no_grad():
        fast.decoder_hidden(model, batch.input_ids, batch.position_ids)
    assert len(built) == 1 and len(seen) == 4 and seen[2] is not built[0]


def test_flex_tiles_reach_every_attention_layer_only_where_they_were_measured(monkeypatch):
    """`FLEX_TILES` go to flex attention as `kernel_options` through the decoder's kwargs (the
    path transformers reads them from), on CUDA at head dim <= 64 only; elsewhere torch's defaults."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return query.transpose(1, 2).contiguous(), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", spy)
    model = _tiny()
    model.config._attn_implementation = "flex_attention"
    batch = _packed([5, 9, 2])
    monkeypatch.setattr(fast, "flex_kernel_options", lambda config, cuda: fast.FLEX_TILES)  # as on CUDA
    with torch.no_grad():
        fast.decoder_hidden(model, batch.input_ids, batch.position_ids)
    assert seen == [fast.FLEX_TILES] * 2
    monkeypatch.undo()
    assert fast.flex_kernel_options(LlamaConfig(hidden_size=2048, num_attention_heads=32), cuda=True) == fast.FLEX_TILES
    assert fast.flex_kernel_options(LlamaConfig(hidden_size=2048, num_attention_heads=32), cuda=False) is None
    assert fast.flex_kernel_options(LlamaConfig(hidden_size=3072, num_attention_heads=24), cuda=True) is None  # d 128
    assert fast.flex_kernel_options(LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=128), True) is None


def test_compiled_layers_under_checkpointing_keep_the_loss_gradients_and_memory_savings():
    """`COMPILE_CHECKPOINTED` (on by default, measured on a GPU): transformers' checkpoint around
    each compiled layer gives the eager loss and gradients, and what stays saved for the backward
    (beyond the weights) stays near checkpointing's, far below no checkpointing's. On the CPU the
    compiled graphs run under `aot_eager`, as in the test above."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.train.losses import sft_loss_sum

    batch = _packed([7, 12, 5])
    batch.attention_mask = None
    results = {}
    for mode in ("plain", "checkpointed", "checkpointed+compiled"):
        torch.manual_seed(1)
        model = get_peft_model(_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        lora_node.fuse_lora_layers(model)
        lm = fast.causal_lm(model)
        if mode != "plain":
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.enable_input_require_grads()
        if mode.endswith("compiled"):
            fast._compile_decoder_layers(lm, backend="aot_eager")
        model.train()
        weights, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, []

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sft_loss_sum(model, batch).total
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                         sum(saved))
    plain, ckpt, compiled = results["plain"], results["checkpointed"], results["checkpointed+compiled"]
    for got in (ckpt, compiled):
        torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-5)
        for name, grad in plain[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-5)
    assert ckpt[2] < 0.3 * plain[2]
    assert compiled[2] < 0.35 * plain[2]  # + the mask, RoPE tables and RNG states each layer also keeps



def _saved_per_token(budget: float) -> float:
    """Hidden-sized values a compiled LoRA decoder layer saves for its backward, per token (the
    partitioner the GPU uses, min-cut, here without inductor's code generation)."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hidden, tokens = 128, 256
    config = LlamaConfig(hidden_size=hidden, intermediate_size=448, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=512)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    lm = fast.causal_lm(model)
    lora_node.fuse_lora_layers(model)
    before, process_wide = fast.ACTIVATION_MEMORY_BUDGET, functorch_config.activation_memory_budget
    fast.ACTIVATION_MEMORY_BUDGET = budget
    torch._dynamo.reset()
    try:
        fast._compile_decoder_layers(lm, backend="aot_eager_decomp_partition")
        x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(tokens)[None]
        saved: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault((t.untyped_storage().data_ptr(), tuple(t.shape)), t), lambda t: t):
            lm.model.layers[0](x, position_embeddings=lm.model.rotary_emb(x, positions), attention_mask=None,
                               position_ids=positions)
    finally:
        fast.ACTIVATION_MEMORY_BUDGET = before
        torch._dynamo.reset()
    assert functorch_config.activation_memory_budget == process_wide  # set only while the layers compiled
    weights = {p.data_ptr() for p in model.parameters()}
    size = sum(t.numel() * t.element_size() for (ptr, _), t in saved.items() if ptr not in weights)
    return size / (tokens * hidden * 2)


def test_the_activation_memory_budget_reaches_the_compiled_layers_partitioner():
    """`fast.ACTIVATION_MEMORY_BUDGET` below 1 makes the compiled layers save less for their
    backward (torch recomputes cheap ops instead): the knob is torch's and must keep working."""
    default, budgeted = _saved_per_token(1.0), _saved_per_token(0.9)
    assert budgeted < 0.8 * default, (default, budgeted)
