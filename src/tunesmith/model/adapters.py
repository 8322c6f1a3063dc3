"""Which parameters train: every weight (`full`) or a LoRA adapter on the linear layers (`lora`).

A method in tunesmith is "which parameters train" (this module) plus "which loss"
(`tunesmith.train.losses`). LoRA adapters are kept in fp32 even when the base model is
bf16 (peft's `autocast_adapter_dtype`), so the small adapter updates are not rounded away.
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


def prepare_for_method(model: Any, method: str, *, lora_r: int = 16, lora_alpha: int = 32,
                       lora_targets: str = "all-linear") -> Any:
    """The model ready to train with `method`: full -> all weights train; lora -> an adapter.

    Gradient checkpointing and kernels are `tunesmith.model.fast.prepare_for_training`'s job.
    """
    model.config.use_cache = False  # training never reuses a KV cache
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "lora":
        return apply_lora(model, lora_r, lora_alpha, lora_targets)
    raise UserError(f"method {method!r} is not available yet (available: full, lora)")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_state(model: Any) -> dict[str, Any]:
    """The trainable tensors by name: what a checkpoint must hold to resume (all weights or the adapter)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def is_peft(model: Any) -> bool:
    """Whether `model` carries a peft adapter."""
    return hasattr(model, "peft_config")
