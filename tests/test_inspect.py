"""data inspect: trained spans marked exactly, colours only on a terminal, stats, pre-flight."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from template_families import family_model_dir

from tunesmith.config import DataOptions
from tunesmith.data.inspect import inspect_data
from tunesmith.errors import UserError

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "You shout."}, {"from": "human", "value": "hello there"},
                       {"from": "gpt", "value": "HELLO THERE"}, {"from": "human", "value": "why"},
                       {"from": "gpt", "value": "BECAUSE I CAN"}]},
    {"conversations": [{"from": "human", "value": "the sun"}, {"from": "gpt", "value": "IT IS BIG"}]},
]


def sharegpt_file(tmp_path: Path) -> Path:
    """A small ShareGPT file with a system prompt."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT), encoding="utf-8")
    return path


def run(options: DataOptions, model: Path, terminal: bool, **kwargs: object) -> tuple[dict, str]:
    """inspect_data into a string; `terminal` decides whether rich may use colours."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120, color_system="standard" if terminal else None)
    stats = inspect_data(options, model=str(model), console=console, **kwargs)  # type: ignore[arg-type]
    return stats, out.getvalue()


def test_piped_output_marks_exactly_the_replies_and_eot(tiny_model_dir: Path, tmp_path: Path) -> None:
    stats, text = run(DataOptions(data=str(sharegpt_file(tmp_path))), tiny_model_dir, terminal=False, samples=2,
                      time_it=True)
    assert re.findall(r"\[\[(.*?)\]\]", text, flags=re.S) == [
        "HELLO THERE<|eot_id|>", "BECAUSE I CAN<|eot_id|>", "IT IS BIG<|eot_id|>"]
    assert "<|start_header_id|>system<|end_header_id|>\n\nYou shout.<|eot_id|>" in text
    assert "\x1b[" not in text and "pre-flight: ok" in text and "template: tokenizer" in text
    assert stats["rows_read"] == 2 and stats["train_samples"] == 2 and stats["samples_per_second"] > 0
    assert "tokens per sample" in text and "tokenize speed" in text


def test_terminal_output_uses_colours_not_markers(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, text = run(DataOptions(data=str(sharegpt_file(tmp_path))), tiny_model_dir, terminal=True, samples=1)
    assert "\x1b[" in text and "[[" not in text and "HELLO THERE" in text


def test_skipped_rows_and_failed_preflight_are_shown(tiny_base_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": ""}\n'
                    '{"question": "' + "long " * 300 + '", "answer": "a"}\n', encoding="utf-8")
    options = DataOptions(data=str(path), skip_invalid=True, max_length=64)
    stats, text = run(options, tiny_base_model_dir, terminal=False)
    assert "skipped 1 invalid rows" in text and f"{path}:2: field 'answer' is empty" in text
    assert stats["rows_invalid"] == 1 and stats["over_max_length"] == 1 and stats["dropped"] == 1
    assert "template: zephyr" in text
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "' + "long " * 300 + '", "answer": "a"}\n',
                    encoding="utf-8")
    out = io.StringIO()
    with pytest.raises(UserError, match="no trained token left"):
        inspect_data(DataOptions(data=str(path), max_length=64), model=str(tiny_base_model_dir),
                     console=Console(file=out, force_terminal=False))
    assert "pre-flight: FAILED" in out.getvalue() and "[[" in out.getvalue()


def test_inspect_shows_per_turn_splits_folds_and_refusals(tmp_path: Path) -> None:
    think = "<think>\nhmm\n</think>\n\n"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": think + "A"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": think + "B"}]},
            {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "no reasoning"}]}]
    path = tmp_path / "r1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = family_model_dir(tmp_path, "deepseek-r1-distill-qwen")
    out = io.StringIO()
    with pytest.raises(UserError, match="1 samples cannot be trained the way inference renders them"):
        inspect_data(DataOptions(data=str(path)), model=str(model), console=Console(file=out, width=200))
    text = out.getvalue()
    assert "note: 1 conversations were split into 2 samples" in text
    assert f"── {path}:1 (turn 3) ·" in text and f"── {path}:1 (turn 5) ·" in text
    assert re.findall(r"\[\[(.*?)\]\]", text, flags=re.S) == ["hmm\n</think>\n\nA<｜end▁of▁sentence｜>",
                                                              "hmm\n</think>\n\nB<｜end▁of▁sentence｜>"]
    assert f"{path}:2: turn 2: the chat template renders this assistant turn differently" in text
    stats, text = run(DataOptions(data=str(path), skip_invalid=True), model, terminal=False)
    assert stats["split_conversations"] == 1 and stats["split_samples"] == 2 and stats["refused"] == 1
    assert "split per turn" in text and "pre-flight: ok" in text


def test_inspect_says_when_the_system_prompt_is_folded(tmp_path: Path) -> None:
    stats, text = run(DataOptions(data=str(sharegpt_file(tmp_path))), family_model_dir(tmp_path, "gemma-2"),
                      terminal=False)
    assert "note: folded the system prompt into the first user turn in 1 samples" in text
    assert "<start_of_turn>user\nYou shout.\n\nhello there<end_of_turn>" in text and stats["folded_system"] == 1
    assert re.findall(r"\[\[(.*?)\]\]", text, flags=re.S)[:2] == ["HELLO THERE<end_of_turn>", "BECAUSE I CAN<end_of_turn>"]
