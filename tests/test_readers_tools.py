"""OpenAI-style tool calls read from files: assistant `tool_calls`, `tool` results, a sample's `tools`;
bad shapes refused with FILE:LINE and the field (or skipped, counted); `data inspect` on a real template."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from template_families import family_model_dir
from test_readers_cli import tunesmith

from tunesmith.data.readers import read_conversations
from tunesmith.errors import UserError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat(call: Any = CALL, **extra: Any) -> dict[str, Any]:
    """A question, an assistant tool call (as OpenAI writes it: arguments a JSON string), its result, the answer."""
    return {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"temp": 21}'},
                         {"role": "assistant", "content": "It is 21 °C in Paris."}], "tools": [WEATHER], **extra}


def write(tmp_path: Path, rows: list[Any], name: str = "tools.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_openai_tool_calls_and_results_become_tool_turns(tmp_path: Path) -> None:
    convs, _ = read_conversations(str(write(tmp_path, [chat()])))
    conv = convs[0]
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.turns[2].content == "" and conv.turns[2].tool_calls == (
        {"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},)
    assert conv.messages()[3] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call12345",
                                  "name": "get_weather"}
    assert conv.tools == [WEATHER] and conv.uses_tools


def test_an_empty_tool_calls_list_is_a_plain_reply(tmp_path: Path) -> None:  # some exporters write it
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}]}
    assert read_conversations(str(write(tmp_path, [row])))[0][0].turns[1].tool_calls == ()


def test_openai_legacy_function_call_and_function_role(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"role": "function", "name": "get_weather", "content": '{"temp": 21}'},
                        {"role": "assistant", "content": "21 °C."}]}
    conv = read_conversations(str(write(tmp_path, [row])))[0][0]
    assert conv.turns[1].tool_calls == ({"type": "function", "function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}},)
    assert conv.turns[2].role == "tool" and conv.turns[2].name == "get_weather"


def test_tool_samples_written_as_jsonl_read_back_unchanged(tmp_path: Path) -> None:
    from tunesmith.data.readers import write_jsonl

    convs, _ = read_conversations(str(write(tmp_path, [chat()])))
    write_jsonl(convs, tmp_path / "again.jsonl")  # (held-out splits and the report are written this way)
    again, _ = read_conversations(str(tmp_path / "again.jsonl"))
    assert again[0].turns == convs[0].turns and again[0].tools == convs[0].tools


def test_sharegpt_function_call_and_observation_turns(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                             {"from": "observation", "value": '{"temp": 21}'}, {"from": "gpt", "value": "21 °C."}],
           "tools": json.dumps([WEATHER["function"]])}
    conv = read_conversations(str(write(tmp_path, [row])))[0][0]
    assert [t.role for t in conv.turns] == ["user", "assistant", "tool", "assistant"]
    assert conv.turns[1].tool_calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert conv.tools == [WEATHER["function"]]


BAD = [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": {"name": "f"}},
                   {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
     "messages[2]: 'tool_calls' must be a list of calls (found an object)"),
    (chat({"type": "function", "function": {"arguments": "{}"}}),
     "messages[3]: tool_calls[1]: 'function.name' must be the tool's name"),
    (chat({"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}),
     "messages[3]: tool_calls[1]: 'function.arguments' is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "a"}]},
     "roles out of order: message 2 is a tool result with no assistant tool call before it"),
    (chat(tools=[{"type": "function", "function": {"description": "no name"}}]),
     "field 'tools'[1] must be a function definition with a 'name'"),
]


@pytest.mark.parametrize(("row", "needle"), BAD, ids=["not-a-list", "no-name", "bad-json", "orphan-result", "tools"])
def test_bad_tool_shapes_name_file_line_and_field(tmp_path: Path, row: dict[str, Any], needle: str) -> None:
    path = write(tmp_path, [chat(), row])
    with pytest.raises(UserError) as err:
        read_conversations(str(path))
    assert f"{path}:2: {needle}" in "\n".join(err.value.problems), err.value.problems
    convs, report = read_conversations(str(path), skip_invalid=True)
    assert len(convs) == 1 and report.rows_invalid == 1


def test_inspect_trains_the_tool_call_and_masks_the_result_on_qwen25(tmp_path: Path) -> None:
    path = write(tmp_path, [chat()])
    result = tunesmith("data", "inspect", str(path), "--model", str(family_model_dir(tmp_path, "qwen2.5")), "--samples", "1")
    assert result.returncode == 0, result.stderr
    trained = re.findall(r"\[\[(.*?)\]\]", result.stdout, flags=re.DOTALL)
    assert trained == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                       "It is 21 °C in Paris.<|im_end|>"], result.stdout
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in result.stdout  # shown as context, not trained
    assert '"name": "get_weather", "description": "Weather of a city"' in result.stdout  # the tools were offered


def test_inspect_refuses_tool_data_on_a_template_without_tools(tmp_path: Path) -> None:
    path = write(tmp_path, [chat()])
    result = tunesmith("data", "inspect", str(path), "--model", str(family_model_dir(tmp_path, "gemma-2")))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}:1: turn 3: this model's chat template does not render tool calls" in result.stderr
    assert "refused: 1 samples" in result.stdout  # inspect lists the refusal with the rendered samples
