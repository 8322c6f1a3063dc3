"""Multi-turn chat: a history re-rendered with the chat template each turn, and the REPL on top.

The history keeps every message (so `/save` writes the whole transcript as training
data); what the model *sees* drops the oldest user/assistant pairs when the rendered
conversation would not fit in its context window, and `Chat.trimmed` says how many.
"""
from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tunesmith.errors import UserError
from tunesmith.infer.generate import (Model, context_window, generate_batch, has_template, load, prompt_ids,
                                      stream_text)
from tunesmith.infer.sampling import SamplingOptions, sampling_with

QUIT_WORDS = ("/quit", "quit", "exit", "q")
HELP = "commands: /reset  /system TEXT  /save FILE  /quit (or Ctrl-D); Ctrl-C stops a reply"


class Chat:
    """A conversation with a model: `send` or `stream` a message, get the reply, history kept."""

    def __init__(self, model: str | Model | None = None, *, system: str | None = None, **sampling: Any) -> None:
        self.model: Model = model if isinstance(model, Model) else load(model)
        self.tokenizer = self.model.tokenizer
        self.template_note: str | None = None
        if not has_template(self.tokenizer):  # a base model: borrow a built-in format, on a copy
            from tunesmith.data.templates import choose_template

            self.tokenizer = copy.deepcopy(self.tokenizer)
            used = choose_template(self.tokenizer, "auto")
            self.template_note = f"this model has no chat template; using the built-in {used!r} format"
        self.system = system
        self.sampling: SamplingOptions = sampling_with(self.model.sampling, sampling)
        self.messages: list[dict[str, str]] = []  # user/assistant turns, oldest first (no system)
        self.earlier: list[list[dict[str, str]]] = []  # finished conversations (transcripts), before a /system
        self.trimmed = 0  # oldest messages the last reply could not see

    def reset(self) -> None:
        """Forget the conversation, and any earlier ones (the system prompt stays)."""
        self.messages = []
        self.earlier = []
        self.trimmed = 0

    def set_system(self, text: str | None) -> bool:
        """Change the system prompt; True when that started a new conversation.

        Replies already generated stay paired with the system prompt they were generated
        under: if the conversation has turns, it is closed (kept for `save`) and a new one
        starts, which the model sees without the earlier turns.
        """
        started = bool(self.messages)
        if started:
            self.earlier.append(self.transcript())
            self.messages = []
            self.trimmed = 0
        self.system = text or None
        return started

    def transcript(self) -> list[dict[str, str]]:
        """The whole conversation in the messages format, system prompt first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    def send(self, text: str, **sampling: Any) -> str:
        """Add a user message and return the model's whole reply."""
        options = sampling_with(self.sampling, sampling)
        visible = self._open_turn(text, options)
        reply = generate_batch(self.model.model, self.tokenizer, [visible], options)[0].text
        self._close_turn(reply)
        return reply.strip()

    def stream(self, text: str, **sampling: Any) -> Iterator[str]:
        """Add a user message and yield the reply piece by piece; stopping early keeps what came."""
        options = sampling_with(self.sampling, sampling)
        visible = self._open_turn(text, options)
        pieces: list[str] = []
        try:
            for piece in stream_text(self.model.model, self.tokenizer, visible, options):
                pieces.append(piece)
                yield piece
        finally:
            self._close_turn("".join(pieces))

    def save(self, path: str | Path) -> int:
        """Append each conversation (earlier ones first) as a JSONL line `{"messages": [...]}`.

        Each line carries the system prompt its replies were generated under, so the file
        reads back as training data that says what happened. Returns the messages written.
        """
        conversations = [t for t in [*self.earlier, self.transcript()] if any(m["role"] == "assistant" for m in t)]
        if not conversations:
            raise UserError("nothing to save yet (no reply in this conversation)")
        target = Path(path).expanduser()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a", encoding="utf-8") as out:
                for transcript in conversations:
                    out.write(json.dumps({"messages": transcript}, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UserError(f"{path}: cannot write ({exc.strerror})") from None
        return sum(len(t) for t in conversations)

    def _open_turn(self, text: str, options: SamplingOptions) -> list[dict[str, str]]:
        """Append the user message; return the messages the model will see (trimmed to fit)."""
        if not text.strip():
            raise UserError("empty message")
        self.messages.append({"role": "user", "content": text.strip()})
        try:
            return self._visible(options)
        except UserError:
            self.messages.pop()
            raise

    def _close_turn(self, reply: str) -> None:
        """Record the reply; an empty one removes its user message too (a transcript needs both)."""
        if reply.strip():
            self.messages.append({"role": "assistant", "content": reply.strip()})
        else:
            self.messages.pop()

    def _visible(self, options: SamplingOptions) -> list[dict[str, str]]:
        """System prompt + the newest turns whose rendering leaves room for the reply."""
        window = context_window(self.model.model)
        head = [{"role": "system", "content": self.system}] if self.system else []
        turns = self.messages
        if window is not None:
            budget = window - min(options.max_new_tokens, window // 2)
            while len(prompt_ids(self.tokenizer, head + turns)) > budget:
                if len(turns) <= 1:
                    raise UserError(f"the message is too long for the model's context window ({window} tokens)")
                turns = turns[2:]  # drop the oldest user/assistant pair
        self.trimmed = len(self.messages) - len(turns)
        return head + turns


# --------------------------------------------------------------------------------------
# The REPL: works on a terminal and driven by a script on stdin.


def _command(chat: Chat, line: str, say: Callable[[str], None]) -> None:
    """Run one slash command."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/reset":
        chat.reset()
        say("(history cleared)")
    elif name == "/system":
        new = chat.set_system(arg)
        said = f"system prompt set: {arg}" if arg else "system prompt cleared"
        say(f"({said}; a new conversation starts: the model no longer sees the earlier turns, and /save keeps "
            "them with the system prompt they were answered under)" if new else f"({said})")
    elif name == "/save":
        if not arg:
            say("(usage: /save FILE)")
            return
        count = chat.save(arg)
        say(f"(saved {count} messages to {arg})")
    elif name in ("/help", "/?"):
        say(f"({HELP})")
    else:
        say(f"(unknown command {name}; {HELP})")


def _reply(chat: Chat, text: str, out: TextIO) -> None:
    """Stream one reply to `out`; Ctrl-C stops this reply only. Says so when more old turns drop out."""
    trimmed_before = chat.trimmed
    pieces = chat.stream(text)
    reply = ""
    try:
        for piece in pieces:
            reply += piece
            out.write(piece)
            out.flush()
        out.write("\n")
    except KeyboardInterrupt:
        pieces.close()  # runs the generator's cleanup: stop generating, keep the partial reply
        out.write("\n(reply stopped)\n")
    if not reply.strip():
        out.write("(empty reply: this turn is not kept in the history)\n")
    if chat.trimmed > trimmed_before:
        out.write(f"(context window full: the oldest {chat.trimmed} messages are no longer seen by the model)\n")
    out.flush()


def repl(chat: Chat, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read messages and commands until /quit or end of input, streaming each reply."""
    interactive = sys.stdin.isatty()

    def say(message: str) -> None:
        out.write(message + "\n")
        out.flush()

    if chat.template_note:
        say(f"({chat.template_note})")
    if interactive:
        say(f"(chatting with {chat.model.name}; {HELP})")
    while True:
        try:
            line = read("you> " if interactive else "").strip()
        except EOFError:
            break
        except KeyboardInterrupt:
            say("\n(Ctrl-D or /quit to leave)")
            continue
        if not line:
            continue
        if line in QUIT_WORDS:
            break
        try:
            if line.startswith("/"):
                _command(chat, line, say)
            else:
                _reply(chat, line, out)
        except UserError as exc:
            say(f"(error: {exc})")
