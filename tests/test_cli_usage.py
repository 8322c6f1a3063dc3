"""Usage errors are short and point the way: subcommand usage, "did you mean", negative numbers, --version."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith import __version__
from tunesmith.cli import build_parser, reference_markdown
from tunesmith.cli_parse import fix_argv
from tunesmith.config import TrainConfig, options_of


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_negative_flags_say_what_the_flag_does() -> None:
    negated = [o for o in options_of(TrainConfig) if o.negated]
    assert {"fast_kernels", "report"} <= {o.name for o in negated}
    table = reference_markdown()
    for opt in negated:
        row = next(line for line in table.splitlines() if f"`{opt.flag}`" in line)
        assert "Do not " in row and "(on by default)" in row, row
        assert "(default: True)" not in row
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    help_text = " ".join(train.format_help().split())
    assert "--no-report Do not compare base and tuned model" in help_text


def test_negative_number_after_a_value_flag_is_a_value() -> None:
    parser = build_parser()
    assert fix_argv(["train", "--lr", "-1e-4", "--seed", "-3"], parser) == ["train", "--lr=-1e-4", "--seed=-3"]
    assert fix_argv(["train", "--resume", "-1e-4"], parser) == ["train", "--resume", "-1e-4"]  # takes no value


def test_negative_lr_gets_the_range_not_a_usage_dump() -> None:
    proc = run_cli("train", "--lr", "-1e-4", "--model", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tunesmith: --lr: invalid value for lr: -0.0001 (allowed: 0 < lr < 1)"


def test_unknown_train_flag_shows_train_usage_and_did_you_mean() -> None:
    proc = run_cli("train", "--learning-rate", "1e-4")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "usage: tunesmith train [options]"
    assert "did you mean --lr?" in lines[1] and "Hugging Face" in lines[1]
    assert len(lines) <= 3 and "Traceback" not in proc.stderr
    typo = run_cli("train", "--max-stps", "3")
    assert "did you mean --max-steps?" in typo.stderr and typo.returncode == 2


@pytest.mark.parametrize("args, usage", [
    (["train", "--epochs"], "usage: tunesmith train [options]"),
    (["data", "inspect"], "usage: tunesmith data inspect FILE [options]"),
    (["generate", "--bogus"], "usage: tunesmith generate [MODEL] [options]"),
])
def test_usage_errors_print_one_usage_line(args: list[str], usage: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == usage
    assert len(proc.stderr.splitlines()) <= 3


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tunesmith {__version__}"


def test_data_alone_describes_its_subcommand() -> None:
    proc = run_cli("data")
    assert proc.returncode == 2
    assert "inspect    show how a data file is read" in proc.stderr
    assert "show how a data file is read" in run_cli("data", "--help").stdout
