"""What export reads: a model (a LoRA adapter already merged into its base), its tokenizer, and
what the run recorded (end-of-turn ids, system prompt, options, figures).

Everything is loaded on the CPU in float32, whatever the model was trained in: every
export format is then a rounding of the same exact weights (bf16 checkpoints widen to
float32 without loss), and no accelerator is needed to export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tunesmith.errors import UserError


@dataclass
class ExportSource:
    """A model ready to be written out, and the facts of the run that made it."""

    name: str  # what the user passed (directory or hub id)
    path: Path | None  # the local directory, when there is one
    model: Any  # float32, CPU, adapter merged
    tokenizer: Any  # with the chat template training used
    end_of_turn_ids: list[int]
    base_model: str | None  # the model the run started from (adapter base, or config.yaml's model)
    saved_dtype: torch.dtype  # the dtype the weights were saved in (merged output keeps it)
    is_adapter: bool
    run: dict[str, Any] = field(default_factory=dict)  # config.yaml of a tunesmith run
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json of a tunesmith run

    @property
    def system_prompt(self) -> str | None:
        """The system prompt training added to samples without one (`--system`)."""
        return self.run.get("system") or None

    def stop_strings(self) -> list[str]:
        """The end-of-turn tokens as text (what Ollama's `PARAMETER stop` matches)."""
        return [self.tokenizer.convert_ids_to_tokens(i) for i in self.end_of_turn_ids]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def end_of_turn_ids(path: Path | None, model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a reply: a tunesmith output's generation_config.json lists them all;
    for any other model they are derived from its chat template as training would (else its EOS)."""
    eos = _read_json(path / "generation_config.json").get("eos_token_id") if path else None
    if eos is None and getattr(tokenizer, "chat_template", None):
        from tunesmith.data.templates import end_of_turn_ids as derive

        return derive(tokenizer)
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return [int(i) for i in ids]


def _saved_dtype(path: Path | None, base: str | None) -> torch.dtype:
    """The dtype named in config.json (an adapter dir: its base's), default float32."""
    from transformers import AutoConfig

    source = base if base else (str(path) if path else None)
    try:
        cfg = AutoConfig.from_pretrained(source) if source else None
    except (OSError, ValueError):
        cfg = None
    dtype = getattr(cfg, "dtype", None) if cfg is not None else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_source(name: str) -> ExportSource:
    """Load `name` (tunesmith output, HF model directory or hub id) for export."""
    from tunesmith.model.load import adapter_base, load_model, load_tokenizer, resolve_model_name

    resolved = resolve_model_name(name)
    path = Path(resolved) if Path(resolved).is_dir() else None
    base = adapter_base(resolved)
    model = load_model(resolved, device=torch.device("cpu"), dtype=torch.float32, merge_adapter=True)
    model.eval()
    tokenizer = load_tokenizer(resolved)
    run = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) if path and (path / "config.yaml").is_file() else {}
    if not isinstance(run, dict):
        raise UserError(f"{path / 'config.yaml'}: expected a mapping of options")
    return ExportSource(
        name=name, path=path, model=model, tokenizer=tokenizer,
        end_of_turn_ids=end_of_turn_ids(path, model, tokenizer),
        base_model=base or run.get("model"), saved_dtype=_saved_dtype(path, base), is_adapter=base is not None,
        run=run, summary=_read_json(path / "summary.json") if path else {},
    )
