"""Ollama's Modelfile: the GGUF, the chat template in Go syntax, the stop strings, the system
prompt training used, and tunesmith's sampling defaults.

"Works in Python, rambles in Ollama" is nearly always a lost template or stop token: the
TEMPLATE here is derived from (and checked against) the jinja template training used, and
every end-of-turn token becomes a `PARAMETER stop`, so `ollama run` renders and stops as
`tunesmith generate` does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.export.gguf_vocab import adds_bos
from tunesmith.export.gorender import render_ollama
from tunesmith.export.gotemplate import check_go_template, go_template, turn_pieces


def jinja_renderer(tokenizer: Any) -> Any:
    """(messages, add_generation_prompt) -> text, exactly as training and `tunesmith generate` render."""
    from tunesmith.data.templates import Renderer

    renderer = Renderer(tokenizer)
    return lambda messages, gen: renderer.render(messages, add_generation_prompt=gen)


def ollama_template(tokenizer: Any, system_prompt: str | None) -> str:
    """The Go TEMPLATE for this tokenizer's chat template, verified to render as jinja does."""
    render = jinja_renderer(tokenizer)
    pieces = turn_pieces(render)
    if system_prompt and not pieces.has_system:
        raise UserError("Ollama export: training used a system prompt, but this chat template has no place "
                        "for one that an Ollama template can express")
    bos = tokenizer.bos_token if adds_bos(tokenizer) else None
    template = go_template(pieces, bos=bos)
    check_go_template(template, render, render_ollama, bos)
    return template


def _quoted(text: str) -> str:
    """A Modelfile string: triple-quoted, which keeps newlines and quotes as they are."""
    if '"""' in text:
        raise UserError('Ollama export: a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str, stops: list[str], system: str | None,
                   sampling: dict[str, Any]) -> str:
    """The Modelfile: FROM, TEMPLATE, one PARAMETER stop per end-of-turn string, SYSTEM, sampling."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(template)}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    lines += [f"PARAMETER {key} {value}" for key, value in sampling.items()]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


def sampling_defaults() -> dict[str, Any]:
    """tunesmith generate's defaults under Ollama's parameter names."""
    from tunesmith.infer.sampling import SamplingOptions

    s = SamplingOptions()
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
            "repeat_penalty": s.repetition_penalty, "num_predict": s.max_new_tokens}


def write_modelfile(directory: Path, gguf_path: Path, template: str, stops: list[str],
                    system: str | None) -> Path:
    """Write DIR/Modelfile next to the GGUF (`template` from `ollama_template`); returns its path."""
    text = modelfile_text(gguf_path.name, template, stops, system, sampling_defaults())
    path = directory / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path
