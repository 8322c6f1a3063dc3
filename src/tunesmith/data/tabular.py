"""CSV/TSV and parquet files -> (where, record) rows, streamed.

CSV records keep the *physical* line they start on (a quoted cell may span lines), and a
row that spans several lines says so when it is bad (an unclosed quote is the usual
cause). A quote never closed refuses the file: it would swallow every line after it.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.data.jsonscan import BadRow
from tunesmith.data.rawfile import Line, nul_problem, open_regular, text_lines
from tunesmith.errors import UserError

FIELD_LIMIT = 2**31 - 1  # csv's default (131,072 characters) would refuse one long reply
PARQUET_MAGIC = b"PAR1"


class _Feed:
    """Decoded physical lines for `csv.reader`, remembering which could not be decoded."""

    def __init__(self, lines: Iterator[Line]) -> None:
        self.lines = lines
        self.number = 0
        self.bad: dict[int, str] = {}

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.number = line.number
        if line.problem:
            self.bad[line.number] = line.problem
        return line.text + "\n"

    def problem_between(self, first: int, last: int) -> str | None:
        """The decoding problem of a line in [first, last], if any (then forgotten)."""
        for number in [n for n in self.bad if first <= n <= last]:
            return f"line {number}: {self.bad.pop(number)}" if number != first else self.bad.pop(number)
        return None


def _delimiter(path: Path, header_line: str, suffix: str) -> str:
    """Tab for .tsv, and for a .csv whose header holds tabs but no comma (a TSV named .csv)."""
    if suffix == ".tsv" or ("\t" in header_line and "," not in header_line):
        return "\t"
    return ","


def read_csv(path: Path, suffix: str) -> Iterator[tuple[str, Any]]:
    """CSV/TSV with a header row; blank rows are skipped; every other row is a record or a `BadRow`."""
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
    lines = text_lines(path)
    first = next(lines, None)
    while first is not None and not first.text.strip() and not first.problem:
        first = next(lines, None)
    if first is None:
        raise UserError(f"{path}: the file is empty (expected a header row, then samples)")
    if first.problem:
        raise UserError(f"{path}:{first.number}: {first.problem}")
    header_line = first.number
    feed = _Feed(_chain(first, lines))
    reader = csv.reader(feed, delimiter=_delimiter(path, first.text, suffix), strict=True)
    header = _header(path, reader, header_line)
    rows = 0
    while True:
        start = feed.number + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise UserError(f"{path}:{start}: a quote (\") opened in this row is never closed, so lines "
                                f"{start}-{feed.number} (the rest of the file) would be one cell; close it, or "
                                "write a literal quote inside a quoted cell as two (\"\")") from None
            yield f"{path}:{start}", BadRow(f"malformed CSV: {exc} (a quote inside a cell must be doubled)")
            continue
        problem = feed.problem_between(start, feed.number)
        if not cells and problem is None:
            continue  # a blank line
        if problem is None and not any(c.strip() for c in cells):
            continue  # a blank spreadsheet row (",,,")
        rows += 1
        yield f"{path}:{start}", _record(header, cells, problem, start, feed.number)
    if rows == 0:
        raise UserError(f"{path}: only a header ({', '.join(header)}), no rows of data")


def _chain(first: Line, rest: Iterator[Line]) -> Iterator[Line]:
    yield first
    yield from rest


def _header(path: Path, reader: Any, line: int) -> list[str]:
    """The column names; duplicates are refused (one value would be silently lost)."""
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as exc:
        raise UserError(f"{path}:{line}: malformed header ({exc})") from None
    seen: dict[str, int] = {}
    for n, name in enumerate(header, start=1):
        if name in seen:
            shown = repr(name) if name else "(empty)"
            raise UserError(f"{path}:{line}: the header names column {shown} twice (columns {seen[name]} and "
                            f"{n}); rename one, so neither value is lost")
        seen[name] = n
    return header


def _record(header: list[str], cells: list[str], problem: str | None, start: int, end: int) -> Any:
    """One row as {column: cell}, or a `BadRow` saying why not (wrong field count, bytes, NUL)."""
    if problem is not None:
        return BadRow(problem)
    if len(cells) != len(header):
        spans = f"; this row spans lines {start}-{end}: is a quote left open?" if end > start else ""
        return BadRow(f"{len(cells)} fields (expected {len(header)}, as in the header: {', '.join(header)}){spans}")
    for cell in cells:
        nul = nul_problem(cell)
        if nul:
            return BadRow(nul)
    return dict(zip(header, cells))


def read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    """A parquet table, streamed by record batch (pyarrow); rows are numbered from 1."""
    import pyarrow.parquet as pq

    with open_regular(path) as raw:
        head = raw.read(4)
    _check_parquet_magic(path, head)
    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=8192)
        n = 0
        for batch in batches:
            for record in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", record
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None


def _check_parquet_magic(path: Path, head: bytes) -> None:
    """A parquet file starts (and ends) with PAR1; anything else is named for what it looks like."""
    if head == PARQUET_MAGIC:
        return
    looks = "JSON" if head[:1] in (b"{", b"[") else "text (CSV?)" if head.isascii() and head else "binary data"
    raise UserError(f"{path}: not a parquet file (it starts with {head!r}: it looks like {looks}); "
                    "give it the suffix of what it holds (.jsonl, .csv, ...)")
