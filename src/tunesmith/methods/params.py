"""Parameter sets: which weights train, and how the model is loaded, wrapped and saved.

A `ParameterSet` is data plus three plain functions; the training code calls them and
never asks which one it holds. `adapter=True` means the base weights stay frozen and only
an adapter trains: the output is a peft adapter directory (and `--merge` can fold it in),
and a preference objective can use the same weights with the adapter switched off as its
reference model.

`qlora` loads the base weights 4-bit NF4 (bitsandbytes, double-quantised constants) and
trains a LoRA adapter on them; its merge reloads the base in 16 bits (never a merge into
4-bit weights), so the merged model is the same one a plain LoRA merge would give.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def no_load_options(device: Any, dtype: Any) -> dict[str, Any]:
    """Extra `from_pretrained` keywords: none (weights load in the run's dtype)."""
    return {}


def merge_in_place(model: Any, adapter_dir: Any) -> Any:
    """peft's `merge_and_unload`: the adapter folded into the (16-bit) base weights it trained on."""
    return model.merge_and_unload()


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
    merge: Callable[[Any, Any], Any] = merge_in_place
    """`(trained model, dir its adapter was saved to) -> a plain model with the adapter merged in`."""
    base_bits: int = 16
    """Bits per base linear weight as loaded (16, or 4 for NF4): what the memory plan counts."""


def wrap_full(model: Any, options: Any) -> Any:
    """Every weight trains."""
    from tunesmith.model.adapters import train_all_weights

    return train_all_weights(model)


def wrap_lora(model: Any, options: Any) -> Any:
    """A LoRA adapter (peft) on the chosen linear layers; the base is frozen."""
    from tunesmith.model.adapters import apply_lora

    return apply_lora(model, options.lora_r, options.lora_alpha, options.lora_targets)


def qlora_load_options(device: Any, dtype: Any) -> dict[str, Any]:
    """4-bit NF4 base weights with double-quantised constants; matmuls in bf16 (fp32 on CPU).

    NF4 + double quantisation is the QLoRA paper's recipe (~0.52 bytes per weight with its
    constants). The compute dtype is the run's dtype, so CPU runs compute in fp32.
    """
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.device(device).type == "cuda" and dtype == torch.bfloat16 else torch.float32
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)}


def wrap_qlora(model: Any, options: Any) -> Any:
    """LoRA on every quantised linear layer; embeddings and LM head stay 16-bit and frozen.

    Not peft's `prepare_model_for_kbit_training`: it casts every non-quantised weight
    (embeddings, LM head, norms) to fp32, +2 bytes per parameter for nothing trained (1 GiB
    on Llama-3.1-8B's 128k vocabulary), and switches checkpointing on unconditionally. What
    it does that matters is done here (base frozen by peft) and in the fast path (input
    gradients for checkpointing; checkpointing chosen by the memory plan).
    """
    from tunesmith.model.adapters import apply_lora, check_quantised

    check_quantised(model)
    return apply_lora(model, options.lora_r, options.lora_alpha, options.lora_targets)


def merge_dequantised(model: Any, adapter_dir: Any) -> Any:
    """Reload the base in 16 bits (CPU) and merge the saved adapter there: never into 4-bit weights.

    Merging into NF4 weights would re-quantise base + delta and lose most of the update; the
    adapter was trained against the dequantised weights, so it is merged into the original
    16-bit base (the dtype of the run's unquantised weights: bf16 on CUDA). On the CPU, so
    the GPU needs no room for a second, 16-bit copy beside the training one.
    """
    import sys

    import torch

    from tunesmith.model.load import load_model

    dtype = model.get_input_embeddings().weight.dtype
    print(f"merge: reloading the base in {str(dtype).removeprefix('torch.')} on the CPU and merging the adapter "
          "there (a QLoRA adapter is never merged into 4-bit weights)", file=sys.stderr)
    return load_model(str(adapter_dir), device=torch.device("cpu"), dtype=dtype, merge_adapter=True)


FULL = ParameterSet("full", "every weight trains", adapter=False, wrap=wrap_full)
LORA = ParameterSet("lora", "a LoRA adapter on the linear layers (peft); the base stays frozen",
                    adapter=True, wrap=wrap_lora)

QLORA = ParameterSet("qlora", "a LoRA adapter on 4-bit NF4 base weights (bitsandbytes): 7-8B models on one 24 GB GPU",
                     adapter=True, wrap=wrap_qlora, load_options=qlora_load_options,
                     requires=(("bitsandbytes", "qlora"),), merge=merge_dequantised, base_bits=4)

PARAMETER_SETS: dict[str, ParameterSet] = {p.name: p for p in (FULL, LORA, QLORA)}
