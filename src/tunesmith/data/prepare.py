"""The whole data side in one call: read -> validate -> template -> split -> tokenize -> pre-flight.

`prepare_data` is what training calls before it starts; `data inspect` runs the same
steps and checks. Pre-flight refuses to start (a `UserError` naming the fix) when
nothing would be learned, when the model would never learn to stop, or when training
and inference would render the assistant turn differently.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import DataOptions, DatasetSpec
from tunesmith.data.cache import cache_key, default_cache_dir, load_entry, save_entry
from tunesmith.data.conversation import Conversation
from tunesmith.data.mix import read_dataset, read_mix
from tunesmith.data.precut import char_budget, cut_overlong
from tunesmith.data.readers import ReadReport
from tunesmith.data.split import split_train_eval
from tunesmith.data.templates import choose_template, end_of_turn_ids
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample, TokenizeReport, tokenize_all
from tunesmith.errors import UserError

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "assets" / "examples" / "caps_tweets.jsonl"
MAX_LISTED = 20


@dataclass
class PreparedData:
    """Tokenized train/eval samples plus what training, evaluation and the report need."""

    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    eval_conversations: list[Conversation]  # the held-out conversations, for generation-based eval
    template: str
    end_of_turn_ids: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    cache_entry: Path | None = None  # where these samples are cached (an objective may keep more beside them)


def data_sources(options: DataOptions) -> list[DatasetSpec]:
    """The datasets to read: `options.data`, else the bundled example dataset."""
    if options.data:
        return list(options.data)
    if not EXAMPLE_DATA.is_file():
        raise UserError(f"the bundled example dataset is missing ({EXAMPLE_DATA}); pass --data FILE")
    return [DatasetSpec(str(EXAMPLE_DATA))]


def read_with_report(source: str, options: DataOptions, log: Callable[[str], None]) -> tuple[
        list[Conversation], ReadReport]:
    """One file read with the run's options; skipped rows are logged, never silent."""
    return read_dataset(DatasetSpec(source), options, log)


def prepare_data(options: DataOptions, tokenizer: Any, *, seed: int = 42, cache_dir: Path | None = None,
                 log: Callable[[str], None] = print,
                 check_kinds: Callable[[set[str], str], None] | None = None,
                 tokenize: Callable[[list[Conversation], Any, DataOptions], Any] | None = None) -> PreparedData:
    """Turn the configured data into checked, tokenized train/eval samples (cached on disk).

    Sets the chosen chat template on `tokenizer`, so saving the tokenizer with the model
    makes inference render exactly as training did. `check_kinds(kinds, source)` (the
    objective's `Recipe.check_data`) refuses data the objective cannot train on, right
    after reading and before anything is tokenized. `tokenize(convs, tokenizer, options)`
    (the objective's hook, e.g. preference pairs) replaces the one-sequence-per-sample tokenizer.
    """
    specs = data_sources(options)
    source = ", ".join(s.path for s in specs)
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    kind = f"{tokenize.__module__}.{tokenize.__qualname__}" if tokenize is not None else ""
    key = cache_key(options, tokenizer, [s.path for s in specs], seed, kind)
    if tokenize is None:
        def tokenize(convs: list[Conversation], tok: Any, opts: DataOptions) -> Any:
            return tokenize_fitting(convs, tok, opts, log)  # one sequence per sample (chat or text)
    template = choose_template(tokenizer, options.template)
    eot = end_of_turn_ids(tokenizer)
    cached = load_entry(directory, key)
    if cached is not None:
        train, evals, eval_convs, stats = cached
        log(f"data: {len(train)} train / {len(evals)} eval samples (cached: {directory / key})")
        return PreparedData(train, evals, eval_convs, template, eot, stats, directory / key)
    convs, mix = read_mix(specs, options, seed, log)
    report = mix.combined()
    if check_kinds is not None:
        check_kinds({c.kind for c in convs}, source)
    if options.eval_data:
        train_convs, eval_convs = convs, read_with_report(options.eval_data, options, log)[0]
    else:
        train_convs, eval_convs = split_train_eval(convs, options.test_split, seed)
    train, train_report = tokenize(train_convs, tokenizer, options)
    evals, eval_report = tokenize(eval_convs, tokenizer, options)
    has_chat = any(c.kind in ("chat", "preference") for c in train_convs)
    preflight(train, train_report, eval_report, eot, options, log, has_chat)
    stats = data_stats(report, train_report, eval_report, options.max_length)
    stats.update(template=template, end_of_turn_ids=eot, source=source, datasets=mix.as_stats())
    save_entry(directory, key, train, evals, eval_convs, stats)
    for line in mix.lines():
        log(f"data: {line}")
    log(f"data: {len(train)} train / {len(evals)} eval samples from {source} (format {report.format}, "
        f"template {template}); {stats['trained_share']:.0%} of tokens trained")
    for line in train_report.notices():
        log(line)
    if train_report.truncated:
        log(f"warning: {train_report.truncated} samples longer than --max-length {options.max_length} "
            "were truncated")
    return PreparedData(train, evals, eval_convs, template, eot, stats, directory / key)


def tokenize_fitting(convs: list[Conversation], tokenizer: Any, options: DataOptions,
                     log: Callable[[str], None], skip_invalid: bool | None = None,
                     ) -> tuple[list[TokenizedSample], TokenizeReport]:
    """`tokenize_all`, after cutting samples far over --max-length (`data.precut`), which is logged.

    `skip_invalid` (default: the option) lists samples the template cannot train in the report
    instead of refusing them (`data inspect` shows them).
    """
    convs, cut = cut_overlong(convs, tokenizer, options.max_length)
    if cut:
        log(f"warning: {cut} samples have over {char_budget(tokenizer, options.max_length):,} characters, more "
            f"than --max-length {options.max_length} tokens can hold: cut to that before tokenizing, then "
            "truncated (counted below)")
    return tokenize_all(convs, tokenizer, options.max_length, options.train_on_prompt,
                        fold_system=options.fold_system,
                        skip_invalid=options.skip_invalid if skip_invalid is None else skip_invalid)


def preflight(train: list[TokenizedSample], report: TokenizeReport, eval_report: TokenizeReport,
              eot: list[int], options: DataOptions, log: Callable[[str], None], has_chat: bool = True) -> None:
    """Refuse to train, naming the fix, when the data would teach nothing or teach the wrong thing."""
    dropped = report.dropped + eval_report.dropped
    if dropped and not options.skip_invalid:
        longest = max(report.lengths + eval_report.lengths, default=0)
        raise UserError(
            f"{len(dropped)} samples have no trained token left after truncation to --max-length "
            f"{options.max_length} (the longest sample has {longest} tokens)",
            dropped[:MAX_LISTED] + [f"fix: raise --max-length (e.g. {longest}), shorten those prompts, "
                                    "or pass --skip-invalid to skip them"])
    if dropped:
        log(f"warning: skipped {len(dropped)} samples with nothing left to train after truncation "
            f"(--skip-invalid); the first: {dropped[0]}")
    if not train:
        raise UserError("no training sample has a trained token",
                        ["fix: check --format / --columns (tunesmith data inspect FILE shows what is trained)"])
    if options.train_on_prompt or not has_chat:
        return  # text documents and --train-on-prompt train every token, end-of-turn included
    trained_eot = any(label in eot for s in train for label in s.labels if label != IGNORE_INDEX)
    if not trained_eot:
        raise UserError(
            "the end-of-turn token is never trained, so the model would not learn to stop "
            f"(end-of-turn ids: {eot})",
            ["fix: pick a template that closes assistant turns with an end-of-turn token: "
             "--template llama3 | chatml | zephyr | alpaca | plain (see tunesmith data inspect FILE)"])


def length_stats(lengths: list[int]) -> dict[str, int]:
    """min / median / p95 / max of token lengths (zeros for no samples)."""
    if not lengths:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"min": ordered[0], "median": int(statistics.median(ordered)), "p95": p95, "max": ordered[-1]}


def data_stats(read: ReadReport, train: TokenizeReport, evals: TokenizeReport, max_length: int) -> dict[str, Any]:
    """The numbers `data inspect` prints and training logs."""
    lengths = train.lengths + evals.lengths
    tokens = train.tokens + evals.tokens
    trained = train.trained_tokens + evals.trained_tokens
    return {
        "format": read.format,
        "rows_read": read.rows_read,
        "rows_invalid": read.rows_invalid,
        "train_samples": train.samples,
        "eval_samples": evals.samples,
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": trained / tokens if tokens else 0.0,
        "length": length_stats(lengths),
        "max_length": max_length,
        "over_max_length": sum(1 for n in lengths if n > max_length),
        "truncated": train.truncated + evals.truncated,
        "dropped": len(train.dropped) + len(evals.dropped),
        "chunked_documents": train.chunked_documents + evals.chunked_documents,
        "split_conversations": train.split_conversations + evals.split_conversations,
        "split_samples": train.split_samples + evals.split_samples,
        "folded_system": train.folded_system + evals.folded_system,
        "refused": len(train.refused) + len(evals.refused),
    }
