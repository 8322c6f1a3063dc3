"""`tunesmith chat` driven by a script on stdin: replies stop, history kept, /reset clears, /save writes."""
from __future__ import annotations

import json
from pathlib import Path

from test_cli_generate import tunesmith
from test_generate import CHATS, trained_dir
from tunesmith.data.readers import read_conversations


def test_chat_script_history_reset_save(tmp_path_factory, tmp_path: Path) -> None:
    model_dir = str(trained_dir(tmp_path_factory))
    first, second = CHATS
    saved = tmp_path / "transcript.jsonl"
    script = "\n".join([first, second, f"/save {saved}", "/reset", "/system Be brief.", second,
                        f"/save {saved}"]) + "\n"  # then end of input, like Ctrl-D
    proc = tunesmith("chat", model_dir, "--greedy", stdin=script)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if not line.startswith("(")] == [CHATS[first], CHATS[second], CHATS[second]]
    assert "(history cleared)" in lines
    records = [json.loads(line)["messages"] for line in saved.read_text().splitlines()]
    assert [m["content"] for m in records[0]] == [first, CHATS[first], second, CHATS[second]]  # history kept
    assert [m["role"] for m in records[1]] == ["system", "user", "assistant"]  # /reset cleared it
    conversations, _ = read_conversations(str(saved))
    assert len(conversations) == 2

