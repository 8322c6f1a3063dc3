"""`export_model(...)`: the Python API behind `tunesmith export` and `train --export`.

One source (loaded once, adapter merged), one writer per format; every file written is
listed with its size, and the run is timed, so the CLI can print exactly what happened.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import build_config
from tunesmith.export.options import ExportOptions
from tunesmith.export.source import ExportSource, load_source


@dataclass
class ExportResult:
    """What an export wrote, how long it took, and the command to run next (if any)."""

    directory: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    next_step: str | None = None

    def lines(self) -> list[str]:
        """Human-readable report: one line per file with its size, any notes, the time, then the next step."""
        out = [f"wrote {f} ({_size(f.stat().st_size)})" for f in self.files] + self.notes
        out.append(f"export took {self.seconds:.1f} s")
        if self.next_step:
            out.append(f"next: {self.next_step}")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def default_output(source: ExportSource, to: str) -> Path:
    """MODEL/merged for a merge (where `train --merge` puts it), else MODEL/export-gguf, MODEL/export-ollama.

    A model directory inside the installed package (the bundled starter) or one the user cannot
    write to gets ./NAME-merged (./NAME-export-gguf, ...) in the working directory instead:
    an export must never write into site-packages.
    """
    leaf = "merged" if to == "merged" else f"export-{to}"
    if source.path is None:
        return Path(source.name.replace("/", "--")) / leaf
    package = Path(__file__).resolve().parent.parent
    inside_package = source.path.resolve().is_relative_to(package)
    if inside_package or not os.access(source.path, os.W_OK):
        return Path.cwd() / f"{model_name(source)}-{leaf}"
    return source.path / leaf


def model_name(source: ExportSource) -> str:
    """A file/model name from the directory or hub id (lower case, no spaces)."""
    raw = source.path.resolve().name if source.path is not None else source.name.split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw.lower()) or "model"


def export_model(model: str, source: ExportSource | None = None, **options: Any) -> ExportResult:
    """Export `model` (output dir, model dir or hub id); options are `ExportOptions` fields (to, quant, output)."""
    from tunesmith.export.gguf import write_gguf
    from tunesmith.export.kquant import K_QUANTS, fallback_note
    from tunesmith.export.merged import write_merged
    from tunesmith.export.ollama import ollama_template, write_modelfile

    opts: ExportOptions = build_config(ExportOptions, options)
    started = time.perf_counter()
    source = source or load_source(model)
    directory = Path(opts.output).expanduser() if opts.output else default_output(source, opts.to)
    result = ExportResult(directory)
    if opts.to == "merged":
        write_merged(source, directory)
        result.files = sorted(p for p in directory.iterdir() if p.is_file())
        result.next_step = f"transformers.pipeline('text-generation', model='{directory}')"
    else:
        name = model_name(source)
        # The template is derived (or refused) before the slow part writes gigabytes.
        template = ollama_template(source.tokenizer, source.system_prompt) if opts.to == "ollama" else ""
        gguf_path = write_gguf(source.model, source.tokenizer, directory / f"{name}-{opts.quant}.gguf", opts.quant,
                               source.end_of_turn_ids, name)
        result.files = [gguf_path]
        note = fallback_note(gguf_path, opts.quant) if opts.quant in K_QUANTS else None
        result.notes = [note] if note else []
        result.next_step = f"llama-cli -m {gguf_path} -cnv"
        if opts.to == "ollama":
            result.files.append(write_modelfile(directory, gguf_path, template, source.stop_strings(),
                                                source.system_prompt))
            result.next_step = f"cd {directory} && ollama create {name} -f Modelfile && ollama run {name}"
    result.seconds = time.perf_counter() - started
    return result


def export_after_training(output_dir: Path, to: str) -> ExportResult:
    """`train --export TO`: export the finished run with the default quant, reporting on stderr."""
    import sys

    result = export_model(str(output_dir), to=to)
    for line in result.lines():
        print(line, file=sys.stderr)
    return result
