"""Loading models and tokenizers: one place decides the device, the dtype and what a name means.

A model name is a hub id, a local HF model directory, or a tunesmith output directory
(full weights, or a LoRA adapter whose base is named in `adapter_config.json`). No name
means the bundled starter model. Loading never runs remote code unless asked, and reads
weights as safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import UserError

STARTER_DIR = Path(__file__).resolve().parent.parent / "assets" / "starter"


def pick_device_dtype(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device/dtype policy: CUDA -> bf16 where supported; MPS and CPU -> float32.

    Float32 on MPS and CPU because half precision there is slow or numerically fragile,
    and a CUDA card without bf16 gets float32 too (fp16 training needs loss scaling).
    """
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return dev, torch.bfloat16
    return dev, torch.float32


def resolve_model_name(name: str | None) -> str:
    """A local path as a string, or a hub id; `None` -> the bundled starter model."""
    if name is None:
        if not (STARTER_DIR / "config.json").is_file():
            raise UserError(f"the bundled starter model is missing from {STARTER_DIR}; pass --model")
        return str(STARTER_DIR)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name}: is a file, not a model directory")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"{name}: not a model directory (no config.json or adapter_config.json inside)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise UserError(f"{name}: no such directory (expected a local model directory or a hub id ORG/NAME)")
    return name


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter directory, or None when `path` holds full weights."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{cfg}: no base_model_name_or_path; cannot tell which model the adapter belongs to")
    return str(base)


def _hub_error(name: str, exc: Exception) -> UserError:
    """Turn a loading failure into advice (most often: offline, or a typo in the id)."""
    return UserError(
        f"could not load {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        ["if this is a hub id: check the spelling and that you are online (or that it is in the local cache)",
         "if this is a local model: pass an existing directory path"],
    )


def load_tokenizer(name: str | None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model (for an adapter directory: its own copy, else its base's)."""
    from transformers import AutoTokenizer

    resolved = resolve_model_name(name)
    source = resolved
    if adapter_base(resolved) is not None and not (Path(resolved) / "tokenizer_config.json").is_file():
        source = adapter_base(resolved)  # type: ignore[assignment]
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from None


def load_model(
    name: str | None,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    **load_options: Any,
) -> Any:
    """A causal LM on `device` in `dtype` (policy defaults); LoRA directories load base + adapter.

    `merge_adapter=True` folds the adapter into the base weights (faster inference, not trainable).
    `load_options` go to `from_pretrained` as they are (a parameter set's, e.g. quantisation).
    """
    from transformers import AutoModelForCausalLM

    if device is None or dtype is None:
        policy_device, policy_dtype = pick_device_dtype()
        device, dtype = device or policy_device, dtype or policy_dtype
    resolved = resolve_model_name(name)
    base = adapter_base(resolved)
    quantised = "quantization_config" in load_options
    if quantised:
        if base is not None:
            raise UserError(f"{resolved}: a LoRA adapter directory cannot be the base of a quantised run "
                            "(its adapter would be merged into 4-bit weights)",
                            [f"fix: train with --merge and pass {resolved}/merged, or use --method lora"])
        # quantised weights are placed by the loader; `.to()` on a 4-bit model is refused
        load_options = {**load_options, "device_map": {"": _device_index(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_name(base) if base else resolved,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **load_options,
        )
    except (OSError, ValueError) as exc:
        if quantised and not isinstance(exc, OSError):
            raise UserError(f"{resolved}: bitsandbytes cannot quantise this model: {str(exc).splitlines()[0]}",
                            ["fix: use --method lora (16-bit base weights)"]) from None
        raise _hub_error(base or resolved, exc) from None
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved)
        if merge_adapter:
            model = model.merge_and_unload()
    return model if quantised else model.to(device)


def _device_index(device: torch.device) -> int | str:
    """`device_map` spelling of a device: the CUDA ordinal, else the device type."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type
