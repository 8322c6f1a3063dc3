"""argparse, made to answer a usage error the way a person needs: short, with the way out.

argparse's own answer to a typo is the whole usage of the command (18 lines for `train`)
and, for an unknown flag of a subcommand, the *top-level* usage. Here a usage error
prints the subcommand's one-line usage, the error, a "did you mean" for an unknown flag
(another tool's name such as `--learning-rate` included) and where the full help is; it
exits 2. Negative numbers in exponent form (`--lr -1e-4`) are taken as values, not as
flags, so the range check can say what is allowed.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn

NUMBER = re.compile(r"^-(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are short (argparse's documented hook: `error`)."""

    def error(self, message: str) -> NoReturn:
        """Print the one-line usage, the error and where help is; exit 2."""
        print(f"usage: {short_usage(self)}", file=sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        commands = subcommands(self)
        if commands:
            print("commands:", file=sys.stderr)
            for name, help_text in commands.items():
                print(f"  {name:10s} {help_text}", file=sys.stderr)
        print(f"(`{self.prog} --help` lists every option)", file=sys.stderr)
        sys.exit(2)


def short_usage(parser: argparse.ArgumentParser) -> str:
    """`tunesmith train [options]`: the program, its positionals, and [options]."""
    parts = [parser.prog]
    for action in parser._actions:  # argparse has no public accessor for the actions
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        name = action.metavar or action.dest.upper()
        parts.append(f"[{name}]" if action.nargs == "?" else str(name))
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        parts.append("COMMAND")
    return " ".join(parts) + " [options]"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The subcommands of `parser` with their one-line help (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def value_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, in `parser` and its subcommands, that takes a value."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out |= value_flags(child)
        elif action.option_strings and action.nargs is None and not isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                         argparse._VersionAction)):
            out.update(action.option_strings)
    return out


def fix_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--lr -1e-4` -> `--lr=-1e-4`: a negative number after a flag that takes a value is that value."""
    flags = value_flags(parser)
    out: list[str] = []
    for token in argv:
        if out and out[-1] in flags and NUMBER.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def did_you_mean(unknown: str, parser: argparse.ArgumentParser) -> str:
    """` (did you mean --lr?)` for an unknown flag: another tool's name for an option, or the closest flag."""
    from tunesmith.config_file import ALIASES

    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    name = unknown.split("=", 1)[0]
    key = name.lstrip("-").replace("-", "_").lower()
    alias = ALIASES.get(key)
    if alias is not None and alias.target is not None:
        flag = "--" + alias.target.replace("_", "-")
        if flag in flags:
            return f" (did you mean {flag}? {key} is {alias.note})"
    bare = {f.lstrip("-"): f for f in flags}
    close = difflib.get_close_matches(name.lstrip("-"), list(bare), n=1, cutoff=0.7)
    return f" (did you mean {bare[close[0]]}?)" if close else ""


def usage_error(parser: argparse.ArgumentParser, extras: list[str]) -> NoReturn:
    """Unrecognized arguments, reported by the subcommand they were given to."""
    first = next((e for e in extras if e.startswith("-")), extras[0])
    word = "argument" if len(extras) == 1 else "arguments"
    parser.error(f"unrecognized {word}: {' '.join(extras)}{did_you_mean(first, parser)}")
