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


PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I think it is Berlin."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "two plus two"}],
     "chosen": [{"role": "assistant", "content": "Four."}],
     "rejected": [{"role": "assistant", "content": "Five, I guess."}]},
    {"prompt": "same?", "chosen": "Yes.", "rejected": "Yes."},  # nothing to prefer: refused
]


def test_inspect_preference_pairs_shows_prompt_chosen_and_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    result = tunesmith("data", "inspect", str(path), "--model", str(tiny_model_dir), "--skip-invalid")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # each reply is trained through its end-of-turn token, chosen before rejected; the prompts never
    assert re.findall(r"(chosen|rejected): \[\[(.*?)\]\]", out, flags=re.S) == [
        ("chosen", "Paris.<|eot_id|>"), ("rejected", "I think it is Berlin.<|eot_id|>"),
        ("chosen", "Four.<|eot_id|>"), ("rejected", "Five, I guess.<|eot_id|>")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the prompt as transformers renders it for inference
    for messages in ([{"role": "user", "content": PAIRS[0]["prompt"]}], PAIRS[1]["prompt"]):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt + "\nchosen: [[" in out
    assert f"{path}:1 · pair: prompt" in out and f"{path}:2 · pair: prompt" in out
    rows = {" ".join(line.split()[:2]): " ".join(line.split()) for line in out.splitlines() if line.startswith("  ")}
    assert rows["pairs 2"] == "pairs 2 trainable" and rows["refused pairs"] == "refused pairs 1 (listed below)"
    assert f"{path}:3: chosen and rejected replies are identical (nothing to prefer)" in out
    assert "pre-flight: ok" in out

    refused = tunesmith("data", "inspect", str(path), "--model", str(tiny_model_dir))  # as training would
    assert refused.returncode == 2 and "pre-flight: FAILED" in refused.stdout
    assert refused.stderr.startswith("tunesmith: 1 of 3 preference pairs cannot train") and "Traceback" not in refused.stderr
