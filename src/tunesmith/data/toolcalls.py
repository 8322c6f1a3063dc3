"""Tool calls in data files -> the tool-call turns of a `Conversation`.

OpenAI's chat format (the `messages` format): an assistant message may carry
`"tool_calls": [{"type": "function", "id": ..., "function": {"name": ..., "arguments": ...}}]`
(arguments a JSON string, as OpenAI writes them, or an object), and each result comes back as a
`{"role": "tool", "content": ..., "tool_call_id": ..., "name": ...}` message. A sample's top-level
`"tools"` list (function schemas) is what the model was offered; chat templates render it.
LLaMA-Factory's ShareGPT variant says the same with `function_call` / `observation` turns whose
value is the JSON of one call (or a list of calls) / the result, and `tools` as a JSON string.

Arguments are handed to templates as objects, the shape Hugging Face's templates expect
(Llama 3.1, Qwen2.5 and Mistral write them with `tojson`; a string would be quoted twice).
Each problem raises `RowProblem` naming the message and field; the reader adds FILE:LINE.
"""
from __future__ import annotations

import json
from typing import Any

from tunesmith.data.conversation import TOOL_ROLE, Turn
from tunesmith.data.jsonscan import describe


class ToolProblem(ValueError):
    """A malformed tool call or tool definition (the caller turns it into its `RowProblem`)."""


def tool_calls(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """An assistant message's `tool_calls`, checked, each as {"type", "function": {"name", "arguments"}[, "id"]}."""
    if not isinstance(value, list) or not value:
        raise ToolProblem(f"{where}: 'tool_calls' must be a list of calls (found {describe(value)})")
    return tuple(_call(call, f"{where}: tool_calls[{n}]") for n, call in enumerate(value, start=1))


def _call(call: Any, where: str) -> dict[str, Any]:
    """One call in OpenAI's shape (a bare {"name", "arguments"} is taken as its function)."""
    if not isinstance(call, dict):
        raise ToolProblem(f"{where} must be an object {{\"type\": \"function\", \"function\": {{...}}}} "
                          f"(found {describe(call)})")
    kind = call.get("type", "function")
    if kind != "function":
        raise ToolProblem(f"{where}: 'type' is {kind!r} (only \"function\" calls can be trained)")
    function = call.get("function", call if "name" in call else None)
    if not isinstance(function, dict):
        raise ToolProblem(f"{where}: missing 'function' (expected {{\"name\": ..., \"arguments\": ...}})")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolProblem(f"{where}: 'function.name' must be the tool's name (found {describe(name)})")
    out: dict[str, Any] = {"type": "function",
                           "function": {"name": name, "arguments": arguments(function.get("arguments"), where)}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise ToolProblem(f"{where}: 'id' must be text (found {describe(call['id'])})")
        out["id"] = call["id"]
    return out


def arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object: an object as is, a JSON string parsed (absent = no arguments)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolProblem(f"{where}: 'function.arguments' is not valid JSON ({exc.msg} at character "
                              f"{exc.pos}): {value[:60]!r}") from None
    if not isinstance(value, dict):
        raise ToolProblem(f"{where}: 'function.arguments' must be a JSON object of the arguments "
                          f"(found {describe(value)})")
    return value


def tool_result(item: dict[str, Any], content: str, where: str) -> Turn:
    """A `tool` message: the result's text, and the id / name of the call it answers when given."""
    ids = {}
    for key in ("tool_call_id", "name"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise ToolProblem(f"{where}: {key!r} must be text (found {describe(item[key])})")
        ids[key] = item.get(key)
    return Turn(TOOL_ROLE, content, tool_call_id=ids["tool_call_id"], name=ids["name"])


def sharegpt_calls(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """A ShareGPT `function_call` turn's value: the JSON of one call {"name", "arguments"} or a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolProblem(f"{where}: a function_call's value must be the JSON of the call ({exc.msg} at "
                              f"character {exc.pos}): {value[:60]!r}") from None
    return tool_calls(value if isinstance(value, list) else [value], where)


def tool_definitions(value: Any, name: str) -> list[dict[str, Any]] | None:
    """A sample's `tools`: a list of function schemas (or its JSON string); None when absent or empty."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolProblem(f"field {name!r} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, list):
        raise ToolProblem(f"field {name!r} must be a list of tool (function) definitions (found {describe(value)})")
    for n, tool in enumerate(value, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolProblem(f"field {name!r}[{n}] must be a function definition with a 'name' "
                              "({\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}})")
    return value


def check_tool_order(turns: list[Turn], first: int = 1) -> str | None:
    """Why the tool turns are out of place (None when fine): each `tool` result follows an assistant
    turn that calls a tool (or another result), and a call is answered before the next user turn.
    Messages are numbered from `first` (the conversation's numbering when a system turn precedes)."""
    for n, (before, turn) in enumerate(zip([None, *turns], turns), start=first):
        calls = before is not None and before.role == "assistant" and before.tool_calls
        if turn.role == TOOL_ROLE and not (calls or (before is not None and before.role == TOOL_ROLE)):
            return f"message {n} is a tool result with no assistant tool call before it"
        if calls and turn.role != TOOL_ROLE:
            return f"message {n - 1} calls a tool but message {n} is not its result (expected a 'tool' message)"
    if turns and turns[-1].role == TOOL_ROLE:
        return "the conversation ends with a tool result (expected the assistant's reply after it)"
    return None
