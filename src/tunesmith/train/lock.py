"""One run per output directory: a lock file naming the PID of the run that holds it.

Two runs writing the same `--output` would interleave checkpoints and overwrite each
other's weights. The lock is `OUTPUT/.tunesmith.lock` holding the owner's PID and host,
and an advisory `flock` on it (released by the kernel when the owner dies, even by
kill -9, and immune to PID reuse). A second run refuses, naming the first's PID; a lock
left by a dead run is taken over, and that is said once. The file is removed at the end.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from tunesmith.errors import UserError

LOCK_FILE = ".tunesmith.lock"


def _owner(path: Path) -> str:
    """What the lock file says about its holder (`PID 1234 on host`), or `unknown`."""
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
    except OSError:
        return "an unknown process"
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "unknown"


def _locked_fd(path: Path, output_dir: Path) -> int:
    """Open and flock the lock file; retry when the holder removed it between our open and flock."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise UserError(f"{output_dir}: another tunesmith run is writing here ({_owner(path)})",
                            ["wait for it to finish, stop it, or choose another --output"]) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its holder had just removed: take the new one


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold the lock of `output_dir` for the duration; refuse when another live run holds it.

    Under torchrun only rank 0 locks: the ranks of one run share its output directory.
    """
    if os.environ.get("RANK", "0") not in ("", "0"):
        yield
        return
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a directory (choose another --output)")
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    fd = _locked_fd(path, output_dir)
    try:
        previous = os.read(fd, 256).decode("utf-8", "replace").strip()
        if previous:
            print(f"note: {output_dir}: taking over the lock of PID {previous.split()[0]}, which is no longer "
                  "running", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)  # releases the flock
