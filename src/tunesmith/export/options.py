"""Options of `tunesmith export` and `tunesmith push` (flags and Python keywords derive from these)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.config import check, check_choice
from tunesmith.errors import UserError
from tunesmith.export.kquant import K_QUANTS

TARGETS = ("merged", "gguf", "ollama")
QUANTS = ("f16", "bf16", "q8_0", *K_QUANTS)  # = export.gguf.QUANTS


@dataclass
class ExportOptions:
    """What to export MODEL to, at which precision, and where."""

    to: str = "gguf"
    """Format: merged (standalone HF model dir) | gguf (one file for llama.cpp) | ollama (GGUF + Modelfile)."""
    quant: str = "q8_0"
    """GGUF precision: f16 | bf16 | q8_0 (near-lossless, half of f16) | q4_k_m | q5_k_m | q6_k (k-quants: need llama-cpp-python)."""
    output: str | None = None
    """Where to write; default: MODEL/export-TO (MODEL/merged for --to merged)."""

    def __post_init__(self) -> None:
        check_choice("to", self.to, TARGETS)
        check_choice("quant", self.quant, QUANTS)


@dataclass
class PushOptions:
    """Where on the Hugging Face Hub to upload MODEL, and what."""

    repo: str | None = None
    """Hub repository to create or update, USER/NAME or ORG/NAME (required)."""
    private: bool = False
    """Create the repository as private."""
    merged: bool = False
    """Upload the LoRA adapter merged into its base (a standalone model) instead of the adapter."""

    def __post_init__(self) -> None:
        if self.repo is None:
            raise UserError("push: --repo USER/NAME is required (the Hub repository to create or update)")
        check(bool(re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo)), "repo", self.repo, "USER/NAME")
