"""`tunesmith data inspect FILE`: see exactly what the model will be trained on.

Shows the first samples as the chat template renders them, with the trained tokens
highlighted (colours on a terminal, `[[...]]` markers when piped), then the numbers that
catch mistakes early: rows read/invalid, token lengths, the share of tokens trained, how
many samples exceed --max-length, how many conversations were split per turn or had their
system prompt folded, and which samples are refused (FILE:LINE, turn, reason); and runs the
same pre-flight checks as training. Preference data (prompt/chosen/rejected) is shown pair by
pair, as DPO and ORPO train it (`data.inspect_pairs`).
"""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunesmith.config import DataOptions
from tunesmith.data.conversation import Conversation
from tunesmith.data.mix import read_mix
from tunesmith.data.prepare import data_sources, data_stats, length_stats, preflight, tokenize_fitting
from tunesmith.data.readers import ReadReport
from tunesmith.data.templates import choose_template, end_of_turn_ids
from tunesmith.data.tokenize import IGNORE_INDEX, MAX_LISTED, TokenizedSample, TokenizeReport
from tunesmith.errors import UserError

TRAINED_STYLE = "bold black on green"
PROMPT_STYLE = "grey62"
SPECIAL_STYLE = "magenta"


def inspect_data(options: DataOptions, model: str | None, samples: int = 3, time_it: bool = False,
                 console: Console | None = None) -> dict[str, Any]:
    """Print rendered samples with trained spans marked, then stats; return the stats.

    Raises `UserError` (after printing) when a pre-flight check would refuse training.
    """
    console = console or Console(highlight=False, soft_wrap=True)
    messages: list[str] = []
    convs, mix = read_mix(data_sources(options), options, 0, messages.append)  # before torch loads
    read_report = mix.combined()
    from tunesmith.model.load import load_tokenizer  # imports torch: only once the data is known to be good

    tokenizer = load_tokenizer(model)
    template = choose_template(tokenizer, options.template)
    eot = end_of_turn_ids(tokenizer)
    pairs = bool(convs) and all(c.kind == "preference" for c in convs)
    print_header(console, tokenizer, template, eot, read_report.format, mix.lines())
    if pairs:  # what --objective dpo / orpo train: prompt, chosen and rejected of each pair
        from tunesmith.data.inspect_pairs import inspect_pairs

        for line in messages:
            console.print(Text(line, style="yellow"))
        stats = inspect_pairs(console, tokenizer, convs, read_report, options, samples, eot)
        stats["datasets"] = mix.as_stats()
        return stats
    convs = [_as_chat(c) for c in convs]
    start = time.perf_counter()
    tokenized, report = tokenize_fitting(convs, tokenizer, options, messages.append, skip_invalid=True)
    seconds = time.perf_counter() - start
    for line in messages + [n for n in report.notices() if n.startswith("note:")]:  # refusals: below
        console.print(Text(line, style="yellow"))
    for sample in tokenized[:samples]:
        print_sample(console, tokenizer, sample)
    _print_refusals(console, report, options)
    stats = data_stats(read_report, report, TokenizeReport(), options.max_length)
    stats["datasets"] = mix.as_stats()
    if time_it:
        stats["samples_per_second"] = len(convs) / seconds if seconds > 0 else float("inf")
    console.print(stats_table(stats, read_report, console))
    problems: list[str] = []
    try:
        preflight(tokenized, report, TokenizeReport(), eot, options, problems.append,
                  any(c.kind == "chat" for c in convs))
    except UserError as exc:
        console.print(Text("pre-flight: FAILED (training would refuse to start)", style="bold red"))
        raise exc
    for line in problems:
        console.print(Text(line, style="yellow"))
    console.print(Text("pre-flight: ok", style="bold green"))
    return stats


def print_header(console: Console, tokenizer: Any, template: str, eot: list[int], data_format: str,
                 dataset_lines: list[str]) -> None:
    """The template, end-of-turn token(s) and format; each dataset's line; the legend of the markup."""
    console.print(Text.assemble(("template: ", "bold"), template, ("  end of turn: ", "bold"),
                                ", ".join(tokenizer.convert_ids_to_tokens(eot)), ("  format: ", "bold"),
                                data_format))
    for line in dataset_lines:  # each dataset: rows, format and which column was read as what
        console.print(Text.assemble(("data: ", "bold"), line))
    if console.is_terminal and not console.no_color:
        console.print(Text.assemble(("trained", TRAINED_STYLE), "  ", ("context only", PROMPT_STYLE), "  ",
                                    ("special token", SPECIAL_STYLE)))
    else:
        console.print(Text("trained tokens (the loss) are shown between double square brackets"))


def _print_refusals(console: Console, report: TokenizeReport, options: DataOptions) -> None:
    """Samples that cannot be trained as inference renders them: each with its FILE:LINE, turn and reason.

    Raises the training error (after printing) unless --skip-invalid would skip them.
    """
    if not report.refused:
        return
    verdict = "skipped (--skip-invalid)" if options.skip_invalid else "training would refuse to start"
    console.print(Text(f"refused: {len(report.refused)} samples cannot be trained the way inference renders them "
                       f"({verdict}):", style="bold red"))
    for refusal in report.refused[:MAX_LISTED]:
        console.print(Text(f"  {refusal}", style="red"))
        for hint in refusal.problems:
            console.print(Text(f"    {hint}", style="red"))
    if not options.skip_invalid:
        raise UserError(f"{len(report.refused)} samples cannot be trained the way inference renders them",
                        [str(r) for r in report.refused[:MAX_LISTED]])


def _as_chat(conv: Conversation) -> Conversation:
    """A preference pair mixed into other data is shown as prompt + chosen reply (pure preference data is
    shown pair by pair, `data.inspect_pairs`)."""
    if conv.kind != "preference":
        return conv
    return Conversation(turns=conv.turns + list(conv.chosen or []), source=f"{conv.source} (chosen)")


def spans(sample: TokenizedSample) -> list[tuple[list[int], bool]]:
    """Runs of consecutive tokens that are all trained or all not: [(ids, trained)]."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def render_marked(tokenizer: Any, sample: TokenizedSample, colour: bool) -> Text:
    """The sample's text; trained runs highlighted (colour) or wrapped in [[...]] (plain)."""
    text = Text()
    for ids, trained in spans(sample):
        piece = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not colour:
            text.append(f"[[{piece}]]" if trained else piece)
        elif trained:  # make newlines inside trained spans visible
            text.append(piece.replace("\n", "↵\n"), style=TRAINED_STYLE)
        else:
            text.append(piece, style=PROMPT_STYLE)
    if colour:
        for token in _special_strings(tokenizer):
            text.highlight_words([token], style=SPECIAL_STYLE)
    return text


def _special_strings(tokenizer: Any) -> list[str]:
    """The added/special token strings (template control tokens), to make them stand out."""
    return sorted({str(t) for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)


def print_sample(console: Console, tokenizer: Any, sample: TokenizedSample) -> None:
    """One sample: a header line, then its marked-up rendering."""
    colour = console.is_terminal and not console.no_color
    head = f"── {sample.source} · {len(sample.input_ids)} tokens, {sample.num_trained} trained "
    console.print(Text(head + "─" * max(0, 60 - len(head)), style="bold cyan"))
    console.print(render_marked(tokenizer, sample, colour))
    if not colour:
        console.print("")


def stats_table(stats: dict[str, Any], read_report: ReadReport, console: Console) -> Table:
    """The stats as a two-column table."""
    table = Table(title="data", show_header=False, title_justify="left", box=None, padding=(0, 2))
    length = stats["length"]
    rows = [
        ("rows read", f"{stats['rows_read']:,}"),
        ("rows invalid", f"{stats['rows_invalid']:,}" + (" (skipped)" if stats["rows_invalid"] else "")),
        ("samples", f"{stats['train_samples']:,}"),
        ("tokens per sample", f"min {length['min']} · median {length['median']} · p95 {length['p95']} · "
                              f"max {length['max']}"),
        ("tokens trained", f"{stats['trained_share']:.1%} ({stats['trained_tokens']:,} of {stats['tokens']:,})"),
        (f"over --max-length {stats['max_length']}", f"{stats['over_max_length']:,}" + _over_note(stats)),
    ]
    if stats["split_conversations"]:
        rows.append(("split per turn", f"{stats['split_conversations']:,} conversations -> {stats['split_samples']:,} "
                                       "samples (the template renders history differently)"))
    if stats["folded_system"]:
        rows.append(("system prompt folded", f"{stats['folded_system']:,} samples (the template has no system role)"))
    if stats["refused"]:
        rows.append(("refused", f"{stats['refused']:,} samples (see above)"))
    if stats["dropped"]:
        rows.append(("nothing left to train", f"{stats['dropped']:,} samples"))
    if "samples_per_second" in stats:
        rows.append(("tokenize speed", f"{stats['samples_per_second']:,.0f} samples/s"))
    for name, value in rows:
        table.add_row(Text(name, style="bold"), value)
    return table


def _over_note(stats: dict[str, Any]) -> str:
    """What happens to the samples over --max-length."""
    if stats["chunked_documents"]:
        return " (documents: split into chunks)"
    return " (truncated)" if stats["over_max_length"] else ""


__all__ = ["inspect_data", "length_stats", "render_marked", "spans"]
