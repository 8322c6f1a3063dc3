"""One raw row (a dict) -> one `Conversation`, per sample format; or a `RowProblem` saying why not.

Formats and the fields they read (which column is which field is decided once per file by
`tunesmith.data.columns`, case-insensitively and by alias):
alpaca (instruction, input, output) · sharegpt (conversations: [{from, value}]) ·
messages (messages: [{role, content}]) · qa (question, answer) ·
prompt-completion (prompt, completion) · preference (prompt, chosen, rejected) · text (text).
Message content may also be a list of parts (`[{"type": "text", "text": ...}]`, as the
OpenAI format writes it): the text parts are joined with newlines; other part types are refused.
Tool calls, tool results and a sample's `tools` (messages and sharegpt) are read by
`tunesmith.data.toolcalls`.
"""
from __future__ import annotations

from typing import Any

from tunesmith.data.columns import COLUMN_NAMES, mapped_row
from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.jsonscan import describe
from tunesmith.data.toolcalls import (
    ToolProblem,
    check_tool_order,
    sharegpt_calls,
    tool_calls,
    tool_definitions,
    tool_result,
)
from tunesmith.errors import UserError

COLUMN_KEYS = tuple(COLUMN_NAMES)  # the names --columns accepts
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "function": "tool"}  # "function": the result of OpenAI's older function_call


class RowProblem(Exception):
    """What is wrong with one row (the reader adds FILE:LINE)."""


def parse_columns(spec: str | None) -> dict[str, str]:
    """`"prompt=question,response=answer"` -> {"prompt": "question", "response": "answer"}."""
    from tunesmith.data.columns import parse_user_columns

    return parse_user_columns(spec)


def apply_columns(row: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """The row with the user's column names renamed to the names --columns uses (for eval's prompt files)."""
    if not mapping:
        return row
    out = dict(row)
    for key, column in mapping.items():
        if column not in row:
            raise RowProblem(f"missing column {column!r} (mapped by --columns {key}={column}; "
                             f"found: {', '.join(map(str, row))})")
        out[key] = row[column]
    return out


def not_a_record(row: Any) -> str:
    """Why a row that is not an object cannot be a sample (a list of strings is a common mistake)."""
    hint = "; for raw text write {\"text\": ...} per row, or use a .txt file" if isinstance(row, str) else ""
    return f"expected an object with fields (found {describe(row)}){hint}"


def row_to_conversation(row: Any, format: str, where: str, columns: dict[str, str],
                        system: str | None) -> Conversation:
    """Parse one row in `format`, its fields found through `columns` (generic -> column name).

    Raises `RowProblem` naming the user's column and what was expected.
    """
    try:
        return _parse_row(row, format, where, columns, system)
    except ToolProblem as problem:
        raise RowProblem(str(problem)) from None


def _parse_row(row: Any, format: str, where: str, columns: dict[str, str], system: str | None) -> Conversation:
    """`row_to_conversation` without the tool problems' translation."""
    if not isinstance(row, dict):
        raise RowProblem(not_a_record(row))
    fields = Fields(mapped_row(row, columns), columns, row)
    if format == "text":
        return Conversation(text=fields.text("text", strip=False), source=where)
    if format == "preference":
        conv = _preference(fields)
    elif format in ("messages", "sharegpt"):
        conv = Conversation(turns=_message_list(fields, format), tools=tool_definitions(row.get("tools"), "tools"))
    else:
        conv = Conversation(turns=_single_turn(fields, format))
    _check_order(conv.turns, needs_assistant=format != "preference")
    conv.source = where
    prompt = fields.text("system", optional=True) or system
    if prompt and not (conv.turns and conv.turns[0].role == "system"):
        conv.turns.insert(0, Turn("system", prompt))
    return conv


class Fields:
    """A row's values by generic field, with messages that name the user's own column."""

    def __init__(self, values: dict[str, Any], columns: dict[str, str], row: dict[str, Any]) -> None:
        self.values, self.columns, self.row = values, columns, row

    def name(self, generic: str) -> str:
        """The user's name for a generic field."""
        return self.columns.get(generic, generic)

    def get(self, generic: str) -> Any:
        """The raw value (None when absent)."""
        return self.values.get(generic)

    def text(self, generic: str, *, strip: bool = True, optional: bool = False) -> str:
        """A required (or optional) non-empty string field."""
        value, name = self.values.get(generic), self.name(generic)
        if value is None:
            if optional:
                return ""
            if generic in self.values:
                raise RowProblem(f"field {name!r} is null (expected text)")
            raise RowProblem(f"missing field {name!r} (found: {', '.join(map(str, self.row)) or 'no fields'})")
        if not isinstance(value, str):
            raise RowProblem(wrong_type(name, value))
        if not value.strip() and not optional:
            raise RowProblem(f"field {name!r} is {'empty' if not value else 'only whitespace'} (expected text)")
        return value.strip() if strip else value


def wrong_type(name: str, value: Any) -> str:
    """"field 'answer' must be text (found a number: 4; put it in quotes if it is the reply)"."""
    shown = f": {value!r}"[:40] if isinstance(value, (int, float, bool)) else ""
    hint = "; write it as a string (in quotes) if it is the text" if isinstance(value, (int, float)) else ""
    return f"field {name!r} must be text (found {describe(value)}{shown}){hint}"


def _single_turn(fields: Fields, format: str) -> list[Turn]:
    """alpaca / qa / prompt-completion -> [user, assistant]; alpaca's input follows its instruction."""
    if format not in ("alpaca", "qa", "prompt-completion"):
        raise UserError(f"invalid value for format: {format!r}")
    prompt = fields.text("prompt")
    extra = fields.text("input", optional=True) if format == "alpaca" else ""
    return [Turn("user", f"{prompt}\n\n{extra}" if extra else prompt), Turn("assistant", fields.text("response"))]


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for n, part in enumerate(content, start=1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                found = f"type {kind!r}" if kind else describe(part)
                raise RowProblem(f"{where}: content part {n} is {found} (only text parts "
                                 "{\"type\": \"text\", \"text\": ...} can be trained)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RowProblem(f"{where} must be text (found {describe(content)})")


def _message_list(fields: Fields, format: str, generic: str | None = None) -> list[Turn]:
    """messages ([{role, content}]) or sharegpt ([{from, value}]) -> turns, each checked."""
    generic = generic or ("messages" if format == "messages" else "conversations")
    key, items = fields.name(generic), fields.get(generic)
    if items is None:
        raise RowProblem(f"missing field {key!r} (found: {', '.join(map(str, fields.row)) or 'no fields'})")
    if not isinstance(items, list) or not items:
        raise RowProblem(f"field {key!r} must be a non-empty list of messages (found {describe(items)})")
    role_key, text_key = ("from", "value") if format == "sharegpt" else ("role", "content")
    roles = SHAREGPT_ROLES if format == "sharegpt" else MESSAGE_ROLES
    turns = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise RowProblem(f"{key}[{n}] must be an object with {role_key!r} and {text_key!r}")
        role = item.get(role_key, item.get("role"))
        if role not in roles:
            raise RowProblem(f"{key}[{n}]: unknown role {role!r} (expected {' | '.join(roles)})")
        turns.append(_turn(item, roles[role], role, f"{key}[{n}]", text_key))
    return turns


def _turn(item: dict[str, Any], role: str, named: str, where: str, text_key: str) -> Turn:
    """One message; an assistant's tool calls (its text may then be empty) and a tool's result included."""
    raw = item.get(text_key, item.get("content"))
    if named == "function_call":  # ShareGPT (LLaMA-Factory): the value is the call itself
        return Turn(role, "", tool_calls=sharegpt_calls(raw, where))
    calls = tool_calls(item["tool_calls"], where) if item.get("tool_calls") not in (None, []) else ()  # [] = none
    if not calls and isinstance(item.get("function_call"), dict):  # OpenAI's older single-call field
        calls = tool_calls([{"type": "function", "function": item["function_call"]}], where)
    content = "" if calls and raw is None else content_text(raw, f"{where}: {text_key!r}")
    if not content.strip() and not calls:
        raise RowProblem(f"{where}: empty {text_key!r} in a {named} message")
    if calls and role != "assistant":
        raise RowProblem(f"{where}: 'tool_calls' on a {named} message (only assistant messages call tools)")
    if role == "tool":
        return tool_result(item, content, where)
    return Turn(role, content, tool_calls=calls)


def _check_order(turns: list[Turn], needs_assistant: bool) -> None:
    """An optional system turn first, then user/assistant alternating, ending on assistant; tool results
    (and the assistant turns answering them) sit between a tool-calling assistant turn and the next user turn."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if any(t.role == "tool" or t.tool_calls for t in body):
        problem = check_tool_order(body, first=1 + len(turns) - len(body))
        if problem:
            raise RowProblem(f"roles out of order: {problem}")
        body = _without_tool_exchanges(body)
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


def _without_tool_exchanges(body: list[Turn]) -> list[Turn]:
    """The turns with each tool exchange (calls, results, and the replies between them) collapsed into
    the assistant turn that ends it, so the usual user/assistant alternation can be checked."""
    out: list[Turn] = []
    for turn in body:
        if turn.role == "tool" or (out and out[-1].role == "assistant" and turn.role == "assistant"):
            continue
        out.append(turn)
    return out


def _preference(fields: Fields) -> Conversation:
    """prompt (text or messages) + chosen / rejected (text or messages).

    Without a prompt, chosen and rejected as whole conversations (the UltraFeedback /
    Anthropic-HH shape): their shared messages up to the last shared user turn are the prompt.
    """
    prompt = fields.get("prompt")
    if prompt is None and isinstance(fields.get("chosen"), list) and isinstance(fields.get("rejected"), list):
        return _shared_prefix_pair(_message_list(fields, "messages", "chosen"),
                                   _message_list(fields, "messages", "rejected"))
    if isinstance(prompt, list):
        turns = _message_list(fields, "messages", "prompt")
    else:
        turns = [Turn("user", fields.text("prompt"))]
    if not turns or turns[-1].role != "user":
        raise RowProblem(f"field {fields.name('prompt')!r} must end with a user message")
    replies = []
    for generic in ("chosen", "rejected"):
        if isinstance(fields.get(generic), list):
            reply = _message_list(fields, "messages", generic)
            if reply[: len(turns)] == turns:  # HF style: the reply list repeats the prompt
                reply = reply[len(turns):]
            if not reply or any(t.role != "assistant" for t in reply):
                raise RowProblem(f"field {fields.name(generic)!r} must hold the assistant reply (found roles: "
                                 f"{', '.join(t.role for t in reply) or 'none'})")
        else:
            reply = [Turn("assistant", fields.text(generic))]
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
