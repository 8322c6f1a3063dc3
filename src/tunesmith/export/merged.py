"""A standalone model directory: a LoRA adapter folded into its base, saved in the base's dtype.

This is what every other runtime (and `push --merged`) wants: plain safetensors weights
that `transformers.pipeline(DIR)` loads without peft, with the tokenizer carrying the chat
template and a generation config that stops at the end-of-turn ids.
"""
from __future__ import annotations

from pathlib import Path

from tunesmith.export.source import ExportSource


def write_merged(source: ExportSource, directory: Path) -> Path:
    """Save `source`'s (already merged) model in its saved dtype, with tokenizer and generation config."""
    from tunesmith.train.output import generation_config

    directory.mkdir(parents=True, exist_ok=True)
    model = source.model.to(source.saved_dtype)
    try:
        gen = generation_config(model, source.tokenizer, source.end_of_turn_ids)
        model.generation_config = gen
        model.save_pretrained(directory, safe_serialization=True)
        source.tokenizer.save_pretrained(directory)
        gen.save_pretrained(directory)
    finally:
        source.model = model.float()  # later formats round from float32 again (bf16 -> f32 is exact)
    return directory
