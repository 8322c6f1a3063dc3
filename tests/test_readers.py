"""Readers: every format from every file type, column mapping, system prompts, and every bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.readers import read_conversations, write_jsonl
from tunesmith.errors import UserError

ROWS = {
    "alpaca": [{"instruction": "Add", "input": "2+2", "output": "4"},
               {"instruction": "Say hi", "input": "", "output": "Hi!"}],
    "qa": [{"question": "Capital of France?", "answer": "Paris"}],
    "prompt-completion": [{"prompt": "Once upon", "completion": "a time"}],
    "text": [{"text": "A raw document.\nWith two lines."}],
    "preference": [{"prompt": "Pick one", "chosen": "Good", "rejected": "Bad"}],
    "messages": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                               {"role": "assistant", "content": "Bye!"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}],
}
FLAT = ("alpaca", "qa", "prompt-completion", "text", "preference")
EXPECTED_FIRST = {
    "alpaca": [Turn("user", "Add\n\n2+2"), Turn("assistant", "4")],
    "qa": [Turn("user", "Capital of France?"), Turn("assistant", "Paris")],
    "prompt-completion": [Turn("user", "Once upon"), Turn("assistant", "a time")],
    "messages": [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "Bye"),
                 Turn("assistant", "Bye!")],
    "sharegpt": [Turn("user", "Hi"), Turn("assistant", "Hello")],
}


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the file type given by `path`'s suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def check_first(fmt: str, conv: Conversation) -> None:
    """The first row of ROWS[fmt] parsed as expected."""
    if fmt == "text":
        assert conv.kind == "text" and conv.text == ROWS["text"][0]["text"]
    elif fmt == "preference":
        assert conv.kind == "preference"
        assert conv.turns == [Turn("user", "Pick one")]
        assert conv.chosen == [Turn("assistant", "Good")] and conv.rejected == [Turn("assistant", "Bad")]
    else:
        assert conv.kind == "chat" and conv.turns == EXPECTED_FIRST[fmt]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".tsv"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_from_each_file_type(tmp_path: Path, fmt: str, suffix: str) -> None:
    if suffix in (".csv", ".tsv") and fmt not in FLAT:
        pytest.skip("nested formats do not fit in CSV")
    convs, report = read_conversations(str(write(tmp_path / f"d{suffix}", ROWS[fmt])))
    assert report.format == fmt and report.rows_read == len(ROWS[fmt]) and report.rows_invalid == 0
    assert len(convs) == len(ROWS[fmt])
    check_first(fmt, convs[0])


def test_sources_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS["qa"][0]) + "\n\n" + json.dumps(ROWS["qa"][0]) + "\n", encoding="utf-8")
    convs, _ = read_conversations(str(path))
    assert [c.source for c in convs] == [f"{path}:2", f"{path}:4"]
    json_path = write(tmp_path / "d.json", ROWS["alpaca"])
    assert [c.source for c in read_conversations(str(json_path))[0]] == [f"{json_path}:2", f"{json_path}:7"]


def test_json_object_of_columns_and_wrapped_records(tmp_path: Path) -> None:
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"question": ["a?", "b?"], "answer": ["A", "B"]}), encoding="utf-8")
    convs, report = read_conversations(str(cols))
    assert report.format == "qa" and [c.turns[1].content for c in convs] == ["A", "B"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS["qa"] * 2}, indent=1), encoding="utf-8")
    convs, _ = read_conversations(str(wrapped))
    assert convs[0].turns == EXPECTED_FIRST["qa"] and [c.source for c in convs] == [f"{wrapped}:3", f"{wrapped}:7"]


def test_txt_documents_are_blank_line_separated(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("First doc line one.\nline two.\n\n\nSecond doc.\n", encoding="utf-8")
    convs, report = read_conversations(str(path))
    assert report.format == "text"
    assert [c.text for c in convs] == ["First doc line one.\nline two.", "Second doc."]
    assert convs[1].source == f"{path}:5"


def test_column_mapping_and_system_column(tmp_path: Path) -> None:
    rows = [{"Question": "Why?", "Reply": "Because.", "sys": "Be terse."}, {"Question": "How?", "Reply": "So.", "sys": ""}]
    path = write(tmp_path / "d.csv", rows)
    convs, report = read_conversations(str(path), columns="prompt=Question,response=Reply,system=sys",
                                       system="Default system.")
    assert report.format == "prompt-completion"
    assert convs[0].turns == [Turn("system", "Be terse."), Turn("user", "Why?"), Turn("assistant", "Because.")]
    assert convs[1].turns[0] == Turn("system", "Default system.")  # empty column -> --system


def test_system_prompt_added_only_where_missing(tmp_path: Path) -> None:
    no_system = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]}
    path = write(tmp_path / "d.jsonl", ROWS["messages"] + [no_system])
    convs, _ = read_conversations(str(path), system="You are a pirate.")
    assert convs[0].turns[0] == Turn("system", "Be brief.")
    assert convs[1].turns[0] == Turn("system", "You are a pirate.")


def test_preference_with_message_lists_repeating_the_prompt(tmp_path: Path) -> None:
    prompt = [{"role": "user", "content": "Q"}]
    row = {"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    conv = read_conversations(str(write(tmp_path / "p.jsonl", [row])))[0][0]
    assert conv.turns == [Turn("user", "Q")] and conv.chosen == [Turn("assistant", "good")]
    assert conv.rejected == [Turn("assistant", "bad")]


@pytest.mark.parametrize("fmt", ["messages", "preference", "text"])
def test_write_jsonl_round_trips(tmp_path: Path, fmt: str) -> None:
    convs, _ = read_conversations(str(write(tmp_path / "d.jsonl", ROWS[fmt])))
    write_jsonl(convs, tmp_path / "out.jsonl")
    again, _ = read_conversations(str(tmp_path / "out.jsonl"))
    strip = lambda cs: [(c.turns, c.chosen, c.rejected, c.text) for c in cs]  # noqa: E731
    assert strip(again) == strip(convs)


BAD_ROWS = [
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty 'content'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]}, "ends with a user turn"),
    ({"msgs": []}, "missing field 'messages'"),
    ({"messages": "hi"}, "must be a non-empty list"),
    ([1, 2], "expected an object"),
]


@pytest.mark.parametrize("row,needle", BAD_ROWS)
def test_bad_rows_name_file_line_and_problem(tmp_path: Path, row: object, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"][0]) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_conversations(str(path), format="messages")
    assert "--skip-invalid" in str(err.value)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{path}:2: ") and needle in err.value.problems[0]


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path: Path) -> None:
    rows = [ROWS["qa"][0], {"question": "q", "answer": ""}, ROWS["qa"][0], {"question": "q"}]
    convs, report = read_conversations(str(write(tmp_path / "d.jsonl", rows)), skip_invalid=True)
    assert len(convs) == 2 and report.rows_read == 4 and report.rows_invalid == 2
    assert report.problems[0].endswith(":2: field 'answer' is empty (expected text)")
    assert ":4: missing field 'answer'" in report.problems[1]


def test_at_most_20_problems_listed(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"question": "q", "answer": ""}] * 30)
    with pytest.raises(UserError) as err:
        read_conversations(str(path))
    assert "30 of 30 rows are invalid" in str(err.value) and len(err.value.problems) == 20


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b'{"question": "a", "answer": "b"}\n{"question": "a", \n', ":2: malformed JSON"),
    (b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "b"}\n', ":2: not valid UTF-8"),
    (b'{"foo": 1, "bar": 2}\n', "cannot tell the data format from the keys found: bar, foo"),
])
def test_bad_files(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_conversations(str(path))
    assert needle in "\n".join(err.value.lines())
    assert str(err.value).startswith(str(path))


def test_csv_wrong_field_count_and_unknown_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_conversations(str(path))
    assert err.value.problems == [f"{path}:3: 3 fields (expected 2, as in the header: question, answer)"]
    with pytest.raises(UserError, match="unknown name 'prompty'"):
        read_conversations(str(path), columns="prompty=question")


def test_missing_file_and_offline_hub_id() -> None:
    with pytest.raises(UserError, match="no such file"):
        read_conversations("nope/missing.jsonl")
    with pytest.raises(UserError) as err:  # HF_DATASETS_OFFLINE=1 in conftest
        read_conversations("someone/some-dataset")
    assert "hub dataset failed" in str(err.value) and any("online" in p for p in err.value.problems)
