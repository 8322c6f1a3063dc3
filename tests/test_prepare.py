"""prepare_data: split, cache (hit, invalidation), pre-flight refusals, eval file, stats."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import tunesmith.data.prepare as prepare_mod
from tunesmith.config import DataOptions
from tunesmith.data.prepare import length_stats, prepare_data
from tunesmith.data.split import split_train_eval
from tunesmith.errors import UserError


def qa_file(path: Path, n: int, answer: str = "ANSWER") -> Path:
    """A question/answer JSONL file of `n` rows."""
    path.write_text("".join(json.dumps({"question": f"question {i}?", "answer": f"{answer} {i}"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def quiet(_: str) -> None:
    """A log that prints nothing."""


def test_split_is_seeded_and_keeps_order() -> None:
    items = list(range(100))
    train, held = split_train_eval(items, 0.05, seed=1)
    assert len(held) == 5 and sorted(train + held) == items and held == sorted(held)
    assert split_train_eval(items, 0.05, seed=1) == (train, held)
    assert split_train_eval(items, 0.05, seed=2)[1] != held
    assert split_train_eval([1], 0.5, seed=0) == ([1], [])
    assert split_train_eval(items, 0.0, seed=0) == (items, [])


def test_prepare_splits_tokenizes_and_reports(chatml_tokenizer, tmp_path: Path) -> None:
    options = DataOptions(data=str(qa_file(tmp_path / "d.jsonl", 40)), test_split=0.1)
    logged: list[str] = []
    data = prepare_data(options, copy.deepcopy(chatml_tokenizer), cache_dir=tmp_path / "c", log=logged.append)
    assert len(data.train) == 36 and len(data.eval) == 4 and len(data.eval_conversations) == 4
    assert data.template == "tokenizer" and data.end_of_turn_ids == [chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert {c.source for c in data.eval_conversations} == {s.source for s in data.eval}
    assert data.stats["rows_read"] == 40 and 0 < data.stats["trained_share"] < 1
    assert "36 train / 4 eval" in logged[-1]


def test_cache_hit_skips_tokenizing_and_a_changed_file_invalidates(chatml_tokenizer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = qa_file(tmp_path / "d.jsonl", 20)
    options = DataOptions(data=str(path))
    first = prepare_data(options, copy.deepcopy(chatml_tokenizer), cache_dir=tmp_path / "c", log=quiet)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(prepare_mod, "tokenize_all", boom)
    again = prepare_data(options, copy.deepcopy(chatml_tokenizer), cache_dir=tmp_path / "c", log=quiet)
    assert again.train == first.train and again.eval == first.eval
    assert [c.turns for c in again.eval_conversations] == [c.turns for c in first.eval_conversations]
    assert [c.source for c in again.eval_conversations] == [c.source for c in first.eval_conversations]
    qa_file(path, 20, answer="CHANGED")
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_data(options, copy.deepcopy(chatml_tokenizer), cache_dir=tmp_path / "c", log=quiet)
    with pytest.raises(AssertionError, match="tokenized again"):  # an option change invalidates too
        prepare_data(DataOptions(data=str(path), max_length=64), copy.deepcopy(chatml_tokenizer),
                     cache_dir=tmp_path / "c", log=quiet)


def test_eval_data_file_replaces_the_split(base_tokenizer, tmp_path: Path) -> None:
    options = DataOptions(data=str(qa_file(tmp_path / "t.jsonl", 10)), eval_data=str(qa_file(tmp_path / "e.jsonl", 3)))
    data = prepare_data(options, copy.deepcopy(base_tokenizer), cache_dir=tmp_path / "c", log=quiet)
    assert len(data.train) == 10 and len(data.eval) == 3 and data.template == "zephyr"
    assert all(s.source.startswith(str(tmp_path / "e.jsonl")) for s in data.eval)


def test_fully_truncated_samples_refuse_unless_skipped(llama3_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q", "answer": "a"}, {"question": "long " * 200, "answer": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    options = DataOptions(data=str(path), max_length=32, test_split=0.0)
    with pytest.raises(UserError) as err:
        prepare_data(options, copy.deepcopy(llama3_tokenizer), cache_dir=tmp_path / "c", log=quiet)
    assert "no trained token left" in str(err.value) and err.value.problems[0].startswith(f"{path}:2:")
    assert "--max-length" in err.value.problems[-1]
    logged: list[str] = []
    options.skip_invalid = True
    data = prepare_data(options, copy.deepcopy(llama3_tokenizer), cache_dir=tmp_path / "c", log=logged.append)
    assert len(data.train) == 1 and any("skipped 1 samples" in line for line in logged)


def test_template_that_never_ends_turns_is_refused(base_tokenizer, tmp_path: Path) -> None:
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = ("{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{ 'assistant:' }}{%- endif %}")
    options = DataOptions(data=str(qa_file(tmp_path / "d.jsonl", 4)))
    with pytest.raises(UserError) as err:
        prepare_data(options, tok, cache_dir=tmp_path / "c", log=quiet)
    assert "end-of-turn token is never trained" in str(err.value) and "--template" in err.value.problems[0]


def test_text_data_prepares_without_end_of_turn_check(base_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Paragraph {i} of a long book." for i in range(10)), encoding="utf-8")
    data = prepare_data(DataOptions(data=str(path)), copy.deepcopy(base_tokenizer), cache_dir=tmp_path / "c",
                        log=quiet)
    assert len(data.train) == 9 and data.stats["trained_share"] == 1.0


def test_missing_bundled_example_is_a_clear_error(base_tokenizer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_mod, "EXAMPLE_DATA", tmp_path / "gone.jsonl")
    with pytest.raises(UserError, match="bundled example dataset is missing"):
        prepare_data(DataOptions(), copy.deepcopy(base_tokenizer), cache_dir=tmp_path / "c", log=quiet)


def test_length_stats() -> None:
    assert length_stats(list(range(1, 101))) == {"min": 1, "median": 50, "p95": 95, "max": 100}
    assert length_stats([]) == {"min": 0, "median": 0, "p95": 0, "max": 0}
