"""Parameter sets: which weights train, and how the model is loaded, wrapped and saved.

A `ParameterSet` is data plus three plain functions; the training code calls them and
never asks which one it holds. `adapter=True` means the base weights stay frozen and only
an adapter trains: the output is a peft adapter directory (and `--merge` can fold it in),
and a preference objective can use the same weights with the adapter switched off as its
reference model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def no_load_options(device: Any, dtype: Any) -> dict[str, Any]:
    """Extra `from_pretrained` keywords: none (weights load in the run's dtype)."""
    return {}


@dataclass(frozen=True)
class ParameterSet:
    """What trains: all weights, or an adapter on frozen (possibly quantised) weights."""

    name: str
    summary: str
    """One line for `--help`."""
    adapter: bool
    """True: only an adapter trains; the base weights are frozen."""
    wrap: Callable[[Any, Any], Any]
    """`(model, MethodOptions) -> model ready to train` (adapters attached, trainable flags set)."""
    load_options: Callable[[Any, Any], dict[str, Any]] = no_load_options
    """`(device, dtype) -> extra from_pretrained keywords` (e.g. a quantisation config)."""
    requires: tuple[tuple[str, str], ...] = field(default=())
    """(importable module, pip extra that provides it) pairs checked before any weights load."""


def wrap_full(model: Any, options: Any) -> Any:
    """Every weight trains."""
    from tunesmith.model.adapters import train_all_weights

    return train_all_weights(model)


def wrap_lora(model: Any, options: Any) -> Any:
    """A LoRA adapter (peft) on the chosen linear layers; the base is frozen."""
    from tunesmith.model.adapters import apply_lora

    return apply_lora(model, options.lora_r, options.lora_alpha, options.lora_targets)


FULL = ParameterSet("full", "every weight trains", adapter=False, wrap=wrap_full)
LORA = ParameterSet("lora", "a LoRA adapter on the linear layers (peft); the base stays frozen",
                    adapter=True, wrap=wrap_lora)

PARAMETER_SETS: dict[str, ParameterSet] = {p.name: p for p in (FULL, LORA)}
