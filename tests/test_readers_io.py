"""Reading under failure: unreadable, vanishing and swapped files, I/O errors mid-read; the cut before tokenizing."""
from __future__ import annotations

import copy
import errno
import io
import json
import os
import random
from pathlib import Path

import pytest

import tunesmith.data.rawfile as rawfile
from tunesmith.config import DataOptions
from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.precut import char_budget, cut_overlong
from tunesmith.data.prepare import tokenize_fitting
from tunesmith.data.readers import read_conversations, read_rows
from tunesmith.data.tokenize import tokenize_all
from tunesmith.errors import UserError


def qa_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(n)))
    return path


def failing_open(error: OSError):
    real = os.open

    def fake(path: object, flags: int, *args: object) -> int:
        if str(path).endswith(".jsonl"):
            raise error
        return real(path, flags, *args)  # type: ignore[arg-type]
    return fake


@pytest.mark.parametrize("error,needle", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied (make it readable: chmod u+r"),
    (FileNotFoundError(errno.ENOENT, "No such file"), "the file disappeared before it could be read"),
    (OSError(errno.ENXIO, "No such device or address"), "is a socket"),
])
def test_open_failures_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError,
                                 needle: str) -> None:
    path = qa_file(tmp_path / "d.jsonl", 2)
    monkeypatch.setattr(rawfile.os, "open", failing_open(error))
    with pytest.raises(UserError, match=r"^" + str(path).replace("/", r"\/")) as err:
        read_conversations(str(path))
    assert needle in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = qa_file(tmp_path / "d.jsonl", 2)
    path.chmod(0)
    with pytest.raises(UserError, match="permission denied"):
        read_conversations(str(path))


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.jsonl"
    os.mkfifo(path)
    import tunesmith.data.readers as readers

    for module in (rawfile, readers):  # the race: the check saw a regular file
        monkeypatch.setattr(module, "check_regular_file", lambda p: None)
    with pytest.raises(UserError, match="not a regular file"):
        read_conversations(str(path))


def test_an_io_error_mid_read_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = qa_file(tmp_path / "d.jsonl", 50)
    monkeypatch.setattr(rawfile, "CHUNK", 64)
    real = rawfile.open_regular

    class Dying:
        """A file that fails with EIO after a few reads, like a disk or network share going away."""

        def __init__(self, inner: io.BufferedReader) -> None:
            self.inner, self.reads = inner, 0

        def read(self, n: int = -1) -> bytes:
            self.reads += 1
            if self.reads > 3:
                raise OSError(errno.EIO, "Input/output error")
            return self.inner.read(n)

        def seek(self, *args: int) -> int:
            return self.inner.seek(*args)

        def __enter__(self) -> "Dying":
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def close(self) -> None:
            self.inner.close()

    monkeypatch.setattr(rawfile, "open_regular", lambda p: Dying(real(p)))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="read failed mid-file .Input/output error.; did the file change"):
        read_conversations(str(path))


def test_a_file_deleted_while_open_is_still_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = qa_file(tmp_path / "d.jsonl", 30)
    real = rawfile.open_regular

    def open_then_delete(p: Path):
        stream = real(p)
        p.unlink(missing_ok=True)  # POSIX: the open file stays readable
        return stream

    monkeypatch.setattr(rawfile, "open_regular", open_then_delete)
    convs, _ = read_conversations(str(path))
    assert [c.turns[-1].content for c in convs] == [f"a{i}" for i in range(30)]


def test_read_rows_stays_strict_for_eval(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        list(read_rows(str(path)))
    assert err.value.problems[0].startswith(f"{path}:2: malformed JSON")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta,", "gamma.", "delta\n", " eta", "x"]) for _ in range(n))


@pytest.mark.parametrize("style", ["llama3_tokenizer", "chatml_tokenizer"])
def test_the_cut_before_tokenizing_changes_no_token_or_label(style: str, request: pytest.FixtureRequest) -> None:
    tokenizer = copy.deepcopy(request.getfixturevalue(style))
    rng = random.Random(0)
    convs = [Conversation(turns=[Turn("user", words(rng, rng.randint(1, 30))),
                                 Turn("assistant", words(rng, rng.randint(1, 3000))), Turn("user", "more"),
                                 Turn("assistant", words(rng, rng.randint(1, 3000)))], source=f"x:{i}")
             for i in range(120)]
    cut, n = cut_overlong(convs, tokenizer, 128)
    assert n > 100 and all(sum(len(t.content) for t in c.turns) <= char_budget(tokenizer, 128) + 3 for c in cut)
    plain, plain_report = tokenize_all(convs, tokenizer, 128)
    fast, fast_report = tokenize_fitting(convs, tokenizer, DataOptions(max_length=128), lambda _: None)
    assert len(plain) == len(fast) > 80 and plain_report.dropped == fast_report.dropped
    assert [(s.input_ids, s.labels) for s in plain] == [(s.input_ids, s.labels) for s in fast]


def test_a_20mb_reply_is_cut_not_tokenized_whole(llama3_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"question": "Summarize.", "answer": "word " * 4_000_000}) + "\n", encoding="utf-8")
    convs, _ = read_conversations(str(path))
    logged: list[str] = []
    samples, report = tokenize_fitting(convs, copy.deepcopy(llama3_tokenizer), DataOptions(max_length=256),
                                       logged.append)
    assert len(samples[0].input_ids) == 256 and report.truncated == 1 and samples[0].num_trained > 200
    assert "1 samples have over" in logged[0] and "cut to that before tokenizing" in logged[0]
