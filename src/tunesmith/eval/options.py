"""Options of `tunesmith eval` (flags and `tunesmith.evaluate` keywords are derived from this class)."""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import FORMATS, check, check_choice

COMPARE_BASE = "base"  # --compare base: the model MODEL was fine-tuned from


@dataclass
class EvalOptions:
    """What to evaluate on, what to compare with, and where the report goes."""

    data: str | None = None
    """Evaluation file (any format train reads); default: eval.jsonl, the held-out split in MODEL's output directory."""
    format: str = "auto"
    """Sample format of the evaluation file (as for train)."""
    columns: str | None = None
    """Map your column names, e.g. prompt=question,response=answer."""
    compare: str | None = None
    """Also evaluate this model (hub id or directory; 'base': the model MODEL was fine-tuned from) and show both."""
    report: str | None = None
    """Write the HTML report here and report.md beside it (with --compare, default: report.html)."""
    max_prompts: int = 100
    """Generate replies for at most this many prompts (the loss uses every sample)."""
    max_new_tokens: int = 128
    """Longest reply generated, in tokens."""

    def __post_init__(self) -> None:
        check_choice("format", self.format, FORMATS)
        check(self.max_prompts >= 0, "max_prompts", self.max_prompts, "an integer >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
