"""`tunesmith data inspect` as a subprocess: the Llama-3 rendering with only replies marked; bad input exits 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHATS = [
    {"conversations": [{"from": "system", "value": "You answer in capitals."}, {"from": "human", "value": "hi"},
                       {"from": "gpt", "value": "HELLO"}, {"from": "human", "value": "tell me a fact"},
                       {"from": "gpt", "value": "THE SUN IS A STAR"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "two plus two"},
                       {"from": "gpt", "value": "FOUR"}]},
    {"conversations": [{"from": "human", "value": "bad row"}, {"from": "robot", "value": "beep"}]},
]


def tunesmith(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI offline, output piped (so markers, not colours)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_inspect_sharegpt_with_system_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS), encoding="utf-8")
    result = tunesmith("data", "inspect", str(path), "--model", str(tiny_model_dir), "--skip-invalid", "--stats")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.findall(r"\[\[(.*?)\]\]", out, flags=re.S) == [
        "HELLO<|eot_id|>", "THE SUN IS A STAR<|eot_id|>", "FOUR<|eot_id|>"]
    assert "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in capitals.<|eot_id|>" in out
    assert f"{path}:3: conversations[2]: unknown role 'robot'" in out
    assert "rows invalid" in out and "samples/s" in out and "pre-flight: ok" in out


BAD = [
    ("d.jsonl", b'{"question": "q", "answer": "a"}\n{"question": "q" "answer": "a"}\n', ":2: malformed JSON"),
    ("d.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n',
     ":1: messages[2]: unknown role 'bot'"),
    ("d.jsonl", b'{"messages": [{"role": "user", "content": "q"}]}\n', ":1: no assistant turn"),
    ("d.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}\n',
     ":1: roles out of order"),
    ("d.jsonl", b'{"question": "q", "answer": "a"}\n{"question": "q"}\n', ":2: missing field 'answer'"),
    ("d.jsonl", b'{"question": "q", "answer": ""}\n', ":1: field 'answer' is empty"),
    ("d.jsonl", b'{"question": "\xff", "answer": "a"}\n', ":1: not valid UTF-8"),
    ("d.jsonl", b"\n\n", "d.jsonl: the file is empty"),
    ("d.jsonl", b'{"foo": "q", "bar": "a"}\n', "cannot tell the data format from the keys found: bar, foo"),
    ("d.csv", b"question,answer\nq,a\nq,a,b\n", ":3: 3 fields (expected 2"),
    ("d.json", b'[{"question": "q", "answer": "a"},\n {"question": 3, "answer": "a"}]', ":2: field 'question' must be text"),
]


@pytest.mark.parametrize("name,content,needle", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_input_exits_2_naming_file_and_line(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = tunesmith("data", "inspect", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert needle in result.stderr and str(path) in result.stderr
    assert result.stderr.startswith("tunesmith: ")
