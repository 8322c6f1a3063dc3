"""The memory plan: peak training memory estimated from a model's config alone, before any weights load.

Peak = static + per_token * T (+ the loss's logits chunk), so the largest token budget that
fits is a division. What is counted, per parameter or per token, and why:
- weights: 2 bytes (bf16) or 4 (fp32); 4-bit NF4 linear weights 0.5 byte + their
  double-quantised constants (one 8-bit absmax per 64 weights, one fp32 per 256 of those);
  embeddings, LM head and norms stay 16-bit under QLoRA.
- trainable parameters: their gradient (same dtype; LoRA adapters are fp32, so their fp32
  copy too) and the optimizer's state: AdamW 8 bytes (fp32 m, v), the 8-bit ones 2 bytes.
- activations per token and layer: ~10 hidden- and 4 intermediate-sized tensors saved
  for backward by eager layers (norm inputs, q/k/v, attention output, residuals,
  gate/up/act); the fast path's compiled bf16 layers save less (`COMPILED_LAYER`:
  torch's partitioner at the fast path's activation memory budget recomputes the norms
  and the gated product instead); with gradient checkpointing only each layer's input is
  kept and one layer is recomputed at a time. A LoRA layer on peft's path holds fp32
  copies of its input and of its adapter's output (7 per block); the fused node of the
  fast path does not.
- the loss: plain, (T, V) logits in the model dtype, the fp32 log-softmax and its gradient;
  fused (liger / chunked), one chunk of logits and the fp32 hidden-state gradient.
- attention: flash/flex kernels save O(T) per head (no (T, T) scores are counted).
- CUDA: the context (~0.5 GiB, outside PyTorch's allocator) and 5% headroom for
  fragmentation; a 4-bit layer dequantises one weight at a time (a transient).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

GIB = 2**30
CUDA_CONTEXT = GIB // 2
HEADROOM = 0.95  # share of the card the estimate may fill (allocator fragmentation)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed weight + double-quantised absmax constants
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw-8bit": 2 + 8 / 256, "paged-adamw-8bit": 2 + 8 / 256,
                         "paged-adamw-32bit": 8.0}
LORA_LINEARS = 7  # q, k, v, o, gate, up, down (`all-linear`)
TOKEN_STEP = 512  # token budgets are offered in steps of this
# What a compiled, unchecked bf16 decoder layer of the fast path saves per token, in (hidden,
# intermediate)-sized values, for full fine-tuning and for LoRA. Measured on an H200 (bench/
# gpu_train.py --plan-check-fast: the slope of the peak between 4,096 and 8,192/16,384-token rows,
# less the loss and embeddings; activation memory budget 0.9, CUDA graphs): full 4.35 h + 1.89 i,
# LoRA 5.98 h + 1.78 i over Llama-1B, Llama-3B and Qwen2.5-0.5B; rounded up, which puts these
# per-layer figures 4-8% above each measured one (eager layers: 10 h + 4 i, twice as much).
COMPILED_LAYER = {False: (4.5, 2.0), True: (6.0, 2.0)}  # adapter? -> (per hidden, per intermediate)
COMPILED_LAYER_BUDGET = 0.9  # the activation memory budget (`fast.ACTIVATION_MEMORY_BUDGET`) they were measured at
COMPILED_FAMILIES = ("llama", "qwen2")  # the layers measured; others (extra norms, fused projections) keep 10h + 4i
# Beside them the same runs held up to ~0.9 GiB that no per-token or per-weight term explains (a
# LoRA run's peak at 0 tokens, extrapolated: Qwen-0.5B +0.9, Llama-1B +0.4, 3B +0.5 GiB over
# weights + adapter + optimizer): the loss chunk's fp32 copies, block masks, RoPE tables, the
# graphs' pool rounding. Counted once, so the estimate stays above every measured peak.
COMPILED_WORKSPACE = float(GIB)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a dense decoder that memory depends on (read from config.json)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    family: str = ""
    """config.json's model_type (`COMPILED_FAMILIES`)."""

    @property
    def linear_per_layer(self) -> int:
        """Weights of the 7 linear layers of one block (attention + gated MLP)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def lora_per_rank(self) -> int:
        """LoRA parameters per unit of rank on all 7 linear layers of one block ((in + out) each)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (h + q) * 2 + (h + kv) * 2 + (h + i) * 3

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head when it is not tied to them."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        """Every parameter (norms included)."""
        return self.layers * (self.linear_per_layer + 2 * self.hidden) + self.embedding_params + self.hidden


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """A `ModelShape` from a config.json mapping; a clear error for configs that are not a dense decoder."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in text]
    if missing:
        raise UserError(f"{name}: config has no {', '.join(missing)}; cannot plan memory for this architecture")
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    return ModelShape(
        name=name, hidden=hidden, intermediate=int(text.get("intermediate_size") or 4 * hidden),
        layers=int(text["num_hidden_layers"]), heads=heads, kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads), vocab=int(text["vocab_size"]),
        tied=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        family=str(text.get("model_type") or config.get("model_type") or ""))


@dataclass(frozen=True)
class Setting:
    """How a run trains, as far as memory goes."""

    adapter: bool
    """Only an adapter trains (LoRA / QLoRA)."""
    base_bits: int = 16
    """Bits per base linear weight: 16, or 4 (NF4)."""
    checkpointing: bool = False
    optim: str = "adamw"
    lora_r: int = 16
    dtype_bytes: int = 2
    """2 on CUDA (bf16), 4 on CPU/MPS (fp32)."""
    fused_loss: bool = True
    """The fast path's fused linear cross-entropy (CUDA)."""
    fused_lora: bool = True
    """The fast path's one-node LoRA (no fp32 copies of the activations)."""
    compiled_layers: bool = True
    """The fast path's compiled decoder layers (`COMPILED_LAYER`, where `compiled` says it applies)."""
    cuda: bool = True


@dataclass(frozen=True)
class Estimate:
    """Bytes by part, and how they grow with the token budget."""

    parts: dict[str, float]
    tokens: int

    @property
    def total(self) -> float:
        """Estimated peak bytes."""
        return sum(self.parts.values())


def static_parts(shape: ModelShape, s: Setting) -> dict[str, float]:
    """Bytes that do not depend on the token budget: weights, gradients, optimizer state, context."""
    linear = shape.layers * shape.linear_per_layer
    rest = shape.parameters - linear  # embeddings, head, norms: always in the run's dtype
    base_linear = NF4_BYTES if s.base_bits == 4 else s.dtype_bytes
    parts = {"weights": linear * base_linear + rest * s.dtype_bytes}
    if s.adapter:
        trainable = shape.layers * shape.lora_per_rank * s.lora_r
        parts["weights"] += trainable * 4  # the fp32 adapter itself
        grad_bytes = 4.0
    else:
        trainable, grad_bytes = shape.parameters, float(s.dtype_bytes)
    parts["gradients"] = trainable * grad_bytes
    parts["optimizer"] = trainable * OPTIMIZER_STATE_BYTES[s.optim]
    if s.cuda:
        parts["cuda context"] = float(CUDA_CONTEXT)
    return parts


def layer_bytes_per_token(shape: ModelShape, s: Setting) -> float:
    """Saved activations of one block per token (no checkpointing)."""
    per_hidden, per_intermediate = COMPILED_LAYER[s.adapter] if compiled(shape, s) else (10, 4)
    base = (per_hidden * shape.hidden + per_intermediate * shape.intermediate) * s.dtype_bytes
    if not s.adapter:
        return base
    lora = LORA_LINEARS * s.lora_r * 4  # x @ A^T per adapted layer
    if not s.fused_lora:  # peft's path: fp32 copies of each linear's input, fp32 adapter outputs beside the base's
        lora += (6 * shape.hidden + shape.intermediate) * 8
    return base + lora


def compiled(shape: ModelShape, s: Setting) -> bool:
    """Whether the layers run compiled as measured for `COMPILED_LAYER`: a family measured, on
    CUDA in bf16, unchecked, every LoRA layer on the fused node. (A 4-bit base too: QLoRA on the
    Llama-3.1-8B shape at 4,096 tokens peaked at 18.5 GiB on an H200, round 13, where this
    estimates 21.2 and the eager figure 31.2.)"""
    return (s.compiled_layers and s.cuda and s.dtype_bytes == 2 and s.fused_lora and not s.checkpointing
            and shape.family in COMPILED_FAMILIES)


def token_parts(shape: ModelShape, s: Setting, tokens: int) -> dict[str, float]:
    """Bytes that grow with the token budget: activations and the loss."""
    per_layer = layer_bytes_per_token(shape, s)
    if s.checkpointing:
        activations = tokens * (shape.layers * shape.hidden * s.dtype_bytes + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    activations += tokens * 2 * shape.hidden * s.dtype_bytes  # embedding output, final norm
    if s.fused_loss:
        chunk = min(tokens, loss_chunk_tokens(shape, tokens))
        loss = chunk * shape.vocab * 2 * s.dtype_bytes + tokens * shape.hidden * 4
    else:
        loss = tokens * shape.vocab * (s.dtype_bytes + 8)  # logits, fp32 log-softmax and its gradient
    parts = {"activations": float(activations), "loss": float(loss)}
    if compiled(shape, s):
        parts["workspace"] = COMPILED_WORKSPACE
    if s.base_bits == 4:
        parts["dequantised weight"] = float(shape.hidden * max(shape.intermediate, shape.hidden) * s.dtype_bytes)
    return parts


def loss_chunk_tokens(shape: ModelShape, tokens: int) -> int:
    """Tokens per chunk of liger's fused cross-entropy (its rule, with our chunk_mem_const).

    liger: inc = ceil(V / (H * const)), chunk = next power of 2 of ceil(T / inc).
    """
    from tunesmith.model.fast import LIGER_CE_CHUNK_MEM

    inc = max(1, math.ceil(shape.vocab / (shape.hidden * LIGER_CE_CHUNK_MEM)))
    want = max(1, math.ceil(tokens / inc))
    return 1 << (want - 1).bit_length()


def estimate(shape: ModelShape, s: Setting, tokens: int) -> Estimate:
    """The estimated peak memory of a training step at `tokens` tokens per micro-batch."""
    return Estimate({**static_parts(shape, s), **token_parts(shape, s, tokens)}, tokens)


def fits(e: Estimate, memory_bytes: float) -> bool:
    """Whether the estimate fits in `memory_bytes`, headroom kept for fragmentation."""
    return e.total <= HEADROOM * memory_bytes


def fits_graph_pool(shape: ModelShape, s: Setting, tokens: int, memory_bytes: float, longest: int | None = None,
                    accumulates: bool = True) -> bool:
    """Whether the step's peak fits beside what CUDA graphs of the decoder add to it.

    A recording of the decoder (`model/graphs.py`) keeps its activations in a pool of its own,
    which every row of the budget's length reuses: that is the step's activations, already
    counted. What comes on top: a row longer than the budget (`longest`, the longest sample,
    over `tokens`; None: not known, so one more budget's worth) runs eagerly, its activations
    beside the pool; and with gradient accumulation (`accumulates`) `.grad` is a copy of the
    backward graph's gradient buffers. (Measured on an H200, bench/README.md round 14: rows no
    longer than the budget, no accumulation, graphs on: every peak under the plain estimate.)
    """
    e = estimate(shape, replace(s, checkpointing=False), tokens)
    extra: dict[str, float] = {}
    if longest is None or longest > tokens:
        over = tokens if longest is None else row_tokens(tokens, longest)
        extra["eager row"] = estimate(shape, replace(s, checkpointing=False), over).parts["activations"]
    if accumulates:
        extra["graph gradients"] = e.parts["gradients"]
    return fits(Estimate({**e.parts, **extra}, tokens), memory_bytes)


def row_tokens(tokens: int, longest: int) -> int:
    """The longest row a run at this token budget trains on: the budget, or the row of its
    longest sample where that is longer (padded to a multiple of `fast.PAD_MULTIPLE`)."""
    from tunesmith.model.fast import padded_length

    return padded_length(longest, tokens)


def max_tokens(shape: ModelShape, s: Setting, memory_bytes: float, limit: int = 131072, longest: int = 0) -> int:
    """The largest token budget (a multiple of TOKEN_STEP, at most `limit`) that fits, its longest
    row (`longest`: the longest sample's tokens) included; 0 if none does."""
    lo, hi = 0, limit // TOKEN_STEP
    while lo < hi:  # peak grows with tokens: bisect over multiples of TOKEN_STEP
        mid = (lo + hi + 1) // 2
        if fits(estimate(shape, s, row_tokens(mid * TOKEN_STEP, longest)), memory_bytes):
            lo = mid
        else:
            hi = mid - 1
    return lo * TOKEN_STEP


def parse_memory(text: str) -> float:
    """'24GB', '24 GiB', '80g', '16000MB' -> bytes (GB read as GiB, as GPU vendors label cards)."""
    value = text.strip().upper().replace(" ", "").removesuffix("B").removesuffix("I")
    units = {"G": GIB, "M": 2**20, "T": 2**40}
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        amount = float(number)
    except ValueError:
        raise UserError(f"invalid value for gpu_memory: {text!r} (allowed: a size such as 24GB or 80GB)") from None
    if amount <= 0:
        raise UserError(f"invalid value for gpu_memory: {text!r} (allowed: a size > 0, such as 24GB)")
    return amount * (scale or GIB)


def read_config(model: str) -> tuple[dict[str, Any], str]:
    """config.json of a hub id, a model or tunesmith output directory, or a config file: never weights."""
    path = Path(model).expanduser()
    if path.is_file():
        return _load_json(path), path.stem
    if path.is_dir():
        adapter = path / "adapter_config.json"
        if not (path / "config.json").is_file() and adapter.is_file():
            return read_config(str(_load_json(adapter).get("base_model_name_or_path", "")))
        if not (path / "config.json").is_file():
            raise UserError(f"{model}: no config.json in this directory")
        return _load_json(path / "config.json"), path.name
    from tunesmith.model.load import resolve_model_name

    hub_id = resolve_model_name(model)
    try:
        from huggingface_hub import hf_hub_download

        downloaded = hf_hub_download(hub_id, "config.json")
    except Exception as exc:  # offline and not cached, a typo, a gated repo
        raise UserError(f"could not fetch the config of {hub_id!r}: {type(exc).__name__}",
                        ["online: check the id; offline: pass a local directory or its config.json"]) from None
    return _load_json(Path(downloaded)), hub_id.rsplit("/", 1)[-1]


def _load_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a `UserError` naming the file."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON config ({type(exc).__name__})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a JSON object")
    return loaded


def with_checkpointing(s: Setting, on: bool) -> Setting:
    """The same setting with gradient checkpointing on or off."""
    return replace(s, checkpointing=on)


DEFAULT_TOKENS = 8192  # the budget when nothing is known about memory (CPU, MPS)
AUTO_MAX_TOKENS = 16384  # beyond this a bigger micro-batch buys little speed, and accumulation does the rest
AUTO_MIN_TOKENS = 4096  # below this without checkpointing, checkpointing at a larger budget is faster


@dataclass(frozen=True)
class Choice:
    """What the plan chose for a run: the token budget, checkpointing, and why."""

    batch_tokens: int
    checkpointing: bool
    notices: tuple[str, ...] = ()


def choose(shape: ModelShape, s: Setting, memory_bytes: float | None, batch_tokens: int | None,
           longest: int = 0) -> Choice:
    """The token budget (when not given) and checkpointing (when not forced on) for this memory.

    `memory_bytes` None (no accelerator to size against): the given budget, else DEFAULT_TOKENS.
    Given a budget: checkpointing only if it would not fit otherwise. Not given: the largest
    budget up to AUTO_MAX_TOKENS that fits without checkpointing, unless that is under
    AUTO_MIN_TOKENS, then the largest that fits with it. Either way a sample longer than the
    budget (`longest`, in tokens; 0: not known) is a row of its own length, and must fit too.
    """
    if memory_bytes is None:
        return Choice(batch_tokens or DEFAULT_TOKENS, s.checkpointing)
    gib = f"{memory_bytes / GIB:.1f} GiB"
    if batch_tokens is not None:
        row = row_tokens(batch_tokens, longest)
        if s.checkpointing or fits(estimate(shape, s, row), memory_bytes):
            return Choice(batch_tokens, s.checkpointing)
        ckpt = fits(estimate(shape, with_checkpointing(s, True), row), memory_bytes)
        note = "gradient checkpointing: on (activations would not fit in GPU memory)"
        return Choice(batch_tokens, True, (note,) if ckpt else (note, advice(shape, s, memory_bytes)))
    plain = 0 if s.checkpointing else max_tokens(shape, s, memory_bytes, AUTO_MAX_TOKENS, longest)
    if plain >= AUTO_MIN_TOKENS:
        return Choice(plain, False, (f"batch tokens: {plain} (the largest that fits {gib}; set --batch-tokens)",))
    ckpt = max_tokens(shape, with_checkpointing(s, True), memory_bytes, AUTO_MAX_TOKENS, longest)
    if ckpt == 0:
        return Choice(TOKEN_STEP, True, (advice(shape, s, memory_bytes),))
    why = "" if s.checkpointing else ", gradient checkpointing on"
    return Choice(ckpt, True, (f"batch tokens: {ckpt}{why} (the largest that fits {gib}; set --batch-tokens)",))


def advice(shape: ModelShape, s: Setting, memory_bytes: float) -> str:
    """One line: what would fit in this memory (for a plan that does not, and for an OOM)."""
    from tunesmith.methods import PARAMETER_SETS

    gib = f"{memory_bytes / GIB:.1f} GiB"
    for params in sorted(PARAMETER_SETS.values(), key=lambda p: (not p.adapter, -p.base_bits)):
        for optim in dict.fromkeys((s.optim, "paged-adamw-8bit")):
            for ckpt in (False, True):
                trial = replace(s, adapter=params.adapter, base_bits=params.base_bits, checkpointing=ckpt, optim=optim)
                tokens = max_tokens(shape, trial, memory_bytes, AUTO_MAX_TOKENS)
                if tokens >= min(AUTO_MIN_TOKENS, 2 * TOKEN_STEP):
                    flags = f"--method {params.name} --batch-tokens {tokens}" + (
                        " --gradient-checkpointing" if ckpt else "") + (f" --optim {optim}" if optim != "adamw" else "")
                    return f"memory plan for {gib}: {flags} (see `tunesmith plan --model ...`)"
    return f"memory plan: {shape.name} does not fit in {gib} with any method; use a smaller model or a bigger GPU"
