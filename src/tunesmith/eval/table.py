"""The metric table (labels, formatting, which direction is better) and the Markdown report."""
from __future__ import annotations

import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

# (key, label, better: "higher" | "lower" | None when it depends on the task, unit)
METRICS: tuple[tuple[str, str, str | None, str], ...] = (
    ("preference_accuracy", "pairs where chosen is likelier", "higher", "share"),
    ("preference_margin", "mean log-prob margin chosen - rejected", "higher", "num"),
    ("reward_accuracy", "pairs the implicit reward (vs base) prefers chosen", "higher", "share"),
    ("reward_margin", "mean implicit reward margin (nats, beta = 1)", "higher", "num"),
    ("loss", "loss on reply tokens", "lower", "num"),
    ("perplexity", "perplexity", "lower", "num"),
    ("exact_match", "exact match", "higher", "share"),
    ("label_accuracy", "label accuracy", "higher", "share"),
    ("rouge_l", "ROUGE-L F1", "higher", "num"),
    ("chrf", "chrF", "higher", "num"),
    ("mean_length", "mean reply length (tokens)", None, "count"),
    ("ended_share", "replies that ended by themselves", "higher", "share"),
    ("repetition_rate", "repeated 3-grams", "lower", "share"),
    ("uppercase_share", "upper-case share of letters", None, "share"),
)
LABELS = {key: label for key, label, _, _ in METRICS} | {
    "generation": "all reply metrics", "references": "reference metrics on some prompts"}


def fmt(value: float | None, unit: str) -> str:
    """A metric value for display: shares as percentages, other numbers with 3 significant decimals."""
    if value is None:
        return "–"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if unit == "share":
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if abs(value) < 10 and unit != "count" else f"{value:.1f}"


def fmt_diff(value: float | None, unit: str) -> str:
    """A difference: signed, shares in percentage points."""
    if value is None or math.isnan(value):
        return "–"
    if unit == "share":
        return f"{100 * value:+.1f} pp"
    return f"{value:+.3f}" if abs(value) < 10 and unit != "count" else f"{value:+.1f}"


def metric_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric any model has: label, formatted values, and whether the change is good."""
    model, base = result["model"], result.get("base", {})
    diff, ref = result.get("difference", {}), result.get("reference", {})
    rows = []
    for key, label, better, unit in METRICS:
        if key not in model and key not in base:
            continue
        change = diff.get(key)
        good = None
        if better is not None and change is not None and not math.isnan(change) and abs(change) > 1e-12:
            good = (change < 0) == (better == "lower")
        rows.append({"key": key, "label": label, "model": fmt(model.get(key), unit),
                     "base": fmt(base.get(key), unit), "diff": fmt_diff(change, unit),
                     "reference": fmt(ref.get(key), unit) if key in ref else "", "good": good})
    return rows


def table_header(result: dict[str, Any], names: tuple[str, str | None]) -> list[str]:
    """Column titles: metric, [base], model, [change], [reference] (bracketed: when there is one)."""
    has_base = "base" in result
    return ["metric", *([names[1] or "base"] if has_base else []), names[0], *(["change"] if has_base else []),
            *(["reference"] if result.get("reference") else [])]


def row_cells(result: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """One metric row's cells, in `table_header`'s order."""
    has_base = "base" in result
    return [row["label"], *([row["base"]] if has_base else []), row["model"], *([row["diff"]] if has_base else []),
            *([row["reference"]] if result.get("reference") else [])]


def skipped_lines(result: dict[str, Any]) -> list[str]:
    """'skipped LABEL, LABEL: why', one line per reason, for the metrics that could not be computed."""
    by_reason: dict[str, list[str]] = {}
    for key, why in result["skipped"].items():
        by_reason.setdefault(why, []).append(LABELS.get(key, key))
    return [f"skipped {', '.join(labels)}: {why}" for why, labels in by_reason.items()]


def _quote(text: str | None) -> str:
    """User text as a fenced code block: nothing in it is read as Markdown or HTML (empty shown as such)."""
    if text is None:
        return "*(none)*"
    if text == "":
        return "*(empty reply)*"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def md_text(text: Any) -> str:
    """User text inline as plain Markdown text: one line, every character that could start markup escaped."""
    return re.sub(r"([\\`*_\[\]<>&!|~])", r"\\\1", " ".join(str(text).split()))


def md_code(text: Any, in_table: bool = False) -> str:
    """User text inline as a code span (one line; backticks and, in a table, `|` kept literal)."""
    flat = " ".join(str(text).split())
    longest = max((len(m) for m in re.findall(r"`+", flat)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    span = f"{ticks}{pad}{flat}{pad}{ticks}"
    return span.replace("|", "\\|") if in_table else span


def prompt_text(prompt: list[dict[str, str]]) -> str:
    """A prompt's messages as readable text; a single user turn is shown as just its content."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def render_markdown(result: dict[str, Any], names: tuple[str, str | None], loss_curve: Path | None,
                    md_dir: Path | None = None) -> str:
    """report.md: the metric table, skipped metrics, the loss curve (linked from `md_dir`) and the replies."""
    tuned, base = names[0], names[1] or "base"
    has_base = "base" in result
    head = table_header(result, names)
    lines = ["# tunesmith evaluation report", ""]
    if result.get("data"):
        lines += [f"Data: {md_code(result['data'])} · {result['samples']['loss']} samples for the loss, "
                  f"{result['samples']['prompts']} prompts generated greedily.", ""]
    head = [md_text(h) for h in head]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(result, r)) + " |" for r in metric_rows(result)]
    if result["skipped"]:
        lines += [""] + [f"- {line}" for line in skipped_lines(result)]
    if loss_curve is not None and md_dir is not None:
        link = urllib.parse.quote(Path(os.path.relpath(loss_curve, md_dir)).as_posix())
        lines += ["", f"![training loss curve]({link})"]
    for n, ex in enumerate(result["examples"], start=1):
        lines += ["", f"## {n}. {md_code(ex['source'])}", "", "**Prompt**", "", _quote(prompt_text(ex["prompt"])), "",
                  "**Reference**", "", _quote(ex["reference"])]
        if has_base:
            lines += ["", f"**{md_text(base)}**", "", _quote(ex.get("base_reply"))]
        lines += ["", f"**{md_text(tuned)}**", "", _quote(ex["reply"])]
    return "\n".join(lines) + "\n"
