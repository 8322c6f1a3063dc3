"""Which of the user's columns is the prompt, the reply, the system prompt...: detection and --columns.

Names match case- and separator-insensitively ("Question", "question", "QUESTION",
"user_input" = "User Input") against the common names of Alpaca, ShareGPT, TRL, Dolly,
LLaMA-Factory and Axolotl data. The result is a format plus a mapping from the generic
fields the formats read (prompt, response, input, system, messages, ...) to the user's
own column names, which is printed ("columns: Question → prompt, Answer → response") so
a wrong guess is visible before any training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import UserError

# Generic field -> the names it is known by (normalized: lower case, letters and digits only).
ALIASES: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "conversation", "chat"),
    "conversations": ("conversations",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "instruction": ("instruction", "instructions"),
    "prompt": ("prompt", "question", "query", "instruction", "input", "user", "human"),
    "response": ("response", "completion", "answer", "output", "assistant", "gpt", "reply", "target"),
    "input": ("input", "context"),
    "system": ("system", "systemprompt", "sys"),
    "text": ("text", "document"),
}
# Names --columns accepts -> the generic field each stands for.
COLUMN_NAMES = {"prompt": "prompt", "question": "prompt", "instruction": "prompt", "response": "response",
                "answer": "response", "completion": "response", "output": "response", "input": "input",
                "system": "system", "text": "text", "messages": "messages", "conversations": "conversations",
                "chosen": "chosen", "rejected": "rejected"}
# format -> (required generic fields, optional generic fields); auto-detection tries them in this order.
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ("system",)),
    "sharegpt": (("conversations",), ("system",)),
    "preference": (("prompt", "chosen", "rejected"), ("system",)),
    "alpaca": (("prompt", "response"), ("input", "system")),
    "qa": (("prompt", "response"), ("system",)),
    "prompt-completion": (("prompt", "response"), ("system",)),
    "text": (("text",), ()),
}


def normalize(name: str) -> str:
    """"User Input" / "user_input" / "USER-INPUT" -> "userinput"."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass
class ColumnMap:
    """The format, and generic field -> the user's column name."""

    format: str
    columns: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """"Question → prompt, Answer → response" (what `data inspect` and the train log print)."""
        return ", ".join(f"{column} → {generic}" for generic, column in self.columns.items())


def parse_user_columns(spec: str | None) -> dict[str, str]:
    """`"prompt=Q,response=A"` -> {"prompt": "Q", "response": "A"}: the names as typed, checked."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not key or not column:
            raise UserError(f"invalid value for columns: {part!r} (expected NAME=COLUMN, e.g. prompt=question)")
        if key not in COLUMN_NAMES:
            raise UserError(f"invalid value for columns: unknown name {key!r} (allowed: {', '.join(COLUMN_NAMES)})")
        mapping[key] = column
    return mapping


def _find(keys: list[str], generic: str, taken: set[str]) -> str | None:
    """The user's column known as `generic` (the first alias that matches wins), not already taken."""
    for alias in ALIASES[generic]:
        found = [k for k in keys if normalize(k) == alias and k not in taken]
        if len(found) > 1:
            raise UserError(f"columns {' and '.join(map(repr, found))} both read as {generic!r}; rename one, "
                            f"or choose with --columns {generic}=NAME")
        if found:
            return found[0]
    return None


def _existing(source: str, keys: list[str], typed: dict[str, str]) -> dict[str, str]:
    """--columns as generic -> column, each checked to exist (case/separator-insensitively)."""
    present = ", ".join(keys) or "none"
    user: dict[str, str] = {}
    for name, column in typed.items():
        near = [column] if column in keys else [k for k in keys if normalize(k) == normalize(column)]
        if not near:
            raise UserError(f"{source}: --columns {name}={column}: there is no column {column!r} "
                            f"(columns found: {present})")
        user[COLUMN_NAMES[name]] = near[0]
    return user


def resolve_columns(source: str, keys: list[str], format: str, spec: str | None) -> ColumnMap:
    """Decide the format (unless given) and map every field it reads to one of `keys`.

    `keys` are the column names of the first rows. Raises `UserError` naming the missing
    column and the ones present when --columns names a column that does not exist, or
    when no format fits.
    """
    typed = parse_user_columns(spec)
    user = _existing(source, keys, typed)
    for name in ([format] if format != "auto" else list(FIELDS)):
        mapped = _map_format(name, keys, user)
        if mapped is not None and (format != "auto" or _fits(name, mapped, typed)):
            return ColumnMap(name, mapped)
    present = ", ".join(keys) or "none"
    if format != "auto":
        raise UserError(f"{source}: format {format!r} needs {' and '.join(FIELDS[format][0])} columns; "
                        f"found: {present}",
                        [f"known names: {_known(format)}", "map your own with --columns, e.g. --columns "
                         + ",".join(f"{g}=COLUMN" for g in FIELDS[format][0])])
    raise UserError(
        f"{source}: cannot tell the data format from the keys found: {', '.join(sorted(keys)) or 'none'}",
        [f"known: {'; '.join(f'{n}: {_known(n)}' for n in FIELDS if n != 'prompt-completion')}",
         "map your own names with --columns prompt=COL,response=COL[,system=COL], or pass --format"])


def _known(format: str) -> str:
    """The column names `format` recognises, for messages."""
    fields = ("instruction", "response") if format == "alpaca" else FIELDS[format][0]
    return " + ".join("/".join(ALIASES[g][:5]) for g in fields)


def _map_format(format: str, keys: list[str], user: dict[str, str]) -> dict[str, str] | None:
    """generic -> column for `format`, or None when a required field has no column."""
    required, optional = FIELDS[format]
    mapped: dict[str, str] = {}
    taken = set(user.values())
    for generic in required + optional:
        column = user.get(generic)
        if column is None and format == "alpaca" and generic == "prompt":
            column = _find(keys, "instruction", taken)  # alpaca's prompt is its instruction
        elif column is None:
            column = _find(keys, generic, taken)
        if column is None and generic in required:
            return None
        if column is not None:
            mapped[generic] = column
            taken.add(column)
    return mapped


def _fits(format: str, mapped: dict[str, str], typed: dict[str, str]) -> bool:
    """Auto-detection's labels: alpaca for instruction(+input) data, qa for question/answer, else prompt-completion."""
    if format == "alpaca":
        return "instruction" in typed or "input" in typed or (
            "prompt" not in typed and "question" not in typed and normalize(mapped["prompt"]) in ALIASES["instruction"])
    if format == "qa":
        if typed.keys() & {"question", "answer"}:
            return True
        if typed.keys() & {"prompt", "response", "completion", "output"}:
            return False
        return normalize(mapped["prompt"]) == "question" or normalize(mapped["response"]) == "answer"
    return True


def mapped_row(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row seen through the mapping: generic field -> the user's value (absent when the row lacks it)."""
    return {generic: row[column] for generic, column in columns.items() if column in row}
