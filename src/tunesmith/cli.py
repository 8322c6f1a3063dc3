"""The `tunesmith` command: subcommands registered in one table; each only parses and calls.

The flags of `train` are derived from `tunesmith.config.TrainConfig`, so adding a field
there adds the flag, the YAML key and its `--help` line at once. Exit codes: 0 ok,
2 bad input or usage (a `UserError`: one clear line per problem, no traceback),
1 only for a genuine internal error.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from tunesmith import __version__
from tunesmith.cli_parse import Parser, fix_argv, usage_error
from tunesmith.config import (DataOptions, Option, TrainConfig, build_config, options_of, read_options_file,
                              starter_defaults, train_config)
from tunesmith.config_file import describe_settings, setting_origins
from tunesmith.errors import UserError
from tunesmith.train.files import MERGED_DIR


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per leaf option of the config dataclass `cls`; the help says what the flag does."""
    for opt in options_of(cls):
        if opt.name in skip:
            continue
        if opt.type is bool:
            action = "store_false" if opt.negated else "store_true"
            parser.add_argument(opt.flag, dest=opt.name, action=action, default=None, help=opt.flag_help)
        elif typing.get_origin(opt.type) is list:  # repeatable: --data a.jsonl --data b.csv
            parser.add_argument(opt.flag, dest=opt.name, action="append", default=None, metavar=opt.name.upper(),
                                help=opt.flag_help)
        else:
            parser.add_argument(opt.flag, dest=opt.name, type=opt.type, default=None, metavar=opt.name.upper(),
                                help=opt.flag_help)


def gather(cls: type, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of the `--config` file (if any) overridden by the flags given, and where each came from.

    Where: `FILE:LINE` for a config key, the flag for a flag. Alias notices of the file
    (`learning_rate read as lr`) are printed here, once.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if getattr(args, "config", None):
        read = read_options_file(args.config, cls)
        for line in read.notices:
            print(f"tunesmith: {line}", file=sys.stderr)
        values.update(read.values)
        sources.update({name: read.where(name) for name in read.values})
    for opt in options_of(cls):
        given = getattr(args, opt.name, None)
        if given is not None:
            values[opt.name] = given
            sources[opt.name] = opt.flag
    return values, sources


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Defaults, then the YAML file of `--config`, then the flags that were given."""
    return build_config(cls, *gather(cls, args))


# --------------------------------------------------------------------------------------
# train


def add_train(parser: argparse.ArgumentParser) -> None:
    """Flags of `tunesmith train`: every TrainConfig option, plus --config."""
    parser.add_argument("--config", metavar="RUN.YAML", help="YAML file of options (flags win)")
    add_options(parser, TrainConfig)


def run_train(args: argparse.Namespace) -> int:
    """Fine-tune, print the summary and where the output went."""
    values, sources = gather(TrainConfig, args)
    config = train_config(values, sources)  # validate before the heavy imports
    from tunesmith.model.load import resolve_model_name

    resolve_model_name(config.model.model)  # a mistyped model path is refused before anything else
    starter = set(starter_defaults(values))
    print(describe_settings(config, sources, starter), file=sys.stderr)
    from tunesmith.train.distributed import launch, under_torchrun

    if config.distributed.gpus > 1 and not under_torchrun():
        return launch(config.distributed.gpus, args.argv)
    from tunesmith.train.api import finetune

    _quiet_transformers()
    result = finetune(config, origins=setting_origins(config, sources, starter))
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 speaks for the run
    print(f"output: {result.output_dir}")
    if config.method.merge:  # the recipe refuses --merge without an adapter
        print(f"merged: {result.output_dir / MERGED_DIR}")
    return 0


# --------------------------------------------------------------------------------------
# data inspect


def add_data(parser: argparse.ArgumentParser) -> None:
    """`tunesmith data inspect FILE`: rendered samples with trained spans, and stats."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND", title="commands")
    what = "show how a data file is read: rendered samples, the trained tokens marked, and stats"
    inspect_p = sub.add_parser("inspect", help=what, description=what)
    inspect_p.add_argument("data", metavar="FILE", nargs="+", help="data file(s) or hub dataset id(s); several: a mix")
    inspect_p.add_argument("--model", default=None, help="tokenizer to use (default: the bundled starter)")
    inspect_p.add_argument("--samples", type=int, default=3, help="how many samples to show (default: 3)")
    inspect_p.add_argument("--stats", action="store_true", help="also time tokenization (samples/s)")
    add_options(inspect_p, DataOptions, skip=("data", "test_split", "eval_data"))


def run_data(args: argparse.Namespace) -> int:
    """Run `data inspect`."""
    from tunesmith.data.inspect import inspect_data

    options = config_from_args(DataOptions, args)
    inspect_data(options, model=args.model, samples=args.samples, time_it=args.stats)
    return 0


# --------------------------------------------------------------------------------------
# generate, chat


def _sampling_from_args(args: argparse.Namespace) -> Any:
    """The SamplingOptions of the flags that were given (validated)."""
    from tunesmith.infer.sampling import SamplingOptions

    return config_from_args(SamplingOptions, args)


def _quiet_transformers() -> None:
    """No loading bars or advisory warnings from transformers in inference output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices meant for developers


def add_generate(parser: argparse.ArgumentParser) -> None:
    """`tunesmith generate MODEL --prompt TEXT | --prompts FILE` and the sampling flags."""
    from tunesmith.infer.sampling import SamplingOptions

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="hub id, local model directory or tunesmith output (default: the bundled starter)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt; the reply is streamed to stdout")
    source.add_argument("--prompts", metavar="FILE",
                        help="batch: .jsonl (string, {prompt} or {messages} per line) or one prompt per line; "
                             "JSONL results on stdout")
    parser.add_argument("--system", default=None, help="system prompt (chat models)")
    parser.add_argument("--raw", action="store_true",
                        help="use the prompt as is, without the chat template (automatic for base models)")
    add_options(parser, SamplingOptions)


def run_generate(args: argparse.Namespace) -> int:
    """Stream one reply, or write one JSONL result per prompt of a file."""
    import json

    sampling = _sampling_from_args(args)
    from tunesmith.infer.generate import generate_batch, load, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None  # bad files fail before loading
    _quiet_transformers()
    model = load(args.model, light=True)  # the starter and plain Llama dirs skip transformers' model code
    model.sampling = sampling
    if prompts is None:
        for piece in model.stream(args.prompt, raw=args.raw, system=args.system):
            print(piece, end="", flush=True)
        print()
        return 0
    results = generate_batch(model.model, model.tokenizer, prompts, sampling, raw=args.raw, system=args.system)
    for prompt, result in zip(prompts, results):
        print(json.dumps({"prompt": prompt, "completion": result.text, "stopped": result.stopped},
                         ensure_ascii=False), flush=True)
    return 0


def add_chat(parser: argparse.ArgumentParser) -> None:
    """`tunesmith chat MODEL [--system TEXT]` and the sampling flags."""
    from tunesmith.infer.sampling import SamplingOptions

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="hub id, local model directory or tunesmith output (default: the bundled starter)")
    parser.add_argument("--system", default=None, help="system prompt (change it later with /system TEXT)")
    add_options(parser, SamplingOptions)


def run_chat(args: argparse.Namespace) -> int:
    """The chat REPL: /reset /system TEXT /save FILE /quit."""
    sampling = _sampling_from_args(args)
    from tunesmith.infer.chat import Chat, repl
    from tunesmith.infer.generate import load

    _quiet_transformers()
    loaded = load(args.model, light=True)
    loaded.sampling = sampling
    repl(Chat(loaded, system=args.system))
    return 0


# --------------------------------------------------------------------------------------
# eval


def add_eval(parser: argparse.ArgumentParser) -> None:
    """`tunesmith eval MODEL [--data FILE] [--compare BASE] [--report report.html]`."""
    from tunesmith.eval.options import EvalOptions

    parser.add_argument("model", metavar="MODEL", help="hub id, local model directory or tunesmith output")
    add_options(parser, EvalOptions)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate (and compare), print the metric table and where the report went."""
    from tunesmith.eval.options import EvalOptions

    options = config_from_args(EvalOptions, args)
    from tunesmith.eval.report import base_model_name, evaluate, short_name, summary_text

    _quiet_transformers()
    result = evaluate(args.model, **vars(options))
    base = short_name(base_model_name(args.model, options.compare)) if options.compare else None
    print(summary_text(result, (short_name(args.model), base)))
    if result["report"]:
        print(f"report: {result['report']['html']} (and {result['report']['md']})")
    return 0


# --------------------------------------------------------------------------------------
# export, push


def add_export(parser: argparse.ArgumentParser) -> None:
    """`tunesmith export MODEL [--to merged|gguf|ollama] [--quant ...] [--output DIR]`."""
    from tunesmith.export.options import ExportOptions

    parser.add_argument("model", metavar="MODEL", help="tunesmith output, local model directory or hub id")
    add_options(parser, ExportOptions)


def run_export(args: argparse.Namespace) -> int:
    """Export, then list the files written (with sizes), the time taken and the command to run next."""
    from tunesmith.export.options import ExportOptions

    options = config_from_args(ExportOptions, args)
    from tunesmith.export.api import export_model

    _quiet_transformers()
    for line in export_model(args.model, **vars(options)).lines():
        print(line)
    return 0


# --------------------------------------------------------------------------------------
# plan


def add_plan(parser: argparse.ArgumentParser) -> None:
    """`tunesmith plan --model M [--gpu-memory 24GB] [--data FILE]`."""
    from tunesmith.train.plan_report import PlanOptions

    add_options(parser, PlanOptions)


def run_plan(args: argparse.Namespace) -> int:
    """Print the memory plan: per method, what fits and the largest token budget; then a command line."""
    from tunesmith.train.plan_report import PlanOptions, run_plan as plan_lines

    options = config_from_args(PlanOptions, args)
    for line in plan_lines(options):
        print(line)
    return 0


def add_push(parser: argparse.ArgumentParser) -> None:
    """`tunesmith push MODEL --repo USER/NAME [--private] [--merged]`."""
    from tunesmith.export.options import PushOptions

    parser.add_argument("model", metavar="MODEL", help="tunesmith output directory")
    add_options(parser, PushOptions)


def run_push(args: argparse.Namespace) -> int:
    """Upload with a generated model card; print the repository URL."""
    from tunesmith.export.options import PushOptions

    options = config_from_args(PushOptions, args)
    from tunesmith.export.hub import push_model

    _quiet_transformers()
    print(f"pushed: {push_model(args.model, **vars(options))}")
    return 0


# --------------------------------------------------------------------------------------
# The table. Each entry: name -> (help, add_arguments, run).

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "train": ("fine-tune a model on your data", add_train, run_train),
    "data": ("inspect how your data is read, rendered and masked", add_data, run_data),
    "generate": ("generate a reply to a prompt (or a file of prompts)", add_generate, run_generate),
    "chat": ("chat with a model in the terminal", add_chat, run_chat),
    "eval": ("measure a model on held-out data, and compare it with its base", add_eval, run_eval),
    "export": ("export a model: merged weights, GGUF for llama.cpp, or GGUF + Modelfile for Ollama",
               add_export, run_export),
    "push": ("upload a model to the Hugging Face Hub with a generated model card", add_push, run_push),
    "plan": ("what fits in GPU memory, per method, from the model's config alone (no weights)", add_plan, run_plan),
}


def build_parser() -> argparse.ArgumentParser:
    """The whole parser, built from `COMMANDS`."""
    parser = Parser(prog="tunesmith", description="Fine-tune open language models on your own data.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (help_text, add, _run) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subcommands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def reference_markdown() -> str:
    """The CLI reference table kept in README.md (a test checks that the two agree)."""
    rows = ["| command | flag | what it does |", "|---|---|---|"]

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = ", ".join(action.option_strings) or (action.metavar or action.dest).upper()
            help_text = (action.help or "").replace("|", "\\|")
            rows.append(f"| {prefix} | `{flag}` | {help_text} |")
        for name, child in _subparsers(parser).items():
            walk(f"{prefix} {name}", child)

    for name, child in _subparsers(build_parser()).items():
        walk(name, child)
    return "\n".join(rows) + "\n"


ALLOCATOR_DEFAULT = "expandable_segments:True"


def set_allocator_default(env: Any = os.environ) -> None:
    """PyTorch's CUDA allocator grows segments in place instead of caching fixed-size blocks,
    unless the user configured it: a step's activations of varying row lengths then leave
    little reserved-but-unused memory (what fragmentation OOMs are made of), which is what the
    memory plan's estimate assumes. Set before torch starts CUDA, which reads it once; Linux
    only (elsewhere PyTorch does not support it and warns)."""
    if sys.platform.startswith("linux") and not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(env):
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    set_allocator_default()
    parser = build_parser()
    args, extras = parser.parse_known_args(fix_argv(sys.argv[1:] if argv is None else list(argv), parser))
    if extras:
        usage_error(command_parser(parser, args), extras)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for a relaunch under torchrun
    try:
        return COMMANDS[args.command][2](args)
    except UserError as exc:
        for line in exc.lines():
            print(f"tunesmith: {line}" if line is exc.lines()[0] else f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that was given (`data inspect` -> its own), for its usage."""
    for attr in ("command", "data_command"):
        child = _subparsers(parser).get(getattr(args, attr, None) or "")
        if child is None:
            break
        parser = child
    return parser


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["COMMANDS", "Option", "add_options", "build_parser", "config_from_args", "main"]
