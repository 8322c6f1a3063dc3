"""The mechanics of making weights trainable: all of them, or a LoRA adapter (peft).

`tunesmith.methods.params` decides which of these a run uses. LoRA adapters are kept in
fp32 even when the base model is bf16 (peft's `autocast_adapter_dtype`), so the small
adapter updates are not rounded away.
"""
from __future__ import annotations

from typing import Any

from tunesmith.errors import UserError


def lora_target_modules(targets: str) -> str | list[str]:
    """`all-linear` as peft spells it, else the comma list as module names."""
    if targets.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError(f"invalid value for lora_targets: {targets!r} (allowed: all-linear, or q_proj,v_proj,...)")
    return names


def apply_lora(model: Any, r: int, alpha: int, targets: str = "all-linear") -> Any:
    """Wrap `model` with a trainable LoRA adapter (dropout 0); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_target_modules(targets),
                        bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: a named target module does not exist in this model
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise UserError(f"--lora-targets {targets}: {str(exc).splitlines()[0]}",
                        [f"linear layers of this model: {', '.join(linear)}"]) from None


def quantised_layers(model: Any) -> int:
    """How many linear layers of `model` hold bitsandbytes 4-bit weights."""
    return sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")


def check_quantised(model: Any) -> None:
    """Refuse a "quantised" model in which bitsandbytes replaced no layer (nothing would be 4-bit)."""
    if quantised_layers(model) == 0:
        kind = type(model).__name__
        raise UserError(f"bitsandbytes quantised no layer of this model ({kind}: it has no linear layers "
                        "bitsandbytes can replace)", ["fix: use --method lora (16-bit base weights)"])


def train_all_weights(model: Any) -> Any:
    """Full fine-tuning: every parameter gets a gradient."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def is_peft(model: Any) -> bool:
    """Whether `model` carries a peft adapter."""
    return hasattr(model, "peft_config")
