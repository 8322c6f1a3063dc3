"""The output directory: what `transformers.pipeline("text-generation", model=DIR)` loads.

Layout:
- full:  DIR/model.safetensors + config.json + tokenizer (with the chat template used in
  training) + generation_config.json;
- lora, qlora:  DIR/adapter_model.safetensors + adapter_config.json (naming the original
  base model) + tokenizer + generation_config.json; with --merge also DIR/merged/, the adapter
  folded into full 16-bit weights by the parameter set's merge (a standalone model, same
  tokenizer and generation config);
- both:  config.yaml (the resolved run options), metrics.jsonl, tensorboard/, loss.png,
  summary.json, eval.jsonl (the held-out conversations), checkpoints/ (resumable steps).

`generation_config.json` lists every end-of-turn id as `eos_token_id`, so generation
stops where the model learned to end its turn (e.g. <|eot_id|> and <|end_of_text|>).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunesmith.model.adapters import is_peft
from tunesmith.train.files import CONFIG_FILE, MERGED_DIR, SUMMARY_FILE


def generation_config(model: Any, tokenizer: Any, end_of_turn_ids: list[int]) -> Any:
    """The base model's generation config with the end-of-turn ids as EOS and a pad id set.

    `end_of_turn_ids` comes from `tunesmith.data.templates.end_of_turn_ids`, which already
    includes the tokenizer's EOS.
    """
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    config.eos_token_id = list(end_of_turn_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id[0]
    config.pad_token_id = pad
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def _save_full(model: Any, tokenizer: Any, directory: Path, gen: Any, state_dict: dict[str, Any] | None = None) -> None:
    """Full weights as safetensors (`state_dict`: gathered from shards), tokenizer and generation config."""
    model.generation_config = gen
    model.config.use_cache = True  # inference wants the cache back
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    honour_umask(directory)
    tokenizer.save_pretrained(directory)
    gen.save_pretrained(directory)


def save_model(model: Any, tokenizer: Any, directory: Path, end_of_turn_ids: list[int],
               merge: Callable[[Any, Path], Any] | None = None,
               state_dict: dict[str, Any] | None = None) -> list[Path]:
    """Write the trained model (or adapter) so the HF ecosystem loads it; return the dirs written.

    `merge` is the parameter set's merge (`ParameterSet.merge`: in place for LoRA, a 16-bit
    reload for QLoRA); given, the adapter is also written merged into full weights.
    `state_dict`: the whole model's weights when `model` itself holds only shards (FSDP2).
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if is_peft(model) else model
    gen = generation_config(base, tokenizer, end_of_turn_ids)
    if not is_peft(model):
        _save_full(model, tokenizer, directory, gen, state_dict)
        return [directory]
    model.save_pretrained(directory, state_dict=state_dict)  # adapter_model.safetensors + adapter_config.json
    honour_umask(directory)
    tokenizer.save_pretrained(directory)
    gen.save_pretrained(directory)
    if merge is None:
        return [directory]
    merged = merge(model, directory)  # after the adapter is saved: a merge may consume it (or reload it)
    _save_full(merged, tokenizer, directory / MERGED_DIR, gen)
    return [directory, directory / MERGED_DIR]


def adapter_stop_notice(model: Any, tokenizer: Any, end_of_turn_ids: list[int], directory: Path) -> str | None:
    """A warning when a LoRA dir loaded by plain transformers would not stop at the end of a turn.

    transformers takes the generation config of an adapter directory from its *base* model,
    not from DIR/generation_config.json; if the base's EOS ids miss an end-of-turn id, plain
    `pipeline(DIR)` runs past the reply (tunesmith's own generate/chat stop correctly).
    """
    if not is_peft(model):
        return None
    base_eos = model.get_base_model().generation_config.eos_token_id
    base_eos = {base_eos} if isinstance(base_eos, int) else set(base_eos or [])
    missing = [i for i in end_of_turn_ids if i not in base_eos]
    if not missing:
        return None
    names = ", ".join(tokenizer.convert_ids_to_tokens(missing))
    return (f"note: the base model's generation config does not stop at {names}; plain transformers.pipeline("
            f"{directory}) would run past the reply: use {directory / MERGED_DIR} (--merge) or pass "
            f"eos_token_id from {directory / 'generation_config.json'}; tunesmith generate/chat stop correctly")


def current_umask() -> int:
    """The process umask (read from /proc where it can be, else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(directory: Path) -> None:
    """Give the `*.safetensors` in `directory` the mode a plain `open()` would (0o666 & ~umask).

    safetensors >= 0.8 writes through a temp file created 0600 and renamed into place
    (safetensors#764, reported as #782), so the weights would be readable by their owner
    only while every other file of the directory follows the umask.
    """
    mode = 0o666 & ~current_umask()
    for path in directory.glob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def save_config(directory: Path, flat_config: dict[str, Any]) -> None:
    """config.yaml: the resolved options (rerun with `tunesmith train --config DIR/config.yaml`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(flat_config, sort_keys=False), encoding="utf-8")


def save_summary(directory: Path, summary: dict[str, Any]) -> None:
    """summary.json: the final figures; its presence also marks the run as finished."""
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
