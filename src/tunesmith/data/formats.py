"""One raw row (a dict) -> one `Conversation`, per sample format; or a `RowProblem` saying why not.

Formats and the keys that identify them (auto-detection looks at the keys of the rows):
alpaca (instruction, input, output) · sharegpt (conversations: [{from, value}]) ·
messages (messages: [{role, content}]) · qa (question, answer) ·
prompt-completion (prompt, completion) · preference (prompt, chosen, rejected) · text (text).
`--columns prompt=Q,response=A,system=S` renames the user's columns to these names first.
"""
from __future__ import annotations

from typing import Any

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.errors import UserError

# Generic names --columns may map, and the format field each one stands for.
COLUMN_KEYS = ("prompt", "response", "system", "input", "text", "messages", "conversations", "chosen",
               "rejected", "instruction", "output", "question", "answer", "completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
# (format, keys that must all be present), checked in this order.
SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("preference", ("chosen", "rejected")),
    ("alpaca", ("instruction", "output")),
    ("prompt-completion", ("prompt", "completion")),
    ("prompt-completion", ("prompt", "response")),
    ("qa", ("question", "answer")),
    ("text", ("text",)),
)


class RowProblem(Exception):
    """What is wrong with one row (the reader adds FILE:LINE)."""


def parse_columns(spec: str | None) -> dict[str, str]:
    """`"prompt=question,response=answer"` -> {"prompt": "question", "response": "answer"}."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not key or not column:
            raise UserError(f"invalid value for columns: {part!r} (expected NAME=COLUMN, e.g. prompt=question)")
        if key not in COLUMN_KEYS:
            raise UserError(f"invalid value for columns: unknown name {key!r} (allowed: {', '.join(COLUMN_KEYS)})")
        mapping[key] = column
    return mapping


def apply_columns(row: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """The row with the user's column names renamed to the generic ones."""
    if not mapping:
        return row
    out = dict(row)
    for key, column in mapping.items():
        if column not in row:
            raise RowProblem(f"missing column {column!r} (mapped by --columns {key}={column}; "
                             f"found: {', '.join(map(str, row))})")
        out[key] = row[column]
    return out


def detect_format(source: str, rows: list[tuple[str, Any]], mapping: dict[str, str]) -> str:
    """The format whose keys the first rows have; a `UserError` listing the keys found otherwise."""
    keys: set[str] = set()
    for _, row in rows[:50]:
        if isinstance(row, dict):
            keys.update(str(k) for k in row)
    keys.update(mapping)
    for name, needed in SIGNATURES:
        if all(k in keys for k in needed):
            return name
    expected = "; ".join(f"{n}: {', '.join(k)}" for n, k in SIGNATURES)
    raise UserError(
        f"{source}: cannot tell the data format from the keys found: {', '.join(sorted(keys)) or 'none'}",
        [f"expected one of -- {expected}",
         "map your own names with --columns prompt=COL,response=COL[,system=COL], or pass --format"],
    )


def row_to_conversation(row: Any, format: str, where: str, mapping: dict[str, str],
                        system: str | None) -> Conversation:
    """Parse one row in `format`; raise `RowProblem` naming the field and what was expected."""
    if not isinstance(row, dict):
        raise RowProblem(f"expected an object with fields (found {type(row).__name__})")
    row = apply_columns(row, mapping)
    if format == "text":
        return Conversation(text=_text(row, "text", strip=False), source=where)
    if format == "preference":
        conv = _preference(row)
    elif format in ("messages", "sharegpt"):
        conv = Conversation(turns=_message_list(row, format))
    else:
        conv = Conversation(turns=_single_turn(row, format))
    _check_order(conv.turns, needs_assistant=format != "preference")
    conv.source = where
    extra = row.get("system")
    if extra is not None and not isinstance(extra, str):
        raise RowProblem(f"field 'system' must be text (found {type(extra).__name__})")
    prompt = (extra or "").strip() or system
    if prompt and not (conv.turns and conv.turns[0].role == "system"):
        conv.turns.insert(0, Turn("system", prompt))
    return conv


def _text(row: dict[str, Any], key: str, *, strip: bool = True, optional: bool = False) -> str:
    """A required (or optional) non-empty string field."""
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise RowProblem(f"missing field {key!r} (found: {', '.join(map(str, row)) or 'no fields'})")
    if not isinstance(value, str):
        raise RowProblem(f"field {key!r} must be text (found {type(value).__name__})")
    if not value.strip() and not optional:
        raise RowProblem(f"field {key!r} is empty (expected text)")
    return value.strip() if strip else value


def _single_turn(row: dict[str, Any], format: str) -> list[Turn]:
    """alpaca / qa / prompt-completion -> [user, assistant]."""
    if format == "alpaca":
        instruction = _text(row, "instruction") if "prompt" not in row else _text(row, "prompt")
        extra = _text(row, "input", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        answer = _text(row, "response") if "response" in row else _text(row, "output")
    elif format == "qa":
        prompt = _text(row, "prompt") if "prompt" in row else _text(row, "question")
        answer = _text(row, "response") if "response" in row else _text(row, "answer")
    elif format == "prompt-completion":
        prompt = _text(row, "prompt")
        answer = _text(row, "response") if "response" in row else _text(row, "completion")
    else:
        raise UserError(f"invalid value for format: {format!r}")
    return [Turn("user", prompt), Turn("assistant", answer)]


def _message_list(row: dict[str, Any], format: str, key: str | None = None) -> list[Turn]:
    """messages ([{role, content}]) or sharegpt ([{from, value}]) -> turns, each checked."""
    key = key or ("messages" if format == "messages" else "conversations")
    items = row.get(key)
    if items is None:
        raise RowProblem(f"missing field {key!r} (found: {', '.join(map(str, row)) or 'no fields'})")
    if not isinstance(items, list) or not items:
        raise RowProblem(f"field {key!r} must be a non-empty list of messages")
    role_key, text_key = ("from", "value") if format == "sharegpt" else ("role", "content")
    roles = SHAREGPT_ROLES if format == "sharegpt" else {r: r for r in ("system", "user", "assistant")}
    turns = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise RowProblem(f"{key}[{n}] must be an object with {role_key!r} and {text_key!r}")
        role = item.get(role_key, item.get("role"))
        if role not in roles:
            raise RowProblem(f"{key}[{n}]: unknown role {role!r} (expected {' | '.join(roles)})")
        content = item.get(text_key, item.get("content"))
        if not isinstance(content, str):
            raise RowProblem(f"{key}[{n}]: {text_key!r} must be text (found {type(content).__name__})")
        if not content.strip():
            raise RowProblem(f"{key}[{n}]: empty {text_key!r} in a {role} message")
        turns.append(Turn(roles[role], content))
    return turns


def _check_order(turns: list[Turn], needs_assistant: bool) -> None:
    """An optional system turn first, then user/assistant alternating, ending on assistant."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    for n, turn in enumerate(body):
        expected = "user" if n % 2 == 0 else "assistant"
        if turn.role != expected:
            where = "a system message after the first message" if turn.role == "system" else \
                f"{turn.role} where {expected} was expected (message {n + 1 + len(turns) - len(body)})"
            raise RowProblem(f"roles out of order: {where} (expected [system], user, assistant, user, ...)")
    if not needs_assistant:
        return
    if not any(t.role == "assistant" for t in body):
        raise RowProblem("no assistant turn (nothing to train on)")
    if body[-1].role != "assistant":
        raise RowProblem("the conversation ends with a user turn (expected it to end with the assistant reply)")


def _preference(row: dict[str, Any]) -> Conversation:
    """prompt (text or messages) + chosen / rejected (text or messages).

    Without a prompt, chosen and rejected as whole conversations (the UltraFeedback /
    Anthropic-HH shape): their shared messages up to the last shared user turn are the prompt.
    """
    prompt = row.get("prompt")
    if prompt is None and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return _shared_prefix_pair(_message_list(row, "messages", "chosen"), _message_list(row, "messages", "rejected"))
    if isinstance(prompt, list):
        turns = _message_list(row, "messages", "prompt")
    else:
        turns = [Turn("user", _text(row, "prompt"))]
    if not turns or turns[-1].role != "user":
        raise RowProblem("field 'prompt' must end with a user message")
    replies = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, list):
            reply = _message_list(row, "messages", key)
            if reply[: len(turns)] == turns:  # HF style: the reply list repeats the prompt
                reply = reply[len(turns):]
            if not reply or any(t.role != "assistant" for t in reply):
                raise RowProblem(f"field {key!r} must hold the assistant reply (found roles: "
                                 f"{', '.join(t.role for t in reply) or 'none'})")
        else:
            reply = [Turn("assistant", _text(row, key))]
        replies.append(reply)
    return Conversation(turns=turns, chosen=replies[0], rejected=replies[1])


def _shared_prefix_pair(chosen: list[Turn], rejected: list[Turn]) -> Conversation:
    """Split two whole conversations into their shared prompt (ending on a user turn) and the two replies."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role != "user":
        shared -= 1
    if not shared:
        raise RowProblem("fields 'chosen' and 'rejected' share no prompt ending with a user message "
                         "(give a 'prompt' field, or start both conversations with the same messages)")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        reply = turns[shared:]
        if not reply or any(t.role != "assistant" for t in reply):
            raise RowProblem(f"field {key!r} must continue the shared prompt with the assistant reply "
                             f"(found roles: {', '.join(t.role for t in reply) or 'none'})")
    return Conversation(turns=chosen[:shared], chosen=chosen[shared:], rejected=rejected[shared:])
