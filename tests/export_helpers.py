"""Shared builders for the export tests: a tiny LoRA run through `tunesmith.finetune`, tiny models
of each supported architecture, and loading a GGUF back with transformers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SYSTEM = "You answer briefly."


def tiny_lora_run(base_dir: Path, tmp: Path, report: bool = True) -> Path:
    """A 2-step LoRA run with a system prompt and a held-out report (tiny model, CPU, seconds)."""
    from test_train_api import write_qa

    from tunesmith.train.api import finetune

    data = write_qa(tmp / "qa.jsonl")
    result = finetune(model=str(base_dir), data=str(data), method="lora", max_steps=2, test_split=0.0,
                      eval_data=str(data), system=SYSTEM, output=str(tmp / "run"), report=report)
    return result.output_dir


def arch_configs(vocab: int, pad: int) -> dict[str, Any]:
    """One tiny config per supported HF architecture (norms and heads as the real families have them)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=pad)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common),
        "qwen2": Qwen2Config(**common),
        # transformers' GGUF reader takes Qwen3's head size from its default (128), not the file
        "qwen3": Qwen3Config(head_dim=128, **common),
        "gemma2": Gemma2Config(head_dim=16, **common),
        "gemma3": Gemma3TextConfig(head_dim=16, **common),
        "phi3": Phi3Config(**{**common, "num_key_value_heads": 4}, bos_token_id=pad, eos_token_id=pad),
    }


def f16_rounded(model: Any) -> Any:
    """The model with every matrix rounded to float16 (what an f16 GGUF stores; 1-D tensors stay f32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(p.half().float())
    return model


def load_gguf_model(path: Path) -> Any:
    """transformers' own GGUF loader (dequantises to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def gguf_fields(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF via gguf's reader (arrays as lists)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def wide_model_dir(path: Path, **shape: int) -> Path:
    """A tiny llama3-style model whose rows are multiples of 256 (llama.cpp's k-quant block), and whose
    tokenizer prepends BOS on plain encoding as Meta's Llama 3 tokenizer does (llama.cpp's
    `add_bos_token` then comes out true)."""
    import tiny
    from tokenizers import processors
    from transformers import AutoTokenizer

    tiny.make_model_dir(path, "llama3", **{"hidden_size": 256, "intermediate_size": 512, **shape})
    tokenizer = AutoTokenizer.from_pretrained(path)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(path)
    return path
