"""Several datasets in one run: flags, YAML lists, per-dataset options, shares, the reported mix; column aliases."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import build_parser, gather
from tunesmith.config import DataOptions, DatasetSpec, TrainConfig, build_config, load_yaml, to_flat_dict
from tunesmith.data.columns import resolve_columns
from tunesmith.data.mix import mix_counts, read_mix
from tunesmith.data.prepare import prepare_data
from tunesmith.data.readers import read_conversations
from tunesmith.errors import UserError


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} question {i}?", "answer": f"{tag} answer {i}"} for i in range(n)]


def quiet(_: str) -> None:
    """A log that prints nothing."""


@pytest.mark.parametrize("keys,format,mapped", [
    (["Question", "Answer"], "qa", "Question → prompt, Answer → response"),
    (["QUESTION", "answer", "System Prompt"], "qa", "QUESTION → prompt, answer → response, System Prompt → system"),
    (["input", "output"], "prompt-completion", "input → prompt, output → response"),
    (["instruction", "response"], "alpaca", "instruction → prompt, response → response"),
    (["instruction", "input", "output"], "alpaca", "instruction → prompt, output → response, input → input"),
    (["Instruction", "Context", "Response", "Category"], "alpaca",
     "Instruction → prompt, Response → response, Context → input"),
    (["query", "response"], "prompt-completion", "query → prompt, response → response"),
    (["user", "assistant"], "prompt-completion", "user → prompt, assistant → response"),
    (["prompt", "completion"], "prompt-completion", "prompt → prompt, completion → response"),
    (["prompt", "chosen", "rejected"], "preference", "prompt → prompt, chosen → chosen, rejected → rejected"),
    (["Messages"], "messages", "Messages → messages"),
    (["conversations", "system"], "sharegpt", "conversations → conversations, system → system"),
    (["Text", "id"], "text", "Text → text"),
])
def test_column_aliases_case_and_separator_insensitive(keys: list[str], format: str, mapped: str) -> None:
    found = resolve_columns("f.csv", keys, "auto", None)
    assert (found.format, found.describe()) == (format, mapped)


def test_columns_flag_names_the_missing_column_and_the_present_ones() -> None:
    with pytest.raises(UserError) as err:
        resolve_columns("f.csv", ["Question", "Answer", "prompt"], "auto", "prompt=Q")
    assert str(err.value) == "f.csv: --columns prompt=Q: there is no column 'Q' (columns found: Question, Answer, prompt)"


def test_format_given_with_capitalised_columns_reads_every_row(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("Question,Answer\nWhy?,Because.\nHow?,So.\n", encoding="utf-8")
    convs, report = read_conversations(str(path), format="qa")
    assert len(convs) == 2 and report.rows_invalid == 0 and report.columns == "Question → prompt, Answer → response"


def test_mix_counts() -> None:
    assert mix_counts([100, 50], [None, None]) == [100, 50]
    assert mix_counts([1000, 700], [0.3, 0.7]) == [300, 700]  # b limits: 700 is 70% of 1000
    assert mix_counts([100, 1000], [0.5, 0.5]) == [100, 100]
    assert mix_counts([100, 300, 100], [0.5, None, None]) == [100, 75, 25]  # the rest split 3:1 by size


def test_flags_repeat_and_yaml_lists(tmp_path: Path) -> None:
    args = build_parser().parse_args(["train", "--data", "a.jsonl", "--data", "b.csv"])
    config = build_config(TrainConfig, gather(TrainConfig, args)[0])
    assert [s.path for s in config.data.data] == ["a.jsonl", "b.csv"]
    run = tmp_path / "run.yaml"
    run.write_text("datasets:\n  - path: a.jsonl\n    share: 0.25\n  - path: b.csv\n    format: qa\n"
                   "    columns: prompt=Q,response=A\n    system: Be brief.\n", encoding="utf-8")
    config = build_config(TrainConfig, load_yaml(run))
    assert config.data.data == [DatasetSpec("a.jsonl", share=0.25),
                                DatasetSpec("b.csv", format="qa", columns="prompt=Q,response=A", system="Be brief.")]
    saved = yaml.safe_load(yaml.safe_dump(to_flat_dict(config)))  # config.yaml of the run, and back
    assert build_config(TrainConfig, saved).data.data == config.data.data
    assert DataOptions(data="one.jsonl").data == [DatasetSpec("one.jsonl")]  # the Python API's plain string


@pytest.mark.parametrize("value,needle", [
    ([{"path": "a", "share": 0.6}, {"path": "b", "share": 0.6}], "invalid value for share"),
    ([{"path": "a", "share": 1.0}, {"path": "b"}], "to less than 1 when some datasets have none"),
    ([{"file": "a"}], "invalid value for data entry 1"),
    ([{"path": "a", "format": "csv"}], "invalid value for format: 'csv'"),
    ([], "invalid value for data"),
])
def test_bad_dataset_lists(value: object, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        DataOptions(data=value)  # type: ignore[arg-type]


def test_per_dataset_options_and_shares(tmp_path: Path) -> None:
    a = jsonl(tmp_path / "a.jsonl", qa_rows(40, "a"))
    b = tmp_path / "b.csv"
    b.write_text("Q,A\n" + "".join(f"b q{i},b a{i}\n" for i in range(10)), encoding="utf-8")
    specs = [DatasetSpec(str(a), share=0.5), DatasetSpec(str(b), columns="prompt=Q,response=A", system="Be brief.")]
    convs, mix = read_mix(specs, DataOptions(), seed=0, log=quiet)
    assert mix.used == [10, 10] and len(convs) == 20
    from_b = [c for c in convs if c.source.startswith(str(b))]
    assert len(from_b) == 10 and all(c.turns[0].content == "Be brief." for c in from_b)
    assert all(c.turns[0].role == "user" for c in convs if c.source.startswith(str(a)))
    lines = mix.lines()
    assert lines[0] == f"{a}: 10 of 40 rows (50% of the mix), format qa; columns: question → prompt, answer → response"
    assert lines[1] == f"{b}: 10 rows (50% of the mix), format prompt-completion; columns: Q → prompt, A → response"


def test_prepare_logs_the_mix_and_the_cache_sees_every_file(chatml_tokenizer, tmp_path: Path) -> None:
    a = jsonl(tmp_path / "a.jsonl", qa_rows(12, "a"))
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"do {i}", "output": f"done {i}"} for i in range(8)])
    options = DataOptions(data=[str(a), str(b)], test_split=0.1)
    logged: list[str] = []
    data = prepare_data(options, copy.deepcopy(chatml_tokenizer), cache_dir=tmp_path / "c", log=logged.append)
    assert len(data.train) + len(data.eval) == 20
    assert f"data: {a}: 12 rows (60% of the mix), format qa; columns: question → prompt, answer → response" in logged
    assert f"data: {b}: 8 rows (40% of the mix), format alpaca; columns: instruction → prompt, output → response" \
        in logged
    assert [d["used"] for d in data.stats["datasets"]] == [12, 8]
    assert {s.source.rsplit(":", 1)[0] for s in data.train + data.eval} == {str(a), str(b)}  # which file, which line
    jsonl(b, [{"instruction": f"do {i}", "output": f"changed {i}"} for i in range(8)])
    again = prepare_data(options, copy.deepcopy(chatml_tokenizer), cache_dir=tmp_path / "c", log=quiet)
    assert again.train != data.train or again.eval != data.eval  # the second file's change invalidated the cache
