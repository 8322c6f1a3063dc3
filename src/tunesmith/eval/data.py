"""Evaluation data: which file, read how, and split into (prompt, reference) cases.

Evaluation reads every format training reads, and one more case training refuses:
prompts without replies (rows with only a prompt/question/instruction, or message lists
ending on a user turn). Those still get replies and reply statistics; the metrics that
need a reference are skipped, and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.formats import apply_columns, parse_columns, RowProblem
from tunesmith.data.readers import read_conversations, read_rows
from tunesmith.errors import UserError
from tunesmith.train.files import HELD_OUT_FILE

REPLY_KEYS = ("output", "completion", "response", "answer", "chosen", "rejected")
PROMPT_KEYS = ("prompt", "question", "instruction")
MAX_LISTED = 20


@dataclass
class EvalCase:
    """One generation case: the prompt messages and the reference reply (None if the data has none)."""

    prompt: list[dict[str, str]]
    reference: str | None
    source: str


def default_data(model: str | None) -> str:
    """The held-out split `train` saved in the output directory `model`."""
    path = Path(model).expanduser() / HELD_OUT_FILE if model else None
    if path is None or not path.is_file():
        raise UserError(f"no --data given and {model or 'the model'} holds no {HELD_OUT_FILE} "
                        "(the held-out split train writes into its output directory); pass --data FILE")
    if not path.read_text(encoding="utf-8").strip():
        raise UserError(f"{path}: empty: that run held out no samples (--test-split 0); pass --data FILE")
    return str(path)


def read_eval_data(source: str, format: str = "auto", columns: str | None = None) -> list[Conversation]:
    """Conversations to evaluate on: prompt-only files too, and preference pairs (scored as pairs)."""
    if format not in ("text", "preference"):
        prompts = _prompts_only(source, list(read_rows(source)), parse_columns(columns))
        if prompts is not None:
            return prompts
    convs, _report = read_conversations(source, format, columns)
    return convs


def _prompts_only(source: str, rows: list[tuple[str, Any]], mapping: dict[str, str]) -> list[Conversation] | None:
    """Conversations of prompts with no reply, or None when the rows do carry replies."""
    keys = {str(k) for _, row in rows if isinstance(row, dict) for k in row} | set(mapping)
    if "messages" in keys:
        ends_on_user = all(isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]
                           and isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") == "user"
                           for _, row in rows)
        maker = _messages_prompt if ends_on_user else None
    elif not keys & set(REPLY_KEYS) and keys & set(PROMPT_KEYS):
        maker = _single_prompt
    else:
        maker = None
    if maker is None:
        return None
    convs, problems = [], []
    for where, row in rows:
        try:
            convs.append(Conversation(turns=maker(apply_columns(row, mapping)), source=where))
        except RowProblem as problem:
            problems.append(f"{where}: {problem}")
    if problems:
        raise UserError(f"{source}: {len(problems)} of {len(rows)} prompts are invalid", problems[:MAX_LISTED])
    return convs


def _single_prompt(row: dict[str, Any]) -> list[Turn]:
    """{"prompt" | "question" | "instruction" [, "input"] [, "system"]} -> [system,] user."""
    key = next(k for k in PROMPT_KEYS if k in row)
    text, extra, system = row.get(key), row.get("input"), row.get("system")
    if not isinstance(text, str) or not text.strip():
        raise RowProblem(f"field {key!r} must be non-empty text")
    prompt = f"{text.strip()}\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else text.strip()
    turns = [Turn("system", system.strip())] if isinstance(system, str) and system.strip() else []
    return turns + [Turn("user", prompt)]


def _messages_prompt(row: dict[str, Any]) -> list[Turn]:
    """{"messages": [..., {"role": "user", ...}]} -> the turns (each checked)."""
    turns = []
    for n, item in enumerate(row["messages"], start=1):
        role, content = item.get("role") if isinstance(item, dict) else None, \
            item.get("content") if isinstance(item, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str) or not content.strip():
            raise RowProblem(f"messages[{n}] must have a role (system | user | assistant) and non-empty content")
        turns.append(Turn(role, content))
    return turns


def eval_cases(convs: list[Conversation], limit: int) -> list[EvalCase]:
    """Up to `limit` cases: the prompt is every turn before the last assistant turn, which is the reference.

    A preference pair's case is its prompt, with the chosen reply as the reference.
    """
    cases: list[EvalCase] = []
    for conv in convs:
        if len(cases) >= limit:
            break
        if conv.kind == "preference" and conv.chosen:
            cases.append(EvalCase(conv.messages(), conv.chosen[-1].content, conv.source))
            continue
        if conv.kind != "chat":
            continue
        messages = conv.messages()
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            cases.append(EvalCase(messages, None, conv.source))
        else:
            cases.append(EvalCase(messages[:last], messages[last]["content"], conv.source))
    return cases


def has_reply(conv: Conversation) -> bool:
    """Whether a conversation has trained tokens (a reply, or a text document) for the loss."""
    return conv.kind == "text" or any(t.role == "assistant" for t in conv.turns)
