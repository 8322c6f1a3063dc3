"""The weights follow the user's umask like every other file of the output directory."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_weights_follow_the_umask(tiny_model_dir: Path, tmp_path: Path, mask: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.adapters import apply_lora
    from tunesmith.methods import PARAMETER_SETS
    from tunesmith.train.output import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = os.umask(mask)
    try:
        save_model(model, tokenizer, tmp_path / "full", [tokenizer.eos_token_id])
        save_model(apply_lora(model, 4, 8), tokenizer, tmp_path / "lora", [tokenizer.eos_token_id],
                   merge=PARAMETER_SETS["lora"].merge)
    finally:
        os.umask(before)
    for directory, weights in [("full", "model.safetensors"), ("lora", "adapter_model.safetensors"),
                               ("lora/merged", "model.safetensors")]:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / directory).iterdir() if p.is_file()}
        assert modes[weights] == 0o666 & ~mask == modes["config.json" if "lora" != directory else
                                                        "adapter_config.json"], (directory, modes)
