"""The CUDA fast path: fused kernels, per-document flex attention, a loss that never builds logits.

What it changes, and why each piece pays on a packed batch of T tokens:
- attention: flex attention with a block mask built from the restarting `position_ids`
  (`document_block_mask`: transformers would build the same one, but reads the GPU first).
  Only the blocks inside one document are computed, where sdpa with a (T, T) mask computes
  all of them.
- the decoder layers are compiled one by one (regional torch.compile): inductor fuses RMSNorm,
  RoPE, SwiGLU and the LoRA adds, and each layer is one autograd node, which removes the host
  overhead that bound LoRA. With gradient checkpointing on, layers stay eager and get
  liger-kernel's Triton RMSNorm, RoPE and SwiGLU instead (optional dependency `tunesmith[gpu]`).
- the loss: `hidden @ lm_head.T` with a 128k vocabulary is a (T, V) tensor of 2 GiB at
  T=8192 in bf16, and more in fp32 for the softmax. liger's fused linear cross-entropy
  computes it chunk by chunk and keeps only the loss and the gradients; without liger, a
  chunked, recomputing torch version keeps the same memory bound.
- packed rows are padded to a fixed length so the compiled flex kernels see one shape.
- gradient checkpointing switches itself on when the memory plan (`train.plan`) says activations
  will not fit, and the plan picks the token budget when none is given.
- LoRA layers run as one fused node in bf16 (`model/lora_node.py`; adapter weights stay fp32
  for the optimizer), instead of peft's fp32 copies of every activation and ~6 nodes per
  layer; inside the compiled layers the nodes that share an input are grouped into shared
  adapter matmuls (`model/lora_graph.py`); on NF4 (QLoRA) bases the node dequantises the
  weight in the forward and again in the backward (inside compiled layers under a checkpoint
  tag, so the compiler does not save the 16-bit weight: `lora_node.lora4bit_compiled`).
- CUDA graphs (`model/graphs.py`): the decoder's forward and backward for rows of the budget
  are recorded once and replayed, so the host issues a micro-batch's layers as two launches
  instead of thousands (host-bound shapes: Qwen2.5-0.5B full +28-36%, LoRA +69% on an H200).
liger's kernels are not compiled (they failed under torch.compile in issue 7); the fused
cross-entropy runs outside the compiled layers.

Everything degrades with a one-line notice: CPU/MPS, `--no-fast-kernels`, liger missing,
a model family liger does not cover, a head the fused loss cannot express.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.model import graphs, lora_node
from tunesmith.model.lora_node import fuse_lora_layers
from tunesmith.train.losses import LossFn, LossSum

# Families whose logits are exactly `lm_head(final_hidden)` (optionally soft-capped), so the
# fused loss reproduces them; and whose blocks liger-kernel patches.
FUSED_LOSS_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# liger's fused CE processes the tokens in chunks of about BT * H * this / V; its default (1)
# gives 32 chunks at T=8192 with a 128k vocabulary, and each chunk re-reads and re-writes the
# whole (V, H) weight gradient. 16 -> 4 chunks: ~0.5 GiB of transient logits, 8x less traffic.
LIGER_CE_CHUNK_MEM = 16
# Regional torch.compile of the decoder layers: measured on an H200 (bench/gpu_train.py, which
# also runs it off): LoRA 43.4k -> 61.4k tok/s, full 55.4k -> 57.8k, losses within 0.02%.
# inductor's default mode: CUDA graphs over the layers ("reduce-overhead") measured slower
# (session 4: full 34.9k vs 61.1k, LoRA 25.1k vs 71.0k tok/s, same losses), so not offered.
COMPILE_LAYERS = True
# Also compile the layers when gradient checkpointing is on (transformers' checkpoint then wraps
# each compiled layer: the CPU test shows the same losses and gradients and checkpointing's
# saved-activation savings kept). Measured on an H200 (bench/README.md): 16-bit LoRA on the 1B
# shape (round 5), 40.5k vs 38.8k tok/s for eager liger layers, +0.17 GiB, losses within 0.011%;
# QLoRA on the Llama-3.1-8B shape at 4,096 tokens (round 6: NF4 weights dequantised inside the
# compiled, recomputed layers), 9,744 vs 8,278 tok/s (+17.7%), 7.90 vs 7.60 GiB, losses within 0.069%.
COMPILE_CHECKPOINTED = True
RECOMPILE_LIMIT = 64  # compiled-layer variants kept per run (see _compile_decoder_layers)
# Build the per-document flex block mask here (`document_block_mask`) instead of letting
# transformers build it: its packed-row check is a Python `if` on a GPU tensor, so the host
# waits for the GPU at the start of every forward. Measured on an H200 (bench/gpu_train.py
# --host-profile, same batches): full 56.7k -> 60.9k tok/s, LoRA 67.3k -> 69.4k, losses equal.
DOCUMENT_MASK = True
# flex attention's tiles under the document mask, for head dim <= 64 (Llama-3.2-1B, Qwen2.5-0.5B):
# smaller backward tiles than torch's defaults. Measured on an H200 (bench/attention.py; one
# layer of the 1B shape, forward + backward on a packed row): short samples 0.994 vs 1.205 ms
# (-17.5%), long samples 3.316 vs 3.625 ms (-8.5%); outputs and gradients identical. Head dim
# 128 (Llama-3B/8B) is not measured, so it keeps torch's defaults. None: torch's defaults everywhere.
FLEX_TILES: dict[str, int] | None = dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=3)
# CUDA graphs over the decoder's forward and backward (`model/graphs.py`) on the compiled,
# unchecked 16-bit path: the host issues a micro-batch's layers as two replays. Measured on an H200
# (bench/gpu_train.py --host-profile, same batches, losses equal to 0.004%): Qwen2.5-0.5B full
# 102.5k -> 131.1k tok/s, LoRA 86.4k -> 145.6k; Llama-1B full 66.8k -> 67.4k, LoRA 84.7k -> 85.4k
# (there the GPU is the bound). Off where not measured: checkpointed layers, 4-bit (QLoRA) bases,
# data-parallel runs (their wrappers hook the backward); and where the memory plan finds no room
# for the graphs' pool (`plan.fits_graph_pool`).
CUDA_GRAPHS = True
PAD_MULTIPLE = 1024  # packed rows are padded up to the batch budget, longer ones to this multiple
# What the compiled layers may save for their backward, as a share of what is fastest (torch's
# partitioner, `torch._functorch.config.activation_memory_budget`, set only while our layers are
# compiled; below 1.0 it recomputes cheap ops in the backward instead). On a CPU-compiled Llama
# layer with LoRA (tests/test_fast.py) 0.9 saves 10.8 hidden-sized values per token instead of
# 16.3 (normed inputs, one MLP projection). On an H200 (bench/README.md, rounds 12 and 13; same
# batches, 1.0 -> 0.9): 1B full peak 22.0 -> 19.1 GiB at x0.99 tok/s, 1B LoRA 13.2 -> 10.2 GiB
# at x0.98, 3B full 53.0 -> 45.2 GiB at x0.99, 3B LoRA 29.0 -> 22.7 GiB at x0.93-0.98, QLoRA 8B
# 23.6 -> 18.5 GiB at x0.99; losses equal (QLoRA within 0.07%). 0.8 saved no more than 0.9.
ACTIVATION_MEMORY_BUDGET = 0.9  # 1.0: torch's default



@dataclass
class TrainSetup:
    """What `prepare_for_training` decided: the loss to call and what was switched on."""

    loss_sum: LossFn | None
    """`(model, batch) -> (sum of CE over targets, count)`; None: use the plain loss."""
    fast: bool = False
    liger: bool = False
    attention: str = "default"
    checkpointing: bool = False
    graphs: bool = False  # the decoder replays CUDA graphs (`model/graphs.py`)
    batch_tokens: int = 0
    """The token budget per micro-batch (given, or chosen by the memory plan)."""
    notices: list[str] = field(default_factory=list)
    """One line per fallback or automatic choice, for the log."""


def causal_lm(model: Any) -> Any:
    """The transformers `*ForCausalLM` inside a model that may be wrapped by peft."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pad_packed(input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a (1, T) packed row to (1, length) with one extra document that trains nothing.

    Its positions restart at 0, so the per-document mask keeps it apart from real samples.
    """
    pad = length - input_ids.shape[1]
    if pad <= 0:
        return input_ids, position_ids, targets
    tail = torch.arange(pad, device=position_ids.device, dtype=position_ids.dtype).unsqueeze(0)  # (1, P)
    return (F.pad(input_ids, (0, pad), value=0), torch.cat([position_ids, tail], dim=1),
            F.pad(targets, (0, pad), value=IGNORE_INDEX))


def padded_length(tokens: int, budget: int) -> int:
    """The fixed length a row of `tokens` is padded to: the budget, or a multiple of PAD_MULTIPLE."""
    if tokens <= budget:
        return budget
    return math.ceil(tokens / PAD_MULTIPLE) * PAD_MULTIPLE


def full_attention_only(config: Any) -> bool:
    """True when every layer attends causally to its whole document (no sliding-window layers)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return set(layer_types) == {"full_attention"} and not sliding


def document_block_mask(position_ids: torch.Tensor) -> Any:
    """The flex-attention BlockMask of packed rows: causal, and only within each document.

    Documents are where `position_ids` restart (any step other than +1), as transformers
    finds them; the same mask it builds, without its host-side "is this row packed?" read of
    the GPU. position_ids (B, L).
    """
    docs = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # (B, L)

    def same_document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv <= q) & (docs[b, q] == docs[b, kv])

    batch, length = position_ids.shape
    return _block_mask_builder(position_ids.is_cuda)(same_document_causal, B=batch, H=None, Q_LEN=length,
                                                     KV_LEN=length, device=position_ids.device)


@functools.lru_cache(maxsize=2)
def _block_mask_builder(compiled: bool) -> Callable[..., Any]:
    """`create_block_mask`, compiled on CUDA as transformers compiles it (its `_compile` flag
    where torch still has it, measured on the GPU; else `torch.compile` of it, as torch now advises)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not compiled:
        return create_block_mask
    if "_compile" in inspect.signature(create_block_mask).parameters:
        return functools.partial(create_block_mask, _compile=True)
    return torch.compile(create_block_mask)


def decoder_hidden(lm: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (B, L, H) of packed rows, no cache: replayed from CUDA
    graphs where `prepare_for_training` attached them (`model/graphs.py`), else `eager_decoder_hidden`."""
    graphed = graphs.attached(lm)
    if graphed is not None:
        return graphed(lm, input_ids, position_ids)
    return eager_decoder_hidden(lm, input_ids, position_ids)


def eager_decoder_hidden(lm: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states, each kernel issued from Python.

    With flex attention on full-attention layers the block mask is built here
    (`document_block_mask`); otherwise transformers builds its mask from the positions.
    """
    mask, extra = None, {}
    if (DOCUMENT_MASK and lm.config._attn_implementation == "flex_attention"
            and full_attention_only(lm.config)):
        mask = document_block_mask(position_ids)
        options = flex_kernel_options(lm.config, position_ids.is_cuda)
        if options:  # transformers passes the decoder's kwargs on to its flex attention call
            extra["kernel_options"] = options
    return lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                            use_cache=False, **extra).last_hidden_state


def flex_kernel_options(config: Any, cuda: bool) -> dict[str, int] | None:
    """The flex `kernel_options` for this model's attention: `FLEX_TILES` on CUDA at head dim <= 64
    (where they were measured), else None (torch's defaults)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return dict(FLEX_TILES) if FLEX_TILES and cuda and head_dim <= 64 else None


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              softcap: float | None) -> torch.Tensor:
    """Summed CE of one chunk; its (chunk, V) logits live only inside this call."""
    logits = (hidden @ weight.t()).float()  # (C, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     softcap: float | None = None, chunk: int = 2048) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T, targets) without holding (N, V) logits (torch fallback).

    hidden (N, H), weight (V, H), targets (N,). Each chunk is recomputed in the backward pass.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        t = targets[start:start + chunk]
        if bool((t == IGNORE_INDEX).all()):
            continue
        total = total + checkpoint(_ce_chunk, hidden[start:start + chunk], weight, t, softcap,
                                   use_reentrant=False)
    return total


def _liger_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy, summed over the targets."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                            reduction="sum", softcap=softcap, chunk_mem_const=LIGER_CE_CHUNK_MEM)


def make_fused_loss(budget: int, use_liger: bool) -> LossFn:
    """The fast SFT loss: decoder -> final hidden states -> fused linear CE (no (T, V) logits)."""
    linear_ce = _liger_ce_sum if use_liger else chunked_linear_cross_entropy_sum

    def fused_sft_loss_sum(model: Any, batch: Any) -> LossSum:
        """Summed CE over the batch's targets and their count (same contract as the plain loss)."""
        lm = causal_lm(model)
        length = padded_length(batch.input_ids.shape[1], budget)
        ids, pos, tgt = pad_packed(batch.input_ids, batch.position_ids, batch.targets, length)  # (1, L)
        hidden = decoder_hidden(lm, ids, pos)  # (1, L, H)
        head = lm.get_output_embeddings()
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        loss = linear_ce(hidden.reshape(-1, hidden.shape[-1]), head.weight, tgt.reshape(-1), softcap)
        return LossSum(loss, int(batch.num_targets))

    return fused_sft_loss_sum


def _liger_missing(lm: Any) -> str | None:
    """None when liger-kernel can patch this model family; else the notice saying why not."""
    family = lm.config.model_type
    if family not in FUSED_LOSS_FAMILIES:
        return f"fast kernels: no liger-kernel patches for model family {family!r}; using plain layers"
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that does not load
        return f"fast kernels: liger-kernel unavailable ({type(exc).__name__}); pip install 'tunesmith[gpu]'"
    return None


def _apply_liger_layers(lm: Any) -> None:
    """liger-kernel's Triton RMSNorm, RoPE and SwiGLU on this model instance (eager layers)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=lm, rope=True, rms_norm=True, swiglu=True, geglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def _set_flex_attention(lm: Any) -> str:
    """Switch to flex attention (per-document block masks); keep the current one if it fails."""
    try:
        lm.set_attn_implementation("flex_attention")
        return "flex_attention"
    except Exception:  # family without flex support
        return str(getattr(lm.config, "_attn_implementation", "default"))


def prepare_for_training(model: Any, *, device: torch.device, batch_tokens: int | None, fast_kernels: bool = True,
                         gradient_checkpointing: bool = False, memory: Any = None,
                         cuda_graphs: bool = True, longest_sample: int | None = None,
                         accumulates: bool = True) -> TrainSetup:
    """Make `model` train fast on this device; returns the loss to use and what was chosen.

    `memory` (a `train.plan.Setting`: method and optimizer traits) lets the memory plan
    choose checkpointing and, when `batch_tokens` is None, the token budget (CUDA only).
    `cuda_graphs=False` keeps the decoder eager (a data-parallel run: its wrapper hooks the backward).
    `longest_sample` (tokens; None: not known: the plan then sizes for rows of the budget) must
    fit as a row of its own; with `accumulates` (gradient accumulation) they say what CUDA
    graphs would add to the step's memory (`plan.fits_graph_pool`).
    Call after adapters are attached and before the optimizer is built.
    """
    lm = causal_lm(model)
    setup = TrainSetup(loss_sum=None)
    fused_loss = fused_lora = False
    if not fast_kernels:
        setup.notices.append("fast kernels: off (--no-fast-kernels)")
    elif device.type != "cuda":
        setup.notices.append(f"fast kernels: off on {device.type} (CUDA only)")
    else:
        setup.fast = True
        notice = _liger_missing(lm)
        setup.liger = notice is None
        if notice:
            setup.notices.append(notice)
        setup.attention = _set_flex_attention(lm)
        fused_loss = lm.config.model_type in FUSED_LOSS_FAMILIES and not hasattr(lm.get_output_embeddings(),
                                                                                  "base_layer")
        if not fused_loss:
            setup.notices.append(f"fast kernels: plain loss for {lm.config.model_type!r} (fused loss not exact)")
        adapted = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict))
        fused = fuse_lora_layers(model)
        fused_lora = fused == adapted  # every LoRA layer on the fused node (or none to fuse)
        if not fused_lora:
            setup.notices.append(f"fast kernels: fused LoRA node on {fused} of {adapted} adapted layers (the rest run "
                                 "peft's forward: dropout, DoRA or a trained bias)")
    choice, room_for_graphs = _plan_memory(lm, device, batch_tokens, gradient_checkpointing, memory, fused_loss,
                                           setup.fast and fused_lora, setup.fast and COMPILE_LAYERS, longest_sample,
                                           accumulates)
    setup.batch_tokens, setup.checkpointing = choice.batch_tokens, choice.checkpointing
    setup.notices.extend(choice.notices)
    if fused_loss:
        setup.loss_sum = make_fused_loss(setup.batch_tokens, use_liger=setup.liger)
    if setup.checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(lm, "enable_input_require_grads"):
            lm.enable_input_require_grads()  # frozen embeddings (LoRA) must still pass gradients
    compiled = setup.fast and COMPILE_LAYERS and (COMPILE_CHECKPOINTED or not setup.checkpointing)
    if compiled:
        setup.notices.append(f"fast kernels: {_compile_decoder_layers(lm)} decoder layers compiled (torch.compile; "
                             "the first steps compile them: 10-20 s on an H200 with torch's compile cache warm, "
                             "up to 5 minutes the first time on a machine)")
    elif setup.liger:
        _apply_liger_layers(lm)
    graphs.detach(lm)
    if compiled and fused_loss and CUDA_GRAPHS and cuda_graphs and not setup.checkpointing and not quantized(lm):
        if room_for_graphs:
            graphs.attach(lm, eager_decoder_hidden, length=setup.batch_tokens)
            setup.graphs = True
            setup.notices.append(f"fast kernels: CUDA graphs over the decoder (forward and backward) for rows of "
                                 f"{setup.batch_tokens} tokens")
        else:
            setup.notices.append("fast kernels: no CUDA graphs (no room for their memory pool beside the step's peak)")
    return setup


def quantized(lm: Any) -> bool:
    """Whether the base weights are quantised (bitsandbytes 4/8-bit through transformers)."""
    return bool(getattr(lm, "is_quantized", False) or getattr(lm, "hf_quantizer", None) is not None
                or getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False))


def _compile_decoder_layers(lm: Any, backend: str = "inductor") -> int:
    """Regional compilation: each decoder layer becomes one compiled graph (one autograd node).

    The layers share one forward, so dynamo compiles it once and reuses it for every layer
    (parameters are graph inputs); the fixed padded row length keeps the shape static. What
    it removes is host work: hundreds of small kernels and autograd nodes per layer. A layer
    dynamo cannot compile runs eagerly instead of stopping the run (`suppress_errors`).
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    # One code object serves every layer, so its cache holds one graph per variant the run
    # meets: budget-length and longer rows (multiples of PAD_MULTIPLE), grad and no-grad
    # (eval, DPO's reference with the adapter off), the first layer's frozen input. dynamo's
    # default of 8 entries is reached by a DPO run with long rows, and the layers would then
    # fall back to eager for the rest of the run.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6's name
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    from tunesmith.model import lora_graph

    compiler: Any = backend
    if (lora_node.NODE == "grouped" and is_adapted(lm)) or lora_graph.LINEARS:  # calls sharing an input: one group
        compiler = lora_graph.grouping_backend(backend)
    compiler = _with_memory_budget(compiler, ACTIVATION_MEMORY_BUDGET)
    layers = getattr(lm.get_decoder(), "layers", None) or []
    for layer in layers:
        layer.compile(dynamic=False, backend=compiler)
    return len(layers)


def _with_memory_budget(backend: Any, budget: float) -> Any:
    """`backend` (a name or a torch.compile backend) run with torch's partitioner budget at `budget`.

    AOT autograd partitions a graph into forward and backward while the backend compiles it,
    so the setting is patched around that call only: other compiled code in the process (a
    user's own, the evaluation of another run) keeps torch's default.
    """
    import torch._functorch.config as functorch_config
    from torch._dynamo import lookup_backend

    compile_graph = lookup_backend(backend)  # (a callable comes back as it is)

    def compile_budgeted(gm: Any, example_inputs: list[Any]) -> Any:
        with functorch_config.patch(activation_memory_budget=budget):
            return compile_graph(gm, example_inputs)

    return compile_budgeted


def is_adapted(model: Any) -> bool:
    """Whether `model` carries LoRA layers."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def _plan_memory(lm: Any, device: torch.device, batch_tokens: int | None, checkpointing: bool, memory: Any,
                 fused_loss: bool, fused_lora: bool, compiled_layers: bool, longest: int | None,
                 accumulates: bool) -> tuple[Any, bool]:
    """The memory plan's choice of token budget and checkpointing for this GPU (`train.plan`), and
    whether a CUDA graph pool fits beside it (`plan.fits_graph_pool`; False off CUDA), given the
    longest sample (its row must fit too; None: not known) and whether gradients accumulate.
    `compiled_layers`: the layers will be compiled; the plan's figure for them holds at the
    activation memory budget it was measured at (`plan.COMPILED_LAYER_BUDGET`) or below.

    The memory it sizes against is what is free now plus what PyTorch already holds (the
    weights, counted by the estimate) plus the CUDA context (also counted).
    """
    from tunesmith.train import plan

    setting = memory if memory is not None else plan.Setting(adapter=is_adapted(lm))
    setting = replace(setting, checkpointing=checkpointing, fused_loss=fused_loss, fused_lora=fused_lora,
                      dtype_bytes=2 if lm.get_input_embeddings().weight.dtype.itemsize == 2 else 4,
                      cuda=device.type == "cuda",
                      compiled_layers=compiled_layers and ACTIVATION_MEMORY_BUDGET <= plan.COMPILED_LAYER_BUDGET)
    available = None
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device) + plan.CUDA_CONTEXT
    shape = plan.shape_from_config(lm.config.to_dict(), lm.config.name_or_path or lm.config.model_type)
    choice = plan.choose(shape, setting, available, batch_tokens, longest or 0)
    room = available is not None and plan.fits_graph_pool(shape, setting, choice.batch_tokens, available,
                                                          longest, accumulates)
    return choice, room
