"""Which Hugging Face architectures become which llama.cpp architectures, and how.

llama.cpp re-implements each architecture, so a GGUF must name one it knows and lay the
weights out the way its kernels expect. Three differences from the HF checkpoint matter
for the families we support (learned from llama.cpp's convert_hf_to_gguf.py):

- Llama/Mistral: HF stores Q and K rows in "rotate half" order, llama.cpp in interleaved
  (GPT-J) order, so their rows are permuted per head (`permute_qk`);
- Gemma 2/3: HF's RMSNorm multiplies by (1 + w), llama.cpp's by w, so norm weights get +1;
- tied embeddings: llama.cpp reuses `token_embd` when there is no `output` tensor, so a tied
  `lm_head` is not written twice.

Anything else is refused by name: writing a file that llama.cpp loads but computes wrongly
would be worse than no file.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """How one HF `model_type` is written: the llama.cpp arch name and the tensor fixes it needs."""

    gguf_arch: str  # a key of gguf.MODEL_ARCH_NAMES' values, e.g. "llama"
    permute_qk: bool = False
    norm_plus_one: bool = False
    extra_hparams: Callable[[Any, Any], None] | None = field(default=None, compare=False)


def _gemma_hparams(writer: Any, config: Any) -> None:
    """Gemma 2/3: sliding window, logit soft-capping."""
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


SUPPORTED: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),  # llama.cpp runs Mistral as its Llama graph
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma2": ArchSpec("gemma2", norm_plus_one=True, extra_hparams=_gemma_hparams),
    "gemma3_text": ArchSpec("gemma3", norm_plus_one=True, extra_hparams=_gemma_hparams),
    "phi3": ArchSpec("phi3"),
}


def arch_spec(config: Any) -> ArchSpec:
    """The spec of this model's architecture; a `UserError` naming it when unsupported."""
    kind = getattr(config, "model_type", None)
    if kind == "gemma3":  # the multimodal wrapper: only its text model is a causal LM
        kind = "gemma3_text"
    if kind not in SUPPORTED:
        raise UserError(f"GGUF export does not support the {kind!r} architecture "
                        f"({', '.join(getattr(config, 'architectures', None) or [])})",
                        ["supported: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3; "
                         "`tunesmith export MODEL --to merged` works for any model"])
    _refuse_unsupported_rope(config, kind)
    return SUPPORTED[kind]


def rope_parameters(config: Any) -> dict[str, Any]:
    """The RoPE settings of the full-attention layers (transformers 5 keeps them in `rope_parameters`)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in rope:  # Gemma 3: one entry per layer type; llama.cpp fixes the sliding ones itself
        rope = rope["full_attention"]
    return dict(rope)


def _refuse_unsupported_rope(config: Any, kind: str) -> None:
    """RoPE scaling variants we do not carry over would make every prompt silently wrong."""
    rope_type = rope_parameters(config).get("rope_type") or "default"
    if kind == "phi3" and rope_type != "default":
        raise UserError(f"GGUF export: Phi-3 with {rope_type!r} RoPE scaling (the 128k variants) is not supported",
                        ["use a 4k-context Phi-3, or `--to merged`"])
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"GGUF export: RoPE scaling {rope_type!r} of this {kind} model is not supported",
                        ["supported: none, linear, llama3; `--to merged` works for any model"])


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """Llama 3.1+ frequency scaling as llama.cpp's `rope_freqs` tensor (one divisor per rotated pair).

    The published Llama 3 rule: wavelengths shorter than original_ctx / high_freq_factor keep
    their frequency, longer than original_ctx / low_freq_factor are divided by `factor`, and
    the band between is interpolated smoothly. None when the model does not use it.
    """
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim, base = head_dim(config), float(rope["rope_theta"])
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection from HF's half-split RoPE order to llama.cpp's interleaved order.

    Per head, HF keeps the first halves of the rotated pairs in rows [0, d/2) and the second
    halves in [d/2, d); llama.cpp wants each pair adjacent. (out, in) -> (out, in).
    """
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def fix_tensor(spec: ArchSpec, hf_name: str, weight: np.ndarray, config: Any) -> np.ndarray:
    """Apply the layout fixes of `spec` to one tensor (named as in the HF state dict)."""
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(weight, config.num_attention_heads)
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(weight, config.num_key_value_heads or config.num_attention_heads)
    if spec.norm_plus_one and hf_name.endswith("norm.weight"):
        return weight + 1.0
    return weight


def head_dim(config: Any) -> int:
    """Per-head size: the config's own when given (Gemma, Qwen3), else hidden / heads."""
    given = getattr(config, "head_dim", None)
    return int(given) if given else config.hidden_size // config.num_attention_heads


def write_hparams(writer: Any, spec: ArchSpec, config: Any, vocab_size: int) -> None:
    """The architecture keys llama.cpp reads to build its graph (`{arch}.*`)."""
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    if getattr(config, "head_dim", None):  # Qwen3, Gemma: heads need not be hidden / n_head wide
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if spec.extra_hparams is not None:
        spec.extra_hparams(writer, config)
