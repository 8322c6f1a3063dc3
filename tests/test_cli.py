"""The CLI contract: the README's reference table matches the parser; usage errors exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tunesmith.cli import build_parser, reference_markdown
from tunesmith.config import TrainConfig, options_of

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_cli_table_matches_parser() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- cli-reference:start -->\n", 1)[1].split("<!-- cli-reference:end -->", 1)[0]
    assert section == reference_markdown(), (
        "the CLI changed but README.md's reference table did not: run python3 scripts/update_readme_cli.py")


def test_train_help_lists_every_option_with_default() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    flat = " ".join(help_text.split())
    for opt in options_of(TrainConfig):
        assert opt.flag in flat, opt.flag
    negated = [o for o in options_of(TrainConfig) if o.negated]
    assert flat.count("(default:") >= len(options_of(TrainConfig)) - len(negated)
    assert flat.count("(on by default).") == len(negated)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_bad_option_value_exits_2_with_one_clear_line() -> None:
    proc = run_cli("train", "--lr", "5", "--model", "x")
    assert proc.returncode == 2
    assert "lr" in proc.stderr and "5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_flag_exits_2() -> None:
    proc = run_cli("train", "--no-such-flag")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_the_cuda_allocator_grows_segments_unless_the_user_configured_it() -> None:
    """`tunesmith` sets PyTorch's expandable segments (what the memory plan was measured with),
    and leaves either spelling of a user's own allocator setting alone."""
    from tunesmith.cli import ALLOCATOR_DEFAULT, set_allocator_default

    env: dict[str, str] = {}
    set_allocator_default(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_DEFAULT}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        mine = {name: "max_split_size_mb:128"}
        set_allocator_default(mine)
        assert mine == {name: "max_split_size_mb:128"}
