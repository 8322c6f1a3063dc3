"""A data file's bytes -> checked, decompressed, decoded physical lines (or refused with a reason).

Everything that can go wrong before a record is parsed lives here, each with one clear
message: not a regular file (directory, FIFO, socket, device, symlink loop: refused
before any blocking `open`), unreadable, vanished, compressed (gzip / zstd found by magic
bytes, whatever the name says), other archives and spreadsheets, and the text encoding
(UTF-8 with or without BOM, UTF-16/32 with BOM; any other bytes are reported per line
with how to convert them). Lines are split on "\\n" only (and "\\r" in a file with no
"\\n" at all), never with `str.splitlines()`, which also splits on U+2028, U+0085, ...
that JSON strings may legally hold.
"""
from __future__ import annotations

import errno
import gzip
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tunesmith.errors import UserError

CHUNK = 1 << 20
COMPRESSED = (".gz", ".zst")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
OTHER_MAGIC = {  # bytes a data file starts with -> what it is and what to do
    b"PK\x03\x04": "a zip archive (an Excel .xlsx or a .zip?): export the sheet as CSV, or unzip it",
    b"BZh": "bzip2-compressed: decompress it first (bunzip2 FILE)",
    b"\xfd7zXZ\x00": "xz-compressed: decompress it first (unxz FILE)",
    b"\xd0\xcf\x11\xe0": "an old Excel/Office file: export the sheet as CSV",
    b"SQLite format 3\x00": "an SQLite database: export the table as CSV or JSONL",
}
BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xef\xbb\xbf", "utf-8"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


@dataclass
class Line:
    """One physical line: its number, its text (without the line break) or why it is not text."""

    number: int
    text: str
    problem: str | None = None  # "not valid UTF-8 ...": then `text` is decoded with U+FFFD replacements


def logical_suffix(path: Path) -> str:
    """The suffix that names the format, under a compression suffix: d.jsonl.gz -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def check_regular_file(path: Path) -> None:
    """Refuse at once, naming what it is, anything that is not a readable regular file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(_stat_problem(path, exc)) from None
    mode = info.st_mode
    kinds = ((stat.S_ISDIR, "is a directory (expected a data file; pass the file inside it)"),
             (stat.S_ISFIFO, "is a named pipe (FIFO), not a file: reading it could wait forever; "
                             "write the data to a regular file first"),
             (stat.S_ISSOCK, "is a socket, not a file; write the data to a regular file first"),
             (stat.S_ISCHR, "is a character device, not a file"), (stat.S_ISBLK, "is a block device, not a file"))
    for test, what in kinds:
        if test(mode):
            raise UserError(f"{path}: {what}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file")


def _stat_problem(path: Path, exc: OSError) -> str:
    """The message for a path that cannot even be looked at."""
    if exc.errno == errno.ELOOP:
        return f"{path}: a symlink loop (the link points, directly or not, at itself); fix or remove the link"
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"{path}: a symlink to a file that does not exist ({os.readlink(path)})"
        return f"{path}: no such file"
    if exc.errno == errno.EACCES:
        return f"{path}: permission denied (a folder on the way is not readable)"
    return f"{path}: cannot be read ({exc.strerror or exc})"


def open_regular(path: Path) -> BinaryIO:
    """Open for reading without ever blocking (O_NONBLOCK), then make sure it is a regular file.

    The check before the open can race with the file being swapped for a FIFO; the
    `fstat` of the opened descriptor cannot.
    """
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise UserError(f"{path}: permission denied (make it readable: chmod u+r {path})") from None
    except FileNotFoundError:
        raise UserError(f"{path}: the file disappeared before it could be read") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise UserError(f"{path}: is a socket, not a file; write the data to a regular file first") from None
        raise UserError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: not a regular file (it changed while being opened)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_data(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when they are gzip or zstd (found by magic bytes, not name)."""
    raw = open_regular(path)
    head = _peek(raw, path, 16)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise UserError(f"{path}: zstd-compressed, and the zstandard package is not installed "
                            "(pip install zstandard, or decompress it: unzstd FILE)") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[return-value]
    if path.suffix.lower() in COMPRESSED:
        raw.close()
        raise UserError(f"{path}: named {path.suffix} but not {path.suffix[1:]}-compressed "
                        "(rename it to what it holds)")
    for magic, what in OTHER_MAGIC.items():
        if head.startswith(magic):
            raw.close()
            raise UserError(f"{path}: {what}")
    return raw


def _peek(raw: BinaryIO, path: Path, n: int) -> bytes:
    """The first `n` bytes, leaving the stream where it was."""
    try:
        head = raw.read(n)
        raw.seek(0)
    except OSError as exc:
        raise UserError(f"{path}: read failed ({exc.strerror or exc})") from None
    return head


def read_chunks(stream: BinaryIO, path: Path) -> Iterator[bytes]:
    """Blocks of (decompressed) bytes; broken or truncated compressed data and I/O errors are named."""
    while True:
        try:
            block = stream.read(CHUNK)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise UserError(f"{path}: the compressed data is broken or cut short ({exc}); "
                            "the file is damaged or was not fully copied") from None
        except OSError as exc:
            raise UserError(f"{path}: read failed mid-file ({exc.strerror or exc}); did the file change "
                            "or vanish while being read?") from None
        except Exception as exc:  # zstandard.ZstdError and friends
            raise UserError(f"{path}: the compressed data is broken ({type(exc).__name__}: {exc})") from None
        if not block:
            return
        yield block


def split_lines(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """Physical lines as bytes (without the break), numbered from 1: split on b"\\n" only.

    A file with "\\r" but no "\\n" in its first block (old Mac line ends) is split on "\\r";
    a "\\r" before a "\\n" is dropped (CRLF). Any other "\\r" stays in the line.
    """
    first = next(chunks, b"")
    sep = b"\r" if b"\r" in first and b"\n" not in first else b"\n"
    rest, number = b"", 0
    for block in _prepend(first, chunks):
        pieces = (rest + block).split(sep)
        rest = pieces.pop()
        for piece in pieces:
            number += 1
            yield number, piece[:-1] if sep == b"\n" and piece.endswith(b"\r") else piece
    if rest:
        yield number + 1, rest[:-1] if rest.endswith(b"\r") else rest


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def text_lines(path: Path) -> Iterator[Line]:
    """Decoded physical lines (the file opened once); a line that is not UTF-8 carries a problem."""
    with open_data(path) as stream:
        chunks = read_chunks(stream, path)
        first = next(chunks, b"")
        encoding = sniff_encoding(path, first[:4096])
        if encoding not in ("utf-8", None):
            yield from _decoded_whole(path, first + b"".join(chunks), encoding)
            return
        for number, data in split_lines(_prepend(first, chunks)):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                yield Line(number, data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield Line(number, data.decode("utf-8", "replace"), not_utf8(path, data, exc))


def sniff_encoding(path: Path, head: bytes) -> str | None:
    """The encoding a BOM announces (None without one); UTF-16 without a BOM is refused, named."""
    for bom, name in BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 8 and head.count(0) * 3 > len(head):
        order = "LE" if head[1:2] == b"\x00" else "BE"
        raise UserError(f"{path}: looks like UTF-16 without a byte-order mark; convert it to UTF-8: "
                        f"iconv -f UTF-16{order} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}")
    return None


def _decoded_whole(path: Path, data: bytes, encoding: str) -> Iterator[Line]:
    """UTF-16/32 files (rare, small): decode all at once, then split on "\\n" like the rest."""
    try:
        text = data.decode("utf-16" if "16" in encoding else "utf-32")  # these codecs read and drop the BOM
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: starts with a {encoding.upper()} byte-order mark but is not valid "
                        f"{encoding.upper()} ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    sep = "\r" if "\r" in text and "\n" not in text else "\n"
    for number, piece in enumerate(text.split(sep), start=1):
        yield Line(number, piece[:-1] if piece.endswith("\r") else piece)


def not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    """What to say about a line that is not UTF-8: the byte, the column, and the iconv command."""
    guess = "Windows-1252 / Latin-1" if _decodes(data, "cp1252") else "an unknown 8-bit encoding or binary data"
    return (f"not valid UTF-8 (byte {data[exc.start]:#04x} at column {exc.start + 1}; it looks like {guess}); "
            f"convert the file: iconv -f CP1252 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}")


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def read_text(path: Path) -> str:
    """The whole file as one string (for formats parsed as one document: .json); errors name the line."""
    lines = []
    for line in text_lines(path):
        if line.problem:
            raise UserError(f"{path}:{line.number}: {line.problem}")
        lines.append(line.text)
    return "\n".join(lines)


def nul_problem(text: str) -> str | None:
    """A message when the text holds raw NUL characters (binary data, or UTF-16 read as UTF-8)."""
    at = text.find("\x00")
    if at < 0:
        return None
    return f"a raw NUL byte at column {at + 1} (binary data in a text file? write \\u0000 if you mean it)"


__all__ = ["Line", "check_regular_file", "logical_suffix", "open_data", "read_text", "split_lines", "text_lines"]
