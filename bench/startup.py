"""Startup time of the CLI: seconds to the first byte of output, and the heaviest imports.

    python bench/startup.py            # 3 runs each of --help, data inspect, generate (starter, offline)
    python bench/startup.py --runs 5
    python bench/startup.py --src /tmp/old/src   # another checkout's sources (before/after)

Each command runs as a fresh subprocess (`python -m tunesmith.cli ...`, offline); the
clock stops at the first byte on stdout or stderr, which is what a user waits for. The
median and the minimum of the runs (the minimum is the one to compare on a shared machine)
are printed with the machine's CPU count, then the five slowest
top-level imports of each command from `python -X importtime` (self + children, ms).
A benchmark, not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import re
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = [ROOT / "src"]  # the sources measured (--src)
EXAMPLE = ROOT / "src" / "tunesmith" / "assets" / "examples" / "chat.jsonl"
COMMANDS = {
    "--help": ["--help"],
    "data inspect": ["data", "inspect", str(EXAMPLE), "--samples", "1"],
    "generate": ["generate", "--prompt", "Hello", "--max-new-tokens", "4", "--greedy"],
}


def environment() -> dict[str, str]:
    """Offline, with this checkout's sources first on the path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC[0]), env.get("PYTHONPATH", "")])
    return env


def first_output_seconds(args: list[str]) -> tuple[float, float]:
    """(seconds to the first output byte, seconds to exit) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment())
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]
    first: float | None = None
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
            elif first is None:
                first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}")
    return (first if first is not None else total), total


def slowest_imports(args: list[str], top: int = 5) -> list[tuple[str, float]]:
    """The `top` slowest top-level imports (cumulative ms) of one run under `-X importtime`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunesmith.cli", *args],
                          capture_output=True, text=True, env=environment(), check=False)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # depth 0: imported by tunesmith or the interpreter itself
            rows.append((m.group(3), int(m.group(1)) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    """Print the median time to first output and to exit, and the slowest imports, per command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--src", type=Path, default=SRC[0], help="the src/ directory to measure")
    opts = parser.parse_args()
    SRC[0] = opts.src.resolve()
    print(f"{SRC[0]}: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    for name, args in COMMANDS.items():
        runs = [first_output_seconds(args) for _ in range(opts.runs)]
        first = statistics.median(r[0] for r in runs)
        total = statistics.median(r[1] for r in runs)
        print(f"{name:14s} first output {first:5.2f} s (min {min(r[0] for r in runs):5.2f})   "
              f"exit {total:5.2f} s (min {min(r[1] for r in runs):5.2f})")
        for module, ms in slowest_imports(args):
            print(f"    {module:28s} {ms:8.0f} ms")


if __name__ == "__main__":
    main()
