"""`tunesmith data inspect` on hostile inputs, as a subprocess: exit 2 with FILE:LINE and no traceback, or exit 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def tunesmith(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI offline, output piped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def refused(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith("tunesmith: ") and needle in result.stderr, result.stderr


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_cp1252_names_the_line_and_iconv(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "d.jsonl", b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "b"}\n')
    refused(tunesmith("data", "inspect", str(path)), f"{path}:2: not valid UTF-8 (byte 0xe9 at column 18")
    assert "iconv -f CP1252 -t UTF-8" in tunesmith("data", "inspect", str(path)).stderr


@pytest.mark.parametrize("make,needle", [
    (os.mkfifo, "is a named pipe (FIFO)"),
    (lambda p: p.symlink_to(p.name), "a symlink loop"),
    (lambda p: write_bytes(p, b'{"question": "q", "answer": "a", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
     ":1: nested too deeply to read"),
])
def test_not_a_file_and_deep_nesting_exit_2_at_once(tmp_path: Path, make, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    make(path)
    refused(tunesmith("data", "inspect", str(path), timeout=60), needle)


def test_skip_invalid_skips_a_malformed_json_line_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [json.dumps({"question": f"q{i}?", "answer": f"A{i}"}) for i in range(3)]
    path = tmp_path / "broken.jsonl"
    path.write_text(rows[0] + "\n" + '{"question": "q" "answer": "a"}\n' + rows[1] + "\n" + rows[2] + "\n")
    refused(tunesmith("data", "inspect", str(path), "--model", str(tiny_model_dir)), f"{path}:2: malformed JSON")
    result = tunesmith("data", "inspect", str(path), "--model", str(tiny_model_dir), "--skip-invalid")
    assert result.returncode == 0, result.stderr
    assert f"skipped 1 invalid rows of 4 in {path}" in result.stdout and f"{path}:2: malformed JSON" in result.stdout


def test_spreadsheet_columns_and_a_mix_of_two_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("Question,Answer\nWhy?,Because.\nHow?,Like so.\n", encoding="utf-8")
    chats = tmp_path / "chats.jsonl.gz"
    import gzip

    chats.write_bytes(gzip.compress(b'{"messages": [{"role": "user", "content": "hi"}, '
                                    b'{"role": "assistant", "content": "HELLO"}]}\n'))
    result = tunesmith("data", "inspect", str(sheet), str(chats), "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"data: {sheet}: 2 rows (67% of the mix), format qa; columns: Question → prompt, Answer → response" in out
    assert f"data: {chats}: 1 rows (33% of the mix), format messages; columns: messages → messages" in out
    assert "[[Because.<|eot_id|>]]" in out and "[[HELLO<|eot_id|>]]" in out


def test_columns_flag_with_a_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("Question,Answer\nq,a\n", encoding="utf-8")
    refused(tunesmith("data", "inspect", str(path), "--columns", "prompt=Q"),
            f"{path}: --columns prompt=Q: there is no column 'Q' (columns found: Question, Answer)")


def test_train_on_two_datasets_logs_the_mix_and_records_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("Question,Answer\n" + "".join(f"Why {i}?,BECAUSE {i}.\n" for i in range(12)), encoding="utf-8")
    chats = jsonl_file(tmp_path / "chats.jsonl", [{"instruction": f"Shout {i}", "output": f"HEY {i}!"} for i in range(8)])
    out = tmp_path / "out"
    result = tunesmith("train", "--model", str(tiny_model_dir), "--data", str(sheet), "--data", str(chats),
                       "--method", "lora", "--max-steps", "1", "--no-report", "--output", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"data: {sheet}: 12 rows (60% of the mix), format qa; columns: Question → prompt, Answer → response" \
        in result.stderr
    assert f"data: {chats}: 8 rows (40% of the mix), format alpaca; columns: instruction → prompt, " \
        "output → response" in result.stderr
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"] == [{"path": str(sheet)}, {"path": str(chats)}]


def jsonl_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
