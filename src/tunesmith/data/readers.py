"""Files and hub datasets -> raw rows (each with its FILE:LINE) -> `Conversation`s.

Reading is two steps: a file reader streams `(where, row)` pairs, one per record, where
`where` is "FILE:LINE" (or "FILE:row N" where a format has no lines) and `row` is the
decoded record or a `BadRow` saying why the record cannot be read; then
`tunesmith.data.formats` turns each row into a `Conversation` or a problem message.
Bad rows of every kind (bytes that are not UTF-8, malformed JSON, a wrong CSV field count,
a missing field) are never dropped silently: by default reading stops with a `UserError`
listing up to 20 of them; with `skip_invalid` they are skipped, counted and reported.
Problems that leave no row to point at (not a file, an unclosed CSV quote, a broken JSON
document) stop reading whatever the flag says.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from tunesmith.data.columns import resolve_columns
from tunesmith.data.conversation import Conversation
from tunesmith.data.formats import RowProblem, not_a_record, row_to_conversation
from tunesmith.data.jsonscan import BadRow, Decoder, JsonProblem, NotOneDocument, scan_document
from tunesmith.data.rawfile import Line, check_regular_file, logical_suffix, nul_problem, read_text, text_lines
from tunesmith.data.tabular import read_csv, read_parquet
from tunesmith.errors import UserError

MAX_LISTED = 20
HEAD_ROWS = 50  # rows whose keys decide the format and the column mapping
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")

Row = tuple[str, Any]  # ("FILE:LINE", the decoded record or a BadRow)


@dataclass
class ReadReport:
    """What reading found: counts, the format and column mapping used, and the first problems."""

    rows_read: int = 0
    rows_invalid: int = 0
    problems: list[str] = field(default_factory=list)
    format: str = "auto"
    columns: str = ""  # "Question → prompt, Answer → response"
    source: str = ""


def read_conversations(
    source: str,
    format: str = "auto",
    columns: str | None = None,
    system: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Conversation], ReadReport]:
    """Read a data file or hub dataset into `Conversation`s, validating every row (streamed).

    Raises `UserError` listing up to 20 bad rows as `FILE:LINE: ...` unless
    `skip_invalid`, in which case the bad rows are counted in the report instead.
    """
    rows = iter_rows(source)
    head = list(islice(rows, HEAD_ROWS))
    if not head:
        raise UserError(f"{source}: the file is empty (expected samples)")
    mapping = resolve_columns(source, _head_keys(source, head), format, columns)
    report = ReadReport(format=mapping.format, columns=mapping.describe(), source=source)
    conversations: list[Conversation] = []
    for where, row in chain(head, rows):
        report.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise RowProblem(row.problem)
            conversations.append(row_to_conversation(row, mapping.format, where, mapping.columns, system))
        except RowProblem as problem:
            report.rows_invalid += 1
            if len(report.problems) < MAX_LISTED:
                report.problems.append(f"{where}: {problem}")
    if report.rows_invalid and not skip_invalid:
        shown = f" (the first {MAX_LISTED} below)" if report.rows_invalid > MAX_LISTED else ""
        raise UserError(
            f"{source}: {report.rows_invalid} of {report.rows_read} rows are invalid for format "
            f"{mapping.format!r}{shown}; fix them, or pass --skip-invalid to skip them",
            report.problems,
        )
    if not conversations:
        raise UserError(f"{source}: no valid samples (all {report.rows_read} rows are invalid)", report.problems)
    return conversations, report


def _head_keys(source: str, head: list[Row]) -> list[str]:
    """The keys of the first records, in first-seen order; a `UserError` when none is a record."""
    keys: dict[str, None] = {}
    for _, row in head:
        if isinstance(row, dict):
            keys.update((str(k), None) for k in row)
    if not keys and any(not isinstance(row, dict) for _, row in head):
        problems = [f"{where}: {row.problem if isinstance(row, BadRow) else not_a_record(row)}"
                    for where, row in head[:MAX_LISTED] if not isinstance(row, dict)]
        raise UserError(f"{source}: none of the first {len(head)} rows is a record with fields", problems)
    return list(keys)


def iter_rows(source: str) -> Iterator[Row]:
    """Stream the rows of a file (dispatching on its suffix) or a hub dataset (anything that is not a path)."""
    path = Path(source).expanduser()
    try:
        os.lstat(path)
    except FileNotFoundError:
        if logical_suffix(path) in FILE_SUFFIXES or source.startswith((".", "/", "~")):
            raise UserError(f"{source}: no such file") from None
        return _read_hub(source)
    except OSError as exc:
        if exc.errno != errno.ENOTDIR:
            raise UserError(f"{source}: cannot be read ({exc.strerror or exc})") from None
        raise UserError(f"{source}: no such file (a part of the path is not a folder)") from None
    check_regular_file(path)
    suffix = logical_suffix(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, suffix)
    if suffix == ".parquet":
        return read_parquet(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt}
    if suffix not in readers:
        raise UserError(f"{source}: unknown file type {suffix or '(none)'!r} (expected one of: "
                        f"{' '.join(FILE_SUFFIXES)}, optionally compressed: .gz .zst)")
    return readers[suffix](path)


def read_rows(source: str) -> Iterator[Row]:
    """All rows of `source`, every one a record: a `UserError` lists the rows that cannot be read."""
    rows: list[Row] = []
    problems: list[str] = []
    for where, row in iter_rows(source):
        if isinstance(row, BadRow):
            problems.append(f"{where}: {row.problem}")
        else:
            rows.append((where, row))
    if problems:
        raise UserError(f"{source}: {len(problems)} rows cannot be read", problems[:MAX_LISTED])
    return iter(rows)


def _jsonl_rows(path: Path, lines: Iterable[Line]) -> Iterator[Row]:
    """JSON Lines: one value per line (split on \\n only); blank lines are ignored; bad lines are `BadRow`s."""
    decoder = Decoder()
    for line in lines:
        where = f"{path}:{line.number}"
        if line.problem:
            yield where, BadRow(line.problem)
            continue
        if not line.text.strip():
            continue
        try:
            yield where, decoder.line(line.text)
        except JsonProblem as problem:
            yield where, BadRow(_line_problem(problem, line.text))


def _line_problem(problem: JsonProblem, text: str) -> str:
    """The message for a JSON Lines line that is not one JSON value."""
    nul = nul_problem(text)
    if nul:
        return nul
    if str(problem).startswith("malformed JSON") and "at column" not in str(problem):
        return f"{problem} at column {problem.column} (expected one JSON object per line)"
    return str(problem)


def _read_jsonl(path: Path) -> Iterator[Row]:
    """JSON Lines; a file that is one JSON document (a pretty-printed array, `{"data": [...]}`) reads as one."""
    lines = text_lines(path)
    for line in lines:
        if line.problem or line.text.strip():
            break
    else:
        return
    if not line.problem and _starts_document(line.text):
        pretty = line.text.strip() in ("[", "{")  # cannot be one record: a document, whatever is wrong in it
        document = _document_rows(path, read_text(path), strict=pretty)
        if document is not None:
            lines.close()
            yield from document
            return
    yield from _jsonl_rows(path, chain([line], lines))


def _starts_document(first: str) -> bool:
    """Whether the first line opens a multi-line document (or is a whole array) rather than one record."""
    stripped = first.strip()
    if stripped.startswith("["):
        return True
    try:
        json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return stripped.startswith("{")
    return False


def _document_rows(path: Path, text: str, strict: bool = True) -> list[Row] | None:
    """The rows of one JSON document; None if the text is several values (JSON Lines), or, when not
    `strict`, not valid JSON at all."""
    try:
        scanned = list(scan_document(text))
    except NotOneDocument:
        return None
    except JsonProblem as problem:
        if not strict:
            return None
        where = f"{path}:{problem.line}"
        at = f" at column {problem.column}" if str(problem).startswith("malformed") else ""
        raise UserError(f"{where}: {problem}{at}") from None
    return [(f"{path}:{line}" if line else f"{path}:row {n}", record)
            for n, (line, record) in enumerate(scanned, start=1)]


def _read_json(path: Path) -> Iterator[Row]:
    """A JSON document of records (see `scan_document`); JSON Lines content in a .json file reads as JSONL."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty (expected samples)")
    rows = _document_rows(path, text)
    if rows is None:  # JSON Lines in a .json file
        return _jsonl_rows(path, (Line(n, t) for n, t in enumerate(text.split("\n"), start=1)))
    return iter(rows)


def _read_txt(path: Path) -> Iterator[Row]:
    """Raw text for continued pretraining: documents are separated by blank lines (\\n only, not U+2028)."""
    block: list[str] = []
    start, problem = 1, None
    for line in chain(text_lines(path), [Line(-1, "")]):
        if line.text.strip() and line.number > 0:
            if not block:
                start, problem = line.number, None
            problem = problem or line.problem or nul_problem(line.text)
            block.append(line.text)
        elif block:
            yield f"{path}:{start}", BadRow(problem) if problem else {"text": "\n".join(block)}
            block = []


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
                if conv.tools:
                    record["tools"] = conv.tools
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
