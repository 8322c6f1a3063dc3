"""The input corpus: odd and hostile data files, each with the exact outcome tunesmith must give.

Every case is a file (written by `write`) and either the rows it must read or the
`FILE:LINE: ...` text its error must contain. tests/test_readers_corpus.py runs them all
through the library; `python tests/inputs/gen.py DIR` writes the file-based ones to DIR to
try by hand (`tunesmith data inspect DIR/NAME`).

Sources of the shapes: JSON Lines spec (lines end at \\n; \\r\\n allowed), RFC 8259 (U+2028
is legal in strings; duplicate names are "unpredictable"), RFC 4180 (quoted cells hold
line breaks; quotes inside are doubled), and what spreadsheets and exporters really write
(Excel's UTF-16 "Unicode text", CP-1252 CSVs, a BOM in front of the header).
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def qa(q: str = "What is two plus two?", a: str = "Four.") -> str:
    """One question/answer JSON record."""
    return json.dumps({"question": q, "answer": a}, ensure_ascii=False)


def lines(*records: str, end: str = "\n") -> bytes:
    """Records joined as JSON Lines (UTF-8)."""
    return "".join(r + end for r in records).encode("utf-8")


def msgs(content: Any, reply: Any = "Hello.") -> str:
    """One messages record with a given user content and reply."""
    return json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]})


def nested(depth: int) -> str:
    """A record with a field nested `depth` arrays deep."""
    return '{"question": "q", "answer": "a", "meta": ' + "[" * depth + "]" * depth + "}"


def _parquet(rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return make


def _zst(data: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return make


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # left bound: the file stays a socket for the test's lifetime
    _SOCKETS.append(sock)


_SOCKETS: list[socket.socket] = []


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "gone.jsonl")


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "a.jsonl").write_bytes(lines(qa()))


def _truncated_gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(lines(*[qa(f"q{i}") for i in range(200)]))[:-30])


def _big_row(path: Path) -> None:
    path.write_text(qa("Summarize this.", "word " * 4_000_000) + "\n", encoding="utf-8")  # 20 MB


@dataclass
class Case:
    """One input and its expected outcome: `rows` read, or an error containing `error`."""

    name: str
    file: str
    content: bytes | Callable[[Path], None]
    rows: int | None = None
    error: str | None = None  # "{path}" stands for the file's path
    skipped: tuple[int, int] | None = None  # with --skip-invalid: (rows kept, rows reported invalid)
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[list[Any]], bool] | None = None  # extra check of the conversations read
    needs: str | None = None  # "zstandard" | "no-zstandard" | "unix"

    def write(self, directory: Path) -> Path:
        """Create the input under `directory`; returns its path."""
        path = directory / self.file
        if isinstance(self.content, bytes):
            path.write_bytes(self.content)
        else:
            self.content(path)
        return path


def reply(n: int = 0) -> Callable[[list[Any]], str]:
    return lambda convs: convs[n].turns[-1].content


def prompt(n: int = 0) -> Callable[[list[Any]], str]:
    return lambda convs: convs[n].turns[-2].content


LS = "\u2028"  # LINE SEPARATOR
PS = "\u2029"  # PARAGRAPH SEPARATOR
NEL = "\u0085"  # NEXT LINE
CAFE_CP1252 = "café".encode("cp1252")

CASES: list[Case] = [
    # --- JSON / JSON Lines ---------------------------------------------------------------
    Case("jsonl-plain", "d.jsonl", lines(qa(), qa("Hi?", "Hello.")), rows=2),
    Case("jsonl-bom", "d.jsonl", b"\xef\xbb\xbf" + lines(qa(), qa()), rows=2,
         check=lambda c: prompt()(c) == "What is two plus two?"),
    Case("jsonl-crlf", "d.jsonl", lines(qa(), qa("B?", "b"), end="\r\n"), rows=2,
         check=lambda c: c[1].source.endswith(":2") and reply(1)(c) == "b"),
    Case("jsonl-lone-cr", "d.jsonl", lines(qa(), qa("B?", "b"), end="\r"), rows=2,
         check=lambda c: c[1].source.endswith(":2")),
    Case("jsonl-unicode-line-separators", "d.jsonl", lines(qa(f"a{LS}b{PS}c{NEL}d", f"x{LS}y"), qa()), rows=2,
         check=lambda c: prompt()(c) == f"a{LS}b{PS}c{NEL}d" and reply()(c) == f"x{LS}y"),
    Case("jsonl-vertical-tab-form-feed", "d.jsonl", lines(qa("a\u000bb", "c\u000cd")), rows=1,
         check=lambda c: prompt()(c) == "a\u000bb"),
    Case("jsonl-raw-nul", "d.jsonl", lines(qa()) + b'{"question": "a\x00b", "answer": "c"}\n',
         error="{path}:2: a raw NUL byte at column 16", skipped=(1, 1)),
    Case("jsonl-escaped-nul", "d.jsonl", lines(json.dumps({"question": "a\u0000b", "answer": "c"})), rows=1,
         check=lambda c: prompt()(c) == "a\x00b"),
    Case("jsonl-deep-nesting", "d.jsonl", lines(qa(), nested(100_000)),
         error="{path}:2: nested too deeply to read", skipped=(1, 1)),
    Case("jsonl-moderate-nesting", "d.jsonl", lines(nested(200)), rows=1),
    Case("jsonl-duplicate-keys", "d.jsonl", lines(qa(), '{"question": "q", "answer": "a", "answer": "b"}'),
         error="{path}:2: duplicate key 'answer' in one object", skipped=(1, 1)),
    Case("jsonl-pretty-array", "d.jsonl", json.dumps([{"question": "a?", "answer": "A"},
                                                      {"question": "b?", "answer": "B"}], indent=2).encode(),
         rows=2, check=lambda c: [x.source.rsplit(":", 1)[1] for x in c] == ["2", "6"]),
    Case("jsonl-one-line-array", "d.jsonl", ("[" + qa() + ", " + qa("b?", "B") + "]\n").encode(), rows=2),
    Case("jsonl-pretty-object-with-data", "d.jsonl",
         json.dumps({"data": [{"question": "a?", "answer": "A"}]}, indent=2).encode(), rows=1),
    Case("jsonl-pretty-array-broken", "d.jsonl", b'[\n  {"question": "a?", "answer": "A"},\n  {"question": }\n]\n',
         error="{path}:3: malformed JSON: Expecting value"),
    Case("jsonl-two-records-one-line", "d.jsonl", lines(qa() + " " + qa()),
         error="{path}:1: malformed JSON: extra data after the record"),
    Case("jsonl-malformed-line", "d.jsonl", lines(qa(), '{"question": "q" "answer": "a"}', qa()),
         error="{path}:2: malformed JSON: Expecting ',' delimiter at column 18", skipped=(2, 1)),
    Case("jsonl-truncated-last-line", "d.jsonl", lines(qa()) + b'{"question": "q", "ans',
         error="{path}:2: malformed JSON", skipped=(1, 1)),
    Case("jsonl-scalars", "d.jsonl", b'"just a string"\n"another"\n',
         error="{path}:1: expected an object with fields (found a string); for raw text"),
    Case("jsonl-blank-lines-only", "d.jsonl", b"\n \n\t\n", error="{path}: the file is empty"),
    Case("empty-file", "d.jsonl", b"", error="{path}: the file is empty"),
    Case("json-array", "d.json", json.dumps([{"question": "a?", "answer": "A"}] * 3, indent=1).encode(), rows=3),
    Case("json-data-wrapper", "d.json", json.dumps({"data": [{"question": "a?", "answer": "A"}] * 2}, indent=1)
         .encode(), rows=2, check=lambda c: [x.source.rsplit(":", 1)[1] for x in c] == ["3", "7"]),
    Case("json-wrapper-with-metadata", "d.json", json.dumps({"version": "1.0", "count": 2, "rows": [
        {"question": "a?", "answer": "A"}, {"question": "b?", "answer": "B"}]}).encode(), rows=2),
    Case("json-wrapper-duplicate-key", "d.json", b'{"data": [{"question": "a", "answer": "b"}],\n'
         b' "data": [{"question": "c", "answer": "d"}]}', error="{path}:1: duplicate key 'data' in the top-level object"),
    Case("json-columns", "d.json", json.dumps({"question": ["a?", "b?"], "answer": ["A", "B"]}).encode(), rows=2,
         check=lambda c: c[1].source.endswith(":row 2")),
    Case("json-list-of-scalars", "d.json", b'["one", "two", "three"]',
         error="{path}:1: expected an object with fields (found a string)"),
    Case("json-scalar", "d.json", b"42\n", error="{path}:1: expected a JSON array of records (found a number)"),
    Case("json-duplicate-keys", "d.json",
         b'[\n{"question": "a", "answer": "b"},\n{"question": "a", "question": "b", "answer": "c"}\n]',
         error="{path}:3: duplicate key 'question'", skipped=(1, 1)),
    Case("json-deep-nesting", "d.json", ("[\n" + qa() + ",\n" + nested(100_000) + "\n]").encode(),
         error="{path}:3: nested too deeply to read"),
    Case("json-syntax-error", "d.json", b'[\n {"question": "a", "answer": "b"},\n {"question": "a", "answer": }\n]',
         error="{path}:3: malformed JSON: Expecting value at column 30"),
    Case("json-holding-json-lines", "d.json", lines(qa(), qa("b?", "B")), rows=2),
    Case("json-two-arrays-of-records", "d.json", json.dumps({"train": [{"question": "a", "answer": "b"}],
                                                            "test": [{"question": "c", "answer": "d"}]}).encode(),
         error="{path}:1: an object with several arrays of records (train, test)"),
    Case("content-text-parts", "d.jsonl", lines(msgs([{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
                                                     [{"type": "text", "text": "Hello."}])), rows=1,
         check=lambda c: prompt()(c) == "Hi\nthere" and reply()(c) == "Hello."),
    Case("content-image-part", "d.jsonl", lines(msgs([{"type": "image_url", "image_url": {"url": "x.png"}}])),
         error="{path}:1: messages[1]: 'content': content part 1 is type 'image_url'"),
    Case("answer-number", "d.jsonl", lines(json.dumps({"question": "2+2?", "answer": 4})),
         error="{path}:1: field 'answer' must be text (found a number: 4); write it as a string"),
    Case("answer-null", "d.jsonl", lines(json.dumps({"question": "q", "answer": None})),
         error="{path}:1: field 'answer' is null (expected text)"),
    Case("answer-list", "d.jsonl", lines(json.dumps({"question": "q", "answer": ["a", "b"]})),
         error="{path}:1: field 'answer' must be text (found a list)"),
    Case("answer-empty", "d.jsonl", lines(qa(), qa("q", "")), error="{path}:2: field 'answer' is empty",
         skipped=(1, 1)),
    Case("answer-whitespace", "d.jsonl", lines(qa("q", " \n\t ")), error="{path}:1: field 'answer' is only whitespace"),
    Case("message-content-null", "d.jsonl", lines(msgs("hi", None)),
         error="{path}:1: messages[2]: 'content' must be text (found null)"),
    Case("message-content-number", "d.jsonl", lines(msgs(7)),
         error="{path}:1: messages[1]: 'content' must be text (found a number)"),
    Case("system-number", "d.jsonl", lines(json.dumps({"question": "q", "answer": "a", "system": 3})),
         error="{path}:1: field 'system' must be text (found a number: 3)"),
    # --- encodings -----------------------------------------------------------------------
    Case("utf16-le-bom", "d.jsonl", "\ufeff".encode("utf-16-le") + lines(qa(), qa()).decode().encode("utf-16-le"),
         rows=2),
    Case("utf16-be-bom-csv", "d.csv", "\ufeffquestion,answer\r\nq,café\r\n".encode("utf-16-be"), rows=1,
         check=lambda c: reply()(c) == "café"),
    Case("utf16-no-bom", "d.jsonl", lines(qa()).decode().encode("utf-16-le"),
         error="{path}: looks like UTF-16 without a byte-order mark; convert it to UTF-8: iconv -f UTF-16LE"),
    Case("cp1252-jsonl", "d.jsonl", lines(qa()) + b'{"question": "' + CAFE_CP1252 + b'?", "answer": "Oui."}\n',
         error="{path}:2: not valid UTF-8 (byte 0xe9 at column 18; it looks like Windows-1252 / Latin-1); "
               "convert the file: iconv -f CP1252 -t UTF-8", skipped=(1, 1)),
    Case("cp1252-csv", "d.csv", b"question,answer\nq,a\nq2," + CAFE_CP1252 + b"\n",
         error="{path}:3: not valid UTF-8 (byte 0xe9", skipped=(1, 1)),
    Case("invalid-utf8-mid-file", "d.jsonl", lines(qa(), qa()) + b'{"question": "\x81\x8d", "answer": "x"}\n'
         + lines(qa()), error="{path}:3: not valid UTF-8 (byte 0x81 at column 15; it looks like an unknown",
         skipped=(3, 1)),
    Case("utf8-bom-csv-header", "d.csv", b"\xef\xbb\xbfquestion,answer\nq,a\n", rows=1),
    Case("cp1252-txt", "d.txt", b"first doc\n\nsecond " + CAFE_CP1252 + b"\n",
         error="{path}:3: not valid UTF-8", skipped=(1, 1)),
    # --- CSV / TSV -----------------------------------------------------------------------
    Case("csv-multiline-cells", "d.csv", b'question,answer\n"line one\nline two",A\nq2,"B1\nB2\nB3"\nq3,C\n',
         rows=3, check=lambda c: prompt()(c) == "line one\nline two" and c[2].source.endswith(":7")),
    Case("csv-bad-row-after-multiline", "d.csv", b'question,answer\n"a\nb\nc",A\nq,a,extra\n',
         error="{path}:5: 3 fields (expected 2", skipped=(1, 1)),
    Case("csv-crlf", "d.csv", b"question,answer\r\nq1,a1\r\nq2,a2\r\n", rows=2, check=lambda c: reply(1)(c) == "a2"),
    Case("tsv-stray-tab", "d.tsv", b"question\tanswer\nq1\ta1\nq2\ta\t2\n",
         error="{path}:3: 3 fields (expected 2, as in the header: question, answer)", skipped=(1, 1)),
    Case("tsv-tab-inside-quoted-cell", "d.tsv", b'question\tanswer\nq1\t"a\t1"\n', rows=1,
         check=lambda c: reply()(c) == "a\t1"),
    Case("csv-that-is-tsv", "d.csv", b"question\tanswer\nq1\ta1\n", rows=1),
    Case("csv-unterminated-quote", "d.csv", b'question,answer\nq1,a1\nq2,"never closed\nq3,a3\nq4,a4\n',
         error='{path}:3: a quote (") opened in this row is never closed, so lines 3-5'),
    Case("csv-quote-mid-cell", "d.csv", b'question,answer\nq1,"a"b\nq2,a2\n',
         error="{path}:2: malformed CSV: ',' expected after '\"'", skipped=(1, 1)),
    Case("csv-doubled-quotes", "d.csv", b'question,answer\nq1,"He said ""hi"""\n', rows=1,
         check=lambda c: reply()(c) == 'He said "hi"'),
    Case("csv-duplicate-header", "d.csv", b"question,answer,answer\nq,a,b\n",
         error="{path}:1: the header names column 'answer' twice (columns 2 and 3)"),
    Case("csv-blank-rows", "d.csv", b"question,answer\n\nq1,a1\n,\n\nq2,a2\n,,\n", rows=2,
         check=lambda c: c[1].source.endswith(":6")),
    Case("csv-header-only", "d.csv", b"question,answer\n", error="{path}: only a header (question, answer), no rows"),
    Case("csv-empty", "d.csv", b"\n\n", error="{path}: the file is empty"),
    Case("csv-long-cell", "d.csv", b"question,answer\nq," + b"x" * 300_000 + b"\n", rows=1),
    Case("csv-nul-in-cell", "d.csv", b"question,answer\nq,a\x00b\n", error="{path}:2: a raw NUL byte at column 2"),
    Case("csv-spreadsheet-capitals", "d.csv", b"Question,Answer\nWhy?,Because.\n", rows=1,
         check=lambda c: prompt()(c) == "Why?"),
    Case("csv-input-output", "d.csv", b"input,output\nIn,Out\n", rows=1, check=lambda c: reply()(c) == "Out"),
    Case("csv-instruction-response", "d.csv", b"Instruction,Context,Response\nDo,With this,Done\n", rows=1,
         check=lambda c: prompt()(c) == "Do\n\nWith this"),
    Case("csv-query-response-separators", "d.csv", b"user_query,Bot-Response\nq,a\n", error="cannot tell the data format"),
    Case("csv-separators-and-case", "d.csv", b"System Prompt,QUESTION,answer\nBe brief.,q,a\n", rows=1,
         check=lambda c: c[0].turns[0].content == "Be brief."),
    Case("csv-columns-missing", "d.csv", b"Question,Answer\nq,a\n", options={"columns": "prompt=Q"},
         error="{path}: --columns prompt=Q: there is no column 'Q' (columns found: Question, Answer)"),
    Case("csv-columns-case-insensitive", "d.csv", b"Frage,Antwort\nq,a\n",
         options={"columns": "prompt=frage,response=ANTWORT"}, rows=1),
    Case("csv-ambiguous-columns", "d.csv", b"question,answer,Answer\nq,a,b\n",
         error="columns 'answer' and 'Answer' both read as 'response'"),
    Case("format-qa-capitals", "d.csv", b"Question,Answer\nq,a\n", options={"format": "qa"}, rows=1),
    Case("format-qa-wrong-columns", "d.csv", b"foo,bar\nq,a\n", options={"format": "qa"},
         error="{path}: format 'qa' needs prompt and response columns; found: foo, bar"),
    # --- compressed and columnar ---------------------------------------------------------
    Case("jsonl-gz", "d.jsonl.gz", gzip.compress(lines(qa(), qa())), rows=2,
         check=lambda c: c[1].source.endswith("d.jsonl.gz:2")),
    Case("json-gz", "d.json.gz", gzip.compress(json.dumps([{"question": "a", "answer": "b"}]).encode()), rows=1),
    Case("csv-gz", "d.csv.gz", gzip.compress(b"question,answer\nq,a\n"), rows=1),
    Case("gzip-behind-jsonl-name", "d.jsonl", gzip.compress(lines(qa(), qa(), qa())), rows=3),
    Case("gzip-truncated", "d.jsonl.gz", _truncated_gzip, error="{path}: the compressed data is broken or cut short"),
    Case("gz-name-not-gzip", "d.jsonl.gz", lines(qa()), error="{path}: named .gz but not gz-compressed"),
    Case("jsonl-zst", "d.jsonl.zst", _zst(lines(qa(), qa())), rows=2, needs="zstandard"),
    Case("jsonl-zst-no-library", "d.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 16, needs="no-zstandard",
         error="{path}: zstd-compressed, and the zstandard package is not installed"),
    Case("xlsx-named-csv", "d.csv", b"PK\x03\x04" + b"\x00" * 40, error="{path}: a zip archive (an Excel .xlsx"),
    Case("parquet", "d.parquet", _parquet([{"question": "a", "answer": "b"}] * 3), rows=3),
    Case("parquet-wrong-types", "d.parquet", _parquet([{"question": "a", "answer": 1}, {"question": "b", "answer": 2}]),
         error="{path}:row 1: field 'answer' must be text (found a number: 1)"),
    Case("parquet-fake", "d.parquet", lines(qa()),
         error="{path}: not a parquet file (it starts with b'{{\"qu': it looks like JSON)"),
    Case("parquet-truncated", "d.parquet", b"PAR1" + b"\x00" * 50, error="{path}: not a readable parquet file"),
    # --- not a regular file --------------------------------------------------------------
    Case("directory", "d.jsonl", _directory, error="{path}: is a directory"),
    Case("fifo", "d.jsonl", _fifo, error="{path}: is a named pipe (FIFO), not a file", needs="unix"),
    Case("socket", "d.jsonl", _socket, error="{path}: is a socket", needs="unix"),
    Case("symlink-loop", "d.jsonl", _symlink_loop, error="{path}: a symlink loop", needs="unix"),
    Case("dangling-symlink", "d.jsonl", _dangling, error="{path}: a symlink to a file that does not exist",
         needs="unix"),
    Case("unknown-suffix", "d.xml", b"<rows/>", error="{path}: unknown file type '.xml'"),
    # --- size ----------------------------------------------------------------------------
    Case("row-20mb", "d.jsonl", _big_row, rows=1, check=lambda c: len(reply()(c)) == 20_000_000 - 1),
]


def main(argv: list[str]) -> int:
    """Write every file-based case into DIR (one sub-folder per case)."""
    if len(argv) != 1:
        print("usage: python tests/inputs/gen.py DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    written = 0
    for case in CASES:
        if case.needs or case.name == "row-20mb":  # sockets, FIFOs, links and 20 MB stay in the tests
            continue
        folder = root / case.name
        folder.mkdir(parents=True, exist_ok=True)
        case.write(folder)
        written += 1
    print(f"wrote {written} of the {len(CASES)} cases' inputs under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["CASES", "Case"]
