"""The one internal sample type: every reader produces it, every trainer consumes it.

A `Conversation` is one of three kinds:
- chat: ordered `turns` of system / user / assistant (and `tool` results, answering an
  assistant turn's OpenAI-style `tool_calls`);
- preference: `turns` are the prompt (system/user...), `chosen` and `rejected` the two replies;
- text: a raw document in `text` (continued pretraining).
`source` is "FILE:LINE" (or "hub-id:row N") so every later problem can point at its origin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # a tool's result, answering an assistant turn's tool call
Kind = Literal["chat", "preference", "text"]


@dataclass(frozen=True, slots=True)  # slots: a million samples in memory cost a third less
class Turn:
    """One message of a conversation."""

    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()
    """OpenAI-style calls on an assistant turn: {"type": "function", "id", "function": {"name", "arguments"}}."""
    tool_call_id: str | None = None
    """On a `tool` turn: the id of the call it answers."""
    name: str | None = None
    """On a `tool` turn: the name of the tool that answered (OpenAI's optional `name`)."""


@dataclass(slots=True)
class Conversation:
    """A chat, a preference pair or a raw text document, with where it came from."""

    turns: list[Turn] = field(default_factory=list)
    chosen: list[Turn] | None = None
    rejected: list[Turn] | None = None
    text: str | None = None
    source: str = ""
    tools: list[dict[str, Any]] | None = None
    """The tool (function) definitions offered to the model, passed to the chat template as `tools`."""

    @property
    def kind(self) -> Kind:
        """Which of the three kinds this sample is."""
        if self.text is not None:
            return "text"
        if self.chosen is not None:
            return "preference"
        return "chat"

    def messages(self) -> list[dict[str, Any]]:
        """The chat turns as `[{"role", "content"}]` (plus `tool_calls` / `tool_call_id`), the shape chat
        templates take. A tool-calling turn without text has `content` "" (not OpenAI's null: Qwen3's
        and other templates test `'</think>' in content`, which fails on None)."""
        return [message(t) for t in self.turns]

    @property
    def uses_tools(self) -> bool:
        """Whether any turn calls a tool or carries a tool's result."""
        return any(t.tool_calls or t.role == TOOL_ROLE for t in self.turns)


def message(turn: Turn) -> dict[str, Any]:
    """One turn in the shape chat templates take."""
    out: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        out["tool_calls"] = [dict(call) for call in turn.tool_calls]
    if turn.tool_call_id is not None:
        out["tool_call_id"] = turn.tool_call_id
    if turn.name is not None:
        out["name"] = turn.name
    return out
