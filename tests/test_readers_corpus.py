"""The input corpus (tests/inputs/gen.py) through the library: every case read exactly, or refused exactly.

A refusal must be a `UserError` (exit 2 on the CLI) whose text holds the expected
`FILE:LINE: ...`; any other exception is a failure. Cases with `skipped` are read again
with skip_invalid and must keep and count exactly those rows.
"""
from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

from inputs.gen import CASES, Case
from tunesmith.data.readers import read_conversations
from tunesmith.errors import UserError

HAS_ZSTD = importlib.util.find_spec("zstandard") is not None


def usable(case: Case) -> bool:
    """Whether this machine can build the case's input."""
    if case.needs == "zstandard":
        return HAS_ZSTD
    if case.needs == "no-zstandard":
        return True  # the test hides the library when it is installed
    if case.needs == "unix":
        return sys.platform != "win32"
    return True


def read_within(path: Path, seconds: int, **options: object) -> tuple[list, object]:
    """read_conversations, failing the test (not hanging it) past `seconds`."""
    def timeout(*_: object) -> None:
        raise TimeoutError(f"reading {path} took over {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        return read_conversations(str(path), **options)  # type: ignore[arg-type]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not usable(case):
        pytest.skip(f"needs {case.needs}")
    if case.needs == "no-zstandard":
        monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    path = case.write(tmp_path)
    if case.error is None:
        convs, report = read_within(path, 30, **case.options)
        assert len(convs) == case.rows and report.rows_invalid == 0
        assert all(c.source.startswith(f"{path}:") for c in convs)
        assert case.check is None or case.check(convs)
        return
    with pytest.raises(UserError) as err:
        read_within(path, 30, **case.options)
    text = "\n".join(err.value.lines())
    assert case.error.format(path=path) in text, text
    if case.skipped is not None:
        convs, report = read_within(path, 30, skip_invalid=True, **case.options)
        kept, invalid = case.skipped
        assert (len(convs), report.rows_invalid) == (kept, invalid)
        assert case.error.format(path=path) in "\n".join(report.problems)
