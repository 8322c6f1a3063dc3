"""Each assistant turn as inference sees it: the prompt the model is given, the text it must write.

For assistant turn i the model is given P = render(messages[:i], add_generation_prompt=True)
and must write the *target*: what the template adds after P for that turn, through the
family's end-of-turn token (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `<|end|>`, `</s>`...).
What the template writes after the end-of-turn only for a finished conversation (Phi-3.5's
trailing `<|endoftext|>`, ChatML's newline) is not part of it.

Two template habits are handled here, both counted by the caller:
- no system role (Gemma 2, Mistral 7B): the system prompt is folded into the first user turn;
- a generation prompt that opens the reply (QwQ and DeepSeek-R1-distill end it with
  `<think>\\n`, which the finished turn does not show): the target is the reply continuing it.
Anything else that cannot be trained as inference renders it raises `Refusal`, naming the
sample (FILE:LINE), the turn and the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tunesmith.data.conversation import Conversation
from tunesmith.data.templates import Renderer, end_of_turn_ids
from tunesmith.errors import UserError

SENTINEL = "\ue000reply\ue000"  # a reply text no template transforms, to find where the reply's rendering starts
TEMPLATE_FIX = "fix: pick another template with --template (llama3 | chatml | zephyr | alpaca | plain)"


class Refusal(UserError):
    """One sample cannot be trained the way inference renders it (the message names sample, turn, reason)."""


class TemplateMismatch(Refusal):
    """The template's generation prompt is not continued by the turn as training would render it."""


@dataclass(frozen=True)
class TurnText:
    """One assistant turn as text: the inference prompt and the target the model must write after it."""

    index: int  # position of the assistant message in the (folded) message list
    number: int  # 1-based position of the turn in the sample as written in the data (for messages)
    prompt: str
    target: str


def fold_system_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The system prompt (messages[0]) moved to the front of the first user turn, as LLaMA-Factory and
    Unsloth do for templates without a system role; `messages` must have a user turn."""
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    first_user = next(m for m in rest if m["role"] == "user")
    first_user["content"] = f"{system['content']}\n\n{first_user['content']}"
    return rest


class TurnRenderer:
    """Renders every assistant turn of conversations the inference way (one template, many samples)."""

    def __init__(self, tokenizer: Any, fold_system: bool = True) -> None:
        self.renderer = Renderer(tokenizer)
        self.eot_strings = [s for s in tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) if s]
        self.fold_system = fold_system
        self.folded = 0  # samples whose system prompt was folded into the first user turn

    def turns(self, conv: Conversation) -> list[TurnText]:
        """Every assistant turn of `conv` as (prompt, target) text; raises `Refusal` when impossible."""
        messages, shift = self._messages(conv)
        out: list[TurnText] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            number = i + 1 + shift
            prompt = self._render(conv, number, messages[:i], True)
            finished = self._render(conv, number, messages[:i + 1], False)
            target = self._target(conv, number, messages[:i + 1], prompt, finished)
            out.append(TurnText(i, number, prompt, target))
        self.folded += shift  # counted once the sample is known to render
        return out

    def _messages(self, conv: Conversation) -> tuple[list[dict[str, Any]], int]:
        """The messages to render (system prompt folded where the template has none), and the index shift."""
        messages = conv.messages()
        if conv.uses_tools and not self.renderer.renders_tools:
            number = next(i + 1 for i, t in enumerate(conv.turns) if t.tool_calls or t.role == "tool")
            raise Refusal(f"{conv.source}: turn {number}: this model's chat template does not render tool calls "
                          "(tool_calls / tool results would be dropped)",
                          ["fix: use a model whose template supports tools (e.g. Llama 3.1, Qwen2.5, Mistral), "
                           "or remove the tool turns"])
        why = self.renderer.system_role
        if why is None or not messages or messages[0]["role"] != "system":
            return messages, 0
        if not self.fold_system:
            raise Refusal(f"{conv.source}: turn 1: the chat template has no system role (it {why}) and "
                          "--no-fold-system is set",
                          ["fix: drop --no-fold-system to fold the system prompt into the first user turn, "
                           "or remove the system prompt"])
        if not any(m["role"] == "user" for m in messages):
            raise Refusal(f"{conv.source}: turn 1: the chat template has no system role (it {why}) and there is "
                          "no user turn to fold the system prompt into")
        return fold_system_prompt(messages), 1

    def _render(self, conv: Conversation, number: int, messages: list[dict[str, Any]], generation: bool) -> str:
        """One rendering; a template error becomes a refusal naming the sample and turn."""
        try:
            return self.renderer.render(messages, add_generation_prompt=generation, tools=conv.tools)
        except UserError as exc:
            raise Refusal(f"{conv.source}: turn {number}: {exc}", exc.problems) from None

    def _target(self, conv: Conversation, number: int, upto: list[dict[str, Any]], prompt: str,
                finished: str) -> str:
        """What the model must write after `prompt`, through its end-of-turn token (`upto` ends with the turn)."""
        message = upto[-1]
        if finished.startswith(prompt):
            target = self._through_end_of_turn(finished[len(prompt):], message.get("content"))
        else:
            target = self._moved_history(conv, number, upto, prompt, finished) or \
                self._continuing(conv, number, message, prompt, finished)
        for call in message.get("tool_calls") or []:
            name = (call.get("function") or {}).get("name", "")
            if not name or name not in target:
                raise Refusal(f"{conv.source}: turn {number}: the chat template drops the tool call "
                              f"{name or '(unnamed)'!r} from the assistant turn",
                              ["fix: give every tool call a function name, or use a template that renders tool calls"])
        if not target:
            raise Refusal(f"{conv.source}: turn {number}: the chat template renders nothing for this assistant turn")
        return target

    def _moved_history(self, conv: Conversation, number: int, upto: list[dict[str, Any]], prompt: str,
                       finished: str) -> str | None:
        """Target when the template renders the history differently once the reply exists, but the reply
        itself follows the same generation prompt (Mistral-Nemo moves the system prompt to the last user turn).

        The reply's rendering starts where a sentinel reply's rendering departs from it; the text before
        it must end exactly as `prompt` does (its generation prompt), else None.
        """
        message = upto[-1]
        if not isinstance(message.get("content"), str) or message.get("tool_calls"):
            return None
        probe = [*upto[:-1], {**message, "content": SENTINEL}]
        start = len(os.path.commonprefix([finished, self._render(conv, number, probe, False)]))
        before = self._render(conv, number, upto[:-1], False)
        generation = prompt[len(os.path.commonprefix([before, prompt])):]
        shared = len(os.path.commonprefix([prompt[::-1], finished[:start][::-1]]))
        if shared < max(len(generation), 1) or not finished[start:].strip():
            return None
        return self._through_end_of_turn(finished[start:], message["content"])

    def _continuing(self, conv: Conversation, number: int, message: dict[str, Any], prompt: str,
                    finished: str) -> str:
        """Target when the generation prompt opens the reply (e.g. `<think>\\n`) but the finished turn does not.

        The model is given that opening, so it must write the reply's remainder; the reply must start
        with the opening, and what the template shows of the finished turn must be its tail.
        """
        common = len(os.path.commonprefix([prompt, finished]))
        opened = prompt[common:]
        reply = message.get("content") or ""
        shown = self._through_end_of_turn(finished[common:], None)
        eot = next((s for s in self.eot_strings if shown.endswith(s)), "")
        target = reply[len(opened):] + eot
        if reply.startswith(opened) and target.endswith(shown.lstrip()):
            return target
        raise TemplateMismatch(
            f"{conv.source}: turn {number}: the chat template renders this assistant turn differently at "
            f"inference (add_generation_prompt=True ends with {prompt[-40:]!r}) than in training, and the reply "
            f"does not continue what that prompt opens ({opened!r})",
            [f"training text there: {finished[max(0, common - 40):common + 40]!r}",
             f"fix: start the reply with {opened!r} (e.g. its reasoning), or",
             TEMPLATE_FIX])

    def _through_end_of_turn(self, tail: str, content: str | None) -> str:
        """`tail` up to and including the first end-of-turn token after the reply's text (all if none)."""
        start = 0
        if content and content.strip() and content.strip() in tail:
            start = tail.find(content.strip()) + len(content.strip())
        ends = [tail.find(s, start) + len(s) for s in self.eot_strings if tail.find(s, start) >= 0]
        if not ends:
            return tail
        end = min(ends)
        while True:  # end-of-turn tokens written back to back are all trained (Command R: END_RESPONSE, END_OF_TURN)
            more = next((s for s in self.eot_strings if tail.startswith(s, end)), None)
            if more is None:
                return tail[:end]
            end += len(more)
