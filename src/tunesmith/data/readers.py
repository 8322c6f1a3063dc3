"""Files and hub datasets -> raw rows (each with its FILE:LINE) -> `Conversation`s.

Reading is two steps: a file reader yields `(where, row)` pairs, one per record, where
`where` is "FILE:LINE" (or "FILE:row N" where a format has no lines); then
`tunesmith.data.formats` turns each row into a `Conversation` or a problem message.
Bad rows are never dropped silently: by default reading stops with a `UserError`
listing up to 20 of them; with `skip_invalid` they are skipped and counted.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.conversation import Conversation
from tunesmith.data.formats import RowProblem, detect_format, parse_columns, row_to_conversation
from tunesmith.errors import UserError

MAX_LISTED = 20
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")

Row = tuple[str, Any]  # ("FILE:LINE", the decoded record)


@dataclass
class ReadReport:
    """What reading found: counts, the format used, and the first problems (for printing)."""

    rows_read: int = 0
    rows_invalid: int = 0
    problems: list[str] = field(default_factory=list)
    format: str = "auto"


def read_conversations(
    source: str,
    format: str = "auto",
    columns: str | None = None,
    system: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Conversation], ReadReport]:
    """Read a data file or hub dataset into `Conversation`s, validating every row.

    Raises `UserError` listing up to 20 bad rows as `FILE:LINE: ...` unless
    `skip_invalid`, in which case the bad rows are counted in the report instead.
    """
    mapping = parse_columns(columns)
    rows = list(read_rows(source))
    if not rows:
        raise UserError(f"{source}: no samples found (the file is empty)")
    used = format if format != "auto" else detect_format(source, rows, mapping)
    report = ReadReport(format=used)
    conversations: list[Conversation] = []
    for where, row in rows:
        report.rows_read += 1
        try:
            conversations.append(row_to_conversation(row, used, where, mapping, system))
        except RowProblem as problem:
            report.rows_invalid += 1
            if len(report.problems) < MAX_LISTED:
                report.problems.append(f"{where}: {problem}")
    if report.rows_invalid and not skip_invalid:
        shown = f" (the first {MAX_LISTED} below)" if report.rows_invalid > MAX_LISTED else ""
        raise UserError(
            f"{source}: {report.rows_invalid} of {report.rows_read} rows are invalid for format "
            f"{used!r}{shown}; fix them, or pass --skip-invalid to skip them",
            report.problems,
        )
    if not conversations:
        raise UserError(f"{source}: no valid samples (all {report.rows_read} rows are invalid)", report.problems)
    return conversations, report


def read_rows(source: str) -> Iterator[Row]:
    """Dispatch on the file suffix; anything that is not an existing file is a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"{source}: is a directory (expected a data file: {' '.join(FILE_SUFFIXES)})")
    if not path.exists():
        if Path(source).suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
            raise UserError(f"{source}: no such file")
        return _read_hub(source)
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
               ".parquet": _read_parquet, ".txt": _read_txt}
    if suffix not in readers:
        raise UserError(f"{source}: unknown file type {suffix or '(none)'!r} (expected one of: "
                        f"{' '.join(FILE_SUFFIXES)})")
    return readers[suffix](path)


def _decode(path: Path) -> str:
    """The file as text; non-UTF-8 bytes are reported with their line number."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        "save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty (expected samples)")
    return text


def _read_jsonl(path: Path) -> Iterator[Row]:
    """One JSON object per line; blank lines are ignored; bad JSON names its line."""
    problems: list[str] = []
    rows: list[Row] = []
    lines = _decode(path).splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: malformed JSON: {exc.msg} at column {exc.colno} "
                            "(expected one JSON object per line)")
    if problems:
        raise UserError(f"{path}: {len(problems)} of {len(lines)} lines are not valid JSON", problems[:MAX_LISTED])
    return iter(rows)


def _read_json(path: Path) -> Iterator[Row]:
    """A JSON array of records, an object holding one such array, or an object of columns."""
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
                data = next(iter(lists.values()))  # {"data": [records]}
            else:  # columns: {"instruction": [...], "output": [...]}
                n = len(next(iter(lists.values())))
                return iter([(f"{path}:row {i + 1}", {k: v[i] for k, v in lists.items()}) for i in range(n)])
        else:
            raise UserError(f"{path}:1: expected a JSON array of records or an object of equal-length "
                            f"arrays (found an object with keys: {', '.join(map(str, data)) or 'none'})")
    if not isinstance(data, list):
        raise UserError(f"{path}:1: expected a JSON array of records (found {type(data).__name__})")
    lines = _element_lines(text, len(data))
    return iter([(f"{path}:{line}", record) for line, record in zip(lines, data)])


def _element_lines(text: str, count: int) -> list[int]:
    """The line on which each element of the top-level JSON array starts (best effort)."""
    decoder = json.JSONDecoder()
    pos, lines = text.find("[") + 1, []  # the records' array: the top level, or {"data": [...]}'s
    while len(lines) < count:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            _, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, ValueError):
            break
        lines.append(text.count("\n", 0, pos) + 1)
        pos = end
    return lines + [1] * (count - len(lines))


def _read_csv(path: Path) -> Iterator[Row]:
    """CSV/TSV with a header row; each record keeps the line it starts on."""
    text = _decode(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise UserError(f"{path}:1: malformed header ({exc})") from None
    header = [h.strip() for h in header]
    rows: list[Row] = []
    problems: list[str] = []
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise UserError(f"{path}:{line}: malformed CSV ({exc})") from None
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            problems.append(f"{path}:{line}: {len(cells)} fields (expected {len(header)}, as in the header: "
                            f"{', '.join(header)})")
            continue
        rows.append((f"{path}:{line}", dict(zip(header, cells))))
    if problems:
        raise UserError(f"{path}: {len(problems)} of {len(rows) + len(problems)} rows have the wrong number of "
                        "fields", problems[:MAX_LISTED])
    return iter(rows)


def _read_parquet(path: Path) -> Iterator[Row]:
    """A parquet table (read with pyarrow); rows are numbered from 1."""
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    return iter([(f"{path}:row {i + 1}", r) for i, r in enumerate(records)])


def _read_txt(path: Path) -> Iterator[Row]:
    """Raw text for continued pretraining: documents are separated by blank lines."""
    text = _decode(path)
    rows: list[Row] = []
    block: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            rows.append((f"{path}:{start}", {"text": "\n".join(block)}))
            block = []
    return iter(rows)


def _read_hub(name: str) -> Iterator[Row]:
    """The train split of a hub dataset via `datasets`; offline or unknown ids give a clear error."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # datasets raises many types for "offline" / "not found"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"{name}: not a local file, and loading it as a hub dataset failed ({type(exc).__name__}: {first})",
            ["if this is a file: check the path", "if this is a hub dataset id: check the spelling and that "
             "you are online (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE must be unset)"],
        ) from None
    return iter([(f"{name}:row {i + 1}", r) for i, r in enumerate(dataset)])


def write_jsonl(conversations: list[Conversation], path: Path) -> None:
    """Write conversations so `read_conversations` reads them back unchanged.

    Chat -> {"messages"}, preference -> {"prompt", "chosen", "rejected"} as message
    lists, text -> {"text"}. Used for held-out splits and the report.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for conv in conversations:
            if conv.kind == "text":
                record: dict[str, Any] = {"text": conv.text}
            elif conv.kind == "preference":
                record = {"prompt": conv.messages(),
                          "chosen": [{"role": t.role, "content": t.content} for t in conv.chosen or []],
                          "rejected": [{"role": t.role, "content": t.content} for t in conv.rejected or []]}
            else:
                record = {"messages": conv.messages()}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
