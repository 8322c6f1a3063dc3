"""Loading models and tokenizers: one place decides the device, the dtype and what a name means.

A model name is a hub id, a local HF model directory, or a tunesmith output directory
(full weights, or a LoRA adapter whose base is named in `adapter_config.json`). No name
means the bundled starter model. Loading never runs remote code unless asked, and reads
weights as safetensors.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import UserError

if TYPE_CHECKING:
    import torch

STARTER_DIR = Path(__file__).resolve().parent.parent / "assets" / "starter"


def pick_device_dtype(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device/dtype policy: CUDA -> bf16 where supported; MPS and CPU -> float32.

    Float32 on MPS and CPU because half precision there is slow or numerically fragile,
    and a CUDA card without bf16 gets float32 too (fp16 training needs loss scaling).
    """
    import torch  # here, not at the top: reading a tokenizer (`data inspect`) needs no torch

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


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within `timeout` seconds.

    Without it, an unreachable hub costs ~48 s of huggingface_hub's retries before any
    message. The probe runs in a thread so a hanging DNS lookup cannot outlast `timeout`.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.2)
    return bool(result and result[0])


def hub_options(name: str) -> dict[str, Any]:
    """`from_pretrained` options for a hub id when the hub cannot be used: cache only, or a UserError now.

    Offline (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`, or no connection to the hub) a
    cached model loads from the cache at once; an uncached one fails in about a second.
    """
    if Path(name).expanduser().exists():
        return {}
    if _env_on("HF_HUB_OFFLINE") or _env_on("TRANSFORMERS_OFFLINE"):
        why = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    elif hub_reachable():
        return {}
    else:
        why = "the Hugging Face hub cannot be reached (no network?)"
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json")):
        return {"local_files_only": True}
    raise UserError(f"{name}: not in the local Hugging Face cache, and {why}",
                    ["check the spelling of the hub id, pass a local model directory, or go online once to "
                     "download it"])


def _hub_error(name: str, exc: Exception) -> UserError:
    """Turn a loading failure into advice (most often: offline, or a typo in the id)."""
    return UserError(
        f"could not load {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        ["if this is a hub id: check the spelling and that you are online (or that it is in the local cache)",
         "if this is a local model: pass an existing directory path"],
    )


LIGHT_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def light_tokenizer_class(source: str) -> Any:
    """The tokenizer class of a local directory whose tokenizer_config.json names a generic one, or None.

    `AutoTokenizer` always resolves the model's config class first, and in transformers 5
    that imports torch and torch.distributed (4-5x the time of the tokenizer itself on a
    laptop CPU). A directory that declares the generic `tokenizers`-backed class (what
    transformers 5 writes, and tunesmith's outputs) loads with that class directly; any
    other declaration, remote code (`auto_map`) or a hub id goes through AutoTokenizer.
    """
    config_path = Path(source) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        declared = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = declared.get("tokenizer_class") if isinstance(declared, dict) else None
    if name not in LIGHT_TOKENIZER_CLASSES or "auto_map" in declared:
        return None
    import transformers

    return getattr(transformers, name, None)


def load_tokenizer(name: str | None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model (for an adapter directory: its own copy, else its base's)."""
    resolved = resolve_model_name(name)
    source = resolved
    if adapter_base(resolved) is not None and not (Path(resolved) / "tokenizer_config.json").is_file():
        source = adapter_base(resolved)  # type: ignore[assignment]
    light = light_tokenizer_class(source)
    try:
        if light is not None:
            return light.from_pretrained(source)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_options(source))
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
    source = resolve_model_name(base) if base else resolved
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
            source,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **hub_options(source),
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
    import torch

    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type
