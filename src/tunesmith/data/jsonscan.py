"""JSON text -> records, refusing what `json.loads` would accept silently or crash on.

- Duplicate keys in one object: `json.loads` keeps the last one without a word; here
  the record is refused, naming the key.
- Nesting thousands deep: `json.loads` raises RecursionError; here it is a clear problem.
- A JSON document (an array of records, `{"data": [records]}`, or an object of equal-length
  columns) is scanned element by element, so every record knows the line it starts on.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

WHITESPACE = re.compile(r"[ \t\r\n]*")
TOO_DEEP = "nested too deeply to read (thousands of levels of [ or {); a sample is never shaped like that"


class JsonProblem(Exception):
    """Why a piece of JSON cannot be read; `line`/`column` are relative to the text parsed (1-based)."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


class NotOneDocument(Exception):
    """The text holds more than one JSON value, one after another (JSON Lines, most likely)."""


def _skip(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not JSON whitespace."""
    return WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]


class Decoder:
    """A `json.JSONDecoder` that records duplicate keys (per value) instead of dropping them silently."""

    def __init__(self) -> None:
        self.duplicates: list[str] = []
        self._decoder = json.JSONDecoder(object_pairs_hook=self._pairs)

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        record = dict(pairs)
        if len(record) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.duplicates.append(key)
                seen.add(key)
        return record

    def value(self, text: str, pos: int = 0) -> tuple[Any, int, str | None]:
        """Decode the value at `pos` -> (value, end, duplicate-key problem or None).

        Raises `JsonProblem` for malformed or too-deeply nested JSON.
        """
        self.duplicates = []
        try:
            value, end = self._decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise JsonProblem(f"malformed JSON: {exc.msg}", exc.lineno, exc.colno) from None
        except RecursionError:
            raise JsonProblem(TOO_DEEP) from None
        duplicate = None
        if self.duplicates:
            duplicate = (f"duplicate key {self.duplicates[0]!r} in one object (JSON readers disagree on which "
                         "value wins, so tunesmith picks none: keep one)")
        return value, end, duplicate

    def line(self, text: str) -> Any:
        """One JSON Lines record: the whole string must be exactly one value, without duplicate keys."""
        stripped = text.strip(" \t\r\n")
        offset = len(text) - len(text.lstrip(" \t\r\n"))
        try:
            value, end, duplicate = self.value(stripped)
        except JsonProblem as problem:
            raise JsonProblem(str(problem), problem.line, problem.column + offset) from None
        if end != len(stripped):
            column = offset + _skip(stripped, end) + 1
            raise JsonProblem(f"malformed JSON: extra data after the record at column {column} "
                              "(expected one JSON object per line)", 1, column)
        if duplicate:
            raise JsonProblem(duplicate)
        return value


class BadRow:
    """A record that cannot be a sample (bad bytes, malformed or refused JSON): reported as a bad row."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def scan_document(text: str) -> Iterator[tuple[int, Any]]:
    """(line, record) pairs of one JSON document; `JsonProblem` (with the line) when it is not one.

    Accepts an array of records, an object holding one array of records among other keys
    (`{"data": [...]}`), or an object of equal-length column arrays (`{"q": [..], "a": [..]}`),
    whose rows get line 0 ("row N" is used instead). Raises `NotOneDocument` when one value
    follows another (JSON Lines). Records with duplicate keys come as `BadRow`.
    """
    decoder = Decoder()
    start = _skip(text, 0)
    if text.startswith("[", start):
        end = yield from _scan_array(text, start, decoder)
        if _skip(text, end) != len(text):
            raise NotOneDocument()
        return
    try:
        whole, end, duplicate = decoder.value(text, start)
    except JsonProblem as problem:
        if str(problem).startswith("malformed JSON: Extra data"):
            raise NotOneDocument() from None
        raise
    if _skip(text, end) != len(text):
        raise NotOneDocument()
    if not isinstance(whole, dict):
        raise JsonProblem(f"expected a JSON array of records (found {describe(whole)})")
    yield from _scan_object(text, start, whole, decoder, duplicate)


def _scan_array(text: str, pos: int, decoder: Decoder) -> Iterator[tuple[int, Any]]:
    """Yield the elements of the array at text[pos] == "[" with the line each starts on; return its end."""
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    line, last = _line_of(text, pos), pos
    while True:
        try:
            value, end, duplicate = decoder.value(text, pos)
        except JsonProblem as problem:
            raise JsonProblem(str(problem), *_position(text, problem, pos)) from None
        line += text.count("\n", last, pos)
        last = pos
        yield line, BadRow(duplicate) if duplicate else value
        pos = _skip(text, end)
        if text.startswith("]", pos):
            return pos + 1
        if not text.startswith(",", pos):
            raise JsonProblem("malformed JSON: expected ',' or ']' after a record", *_position(text, None, pos))
        pos = _skip(text, pos + 1)


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _line_of(text: str, pos: int) -> int:
    """1-based line number of `pos` (counts from the start: used once per document)."""
    return text.count("\n", 0, pos) + 1


def _position(text: str, problem: JsonProblem | None, pos: int) -> tuple[int, int]:
    """(line, column) in the whole text of a problem found while decoding from `pos`."""
    if problem is not None and str(problem).startswith("malformed JSON"):
        return problem.line, problem.column  # raw_decode reports positions in the whole text
    return _line_of(text, pos), pos - _line_start(text, pos) + 1


def _scan_object(text: str, start: int, whole: dict[str, Any], decoder: Decoder,
                 duplicate: str | None) -> Iterator[tuple[int, Any]]:
    """An object wrapping the records, or an object of columns."""
    records = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    lists = {k: v for k, v in whole.items() if isinstance(v, list)}
    if len(records) == 1:
        members = _members(text, start)
        names = [name for name, _ in members]
        twice = [name for n, name in enumerate(names) if name in names[:n]]
        if twice:
            raise JsonProblem(f"duplicate key {twice[0]!r} in the top-level object (JSON readers disagree on "
                              "which value wins, so tunesmith picks none: keep one)")
        yield from _scan_array(text, dict(members)[records[0]], decoder)
        return
    if duplicate:
        raise JsonProblem(duplicate)
    if len(records) > 1:
        raise JsonProblem(f"an object with several arrays of records ({', '.join(records)}): which are the "
                          "samples? keep one, or write them all as one array")
    if lists and len(lists) == len(whole) and len({len(v) for v in lists.values()}) == 1:
        for i in range(len(next(iter(lists.values())))):  # columns: {"instruction": [...], "output": [...]}
            yield 0, {k: v[i] for k, v in lists.items()}
        return
    raise JsonProblem("expected a JSON array of records, an object holding one such array, or an object "
                      f"of equal-length arrays (found an object with keys: {', '.join(map(str, whole)) or 'none'})")


def _members(text: str, start: int) -> list[tuple[str, int]]:
    """(key, where its value starts) for each member of the (already validated) object at text[start]."""
    plain = json.JSONDecoder()
    members = []
    pos = _skip(text, start + 1)
    while not text.startswith("}", pos):
        name, pos = plain.raw_decode(text, pos)
        pos = _skip(text, _skip(text, pos) + 1)  # past ":"
        members.append((name, pos))
        _, pos = plain.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
    return members


def describe(value: Any) -> str:
    """A short name for a JSON value's type, as a user would say it."""
    if value is None:
        return "null"
    names = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)
