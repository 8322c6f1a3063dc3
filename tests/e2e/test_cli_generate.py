"""`tunesmith generate` as a subprocess: streamed reply that stops, batch JSONL, bad input -> exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_generate import CHATS, trained_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tunesmith(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, offline."""
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env=ENV)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(trained_dir(tmp_path_factory))


def test_generate_prints_the_answer_and_stops(model_dir: str) -> None:
    question = "tell me about the cat"
    proc = tunesmith("generate", model_dir, "--prompt", question, "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == CHATS[question]  # nothing after the end-of-turn token


def test_generate_prompts_file_writes_jsonl(model_dir: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    questions = list(CHATS)
    prompts.write_text(json.dumps(questions[0]) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": questions[1]}]}) + "\n")
    proc = tunesmith("generate", model_dir, "--prompts", str(prompts), "--temperature", "0.2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["completion"].strip() for r in rows] == [CHATS[q] for q in questions]
    assert all(r["stopped"] for r in rows)


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "0"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_sampling_values_exit_2(flags: list[str], expected: str) -> None:
    proc = tunesmith("generate", "some/model", "--prompt", "hi", *flags)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_model_path_and_bad_prompt_line_exit_2(tmp_path: Path) -> None:
    proc = tunesmith("generate", str(tmp_path / "no-such-model"), "--prompt", "hi")
    assert proc.returncode == 2 and "no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    proc = tunesmith("generate", str(tmp_path / "never-loaded"), "--prompts", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert f"{bad}:2: expected a string" in proc.stderr
