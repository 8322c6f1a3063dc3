"""Rewrite the CLI reference table in README.md from the parser (run after changing an option)."""
from __future__ import annotations

from pathlib import Path

from tunesmith.cli import reference_markdown

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def main() -> None:
    """Replace the text between the README's two markers with the generated table."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{reference_markdown()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
