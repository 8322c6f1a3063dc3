"""The one internal sample type: every reader produces it, every trainer consumes it.

A `Conversation` is one of three kinds:
- chat: ordered `turns` of system / user / assistant;
- preference: `turns` are the prompt (system/user...), `chosen` and `rejected` the two replies;
- text: a raw document in `text` (continued pretraining).
`source` is "FILE:LINE" (or "hub-id:row N") so every later problem can point at its origin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ROLES = ("system", "user", "assistant")
Kind = Literal["chat", "preference", "text"]


@dataclass(frozen=True, slots=True)  # slots: a million samples in memory cost a third less
class Turn:
    """One message of a conversation."""

    role: str
    content: str


@dataclass(slots=True)
class Conversation:
    """A chat, a preference pair or a raw text document, with where it came from."""

    turns: list[Turn] = field(default_factory=list)
    chosen: list[Turn] | None = None
    rejected: list[Turn] | None = None
    text: str | None = None
    source: str = ""

    @property
    def kind(self) -> Kind:
        """Which of the three kinds this sample is."""
        if self.text is not None:
            return "text"
        if self.chosen is not None:
            return "preference"
        return "chat"

    def messages(self) -> list[dict[str, str]]:
        """The chat turns as `[{"role", "content"}]`, the shape chat templates take."""
        return [{"role": t.role, "content": t.content} for t in self.turns]
